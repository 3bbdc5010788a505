"""An EventStream served directly by uvicorn, with nothing around it."""

from __future__ import annotations

from ssecast import Broadcaster
from ssecast.asgi import EventStream

app = EventStream(Broadcaster())
