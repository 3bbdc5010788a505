"""ssecast's ASGI adapter, served by uvicorn on its own or mounted in Starlette."""

from __future__ import annotations

from typing import Any

from _control import CHANNEL, EVENT_TYPE, ASGIApp, Payload, Publisher, control_app, run_uvicorn

from ssecast import Broadcaster
from ssecast.asgi import EventStream


def build(mounted: bool) -> ASGIApp:
    broadcaster = Broadcaster()
    events: ASGIApp = EventStream(broadcaster, [CHANNEL])
    if mounted:
        from starlette.applications import Starlette
        from starlette.routing import Route

        events = Starlette(routes=[Route("/events", events)])

    def publish(payload: Payload) -> None:
        broadcaster.publish(EVENT_TYPE, payload, channel=CHANNEL)

    def stats() -> dict[str, Any]:
        counters = broadcaster.stats()
        return {"subscribers": counters.subscribers, "evicted": counters.evicted}

    # Broadcaster.publish is thread-safe: a thread publisher calls it directly.
    return control_app(events, Publisher(publish, threadsafe=publish), stats)


def main(port: int) -> None:
    """Serve the bare adapter: ``EventStream`` is the whole ASGI app for ``/events``."""
    run_uvicorn(build(mounted=False), port)


def main_starlette(port: int) -> None:
    """Serve the adapter mounted in a Starlette app, as most users deploy it."""
    run_uvicorn(build(mounted=True), port)
