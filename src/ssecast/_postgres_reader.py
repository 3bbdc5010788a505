"""The thread that listens for a backend's publishes and delivers the table's rows, in order.

A process that serves subscribers runs one listener, with one connection, however many
clients it serves. It reads the rows after the last id it delivered, delivers them, then
waits for a notification (or a second at most) and reads again. A notification carries
only an id; the rows are read from the table, so what was published while the listener
was away is read all the same when it is back.

When rows may have been lost, it calls `report_gap` before the next event it delivers,
so that every subscriber learns of the hole (an `ssecast.gap` event) instead of
skipping it:

- a number missing in the rows' `seq`: while this process was paused, or its connection
  down, others published more than `maxlen` events and the table was trimmed past what
  it had read (or a number repeated: its newest rows were deleted);
- a new generation (the highest row's token is not the one it read last): the table was
  emptied (`TRUNCATE`, with its ids restarted or not, or dropped and created again), and
  ids may have begun again. It reads the new generation from its start, so no new row is
  skipped, whether its id is above the last one read or not. Each read returns that
  token, so this is seen at the first read after the first publish of the generation.

It reconnects with exponential backoff (0.05 s doubling to 2 s, with jitter), creating the
table again if it is gone, and goes on after the last id it delivered. The outage itself is
logged once, by the backend's `Availability`; its attempts only at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Final, NamedTuple

import psycopg

from ssecast._availability import Availability
from ssecast._backend import Deliver, ReportGap
from ssecast._exceptions import BackendUnavailableError, BroadcasterClosedError
from ssecast._postgres_connections import Connection, unavailable
from ssecast._postgres_table import LAST_ID, Newest, Page, Table, format_id

__all__ = ["BLOCK_SECONDS", "Position", "Reader"]

logger = logging.getLogger("ssecast")

# The listener reads the table at least this often, notification or not: a safety net,
# and how soon a stop is noticed should its wake-up be lost.
BLOCK_SECONDS: Final = 1.0
# Rows delivered per read: a burst reaches a subscriber in batches of this many.
_READ_BATCH: Final = 100
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0


class Position(NamedTuple):
    """What the listener read last, and in which generation of the table."""

    token: str | None
    """The generation's token; `None` when the table was empty when listening began."""
    id: int
    """The id of the last row read; reading goes on after it."""
    seq: int | None
    """That row's number, which the next one follows; `None` when unknown."""


