"""ssecast with ``RedisBackend``: worker processes serve the streams, another process publishes.

Every process of one deployment shares the Redis Stream under the prefix the benchmark
puts in ``HTTP_FANOUT_REDIS_PREFIX`` (a fresh one per deployment); the publisher deletes
the stream when it stops. ``HTTP_FANOUT_REDIS_URL`` picks the server (127.0.0.1:6379/0).
"""

from __future__ import annotations

import os
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
from ssecast.redis import RedisBackend

URL = os.environ.get("HTTP_FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0")


def _broadcaster() -> tuple[Broadcaster, str]:
    prefix = os.environ["HTTP_FANOUT_REDIS_PREFIX"]
    return Broadcaster(backend=RedisBackend(URL, prefix=prefix, maxlen=10_000)), prefix


def worker(port: int) -> None:
    """Serve ``/events`` from the shared stream; this process never publishes."""
    broadcaster, _ = _broadcaster()

    def refuse(payload: Payload) -> None:
        raise RuntimeError("workers do not publish; start the publisher process")

    def stats() -> dict[str, Any]:
        return {"subscribers": broadcaster.stats().subscribers}

    events: ASGIApp = EventStream(broadcaster, [CHANNEL])
    run_asgi(control_app(events, Publisher(refuse), stats), port)


def publisher(port: int) -> None:
    """Publish to the shared stream on ``POST /start``, and serve no stream.

    A task publishes with ``apublish``; a thread (``thread=1``) with ``publish``.
    """
    broadcaster, prefix = _broadcaster()

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
        import redis

        broadcaster.close()
        client = redis.Redis.from_url(URL)
        keys = client.keys(prefix + "*")  # the prefix holds no glob character
        if keys:
            client.delete(*keys)
        client.close()
