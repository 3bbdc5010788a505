"""The Litestar test app: EventStream mounted at ``/events`` with ``@asgi(is_mount=True)``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar, asgi

from apps.asgi_support import (
    HEADERS,
    Control,
    authorize_async,
    broadcaster_from_env,
    channels_from_query,
    lifespan,
)
from ssecast.asgi import EventStream

broadcaster = broadcaster_from_env()

events = asgi("/events", is_mount=True)(
    EventStream(broadcaster, channels_from_query, authorize=authorize_async, headers=HEADERS)
)
control = asgi("/control", is_mount=True)(Control(broadcaster))


@contextlib.asynccontextmanager
async def app_lifespan(app: Litestar) -> AsyncIterator[None]:
    async with lifespan(broadcaster):
        yield


app = Litestar(route_handlers=[events, control], lifespan=[app_lifespan])
