"""The Starlette test app: EventStream mounted at ``/events``, async authorization."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Mount

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


@contextlib.asynccontextmanager
async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
    async with lifespan(broadcaster):
        yield


app = Starlette(
    routes=[
        Mount(
            "/events",
            EventStream(
                broadcaster, channels_from_query, authorize=authorize_async, headers=HEADERS
            ),
        ),
        Mount("/control", Control(broadcaster)),
    ],
    lifespan=app_lifespan,
)
