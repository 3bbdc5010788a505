"""The PostgreSQL connections of one backend, and the one place psycopg errors become ssecast's.

Publishing and replaying borrow connections from a small pool, which grows to the number
of threads using it at once; `apublish` uses it from a worker thread, so nothing is kept
per event loop. The listener has a connection of its own (see `_postgres_reader.py`).
Every connection carries an `application_name` that begins with `ssecast`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Final, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from ssecast import _fork
from ssecast._availability import Availability
from ssecast._exceptions import BackendUnavailableError

__all__ = [
    "ANSWER_TIMEOUT",
    "CONNECT_TIMEOUT",
    "LOCK_TIMEOUT",
    "MAX_IDLE",
    "STATEMENT_TIMEOUT",
    "TCP_USER_TIMEOUT",
    "Connections",
    "connect",
    "unavailable",
]

# libpq's connect_timeout, in whole seconds (it takes no less than 2).
CONNECT_TIMEOUT: Final = 2
# Every statement on ssecast's connections is bounded, so that no call waits forever:
# for the publishers' lock (another session holding it), for any statement, for a
# transaction left open by a paused process, and for a network that stopped answering.
LOCK_TIMEOUT: Final = "5s"
STATEMENT_TIMEOUT: Final = "10s"
_SETTINGS: Final = (
    f"-c lock_timeout={LOCK_TIMEOUT} -c statement_timeout={STATEMENT_TIMEOUT}"
    f" -c idle_in_transaction_session_timeout={STATEMENT_TIMEOUT}"
    # A publish is one query of two statements: an implicit transaction, which only the
    # session's default isolation reaches.
    r" -c default_transaction_isolation=read\ committed"
)
# libpq's tcp_user_timeout, in milliseconds: unacknowledged data fails the connection.
TCP_USER_TIMEOUT: Final = 10_000
# How long ssecast waits for any answer of the server, in seconds. The server's own
# timeouts come first; this one is for a server whose host still acknowledges the data,
# so that tcp_user_timeout and keepalives never fire, but that does not answer: stopped
# (SIGSTOP), swapping, or stuck on a disk.
ANSWER_TIMEOUT: Final = 15.0
# Idle connections the pool keeps; one more, returned after a burst, is closed.
MAX_IDLE: Final = 4
# How long close() waits for the statements running on borrowed connections.
_CLOSE_WAIT: Final = 5.0

Connection = psycopg.Connection[TupleRow]
_Result = TypeVar("_Result")


@contextlib.contextmanager
def unavailable(doing: str, availability: Availability) -> Iterator[None]:
    """Raise [`BackendUnavailableError`][ssecast.BackendUnavailableError] for any psycopg error.

    Unreachable, timed out, terminated, or refused (a read-only standby, a missing
    privilege): to the caller each means that what it asked for was not done. The message
    names no host or password; the error's own text is kept.

    :param doing: what failed, such as `"could not publish"`.
    :param availability: told whether the statements inside reached PostgreSQL.
    """
    try:
        yield
    except psycopg.Error as error:
        failure = BackendUnavailableError(_failure(doing, error))
        availability.failed(failure)
        raise failure from error
    availability.succeeded()


def _failure(doing: str, error: psycopg.Error) -> str:
    if isinstance(error, psycopg.OperationalError):
        return (
            f"{doing}: PostgreSQL is unreachable, did not answer in time, or ended the "
            f"session ({type(error).__name__}: {str(error).strip()}); check that it runs "
            "and that the DSN is right"
        )
    return (
        f"{doing}: PostgreSQL refused the statement ({type(error).__name__}: "
        f"{str(error).strip()}); check that the table is ssecast's and that the user "
        "may write it"
    )


def connect(conninfo: str, application_name: str) -> Connection:
    """Open a connection in autocommit mode, named `application_name`.

    Its statements are bounded: a wait for a lock fails after `LOCK_TIMEOUT`, any
    statement (or a transaction left idle) after `STATEMENT_TIMEOUT`, and data the server
    does not acknowledge after `TCP_USER_TIMEOUT` ms; these settings follow the DSN's
    own `options`, and take precedence over them. Any wait for the server's answer
    fails after `ANSWER_TIMEOUT` seconds, and closes the connection.

    Its transactions are READ COMMITTED whatever the role's or database's default: a
    publish reads the newest `seq` after taking the lock, which a REPEATABLE READ snapshot
    taken before it would not see (numbers would repeat), and SERIALIZABLE would fail it.

    Its client encoding is UTF-8 whatever the database's: in a SQL_ASCII database psycopg
    would read text as bytes, and in another encoding a character it cannot hold would
    fail in psycopg, untyped, rather than be refused by the server.

    :raises psycopg.Error: it could not connect.
    """
    params = conninfo_to_dict(conninfo)
    options = params.get("options")
    return _Bounded.connect(
        conninfo,
        autocommit=True,
        options=f"{options} {_SETTINGS}" if options else _SETTINGS,
        tcp_user_timeout=TCP_USER_TIMEOUT,
        application_name=application_name,
        client_encoding="UTF8",
        connect_timeout=_connect_timeout(params.get("connect_timeout")),
        # TCP keepalives: a connection whose peer vanished (a host down, a cable cut)
        # fails in about 5 + 3 x 2 s instead of hanging for the kernel's two hours.
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
    )


def _connect_timeout(configured: object) -> int:
    """Return the DSN's `connect_timeout` if it bounds the wait, else `CONNECT_TIMEOUT`."""
    # libpq waits forever for 0, a negative number, or none at all.
    text = str(configured).strip()
    return int(text) if text.isdigit() and int(text) > 0 else CONNECT_TIMEOUT


