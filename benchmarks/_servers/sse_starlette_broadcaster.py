"""sse-starlette with the ``broadcaster`` package: ``Broadcast("memory://")``.

Each client subscribes on its own and gets its own queue; the package fans out by awaiting
``queue.put`` for each of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from _control import (
    CHANNEL,
    EVENT_TYPE,
    ASGIApp,
    Payload,
    Publisher,
    control_app,
    dumps,
    run_asgi,
)
from broadcaster import Broadcast
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route


def build() -> ASGIApp:
    broadcast = Broadcast("memory://")
    subscribers = 0

    async def events(request: Request) -> EventSourceResponse:
        async def stream() -> AsyncIterator[dict[str, str]]:
            nonlocal subscribers
            async with broadcast.subscribe(channel=CHANNEL) as subscriber:
                subscribers += 1
                try:
                    async for event in subscriber:  # type: ignore[union-attr]
                        yield {"event": EVENT_TYPE, "data": event.message}
                finally:
                    subscribers -= 1

        return EventSourceResponse(stream())

    async def publish(payload: Payload) -> None:
        await broadcast.publish(channel=CHANNEL, message=dumps(payload))

    def stats() -> dict[str, Any]:
        return {"subscribers": subscribers}

    app = Starlette(routes=[Route("/events", events)])
    return control_app(app, Publisher(publish), stats, on_startup=broadcast.connect)


def main(port: int) -> None:
    run_asgi(build(), port)
