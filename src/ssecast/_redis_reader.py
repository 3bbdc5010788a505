"""The thread that reads a backend's Redis Stream and delivers its events, in order.

A process that serves subscribers runs one reader, with one connection, however many
clients it serves. It loops on `XREAD BLOCK` after its cursor (the last id it read)
and hands each event to the broadcaster, in stream order.

When events may have been lost, it calls `report_gap` before the next event it
delivers, so that every subscriber learns of the hole (an `ssecast.gap` event) instead
of skipping it:

- a number missing in the entries' `seq`: while this process was paused (SIGSTOP, a
  long collection, a starved CPU), others published more than `maxlen` events and the
  stream trimmed some it had not read yet;
- a gap marker, which the first publish after a Redis restart writes (see
  `_redis_entries.py`), or, after a lost connection, a server that restarted (its
  `run_id` changed): what was published just before may be gone;
- after a lost connection, a stream that no longer holds the cursor's entry (reset,
  rolled back to an older snapshot, or trimmed while the reader was away).

In the last case it reads the stream from its start, because a new stream's ids need not
follow the old ones, and skips every entry up to its old cursor: those it delivered
before, or ones of a new stream whose clock is behind, which come before the gap.

It reconnects with exponential backoff (0.05 s doubling to 2 s, with jitter) and resumes
after the last id it read, so that subscribers stay connected throughout an outage. The
outage itself is logged once, by the backend's `Availability`; its attempts only at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Final, NamedTuple, cast

import redis
from redis.exceptions import ResponseError

from ssecast._availability import Availability
from ssecast._backend import Deliver, ReportGap
from ssecast._exceptions import BackendUnavailableError, BroadcasterClosedError
from ssecast._redis_connections import unavailable
from ssecast._redis_entries import STREAM_START, Entry, parse_id, read_reply

__all__ = ["BLOCK_SECONDS", "Position", "Reader", "locate"]

logger = logging.getLogger("ssecast")

# Each XREAD waits at most this long, so a stopping reader notices within it even if
# its socket could not be shut down.
BLOCK_SECONDS: Final = 1.0
# The reader delivers a whole batch before any stream writes it, so a subscriber whose
# queue_size is under this many frames can be evicted by a burst (the default is 256).
_READ_BATCH: Final = 100
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0


class Position(NamedTuple):
    """Where a reader is: what it read last, and on which server."""

    cursor: str
    """The id of the last entry read; reading goes on after it."""
    seq: int | None
    """That entry's number, which the next one follows; `None` when unknown."""
    run_id: str | None
    """The server's `run_id` then; `None` when Redis does not say (INFO refused)."""


