"""EventStream with a lifetime and heartbeat from the environment, for the pump adversary tests.

``SSECAST_TEST_HEARTBEAT`` and ``SSECAST_TEST_LIFETIME`` (seconds) set them. The server runs
``apps.pump_adversary_app:NAME``:

- ``PLAIN``: no middleware.
- ``YIELDING``: a pure ASGI middleware whose ``send`` wrapper awaits ``asyncio.sleep(0)``
  before passing each message on (a cooperative wrapper).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from apps.asgi_support import Control, channels_from_query, routed
from ssecast import Broadcaster
from ssecast.asgi import EventStream

broadcaster = Broadcaster(heartbeat=float(os.environ.get("SSECAST_TEST_HEARTBEAT", "15")))
lifetime = os.environ.get("SSECAST_TEST_LIFETIME")
events = EventStream(
    broadcaster, channels_from_query, lifetime=float(lifetime) if lifetime else None
)
control = Control(broadcaster)

PLAIN = routed(broadcaster, events, control)


async def YIELDING(scope: Any, receive: Any, send: Any) -> None:
    async def wrapped(message: Any) -> None:
        await asyncio.sleep(0)
        await send(message)

    await PLAIN(scope, receive, wrapped if scope["type"] == "http" else send)