class _Bounded(psycopg.Connection[TupleRow]):
    """A connection on which no wait for the server lasts more than `ANSWER_TIMEOUT`."""

    # The other arguments differ between psycopg versions (3.3 added `timeout`).
    def wait(self, gen: PQGen[_Result], *args: Any, **kwargs: Any) -> _Result:  # noqa: ANN401
        """Run `gen` as psycopg does; close the connection if the server stops answering.

        :raises psycopg.OperationalError: nothing came from the server for `ANSWER_TIMEOUT`.
        """
        try:
            return super().wait(_answered(gen, ANSWER_TIMEOUT), *args, **kwargs)
        except NoAnswerError:
            # Mid-statement, the connection cannot be used again; closed, it is not waited
            # on again by the rollback psycopg would send while the error propagates.
            self.close()
            raise


class NoAnswerError(psycopg.OperationalError):
    """The server did not answer in time."""


def _answered(gen: PQGen[_Result], seconds: float) -> PQGen[_Result]:
    """Pass `gen`'s waits through; fail when nothing arrives for `seconds`.

    psycopg resumes a waiting generator about every 0.1 s even when nothing arrived
    (`Ready.NONE`), which is when the time is checked.
    """
    deadline = time.monotonic() + seconds
    try:
        waiting = next(gen)
        while True:
            ready = yield waiting
            if ready:
                deadline = time.monotonic() + seconds
            elif time.monotonic() > deadline:
                gen.close()
                raise NoAnswerError(f"PostgreSQL did not answer for {seconds:g} s")
            waiting = gen.send(ready)
    except StopIteration as done:
        result: _Result = done.value
        return result


class Connections:
    """The pool of one backend's publishing connections; `close` closes them all.

    :param conninfo: where PostgreSQL is, as libpq takes it.
    :param application_name: the name every connection carries.
    """

    def __init__(self, conninfo: str, application_name: str) -> None:
        self.conninfo = conninfo
        self.application_name = application_name
        # Whether the last statement reached PostgreSQL; every one runs in `unavailable`.
        self.availability = Availability(f"PostgreSQL ({application_name})")
        # A leaf lock (see the table in _broadcaster.py): the idle connections, how many
        # are lent, and whether it is closed. Never held while psycopg runs.
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._idle: list[Connection] = []
        self._lent = 0
        self._closed = False
        # A forked child's copies of its parent's connections: closing one would end the
        # parent's session, and dropping one would warn; they stay here, unused.
        self._parents: list[Connection] = []
        _fork.guard(self, self._lock, Connections._in_child)

    def connect(self) -> Connection:
        """Open a new connection (the listener's), with this backend's name.

        :raises psycopg.Error: it could not connect.
        """
        return connect(self.conninfo, self.application_name)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Connection]:
        """Lend a connection, opened if none is idle; it goes back to the pool afterwards.

        A connection whose statement failed is closed instead: it may be broken.

        :raises BackendUnavailableError: the pool is closed, or it could not connect.
        """
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("the PostgresBackend is closed")
            conn = self._idle.pop() if self._idle else None
            self._lent += 1
        try:
            if conn is None:
                with unavailable("could not connect", self.availability):
                    conn = self.connect()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            with self._lock:
                keep = not self._closed and len(self._idle) < MAX_IDLE
                if keep:
                    self._idle.append(conn)
            if not keep:  # closed meanwhile, or enough are idle
                conn.close()
        finally:
            with self._lock:
                self._lent -= 1
                self._returned.notify_all()

    def close(self) -> None:
        """Close every connection once the statements running on them end (seconds at most)."""
        with self._lock:
            self._closed = True
            # Closing a connection under a running statement would fail it with whatever
            # psycopg meets, not BackendUnavailableError: the borrower closes it instead.
            self._returned.wait_for(lambda: not self._lent, _CLOSE_WAIT)
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _in_child(self) -> None:
        """In a forked child: the parent's connections and borrowers are not this process's."""
        self._parents += self._idle
        self._idle = []
        self._lent = 0
        self._returned = threading.Condition(self._lock)
