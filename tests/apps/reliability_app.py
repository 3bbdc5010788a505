"""The ASGI app the reliability tests load: EventStream plus routes that publish and report.

Routes (a bare ASGI app, so that no framework's memory or tasks blur the figures):

- ``GET /events?channel=a&channel=b&token=...``: ssecast's ``EventStream``. Channels come
  from the repeated ``channel`` parameter (``default`` when none); names starting with
  ``missing`` do not exist (404); channels starting with ``secret`` need ``token=letmein``
  (403 otherwise). ``Last-Event-ID`` and ``lastEventId`` resume as usual.
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

Settings come from ``SSECAST_TEST_QUEUE_SIZE``, ``SSECAST_TEST_HISTORY``,
``SSECAST_TEST_MAX_SUBSCRIBERS`` and ``SSECAST_TEST_HEARTBEAT`` (seconds; 0 for none).
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

from ssecast import Broadcaster, BroadcasterClosedError
from ssecast.asgi import EventStream, close_on_signal

TOKEN = "letmein"
"""The token that opens channels whose name starts with ``secret``."""


def _broadcaster_from_env() -> Broadcaster:
    env = os.environ
    max_subscribers = env.get("SSECAST_TEST_MAX_SUBSCRIBERS")
    heartbeat = float(env.get("SSECAST_TEST_HEARTBEAT", "15"))
    return Broadcaster(
        queue_size=int(env.get("SSECAST_TEST_QUEUE_SIZE", "256")),
        history=int(env.get("SSECAST_TEST_HISTORY", "1024")),
        max_subscribers=int(max_subscribers) if max_subscribers else None,
        heartbeat=heartbeat or None,
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
    """Every channel is open but those starting with ``secret``, which need the token."""
    if not any(name.startswith("secret") for name in channels):
        return True
    return _query(scope).get("token", [""])[-1] == TOKEN


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


broadcaster = _broadcaster_from_env()
events = EventStream(broadcaster, channels_from_query, authorize=authorize)
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


async def _reply(send: Any, result: Any, status: int = 200) -> None:
    body = json.dumps(result).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
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
