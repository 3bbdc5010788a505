"""EventStream behind send wrappers that test one wake-up writing many streams (batch tests).

``SSECAST_TEST_HEARTBEAT`` sets the heartbeat (seconds). The server runs
``apps.batch_adversary_app:NAME``:

- ``PLAIN``: no middleware.
- ``CONTEXT``: a pure ASGI middleware that sets a context variable to the request's
  ``rid`` query parameter before the app runs; its send wrapper appends an SSE comment
  ``:rid=<the variable's value>`` to every body with an event in it, and sets another
  variable that no other stream may see (it appends ``:leak=<value>`` when it does).
- ``MUTATING``: a pure ASGI middleware whose send wrapper keeps every message dict it is
  given and, after passing it on, overwrites its body (a dict shared between two writes
  would corrupt the other stream's).
- ``YIELDING``: a send wrapper that awaits ``asyncio.sleep(0)`` before each body, so that
  every write waits; with ``/control/tpublish`` (two threads publish).
- ``THREADS``: ``PLAIN`` with ``/control/tpublish``.
- ``BASE_HTTP``: Starlette with a `BaseHTTPMiddleware` (the pump's task fallback), and
  `close_on_signal` in its lifespan.
- ``WAIT_AND_RAISE``: a send wrapper that misbehaves as the stream's ``who`` query
  parameter says: ``ok`` passes every message on; ``wait`` waits (``asyncio.sleep(0.01)``)
  before every second body with an event, in the middle of the wake-up that writes every
  stream; ``raise`` raises ``ValueError`` on the second body with an event, once (the
  pump's task takes the stream over and sends that body again); ``yield`` awaits
  ``asyncio.sleep(0)`` before every body.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.routing import Mount

from apps.asgi_support import Control, channels_from_query, lifespan, routed
from ssecast import Broadcaster, BroadcasterClosedError
from ssecast.asgi import EventStream

broadcaster = Broadcaster(heartbeat=float(os.environ.get("SSECAST_TEST_HEARTBEAT", "15")))
events = EventStream(broadcaster, channels_from_query)
control = Control(broadcaster)

PLAIN = routed(broadcaster, events, control)

RID: contextvars.ContextVar[str] = contextvars.ContextVar("rid", default="none")
OWN: contextvars.ContextVar[str] = contextvars.ContextVar("own", default="none")


def _rid(scope: Any) -> str:
    pairs = parse_qs(scope.get("query_string", b"").decode())
    return str(pairs.get("rid", ["none"])[-1])


async def CONTEXT(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await PLAIN(scope, receive, send)
        return
    rid = _rid(scope)
    RID.set(rid)

    async def wrapped(message: Any) -> None:
        body = message.get("body", b"")
        if b"data:" in body:
            extra = f":rid={RID.get()}\n\n"
            own = OWN.get()
            if own not in ("none", rid):
                extra += f":leak={own}\n\n"
            message = {**message, "body": body + extra.encode()}
        OWN.set(rid)
        await send(message)

    await PLAIN(scope, receive, wrapped)


kept: list[Any] = []


async def MUTATING(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await PLAIN(scope, receive, send)
        return

    async def wrapped(message: Any) -> None:
        if "ssecast-kept" in message:
            message = {**message, "body": b"event: duplicate-dict\ndata: x\n\n"}
        await send(message)
        if message.get("more_body"):
            message["body"] = b"event: mangled\ndata: x\n\n"
            message["ssecast-kept"] = True
            kept.append(message)
            del kept[:-1000]

    await PLAIN(scope, receive, wrapped)


class _Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Any, call_next: Any) -> Any:
        return await call_next(request)


BASE_HTTP = Starlette(
    routes=[Mount("/events", events), Mount("/control", control)],
    middleware=[Middleware(_Passthrough)],
    lifespan=lambda app: lifespan(broadcaster),
)


async def _yielding_send(scope: Any, receive: Any, send: Any) -> None:
    async def wrapped(message: Any) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(0)  # every write waits once: each goes to its task
        await send(message)

    await PLAIN(scope, receive, wrapped)


async def _thread_control(scope: Any, receive: Any, send: Any) -> None:
    """``/control/tpublish?channel=&count=``: two threads publish ``count`` events each.

    Each thread stops at the broadcaster's close; the answer lists the ids each published.
    """
    query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    channel, count = query["channel"], int(query["count"])

    def publish(t: int) -> list[str]:
        ids: list[str] = []
        with contextlib.suppress(BroadcasterClosedError):
            for n in range(count):
                ids.append(broadcaster.publish("tick", {"t": t, "n": n}, channel=channel).id)
        return ids

    ids = await asyncio.gather(*(asyncio.to_thread(publish, t) for t in range(2)))
    body = json.dumps(ids).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def YIELDING(scope: Any, receive: Any, send: Any) -> None:
    """PLAIN behind a send wrapper that awaits ``sleep(0)``; ``/control/tpublish`` too."""
    if scope["type"] == "http" and scope["path"].startswith("/control/tpublish"):
        await _thread_control(scope, receive, send)
    elif scope["type"] == "http" and scope["path"].startswith("/events"):
        await _yielding_send(scope, receive, send)
    else:
        await PLAIN(scope, receive, send)


async def THREADS(scope: Any, receive: Any, send: Any) -> None:
    """PLAIN, with ``/control/tpublish``: publishers in threads while the loop writes."""
    if scope["type"] == "http" and scope["path"].startswith("/control/tpublish"):
        await _thread_control(scope, receive, send)
    else:
        await PLAIN(scope, receive, send)


async def WAIT_AND_RAISE(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http" or not scope["path"].startswith("/events"):
        await PLAIN(scope, receive, send)
        return
    pairs = parse_qs(scope.get("query_string", b"").decode())
    who = pairs.get("who", ["ok"])[-1]
    seen = 0
    raised = False

    async def wrapped(message: Any) -> None:
        nonlocal seen, raised
        if b"data:" in message.get("body", b""):
            seen += 1
            if who == "wait" and seen % 2 == 0:
                await asyncio.sleep(0.01)
            elif who == "raise" and seen == 2 and not raised:
                raised = True
                raise ValueError("a middleware that needs its task")
            elif who == "yield":
                await asyncio.sleep(0)
        await send(message)

    await PLAIN(scope, receive, wrapped)
