"""The WSGI body the Flask and Django adapters share, and close_on_sigterm."""

from __future__ import annotations

import signal
import socket
import struct
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

from ssecast import Broadcaster, CloseReason
from ssecast._http import OPENING
from ssecast._wire import HEARTBEAT
from ssecast._wsgi import WSGIStream, _peer_closed, close_on_sigterm


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def test_the_body_opens_at_once_then_streams_the_subscription() -> None:
    """The first chunk is the opening comment; then come the subscription's frames."""
    with Broadcaster() as broadcaster:
        body = WSGIStream(broadcaster.subscribe(), {})
        event = broadcaster.publish("tick", 1)
        assert iter(body) is body
        assert next(body) == OPENING
        assert next(body) == event.frame


def test_closing_a_body_never_read_unsubscribes() -> None:
    """A server may close a body it never iterated (HEAD); the subscription ends then too."""
    with Broadcaster() as broadcaster:
        sub = broadcaster.subscribe()
        WSGIStream(sub, {}).close()
        assert sub.close_reason is CloseReason.UNSUBSCRIBED
        assert broadcaster.stats().subscribers == 0


def test_a_heartbeat_to_a_client_that_left_ends_the_body(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """At a heartbeat the body looks at the client's socket and ends if the peer closed it."""
    server, client = pair
    with Broadcaster(heartbeat=0.01) as broadcaster:
        sub = broadcaster.subscribe()
        body = WSGIStream(sub, {"gunicorn.socket": server})
        assert next(body) == OPENING
        assert next(body) == HEARTBEAT  # the client is still there
        client.close()
        with pytest.raises(StopIteration):
            next(body)
        assert broadcaster.stats().subscribers == 0


def test_peer_closed_tells_an_open_quiet_peer_from_a_gone_one(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Open and silent, or open with unread bytes: not closed. Closed or reset: closed."""
    server, client = pair
    assert not _peer_closed(None)
    assert not _peer_closed(server)
    client.sendall(b"x")
    assert not _peer_closed(server)  # data waiting is not a close, and it is left unread
    assert server.recv(1) == b"x"
    client.close()
    assert _peer_closed(server)


def test_peer_closed_counts_a_reset_as_gone() -> None:
    """A connection reset by the peer is a closed peer."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with server:
            server.sendall(b"unread")  # unread data makes close() send a reset
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            assert _peer_closed(server)


def test_peer_closed_leaves_an_unusable_socket_to_the_next_write() -> None:
    """A socket it cannot peek at (closed here) is not reported as a closed peer."""
    sock = socket.socket()
    sock.close()
    assert not _peer_closed(sock)


def test_close_on_sigterm_needs_a_handler_to_hand_on_to() -> None:
    """Without the server's own handler there is nothing to chain to: a clear error."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with Broadcaster() as broadcaster, pytest.raises(RuntimeError, match="post_worker_init"):
            close_on_sigterm(broadcaster)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_close_on_sigterm_closes_then_calls_the_servers_handler() -> None:
    """SIGTERM closes the broadcaster (ending its streams), then the server's handler runs."""
    called = threading.Event()

    def servers_handler(signum: int, frame: FrameType | None) -> None:
        called.set()

    previous = signal.signal(signal.SIGTERM, servers_handler)
    try:
        broadcaster = Broadcaster()
        sub = broadcaster.subscribe()
        close_on_sigterm(broadcaster)
        signal.raise_signal(signal.SIGTERM)
        assert called.wait(5)
        assert list(sub) == []  # the stream ended: the closing thread ran
        assert sub.close_reason is CloseReason.SHUTDOWN
    finally:
        signal.signal(signal.SIGTERM, previous)
