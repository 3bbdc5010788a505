"""The ASGI floor: a bare ASGI app that sends each pre-encoded frame to every stream's ``send``.

What any library costs least on a given ASGI server: ``GET /events`` answers the headers
ssecast sends and a first comment, then registers the connection's ``send``; ``publish``
encodes the frame once and, from the publisher's task, awaits every ``send`` in turn. No
queue, no task per client, no eviction (a ``send`` that raises drops its connection). The
distance from ``floor`` is the ASGI server's; from here to ssecast, the library's.
"""

from __future__ import annotations

from typing import Any

from _control import (
    EVENT_TYPE,
    ASGIApp,
    Payload,
    Publisher,
    Receive,
    Scope,
    Send,
    control_app,
    dumps,
    run_asgi,
)

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
OPENING = {"type": "http.response.body", "body": b":\n\n", "more_body": True}


class AsgiFloor:
    """The streams' ``send`` callables, and the publish that writes a frame to each."""

    def __init__(self) -> None:
        self.sends: set[Send] = set()
        self.dropped = 0
        self._prefix = b"event: " + EVENT_TYPE.encode() + b"\ndata: "

    async def events(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the stream, then hold it until the client goes."""
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send(OPENING)
        self.sends.add(send)
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            self.sends.discard(send)

    async def publish(self, payload: Payload) -> None:
        frame = b"id: %d\n%s%s\n\n" % (payload["seq"], self._prefix, dumps(payload).encode())
        message = {"type": "http.response.body", "body": frame, "more_body": True}
        for send in list(self.sends):
            try:
                await send(message)
            except Exception:  # the server's word for a gone client varies (OSError, ...)
                if send in self.sends:
                    self.sends.discard(send)
                    self.dropped += 1

    def stats(self) -> dict[str, Any]:
        return {"subscribers": len(self.sends), "evicted": self.dropped}


def build() -> ASGIApp:
    floor = AsgiFloor()
    return control_app(floor.events, Publisher(floor.publish), floor.stats)


def main(port: int) -> None:
    run_asgi(build(), port)
