"""The Quart test app: a dispatcher sends ``/events`` and ``/control`` past Quart."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from quart import Quart

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
quart_app = Quart(__name__)
events = EventStream(broadcaster, channels_from_query, authorize=authorize, headers=HEADERS)
control = Control(broadcaster)


@quart_app.get("/")
async def index() -> str:
    return "quart"


@quart_app.while_serving
async def close_streams_on_stop() -> AsyncGenerator[None, None]:
    async with lifespan(broadcaster):
        yield


async def app(scope: Any, receive: Any, send: Any) -> None:
    path = scope.get("path", "")
    if scope["type"] == "http" and path.startswith("/events"):
        await events(scope, receive, send)
    elif scope["type"] == "http" and path.startswith("/control"):
        await control(scope, receive, send)
    else:
        await quart_app(scope, receive, send)