class Reader:
    """Delivers every event after `start` to `deliver`, in a thread of its own.

    :param client: a client of its own, with one connection, which `stop` shuts.
    :param key: the stream.
    :param start: where to begin (see `locate`).
    :param availability: told whether its reads reach Redis.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        key: str,
        deliver: Deliver,
        report_gap: ReportGap,
        start: Position,
        availability: Availability,
    ) -> None:
        self._client = client
        self._availability = availability
        self._key = key
        self._deliver = deliver
        self._report_gap = report_gap
        self._position = start
        self._gap_pending = False
        # After reading from the stream's start: every entry up to here is skipped.
        self._skip_through: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"ssecast-redis-reader {key}", daemon=True
        )

    def start(self) -> None:
        """Start reading; after `stop`, the thread ends at once."""
        self._thread.start()

    def stop(self) -> None:
        """End the thread and close its connection, waiting a few seconds at most."""
        self._stopping.set()
        thread = self._thread
        if thread.ident is None or thread is threading.current_thread():
            return  # not started (it will end at once), or stopped from its own deliver()
        deadline = time.monotonic() + BLOCK_SECONDS + 5.0
        while thread.is_alive() and time.monotonic() < deadline:
            # Disconnecting the connection in use (redis-py shuts its socket down) ends the
            # blocking XREAD at once instead of after up to a second. Again if need be: an
            # XREAD that began just before the stop opened a new connection.
            with contextlib.suppress(Exception):
                self._client.connection_pool.disconnect()
            thread.join(0.05)

    def _run(self) -> None:
        try:
            self._read_until_stopped()
        except BroadcasterClosedError:
            pass  # close() is stopping this thread too
        finally:
            with contextlib.suppress(Exception):
                self._client.close()

    def _read_until_stopped(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if failures:
                    self._reconnected()
                    logger.debug(
                        "Redis reader of %s reconnected after %d failed attempts",
                        self._key,
                        failures,
                    )
                    failures = 0
                with unavailable("could not read events", self._availability):
                    reply = self._client.xread(
                        {self._key: self._position.cursor},
                        count=_READ_BATCH,
                        block=int(BLOCK_SECONDS * 1000),
                    )
            except Exception as error:
                if self._stopping.is_set():
                    break
                failures += 1
                self._log_failure(error, failures)
                self._stopping.wait(_backoff(failures))
                continue
            for entry in read_reply(reply):
                self._take(entry)

    def _take(self, entry: Entry) -> None:
        """Deliver `entry`, after a gap if events may be missing before it."""
        seq = self._position.seq
        if self._skip_through is not None:
            if (parse_id(entry.id) or (0, 0)) <= self._skip_through:
                self._moved(entry.id, seq)
                return
            self._skip_through = None
        if entry.seq is not None and seq is not None and entry.seq != seq + 1:
            self._gap_pending = True
            if entry.seq > seq:
                why = f"{entry.seq - seq - 1} events were trimmed from the stream before this "
                why += "process read them (it was paused, or too slow for maxlen)"
            else:
                why = "the stream was reset: its numbering began again"
            logger.warning("Redis reader of %s: %s; subscribers get a gap", self._key, why)
        if entry.gap:
            self._gap_pending = True  # another process found that Redis restarted
        if entry.event is None:  # a gap marker, or an entry ssecast did not write
            self._moved(entry.id, entry.seq if entry.gap else seq)
            return
        try:
            if self._gap_pending:
                self._report_gap()
                self._gap_pending = False
            self._deliver(entry.event)
        except BroadcasterClosedError:
            raise
        except Exception:  # a bug downstream: this event is lost to it, not the next ones
            logger.exception("delivering event %s failed", entry.id)
        finally:
            self._moved(entry.id, entry.seq)

    def _moved(self, cursor: str, seq: int | None) -> None:
        self._position = Position(cursor, seq, self._position.run_id)

    def _reconnected(self) -> None:
        """After a lost connection: note a gap if events may have been lost meanwhile."""
        cursor, seq, run_id = self._position
        with unavailable("could not resume reading events", self._availability):
            now = _run_id(self._client)
            restarted = run_id is not None and now is not None and now != run_id
            gone = cursor != STREAM_START and not self._client.xrange(
                self._key, cursor, cursor, count=1
            )
        if restarted:
            logger.warning(
                "Redis reader of %s: Redis restarted, and what was published just before "
                "may be gone; subscribers get a gap",
                self._key,
            )
        if gone:
            logger.warning(
                "Redis reader of %s: the stream no longer holds the last event this process "
                "read (Redis restarted without persistence, or trimmed the stream meanwhile); "
                "reading it from its start, after a gap",
                self._key,
            )
            self._position = Position(STREAM_START, None, now)
            self._skip_through = parse_id(cursor)
        else:
            self._position = Position(cursor, seq, now)
        self._gap_pending = self._gap_pending or restarted or gone

    def _log_failure(self, error: Exception, failures: int) -> None:
        # A lost connection was logged already, as the backend's outage.
        if failures > 1 or (
            isinstance(error, BackendUnavailableError)
            and isinstance(
                error.__cause__, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
            )
        ):
            logger.debug("Redis reader of %s: attempt %d failed: %s", self._key, failures, error)
        else:  # refused (WRONGTYPE, NOPERM), or a bug: worth a traceback
            logger.exception("Redis reader of %s failed; retrying", self._key)


def locate(client: redis.Redis, key: str) -> Position:
    """Return the position after the newest entry of `key`, on the server now.

    :raises redis.exceptions.RedisError: Redis could not be reached, or refused.
    """
    newest = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrevrange(key, count=1))
    run_id = _run_id(client)
    if not newest:
        return Position(STREAM_START, 0, run_id)
    entry = Entry.parse(newest[0])
    return Position(entry.id, entry.seq, run_id)


def _run_id(client: redis.Redis) -> str | None:
    try:
        info = cast("dict[str, object]", client.info("server"))
    except ResponseError:  # INFO refused (an ACL, a managed service): restarts go unseen
        return None
    run_id = info.get("run_id")
    return None if run_id is None else str(run_id)


def _backoff(failures: int) -> float:
    """Seconds to wait after `failures` attempts in a row: doubling, capped, jittered."""
    ceiling = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** min(failures - 1, 16))
    return random.uniform(ceiling / 2, ceiling)
