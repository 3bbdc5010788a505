"""What every HTTP adapter shares: the response headers, the resume id, the refusals."""

from __future__ import annotations

from urllib.parse import parse_qsl

from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    SsecastError,
    TooManySubscribersError,
)
from ssecast._wire import HEARTBEAT

__all__ = [
    "CLOSED_REASON",
    "OPENING",
    "RETRY_AFTER_SECONDS",
    "STREAM_HEADERS",
    "UNAVAILABLE",
    "resume_id",
    "unavailable_reason",
]

STREAM_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    # nginx buffers proxied responses unless told not to, which holds events back.
    ("X-Accel-Buffering", "no"),
)

# Written as soon as the response starts, so proxies and browsers see the stream open
# before the first event.
OPENING = HEARTBEAT

# What subscribe() raises when the client should come back later: a 503 with Retry-After.
UNAVAILABLE = (TooManySubscribersError, BroadcasterClosedError, BackendUnavailableError)

CLOSED_REASON = "the broadcaster is closed (the server is stopping, or a lifespan closed it)"
"""What a 503 says when the broadcaster was closed, however subscribe() worded it."""

# Seconds a client refused for lack of room (503) is asked to wait.
RETRY_AFTER_SECONDS = 5

# EventSource cannot set headers on its first request; this query parameter stands in.
RESUME_QUERY_PARAMETER = "lastEventId"


def resume_id(header: str | None, query_string: str) -> str | None:
    """Return the id to resume after: the `Last-Event-ID` header, else the query parameter.

    :param header: the `Last-Event-ID` header's value, if any.
    :param query_string: the raw query string, without the `?`.
    """
    if header:
        return header
    for name, value in parse_qsl(query_string, keep_blank_values=False):
        if name == RESUME_QUERY_PARAMETER:
            return value
    return None


def unavailable_reason(error: SsecastError) -> str:
    """Return what a 503 tells the client about `error`: never the backend's address."""
    if isinstance(error, BackendUnavailableError):
        return "the event backend is unavailable; retry later"
    if isinstance(error, BroadcasterClosedError):
        return CLOSED_REASON
    return str(error)
