"""The FastAPI test app: EventStream mounted at ``/events``, sync authorization."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from apps.asgi_support import (
    HEADERS,
    Control,
    authorize,
    broadcaster_from_env,
    channels_from_query,
    lifespan,
)
from ssecast.asgi import EventStream

broadcaster = broadcaster_from_env()


@contextlib.asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with lifespan(broadcaster):
        yield


app = FastAPI(lifespan=app_lifespan)
app.mount(
    "/events", EventStream(broadcaster, channels_from_query, authorize=authorize, headers=HEADERS)
)
app.mount("/control", Control(broadcaster))
