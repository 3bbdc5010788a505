"""sse-starlette's common broadcast recipe: one ``asyncio.Queue`` per client.

The publisher serializes the data once and puts the same event dict on every client's
queue; each client's generator yields it and sse-starlette encodes it, once per client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from _control import EVENT_TYPE, ASGIApp, Payload, Publisher, control_app, dumps, run_asgi
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route


def build() -> ASGIApp:
    queues: list[asyncio.Queue[dict[str, str]]] = []

    async def events(request: Request) -> EventSourceResponse:
        async def stream() -> AsyncIterator[dict[str, str]]:
            queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
            queues.append(queue)
            try:
                while True:
                    yield await queue.get()
            finally:
                queues.remove(queue)

        return EventSourceResponse(stream())

    def publish(payload: Payload) -> None:
        event = {"event": EVENT_TYPE, "id": str(payload["seq"]), "data": dumps(payload)}
        for queue in queues:
            queue.put_nowait(event)

    def stats() -> dict[str, Any]:
        return {"subscribers": len(queues)}

    app = Starlette(routes=[Route("/events", events)])
    return control_app(app, Publisher(publish), stats)


def main(port: int) -> None:
    run_asgi(build(), port)
