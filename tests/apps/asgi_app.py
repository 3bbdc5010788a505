"""The bare ASGI test app: EventStream at ``/events/`` with no framework at all."""

from __future__ import annotations

from typing import Any

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
events = EventStream(broadcaster, channels_from_query, authorize=authorize, headers=HEADERS)
control = Control(broadcaster)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Route ``/events/`` and ``/control/``, and run the lifespan."""
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        async with lifespan(broadcaster):
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["path"].startswith("/events"):
        await events(scope, receive, send)
    else:
        await control(scope, receive, send)
