"""An EventStream whose streams the test can cut and whose next requests it can fail.

For tests/test_refusals_adversary.py: ``/events`` is an EventStream (``max_subscribers``
and CORS headers from the environment); ``/control/cut`` ends every open stream cleanly (as
a restart does) and makes the next ``fail`` requests to ``/events`` a ``502``, as a proxy
answers while the app is down, which makes an EventSource give up for good;
``/control/publish`` publishes one ``tick``; ``/control/stats`` and ``/control/seen`` say
what the server counted and which ``Last-Event-ID``/query each request to ``/events`` came
with.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import parse_qsl

from ssecast import Broadcaster
from ssecast.asgi import EventStream

_limit = os.environ.get("SSECAST_TEST_MAX_SUBSCRIBERS")
broadcaster = Broadcaster(
    history=100, heartbeat=1.0, max_subscribers=int(_limit) if _limit else None
)
_origin = os.environ.get("SSECAST_TEST_ALLOW_ORIGIN")
_cors = (
    {"Access-Control-Allow-Origin": _origin, "Access-Control-Allow-Credentials": "true"}
    if _origin
    else {}
)
events = EventStream(broadcaster, ["ticks"], headers=_cors)

_cut = asyncio.Event()
_failing = 0
_seen: list[dict[str, str]] = []


def _header(scope: Any, name: bytes) -> str:
    return ",".join(v.decode("latin-1") for k, v in scope["headers"] if k == name)


async def _events(scope: Any, receive: Any, send: Any) -> None:
    global _failing
    _seen.append(
        {
            "last_event_id": _header(scope, b"last-event-id"),
            "query": scope["query_string"].decode("latin-1"),
        }
    )
    if _failing:
        _failing -= 1
        start = {"type": "http.response.start", "status": 502, "headers": []}
        await send(start)
        await send({"type": "http.response.body", "body": b"bad gateway\n"})
        return
    cut = _cut

    async def cut_receive() -> Any:
        pending = asyncio.ensure_future(receive())
        waiter = asyncio.ensure_future(cut.wait())
        done, _ = await asyncio.wait({pending, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if pending in done:
            return pending.result()
        pending.cancel()
        return {"type": "http.disconnect"}

    await events(scope, cut_receive, send)


async def _control(scope: Any, receive: Any, send: Any) -> None:
    global _cut, _failing
    path = scope["path"]
    query = dict(parse_qsl(scope["query_string"].decode()))
    result: Any
    if path == "/control/cut":
        _failing = int(query.get("fail", "0"))
        _cut.set()
        _cut = asyncio.Event()
        result = "cut"
    elif path == "/control/publish":
        result = (await broadcaster.apublish("tick", {"n": 1}, channel="ticks")).id
    elif path == "/control/stats":
        result = broadcaster.stats()._asdict()
    else:
        result = _seen
    body = json.dumps(result).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Route ``/events`` and ``/control/...``; answer the lifespan."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        broadcaster.close()
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["path"] == "/events":
        await _events(scope, receive, send)
    else:
        await _control(scope, receive, send)
