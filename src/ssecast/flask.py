"""Flask adapter: answer a view with a subscription streamed as Server-Sent Events.

Call :func:`stream` inside a view, so the app's own decorators (login, permissions)
decide first who may listen::

    @app.get("/events")
    @login_required
    def events():
        return ssecast.flask.stream(broadcaster, "prices")

Each open stream holds one server thread for as long as the client listens, so run it
under a server with many threads: werkzeug's threaded dev server, or gunicorn with
``--worker-class gthread --threads N`` where N is more than the streams you expect (the
``sync`` worker has one thread and would serve one client at a time).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Self

try:
    import flask
except ModuleNotFoundError as error:  # pragma: no cover - tested in a subprocess
    if error.name != "flask":
        raise
    raise ImportError(
        "ssecast.flask needs Flask, which is not installed; "
        "install it with: pip install 'ssecast[flask]'"
    ) from error
from werkzeug.exceptions import BadRequest, ServiceUnavailable

from ssecast._broadcaster import Broadcaster
from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    InvalidFieldError,
    TooManySubscribersError,
)
from ssecast._http import OPENING, RETRY_AFTER_SECONDS, STREAM_HEADERS, resume_id
from ssecast._subscription import Subscription
from ssecast._wire import HEARTBEAT

__all__ = ["stream"]

# Where WSGI servers put the client's socket; a heartbeat checks it for a closed peer.
_SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")


def stream(broadcaster: Broadcaster, *channels: str) -> flask.Response:
    """Subscribe the current request to ``channels`` and return the streaming response.

    The client resumes where it left off with the ``Last-Event-ID`` header or, for
    clients that cannot set headers, a ``lastEventId`` query parameter. Refusals are
    raised as werkzeug HTTP exceptions, so the app's ``errorhandler`` renders them.

    :param broadcaster: where the events come from.
    :param channels: the channels to receive (``"default"`` if none).
    :raises werkzeug.exceptions.BadRequest: a channel name is invalid (400).
    :raises werkzeug.exceptions.ServiceUnavailable: the broadcaster is full
        (``max_subscribers``) or closed, or its backend is unreachable (503, with
        ``Retry-After``).
    """
    request = flask.request
    last_event_id = resume_id(
        request.headers.get("Last-Event-ID"), request.query_string.decode("latin-1")
    )
    try:
        subscription = broadcaster.subscribe(*channels, last_event_id=last_event_id)
    except InvalidFieldError as error:
        raise BadRequest(str(error)) from error
    except (TooManySubscribersError, BroadcasterClosedError, BackendUnavailableError) as error:
        raise ServiceUnavailable(str(error), retry_after=RETRY_AFTER_SECONDS) from error
    return flask.Response(_WSGIStream(subscription, request.environ), headers=STREAM_HEADERS)


class _WSGIStream:
    """A WSGI response body: the opening comment, then the subscription's chunks.

    A class rather than a generator because the server calls ``close()`` even on a
    body it never iterated (a HEAD request, an error after the view), and the
    subscription must end then too; a generator never started runs no cleanup.
    """

    __slots__ = ("_opened", "_socket", "_subscription")

    def __init__(self, subscription: Subscription, environ: Mapping[str, object]) -> None:
        self._subscription = subscription
        self._opened = False
        self._socket = _client_socket(environ)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        if not self._opened:
            self._opened = True
            return OPENING
        chunk = next(self._subscription)
        if chunk == HEARTBEAT and _peer_closed(self._socket):
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        """End the subscription; the server calls this when the response is done."""
        self._subscription.close()


def _client_socket(environ: Mapping[str, object]) -> socket.socket | None:
    """Return the client's socket, where the WSGI server exposes it."""
    for key in _SOCKET_KEYS:
        candidate = environ.get(key)
        if isinstance(candidate, socket.socket):
            return candidate
    return None


def _peer_closed(sock: socket.socket | None) -> bool:
    """Whether the client has closed its end, without reading anything it sent."""
    # Under WSGI a write to a closed peer succeeds once (it only provokes a reset), so
    # without this check a disconnect would be noticed a heartbeat later than promised.
    flags = getattr(socket, "MSG_DONTWAIT", 0)
    if sock is None or not flags:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | flags) == b""
    except BlockingIOError:
        return False  # open, and nothing sent: the usual case
    except ConnectionError:
        return True
    except (OSError, ValueError):
        return False  # e.g. a TLS socket, which takes no flags: leave it to the next write
