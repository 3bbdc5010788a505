"""ssecast with `PostgresBackend`: worker processes serve the streams, another publishes.

Every process of one deployment shares one table, named after the prefix the benchmark
puts in `HTTP_FANOUT_REDIS_PREFIX` (a fresh one per deployment); the publisher drops it
when it stops. `HTTP_FANOUT_POSTGRES_DSN` picks the database (`test` on 127.0.0.1).
"""

from __future__ import annotations

import os
import re
from typing import Any

from _control import (
    CHANNEL,
    EVENT_TYPE,
    ASGIApp,
    Payload,
    Publisher,
    Receive,
    Scope,
    Send,
    control_app,
    run_asgi,
)

from ssecast import Broadcaster
from ssecast.asgi import EventStream
from ssecast.postgres import PostgresBackend

DSN = os.environ.get("HTTP_FANOUT_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=root")


def _table() -> str:
    return "http_fanout_" + re.sub(r"\W", "_", os.environ["HTTP_FANOUT_REDIS_PREFIX"])[12:52]


def _broadcaster() -> Broadcaster:
    return Broadcaster(backend=PostgresBackend(DSN, table=_table(), maxlen=10_000))


def worker(port: int) -> None:
    """Serve `/events` from the shared table; this process never publishes."""
    broadcaster = _broadcaster()

    def refuse(payload: Payload) -> None:
        raise RuntimeError("workers do not publish; start the publisher process")

    def stats() -> dict[str, Any]:
        return {"subscribers": broadcaster.stats().subscribers}

    events: ASGIApp = EventStream(broadcaster, [CHANNEL])
    run_asgi(control_app(events, Publisher(refuse), stats), port)


def publisher(port: int) -> None:
    """Publish to the shared table on `POST /start`, and serve no stream.

    A task publishes with `apublish`; a thread (`thread=1`) with `publish`.
    """
    broadcaster = _broadcaster()

    async def apublish(payload: Payload) -> None:
        await broadcaster.apublish(EVENT_TYPE, payload, channel=CHANNEL)

    def publish(payload: Payload) -> None:
        broadcaster.publish(EVENT_TYPE, payload, channel=CHANNEL)

    async def no_events(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"the workers serve /events\n"})

    app = control_app(no_events, Publisher(apublish, threadsafe=publish), lambda: {})
    try:
        run_asgi(app, port)
    finally:
        import psycopg

        broadcaster.close()
        with psycopg.connect(DSN, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {_table()}")
