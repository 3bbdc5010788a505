"""Event values: the immutable published event, its id-less draft, and the field rules."""

from __future__ import annotations

from dataclasses import dataclass

from ssecast import _wire
from ssecast._exceptions import InvalidFieldError

__all__ = ["RESERVED_PREFIX", "Draft", "Event", "check_channel", "check_field"]

RESERVED_PREFIX = "ssecast."
"""Event types and channels that begin with it are ssecast's own."""


@dataclass(frozen=True, slots=True)
class Event:
    """A published event, computed once by `publish()` and shared by every subscriber.

    :ivar type: the SSE event type (`event:` field).
    :ivar id: the opaque id the backend gave it, unique per broadcaster.
    :ivar channel: the channel it was published on.
    :ivar data: the serialized data, as sent.
    :ivar frame: the complete SSE frame, as UTF-8 bytes ready for the socket.
    """

    type: str
    id: str
    channel: str
    data: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated, encoded event that has no id yet: what a backend is given to publish.

    A backend assigns the id and calls [`stamp`][ssecast.Draft.stamp]; it never serializes
    anything again.

    :ivar type: the SSE event type.
    :ivar channel: the channel it is published on.
    :ivar data: the serialized data.
    :ivar body: the frame without its `id:` line.
    """

    type: str
    channel: str
    data: str
    body: bytes

    def stamp(self, event_id: str) -> Event:
        """Return the [`Event`][ssecast.Event] this draft becomes under `event_id`.

        :param event_id: the id the backend assigned; it must hold no CR, LF or NUL.
        """
        return Event(self.type, event_id, self.channel, self.data, _wire.stamp(event_id, self.body))


def check_field(field: str, value: object) -> str:
    """Return `value` if it can stand in an SSE field line, else raise.

    :param field: what the value is, for the error message.
    :param value: the candidate.
    :raises InvalidFieldError: the value is not a non-empty `str` free of CR, LF and NUL.
    """
    if not isinstance(value, str):
        raise InvalidFieldError(field, value, f"expected a str, got {type(value).__name__}")
    if not value:
        raise InvalidFieldError(field, value, "it must not be empty")
    if "\r" in value or "\n" in value or "\0" in value:
        raise InvalidFieldError(field, value, "CR, LF and NUL would inject SSE fields; remove them")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidFieldError(
                field, value, "it is not valid Unicode text (a lone surrogate); remove it"
            ) from None
    return value


def check_channel(value: object) -> str:
    """Return `value` if it can name a user's channel, else raise.

    :raises InvalidFieldError: it is not a valid field (see `check_field`), or begins with
        the `ssecast.` prefix, kept for the messages broadcasters send each other.
    """
    name = check_field("channel", value)
    if name.startswith(RESERVED_PREFIX):
        raise InvalidFieldError(
            "channel", name, f"the prefix {RESERVED_PREFIX!r} is reserved for ssecast's own"
        )
    return name
