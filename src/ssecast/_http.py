"""What every HTTP adapter shares: the response headers, the resume id, the refusals."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl

from ssecast._broadcaster import check_lifetime
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
    "checked_lifetime",
    "per_request",
    "refusal_status",
    "resume_id",
    "unavailable_reason",
]

_R = TypeVar("_R")
_T = TypeVar("_T")

STREAM_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    # nginx buffers proxied responses unless told not to, which holds events back.
    ("X-Accel-Buffering", "no"),
)

# Written as soon as the response starts, so proxies and browsers see the stream open
# before the first event.
OPENING = HEARTBEAT

# What subscribe() raises when the client should come back later: a 503 with Retry-After,
# or a 429 for the per-key limit.
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


def refusal_status(error: SsecastError) -> int:
    """Return the status of a refusal in `UNAVAILABLE`: 429 for the per-key limit, else 503."""
    if isinstance(error, TooManySubscribersError) and error.key is not None:
        return 429
    return 503


def checked_lifetime(lifetime: _T) -> _T:
    """Return an adapter's `lifetime` argument if it is `None`, a callable or valid seconds.

    :raises ConfigurationError: it is a number of seconds out of range.
    """
    if lifetime is not None and not callable(lifetime):
        check_lifetime(lifetime)
    return lifetime


def per_request(value: _T | Callable[[_R], _T], request: _R) -> _T:
    """Return `value`, or what it returns for `request` if it is a callable."""
    return value(request) if callable(value) else value
