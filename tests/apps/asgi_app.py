"""The bare ASGI test app: EventStream at ``/events/`` with no framework at all."""

from __future__ import annotations

from apps.asgi_support import (
    HEADERS,
    Control,
    authorize,
    broadcaster_from_env,
    channels_from_query,
    routed,
)
from ssecast.asgi import EventStream

broadcaster = broadcaster_from_env()
events = EventStream(broadcaster, channels_from_query, authorize=authorize, headers=HEADERS)
control = Control(broadcaster)
app = routed(broadcaster, events, control)
