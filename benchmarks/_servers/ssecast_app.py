"""ssecast's ASGI adapter, served on its own, routed in Starlette or mounted in FastAPI.

``main_ops`` serves the bare adapter as an operator runs it: a
``ssecast.prometheus.Collector`` registered on a registry that is scraped once a second
on the event loop, and a key on every stream (the client's port, one key per connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from _control import (
    CHANNEL,
    EVENT_TYPE,
    ASGIApp,
    Payload,
    Publisher,
    Scope,
    control_app,
    run_asgi,
)

from ssecast import Broadcaster
from ssecast.asgi import EventStream


def build(framework: str = "", ops: bool = False) -> ASGIApp:
    """Build the server's app: the bare adapter, or in ``framework`` (starlette, fastapi)."""
    broadcaster = Broadcaster()
    events: ASGIApp = EventStream(broadcaster, [CHANNEL], key=client_key if ops else None)
    if framework == "starlette":
        from starlette.applications import Starlette
        from starlette.routing import Route

        events = Starlette(routes=[Route("/events", events)])
    elif framework == "fastapi":
        from fastapi import FastAPI

        # As docs/frameworks/fastapi.md deploys it: the mount answers /events/ (the
        # deployment's clients ask for it there), a request for /events is redirected.
        fastapi = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        fastapi.mount("/events", events)
        events = fastapi

    def publish(payload: Payload) -> None:
        broadcaster.publish(EVENT_TYPE, payload, channel=CHANNEL)

    scrapes: list[int] = []

    def stats() -> dict[str, Any]:
        counters = broadcaster.stats()
        found = {"subscribers": counters.subscribers, "evicted": counters.evicted}
        return {**found, "scrapes": len(scrapes)} if ops else found

    publisher = Publisher(publish, threadsafe=publish)
    if not ops:
        # Broadcaster.publish is thread-safe: a thread publisher calls it directly.
        return control_app(events, publisher, stats)
    scrape = scraper(broadcaster, scrapes)
    return control_app(events, publisher, stats, on_startup=scrape)


def client_key(scope: Scope) -> str:
    """One key per connection, as a user id would be: the client's port."""
    return f"client-{scope['client'][1]}"


def scraper(broadcaster: Broadcaster, scrapes: list[int]) -> Callable[[], Awaitable[None]]:
    """Register a Collector; return a startup hook that scrapes it once a second on the loop.

    On the loop, as ``prometheus_client``'s own ASGI app renders its answer: a scrape
    takes its turn with the streams. Each scrape's size is appended to ``scrapes``.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    from ssecast.prometheus import Collector

    registry = CollectorRegistry()
    registry.register(Collector(broadcaster))
    tasks: set[asyncio.Task[None]] = set()

    async def scrape_forever() -> None:
        while True:
            scrapes.append(len(generate_latest(registry)))
            await asyncio.sleep(1.0)

    async def start() -> None:
        tasks.add(asyncio.get_running_loop().create_task(scrape_forever()))

    return start


def main(port: int) -> None:
    """Serve the bare adapter: ``EventStream`` is the whole ASGI app for ``/events``."""
    run_asgi(build(), port)


def main_ops(port: int) -> None:
    """Serve the bare adapter with a Collector scraped once a second and a key per stream."""
    run_asgi(build(ops=True), port)


def main_starlette(port: int) -> None:
    """Serve the adapter mounted in a Starlette app, as most users deploy it."""
    run_asgi(build("starlette"), port)


def main_fastapi(port: int) -> None:
    """Serve the adapter mounted in a FastAPI app at ``/events`` (so answering ``/events/``)."""
    run_asgi(build("fastapi"), port)