class Reader:
    """Delivers every row after `start` to `deliver`, in a thread of its own.

    :param conn: a connection of its own, listening already; the thread closes it.
    :param connect: opens a new connection, after this one is lost.
    :param start: the newest row when listening began.
    :param availability: told whether its statements reach PostgreSQL.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        table: Table,
        connect: Callable[[], Connection],
        deliver: Deliver,
        report_gap: ReportGap,
        start: Newest,
        availability: Availability,
    ) -> None:
        self._conn: Connection | None = conn
        self._availability = availability
        self._table = table
        self._connect = connect
        self._deliver = deliver
        self._report_gap = report_gap
        self._position = Position(start.token, start.id, start.seq)
        self._gap_pending = False
        self._stopping = threading.Event()
        # stop() writes a byte here, which ends the wait for a notification at once.
        self._wake, self._waker = socket.socketpair()
        self._thread = threading.Thread(
            target=self._run, name=f"ssecast-postgres-listener {table.name}", daemon=True
        )

    def start(self) -> None:
        """Start reading; after `stop`, the thread ends at once."""
        self._thread.start()

    def stop(self) -> None:
        """End the thread, waiting a few seconds at most; it closes its connection."""
        self._stopping.set()
        with contextlib.suppress(OSError):  # closed: the thread ended
            self._waker.send(b"x")
        thread = self._thread
        if thread.ident is not None and thread is not threading.current_thread():
            # A read that waits (for a lock, or for a server that stopped answering) is
            # not cancelled: a cancel request may block the whole process in libpq. It
            # is given up on after this (the thread is a daemon); the server's timeouts
            # or ANSWER_TIMEOUT end it.
            thread.join(BLOCK_SECONDS + 5.0)

    def _run(self) -> None:
        try:
            self._read_until_stopped()
        except BroadcasterClosedError:
            pass  # close() is stopping this thread too
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._wake.close()
            self._waker.close()

    def _read_until_stopped(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._conn is None:
                    # Connect again, create the table if it is gone, and listen.
                    with unavailable("could not reconnect", self._availability):
                        self._conn = self._connect()
                        self._table.ensure(self._conn)
                        self._table.listen(self._conn)
                    logger.debug(
                        "PostgreSQL listener of %s reconnected after %d failed attempts",
                        self._table.name,
                        failures,
                    )
                    failures = 0
                with unavailable("could not read events", self._availability):
                    page = self._table.read(self._conn, self._position.id + 1, LAST_ID, _READ_BATCH)
                if self._take(page) < _READ_BATCH:
                    self._wait(self._conn)
            except BroadcasterClosedError:
                raise
            except Exception as error:
                failures += 1
                self._log_failure(error, failures)
                conn, self._conn = self._conn, None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                self._stopping.wait(_backoff(failures))

    def _wait(self, conn: Connection) -> None:
        """Wait for a notification, a stop, or a second; take in what arrived."""
        with unavailable("could not read notifications", self._availability):
            # A notification that came with the last read's results is queued already
            # (psycopg took it in), and the socket shows nothing: read again at once.
            if _drained(conn):
                return
            # A selector, not select.select: that fails on a descriptor of 1024 or more.
            with selectors.DefaultSelector() as selector:
                selector.register(conn.fileno(), selectors.EVENT_READ)
                selector.register(self._wake, selectors.EVENT_READ)
                selector.select(BLOCK_SECONDS)
            if not self._stopping.is_set():
                _drained(conn)

    def _take(self, page: Page) -> int:
        """Deliver the rows of `page`, after a gap if some may be missing; return how many.

        A page of a new generation is not delivered: the position moves to the start of
        the table, after a gap.
        """
        token, _, seq = self._position
        if token is not None and page.token not in (None, token):
            self._gap_pending = True
            logger.warning(
                "PostgreSQL listener of %s: the table was emptied and its events began "
                "again (truncated, or dropped and created again); subscribers get a gap, "
                "then its new events from the first",
                self._table.name,
            )
            self._position = Position(page.token, 0, None)
            return _READ_BATCH  # read again at once, from the new generation's start
        for row in page.rows:
            if seq is not None and row.seq != seq + 1:
                self._gap_pending = True
                if row.seq > seq:
                    why = f"{row.seq - seq - 1} events were trimmed from the table before this "
                    why += "process read them (it was paused or disconnected, or maxlen is small)"
                else:
                    why = "the table's numbering began again (its newest rows were deleted)"
                logger.warning(
                    "PostgreSQL listener of %s: %s; subscribers get a gap", self._table.name, why
                )
            try:
                if self._gap_pending:
                    self._report_gap()
                    self._gap_pending = False
                self._deliver(row.draft.stamp(format_id(row.token, row.id)))
            except BroadcasterClosedError:
                raise
            except Exception:  # a bug downstream: this event is lost to it, not the next ones
                logger.exception("delivering event %s failed", format_id(row.token, row.id))
            finally:
                seq = row.seq
                self._position = Position(row.token, row.id, seq)
        return len(page.rows)

    def _log_failure(self, error: Exception, failures: int) -> None:
        name = self._table.name
        # A lost connection was logged already, as the backend's outage.
        if failures > 1 or (
            isinstance(error, BackendUnavailableError)
            and isinstance(error.__cause__, psycopg.OperationalError)
        ):
            logger.debug("PostgreSQL listener of %s: attempt %d failed: %s", name, failures, error)
        else:  # refused (a missing privilege), or a bug: worth a traceback
            logger.exception("PostgreSQL listener of %s failed; retrying", name)


def _drained(conn: Connection) -> bool:
    """Take in the notifications that have arrived, without waiting; say if there were any.

    What a notification says is read from the table: they are only counted.
    """
    return sum(1 for _ in conn.notifies(timeout=0)) > 0


def _backoff(failures: int) -> float:
    """Seconds to wait after `failures` attempts in a row: doubling, capped, jittered."""
    ceiling = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** min(failures - 1, 16))
    return random.uniform(ceiling / 2, ceiling)
