"""The Redis connections of one backend, and the one place Redis errors become ssecast's.

Publishing and replaying share one synchronous client, whose pool grows to the number
of threads using it at once; `apublish` and `aclose` use it from a worker thread,
so nothing is kept per event loop, and every connection is closed by `close()`
whatever happened to the loops that used them. A reader has a client of its own, with
one connection (see `_redis_reader.py`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Final

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisError
from redis.retry import Retry

from ssecast import _fork
from ssecast._availability import Availability
from ssecast._exceptions import BackendUnavailableError
from ssecast._redis_entries import PUBLISH_SCRIPT

__all__ = ["SOCKET_TIMEOUT", "Connections", "unavailable"]

# Longer than a reader's blocking read, so that only a dead connection times out.
SOCKET_TIMEOUT: Final = 5.0
_CONNECT_TIMEOUT: Final = 2.0
# RESP2 replies have one shape across redis-py versions; the parsing relies on it.
_PROTOCOL: Final = 2


@contextlib.contextmanager
def unavailable(doing: str, availability: Availability) -> Iterator[None]:
    """Raise [`BackendUnavailableError`][ssecast.BackendUnavailableError] for a Redis error inside.

    Unreachable, timed out, or refused (READONLY after a failover, OOM, NOPERM, a key of
    the wrong type): to the caller each means that what it asked for was not done. The
    message names no host or password; the Redis error's own text is kept.

    :param doing: what failed, such as `"could not publish"`.
    :param availability: told whether the commands inside reached Redis.
    """
    try:
        yield
    except RedisError as error:
        failure = BackendUnavailableError(
            f"{doing}: Redis is unreachable, did not answer, or refused the command "
            f"({type(error).__name__}: {error}); check that it runs, that the URL is right "
            "and that it accepts writes"
        )
        availability.failed(failure)
        raise failure from error
    availability.succeeded()


class Connections:
    """The clients of one backend; `close` closes them all.

    :param url: where Redis is.
    :param client_name: the name every connection carries in `CLIENT LIST`.
    """

    def __init__(self, url: str, client_name: str) -> None:
        self._url = url
        self._client_name = client_name
        # Whether the last command reached Redis; every command runs in `unavailable`.
        self.availability = Availability(f"Redis (client name {client_name})")
        # A leaf lock (see the table in _broadcaster.py): whether it is closed, and how
        # many commands run on the shared client. Never held while redis-py runs.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_use = 0
        self._closed = False
        # Made now, opened by its first command: a constructor connects to nothing.
        shared = self.client()
        self._shared = (shared, shared.register_script(PUBLISH_SCRIPT))
        _fork.guard(self, self._lock, Connections._in_child)

    def client(self, **options: int) -> redis.Redis:
        """Return a new client, which connects on its first command."""
        return redis.Redis.from_url(
            self._url,
            client_name=self._client_name,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            # Never retried behind the caller's back: a retried publish could send twice.
            retry=Retry(NoBackoff(), 0),
            protocol=_PROTOCOL,
            **options,
        )

    @contextlib.contextmanager
    def shared(self) -> Iterator[tuple[redis.Redis, Script]]:
        """Lend the shared client and its publish script; `close` waits for it back.

        :raises BackendUnavailableError: the connections are closed.
        """
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("the RedisBackend is closed")
            self._in_use += 1
        try:
            yield self._shared
        finally:
            with self._lock:
                self._in_use -= 1
                self._idle.notify_all()

    def close(self) -> None:
        """Close the shared client once the commands running on it end (a few seconds at most)."""
        with self._lock:
            self._closed = True
            # Closing a client under a running command would fail that command with
            # whatever redis-py meets on the closed socket, not BackendUnavailableError.
            self._idle.wait_for(lambda: not self._in_use, SOCKET_TIMEOUT)
        self._shared[0].close()

    def _in_child(self) -> None:
        """In a forked child: the threads using the client were the parent's."""
        # redis-py's pool notices the new process itself and opens connections of its own.
        self._in_use = 0
        self._idle = threading.Condition(self._lock)
