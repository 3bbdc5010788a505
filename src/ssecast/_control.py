"""The orders broadcasters send each other through their backend: a disconnect, for now.

An order travels as an event, so every backend carries it to every process as it carries
events, with no change of its own. Its channel (`ssecast.control`) is one no client may
subscribe to and no publisher may use, and its type one no publisher may use: no client
ever receives it, live or replayed (a replay keeps only the channels the client asked for),
and none can be forged with `publish`. It takes an id like any event; a broadcaster keeps it
out of its ring of recent events.
"""

from __future__ import annotations

import json
import logging
from typing import NamedTuple

from ssecast import _wire
from ssecast._event import RESERVED_PREFIX, Draft, Event

__all__ = ["CHANNEL", "Disconnect", "parse"]

logger = logging.getLogger("ssecast")

CHANNEL = RESERVED_PREFIX + "control"
"""The channel every order is published on."""
_DISCONNECT = RESERVED_PREFIX + "disconnect"


class Disconnect(NamedTuple):
    """End the subscriptions that match: of `channel` if given, with `key` if given."""

    origin: str
    """The broadcaster that sent it, which ended its own subscriptions already."""
    channel: str | None
    key: str | None

    def draft(self) -> Draft:
        """Return the order as an event to publish."""
        data = json.dumps(self._asdict(), separators=(",", ":"))
        body = _wire.encode_body(_wire.event_prefix(_DISCONNECT), data.encode())
        return Draft(_DISCONNECT, CHANNEL, data, body)


def parse(event: Event) -> Disconnect | None:
    """Return the order an event of `CHANNEL` carries; `None`, logged, if it is not one."""
    try:
        fields = json.loads(event.data)
        order = Disconnect(fields["origin"], fields["channel"], fields["key"])
    except (ValueError, KeyError, TypeError):
        order = None
    if (
        event.type != _DISCONNECT
        or order is None
        or not all(isinstance(value, str | None) for value in order)
    ):
        # From a newer version, say: one process must not stop the others' readers.
        logger.warning("ignored control message %s: not an order this version knows", event.id)
        return None
    return order
