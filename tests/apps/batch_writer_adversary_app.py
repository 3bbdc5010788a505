"""EventStream behind a send wrapper that misbehaves for some clients (batch writer tests).

``SSECAST_TEST_HEARTBEAT`` sets the heartbeat (seconds). ``apps.batch_writer_adversary_app:
WAIT_AND_RAISE`` reads the stream's ``who`` query parameter:

- ``ok``: the wrapper passes every message on.
- ``wait``: every second body with an event waits (``asyncio.sleep(0.01)``) before it is
  passed on, in the middle of the wake-up that writes every stream.
- ``raise``: the second body with an event raises ``ValueError`` from the wrapper, once:
  the pump's task takes the stream over and sends that body again.
- ``yield``: every body waits for ``asyncio.sleep(0)``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import parse_qs

from apps.asgi_support import Control, channels_from_query, routed
from ssecast import Broadcaster
from ssecast.asgi import EventStream

broadcaster = Broadcaster(heartbeat=float(os.environ.get("SSECAST_TEST_HEARTBEAT", "15")))
events = EventStream(broadcaster, channels_from_query)
control = Control(broadcaster)

PLAIN = routed(broadcaster, events, control)


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
