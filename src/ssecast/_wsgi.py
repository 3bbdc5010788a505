"""What the WSGI adapters share: the response body, and closing the broadcaster on SIGTERM."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Self

from ssecast._broadcaster import Broadcaster
from ssecast._http import OPENING
from ssecast._subscription import Subscription
from ssecast._wire import HEARTBEAT

__all__ = ["DISCONNECT_KEY", "WSGIStream", "close_on_sigterm"]

# Where WSGI servers put the client's socket; a heartbeat checks it for a closed peer.
_SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")

# ssecast.testing's environ extension: a callable taking a callable to call when the client
# goes. A WSGI app otherwise learns of a disconnect only at its next write (a heartbeat).
DISCONNECT_KEY = "ssecast.on_disconnect"


class WSGIStream:
    """A WSGI response body: the opening comment, then the subscription's chunks.

    A class rather than a generator because the server calls `close()` even on a
    body it never iterated (a HEAD request, an error after the view), and the
    subscription must end then too; a generator never started runs no cleanup.
    """

    __slots__ = ("_opened", "_socket", "_subscription")

    def __init__(self, subscription: Subscription, environ: Mapping[str, object]) -> None:
        self._subscription = subscription
        self._opened = False
        self._socket = _client_socket(environ)
        on_disconnect = environ.get(DISCONNECT_KEY)
        if callable(on_disconnect):
            on_disconnect(self.close)

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


def close_on_sigterm(broadcaster: Broadcaster) -> None:
    """Close `broadcaster` on SIGTERM, then let the server's own handler stop the server.

    A WSGI server waits for open responses before it exits, and an event stream never
    ends by itself; closing the broadcaster ends them all, cleanly. Call it once the
    server has installed its handler, in each worker: for gunicorn, from the
    `post_worker_init` hook of its config file. Nothing is installed at import time.

    :param broadcaster: the broadcaster whose streams must end.
    :raises RuntimeError: SIGTERM has no Python handler to hand the signal on to.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        raise RuntimeError(
            "close_on_sigterm hands SIGTERM on to the server's handler, and none is set; "
            "call it after the server starts (gunicorn: in post_worker_init)"
        )

    def close_then_stop(signum: int, frame: FrameType | None) -> None:
        # A handler runs between two bytecodes of the main thread, which may hold the
        # broadcaster's lock at that moment, so another thread does the closing.
        threading.Thread(target=broadcaster.close, name="ssecast-close").start()
        previous(signum, frame)

    signal.signal(signal.SIGTERM, close_then_stop)
    # signal.signal() makes SIGTERM interrupt system calls again; gunicorn turns that off.
    signal.siginterrupt(signal.SIGTERM, False)


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
