"""The ASGI app the reliability tests load: EventStream plus routes that publish and report.

Routes (a bare ASGI app, so that no framework's memory or tasks blur the figures):

- ``GET /events?channel=a&channel=b&token=...&user=u&lifetime=s``: ssecast's
  ``EventStream``. Channels come from the repeated ``channel`` parameter (``default`` when
  none); names starting with ``missing`` do not exist (refused as a 403, like a secret
  one); channels starting with ``secret`` need ``token=letmein`` (403 otherwise), and a
  ``user`` denied by ``/deny`` is refused. ``user`` is the subscription's key, and
  ``lifetime`` the stream's lifetime in seconds. ``Last-Event-ID`` and ``lastEventId``
  resume as usual.
- ``GET /page?channel=c&lifetime=s``: an HTML page whose ``EventSource`` reads that stream
  and keeps what it receives in ``window.received`` (``[id, data]`` pairs) and the number
  of times it opened in ``window.opened``.
- ``POST /burst?count=N&rate=R&channel=c&size=S``: start publishing ``count`` events
  ``{"seq": i, "pad": "x" * S}`` of type ``tick`` on ``channel`` at ``rate`` events/s
  (0: as fast as the loop allows), from a task of the server's event loop; returns at once.
- ``POST /publish?channel=c&type=t&data=text``: publish one event with ``data`` as a raw
  string; returns its id.
- ``GET /stats``: ``Broadcaster.stats()`` plus ``rss_kib`` (this process's resident memory),
  ``tasks`` (``asyncio.all_tasks()`` in the server's loop), ``threads``
  (``threading.active_count()``) and ``burst`` (events the burst task published, and
  whether it finished).
- ``POST /close``: close the broadcaster.
- ``POST /deny?user=u``: refuse ``u`` from now on; ``POST /disconnect?user=u&channel=c``:
  ``Broadcaster.adisconnect`` (either may be left out); returns how many it ended here.

Settings come from ``SSECAST_TEST_QUEUE_SIZE``, ``SSECAST_TEST_HISTORY``,
``SSECAST_TEST_MAX_SUBSCRIBERS``, ``SSECAST_TEST_MAX_PER_KEY``, ``SSECAST_TEST_RETRY``
(milliseconds) and ``SSECAST_TEST_HEARTBEAT`` (seconds; 0 for none). With
``SSECAST_TEST_REDIS_PREFIX`` the broadcaster is on Redis (``SSECAST_TEST_REDIS_URL``),
with ``SSECAST_TEST_POSTGRES_TABLE`` on PostgreSQL (``SSECAST_TEST_POSTGRES_DSN``).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

from ssecast import Backend, Broadcaster, BroadcasterClosedError
from ssecast.asgi import EventStream, close_on_signal

TOKEN = "letmein"
"""The token that opens channels whose name starts with ``secret``."""


def _backend_from_env() -> Backend | None:
    env = os.environ
    if "SSECAST_TEST_REDIS_PREFIX" in env:
        from ssecast.redis import RedisBackend

        url = env.get("SSECAST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
        return RedisBackend(url, prefix=env["SSECAST_TEST_REDIS_PREFIX"])
    if "SSECAST_TEST_POSTGRES_TABLE" in env:
        from ssecast.postgres import PostgresBackend

        dsn = env.get("SSECAST_TEST_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=root")
        return PostgresBackend(dsn, table=env["SSECAST_TEST_POSTGRES_TABLE"])
    return None


def _broadcaster_from_env() -> Broadcaster:
    env = os.environ
    max_subscribers = env.get("SSECAST_TEST_MAX_SUBSCRIBERS")
    max_per_key = env.get("SSECAST_TEST_MAX_PER_KEY")
    retry = env.get("SSECAST_TEST_RETRY")
    heartbeat = float(env.get("SSECAST_TEST_HEARTBEAT", "15"))
    return Broadcaster(
        queue_size=int(env.get("SSECAST_TEST_QUEUE_SIZE", "256")),
        history=int(env.get("SSECAST_TEST_HISTORY", "1024")),
        max_subscribers=int(max_subscribers) if max_subscribers else None,
        max_subscribers_per_key=int(max_per_key) if max_per_key else None,
        retry=int(retry) if retry else None,
        heartbeat=heartbeat or None,
        backend=_backend_from_env(),
    )


def _query(scope: Any) -> dict[str, list[str]]:
    # errors="replace": the tests send query strings that are not UTF-8 on purpose.
    text = scope.get("query_string", b"").decode("utf-8", errors="replace")
    return parse_qs(text, keep_blank_values=True)


def channels_from_query(scope: Any) -> list[str]:
    """Every ``channel`` parameter, in order; ``missing...`` names do not exist."""
    names = _query(scope).get("channel") or ["default"]
    for name in names:
        if name.startswith("missing"):
            raise LookupError(name)
    return names


def authorize(scope: Any, channels: Sequence[str]) -> bool:
    """Refuse denied users, and channels starting with ``secret`` without the token."""
    query = _query(scope)
    if user(scope) in _denied:
        return False
    if not any(name.startswith("secret") for name in channels):
        return True
    return query.get("token", [""])[-1] == TOKEN


def user(scope: Any) -> str | None:
    """The ``user`` parameter: the subscription's key."""
    return _query(scope).get("user", [""])[-1] or None


