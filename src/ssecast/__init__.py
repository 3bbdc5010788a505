"""ssecast: broadcast Server-Sent Events from one publisher to many HTTP clients.

Framework adapters live in their own modules (`ssecast.asgi`, `ssecast.flask`,
`ssecast.django`, `ssecast.redis`) and are never imported from here.
"""

from ssecast._backend import Ahead, Backend, Deliver, MemoryBackend, ReportGap
from ssecast._broadcaster import DEFAULT_CHANNEL, Broadcaster, Stats
from ssecast._encoder import GAP_EVENT_TYPE, UNAVAILABLE_EVENT_TYPE, Payload, Serializer
from ssecast._event import Draft, Event
from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    ConfigurationError,
    InvalidFieldError,
    NotSerializableError,
    PayloadTooLargeError,
    PublishError,
    SsecastError,
    TooManySubscribersError,
    UnknownEventTypeError,
)
from ssecast._subscription import CloseReason, Subscription

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHANNEL",
    "GAP_EVENT_TYPE",
    "UNAVAILABLE_EVENT_TYPE",
    "Ahead",
    "Backend",
    "BackendUnavailableError",
    "Broadcaster",
    "BroadcasterClosedError",
    "CloseReason",
    "ConfigurationError",
    "Deliver",
    "Draft",
    "Event",
    "InvalidFieldError",
    "MemoryBackend",
    "NotSerializableError",
    "Payload",
    "PayloadTooLargeError",
    "PublishError",
    "ReportGap",
    "Serializer",
    "SsecastError",
    "Stats",
    "Subscription",
    "TooManySubscribersError",
    "UnknownEventTypeError",
    "__version__",
]
