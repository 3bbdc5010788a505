"""Every error ssecast raises on purpose, in one tree.

Each error also derives from the builtin it means, so `except ValueError` keeps
working for code that does not know ssecast:

```text
SsecastError
├── PublishError (ValueError)            publish() refused the event; nothing was sent
│   ├── UnknownEventTypeError            the type is not in the allowlist
│   ├── PayloadTooLargeError             the serialized data is over max_payload_bytes
│   ├── NotSerializableError (TypeError) the serializer could not encode the data
│   └── InvalidFieldError                a type or channel is empty or holds CR, LF or NUL
├── ConfigurationError (ValueError)      an argument is out of range
├── BroadcasterClosedError (RuntimeError) the broadcaster was closed
├── TooManySubscribersError (RuntimeError) max_subscribers, or the per-key limit, is reached
└── BackendUnavailableError (ConnectionError) the backend (e.g. Redis) cannot be reached
```
"""

from __future__ import annotations

__all__ = [
    "REFUSED_FOR_NOW",
    "BackendUnavailableError",
    "BroadcasterClosedError",
    "ConfigurationError",
    "InvalidFieldError",
    "NotSerializableError",
    "PayloadTooLargeError",
    "PublishError",
    "SsecastError",
    "TooManySubscribersError",
    "UnknownEventTypeError",
]


class SsecastError(Exception):
    """The root of every error ssecast raises on purpose."""


class PublishError(SsecastError, ValueError):
    """`publish()` refused an event before any subscriber saw it."""


class UnknownEventTypeError(PublishError):
    """The event type is not in the broadcaster's `event_types` allowlist.

    :ivar event_type: the type that was refused.
    :ivar allowed: the allowlist in force.
    """

    def __init__(self, event_type: str, allowed: frozenset[str]) -> None:
        self.event_type = event_type
        self.allowed = allowed
        shown = ", ".join(repr(name) for name in sorted(allowed)) or "none"
        super().__init__(
            f"event type {event_type!r} is not allowed (allowed: {shown}); "
            "add it to Broadcaster(event_types=...) or publish one of the allowed types"
        )


class PayloadTooLargeError(PublishError):
    """The serialized data is larger than `max_payload_bytes`.

    :ivar size: the size of the serialized data, in UTF-8 bytes.
    :ivar limit: the broadcaster's `max_payload_bytes`.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"serialized data is {size} bytes, over the limit of {limit}; send less "
            "(for example an id the page fetches) or raise Broadcaster(max_payload_bytes=...)"
        )


class NotSerializableError(PublishError, TypeError):
    """The serializer could not turn the data into text (also a `TypeError`)."""


class InvalidFieldError(PublishError):
    """An event type, channel or id is empty, not a `str`, or holds CR, LF or NUL.

    A line break in a field would let the value inject its own SSE fields into the
    stream, so such values are refused rather than escaped.

    :ivar field: which field was refused (`"event type"`, `"channel"`, ...).
    :ivar value: the value that was refused.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"invalid {field} {value!r}: {reason}")


class ConfigurationError(SsecastError, ValueError):
    """An argument to `Broadcaster()` or `subscribe()` is out of range."""


class BroadcasterClosedError(SsecastError, RuntimeError):
    """The broadcaster was closed; it publishes and subscribes no more."""


class TooManySubscribersError(SsecastError, RuntimeError):
    """`subscribe()` would go over `max_subscribers`, or over `max_subscribers_per_key`.

    :ivar limit: the limit that was reached.
    :ivar key: the subscription's key when the per-key limit was reached; `None` when
        it was `max_subscribers`.
    """

    def __init__(self, limit: int, key: str | None = None) -> None:
        self.limit = limit
        self.key = key
        if key is None:
            message = (
                f"already {limit} subscribers, the limit; ask the client to retry later "
                "or raise Broadcaster(max_subscribers=...)"
            )
        else:
            message = (
                f"already {limit} subscribers with this key, the limit; close one first "
                "or raise Broadcaster(max_subscribers_per_key=...)"
            )
        super().__init__(message)


class BackendUnavailableError(SsecastError, ConnectionError):
    """The backend (for example Redis) could not be reached; nothing was published."""


REFUSED_FOR_NOW = (TooManySubscribersError, BroadcasterClosedError, BackendUnavailableError)
"""What `subscribe()` raises when the client may come back later: a refusal for a while."""