def lifetime(scope: Any) -> float | None:
    """The ``lifetime`` parameter, in seconds."""
    value = _query(scope).get("lifetime", [""])[-1]
    return float(value) if value else None


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


broadcaster = _broadcaster_from_env()
events = EventStream(
    broadcaster, channels_from_query, authorize=authorize, key=user, lifetime=lifetime
)
_denied: set[str] = set()
_burst: dict[str, Any] = {"published": 0, "done": True}
_tasks: set[asyncio.Task[None]] = set()


async def _run_burst(count: int, rate: float, channel: str, pad: str) -> None:
    _burst.update(published=0, done=False)
    started = time.monotonic()
    sent = 0
    try:
        while sent < count:
            # Publish what is due by now, then yield: a steady rate however the loop is late.
            due = count if rate <= 0 else min(count, int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                try:
                    broadcaster.publish("tick", {"seq": sent, "pad": pad}, channel=channel)
                except BroadcasterClosedError:
                    return  # the server is stopping: the burst ends with it
                sent += 1
                _burst["published"] = sent
                if rate <= 0 and sent % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.005 if rate > 0 else 0)
    finally:
        _burst["done"] = True


_PAGE = """<!doctype html>
<script>
window.received = [];
window.opened = 0;
const source = new EventSource("/events?" + location.search.slice(1));
source.onopen = () => { window.opened += 1; };
source.addEventListener("tick", (e) => window.received.push([e.lastEventId, e.data]));
</script>
"""


async def _reply(
    send: Any, result: Any, status: int = 200, content_type: bytes = b"application/json"
) -> None:
    body = result.encode() if content_type == b"text/html" else json.dumps(result).encode()
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _control(scope: Any, send: Any) -> None:
    path = scope["path"]
    query = {name: values[-1] for name, values in _query(scope).items()}
    if path == "/stats":
        result: Any = {
            **broadcaster.stats()._asdict(),
            "rss_kib": _rss_kib(),
            "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
            "burst": dict(_burst),
        }
    elif path == "/burst":
        task = asyncio.get_running_loop().create_task(
            _run_burst(
                int(query.get("count", "100")),
                float(query.get("rate", "0")),
                query.get("channel", "default"),
                "x" * int(query.get("size", "0")),
            )
        )
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        result = "started"
    elif path == "/publish":
        event = broadcaster.publish(
            query.get("type", "tick"),
            query.get("data", ""),
            channel=query.get("channel", "default"),
            raw=True,
        )
        result = event.id
    elif path == "/close":
        await broadcaster.aclose()
        result = "closed"
    elif path == "/deny":
        _denied.add(query["user"])
        result = "denied"
    elif path == "/disconnect":
        result = await broadcaster.adisconnect(channel=query.get("channel"), key=query.get("user"))
    elif path == "/page":
        await _reply(send, _PAGE, content_type=b"text/html")
        return
    else:
        await _reply(send, "not found", 404)
        return
    await _reply(send, result)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Route ``/events`` to the EventStream and the rest to the control routes."""
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        async with close_on_signal(broadcaster):
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            for task in list(_tasks):
                task.cancel()
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["path"] == "/events":
        await events(scope, receive, send)
    else:
        await _control(scope, send)
