"""What every HTTP adapter shares: the response headers, the resume id, the refusals."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import NamedTuple, TypeVar
from urllib.parse import parse_qsl

from ssecast import _wire
from ssecast._broadcaster import check_lifetime
from ssecast._encoder import UNAVAILABLE_EVENT_TYPE
from ssecast._event import check_field
from ssecast._exceptions import (
    REFUSED_FOR_NOW,
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
    "Refusal",
    "checked_lifetime",
    "per_request",
    "refusal",
    "request_key",
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

# What subscribe() raises when the client should come back later: see refusal().
UNAVAILABLE = REFUSED_FOR_NOW

CLOSED_REASON = "the broadcaster is closed (the server is stopping, or a lifespan closed it)"
"""What a 503 says when the broadcaster was closed, however subscribe() worded it."""

# Seconds a client refused for a while (503) is asked to wait.
RETRY_AFTER_SECONDS = 5

# How long an EventSource refused for a while waits before it reconnects, by reason: the
# reason's name (the event's data) and the least and most milliseconds. Never under a
# second, so that refused clients cannot hammer a struggling server; drawn at random from a
# window two to three times as wide as its start, so that they do not all come back at once
# (after a restart, say). A closed broadcaster is mostly a restart or a deploy, over within
# seconds; a backend or a full server may take longer.
_RETRY_WINDOWS: tuple[tuple[type[SsecastError], str, int, int], ...] = (
    (BroadcasterClosedError, "closed", 1000, 3000),
    (BackendUnavailableError, "backend_unavailable", 2000, 6000),
    (TooManySubscribersError, "too_many_subscribers", 2000, 6000),
)

# An Accept parameter that says the type is not acceptable (RFC 9110, 12.4.2).
_NOT_ACCEPTABLE = re.compile(r"q=0(\.0{0,3})?")

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


class Refusal(NamedTuple):
    """How to answer a request that `subscribe()` refused for a while."""

    status: int
    """`200` for an `EventSource`, which then reconnects by itself; else `429` for the
    per-key limit, `503` for the others."""
    reason: str
    """The text of a `503`'s body; never the backend's address."""
    stream: bytes
    """For a `200`, the whole body: a `retry:` field and one `ssecast.unavailable` event."""


def refusal(error: SsecastError, accept: str | None) -> Refusal:
    """Decide how to turn a client away for a while, `error` being what subscribe() raised.

    An `EventSource` (it sends `Accept: text/event-stream`) takes any status but 200 as
    final and never reconnects, so it gets a stream that sets its reconnection delay, says
    why in one `ssecast.unavailable` event, and ends: it comes back after the delay with its
    `Last-Event-ID`. Other clients (curl, health checks, `fetch`) get a 503, or a 429 for
    `max_subscribers_per_key`, which the adapters send with `Retry-After`.

    :param error: what subscribe() raised, one of `UNAVAILABLE`.
    :param accept: the request's `Accept` header, if any.
    """
    reason = unavailable_reason(error)
    if not _wants_event_stream(accept):
        per_key = isinstance(error, TooManySubscribersError) and error.key is not None
        return Refusal(429 if per_key else 503, reason, b"")
    name, least, most = next(
        window[1:] for window in _RETRY_WINDOWS if isinstance(error, window[0])
    )
    data = b'{"reason":"%s"}' % name.encode()
    event = _wire.encode_body(_wire.event_prefix(UNAVAILABLE_EVENT_TYPE), data)
    return Refusal(200, reason, _wire.retry(random.randint(least, most)) + event)


def _wants_event_stream(accept: str | None) -> bool:
    """Whether `accept` names `text/event-stream`, as every `EventSource` request does.

    A client that names it with `q=0` says it does not want it, and gets the `503`.
    """
    for part in (accept or "").split(","):
        media_type, *parameters = ("".join(piece.split()).lower() for piece in part.split(";"))
        if media_type == "text/event-stream":
            return not any(_NOT_ACCEPTABLE.fullmatch(parameter) for parameter in parameters)
    return False


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


def request_key(key: str | Callable[[_R], str | None] | None, request: _R) -> str | None:
    """Return the key of `request`'s subscription, refusing one that is not a `str`.

    Refused here, before the adapter answers a `400` for bad input: a key that is not
    even a `str` (a user object, an int id) is the app's bug, a `500`, and its value must
    not be shown to the client. A `str` with a bad value may be the client's own input
    (a query parameter), checked by `subscribe` like the rest.

    :raises InvalidFieldError: the key is neither a `str` nor `None`.
    """
    value: object = per_request(key, request)
    if value is None or isinstance(value, str):
        return value
    return check_field("key", value)  # raises: it is not a str
