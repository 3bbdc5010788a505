"""A Redis backend: many processes, on many hosts, act as one broadcaster.

Design
------
Every backend with the same Redis database and ``prefix`` shares one Redis Stream,
whose key is ``prefix + "events"``:

- ``publish`` appends the event with ``XADD <key> MAXLEN ~ <maxlen> *``. The entry holds
  the fields ``type``, ``channel``, ``data`` and ``body`` (the encoded SSE frame without
  its ``id:`` line, from :class:`~ssecast.Draft`). The stream id Redis assigns is the
  event id. Validation and serialization happen once, in the publishing process; every
  other process rebuilds the event with ``Draft(...).stamp(stream_id)``, which
  concatenates bytes and never serializes again.
- ``listen`` (the broadcaster calls it before its first subscription; a process that
  only publishes never does) notes the newest id in the stream (``XREVRANGE + - COUNT
  1``; ``0-0`` for an empty stream) and starts ONE daemon reader thread per backend,
  which loops on ``XREAD BLOCK`` from the last id it saw and hands each event to the
  broadcaster, in stream order. A process therefore holds one reading connection,
  however many SSE clients it serves; the fan-out to those clients is the broadcaster's.
  A process that publishes and subscribes gets its own events through its reader too
  (so they reach its subscribers a moment after ``publish`` returns), and every
  subscriber, in every process, sees a channel's events in the same order: the stream's.
- ``replay`` reads the history with ``XRANGE`` (exclusive start, so Redis >= 6.2) and
  keeps the events of the wanted channels. An id that is malformed, trimmed away by
  ``MAXLEN`` or absent from the stream gives ``None``: the client gets a gap event.
  So does an id newer than the last one this process delivered (the client saw it
  through a faster process); the broadcaster then looks for it among the events that
  arrive meanwhile.
- ``publish`` uses a synchronous client; ``apublish`` uses a ``redis.asyncio`` client,
  created lazily for each event loop that calls it, so it never blocks the loop.

Faults
------
- ``publish``, ``apublish`` and ``replay`` raise :class:`~ssecast.BackendUnavailableError`
  when Redis cannot be reached or does not answer in time. Commands are never retried
  behind the caller's back: a retried ``XADD`` could publish an event twice. When the
  error comes from a timeout, Redis may still have appended the event; ``publish``
  raising means only that the event was not acknowledged.
- The reader reconnects with exponential backoff (0.05 s doubling to 2 s, with jitter)
  and resumes from the last id it saw, so events published while it was away are
  delivered once Redis is back, and subscribers stay connected throughout.
- A Redis restarted without persistence comes back with an empty stream, and its new
  ids need not follow the old ones (another host's clock may be behind). So after each
  reconnection the reader checks that the stream still holds the last entry it read.
  If it does not (the stream was reset, rolled back to an older snapshot, or trimmed
  past that entry while the reader was away), the reader reads the stream from its
  start (``0-0``) and skips the entries it already delivered: it remembers the ids of
  the last ``maxlen`` + 1000 events, at least what the stream holds when every backend
  on the prefix has the same ``maxlen``. The
  choice favours delivering every new event over waiting for ids beyond the old ones,
  which could lose events for as long as a clock is behind. After a rollback, entries
  older than this process's start may be delivered once more. An id from before a
  reset is unknown to ``replay``: a client resuming from it gets a gap.

Connections carry the client name ``ssecast:<prefix>`` (``CLIENT LIST`` shows them):
one for the reader, in a process that subscribes; in a process that publishes or resumes
from Redis, a pool that grows to the number of threads doing so at once; and one pool
per event loop using ``apublish``. A worker that only serves streams holds one, and so
does a process that only publishes from one thread or one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import threading
from collections import deque
from collections.abc import Iterator
from typing import Final, cast
from urllib.parse import urlsplit

from ssecast._backend import Deliver
from ssecast._event import Draft, Event
from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    ConfigurationError,
)

try:
    import redis
    import redis.asyncio
    import redis.asyncio.retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
    from redis.retry import Retry
    from redis.typing import EncodableT, FieldT
except ImportError as error:  # pragma: no cover - tested in a subprocess without redis
    if error.name != "redis" and not (error.name or "").startswith("redis."):
        raise
    raise ImportError(
        "ssecast.redis needs the redis package; install it with: pip install 'ssecast[redis]'"
    ) from error

__all__ = ["RedisBackend"]

logger = logging.getLogger("ssecast")

# Each XREAD waits at most this long, so a stopping reader notices within it even if
# its socket could not be shut down.
_BLOCK_MS: Final = 1000
# Longer than a blocking read, so only a dead connection times out.
_SOCKET_TIMEOUT: Final = 5.0
_CONNECT_TIMEOUT: Final = 2.0
# RESP2 replies have one shape across redis-py versions; the parsing below relies on it.
_PROTOCOL: Final = 2
# The reader delivers a whole batch before any stream writes it, so a subscriber whose
# queue_size is under this many frames can be evicted by a burst (the default is 256).
_READ_BATCH: Final = 100
# MAXLEN ~ trims whole nodes of (by default) 100 entries, so a stream may hold a little
# more than maxlen; the reader remembers that many delivered ids and a margin.
_RECENT_MARGIN: Final = 1000
_REPLAY_PAGE: Final = 1000
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0
_STREAM_START: Final = "0-0"
_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_MAX_ID_PART: Final = 2**64 - 1
_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})
# Unreachable, timed out, or refused (READONLY after a failover, OOM, NOPERM): to the
# caller all of these mean the event was not published.
_UNAVAILABLE: Final = (RedisError,)

# A stream entry as redis-py returns it without decoding: (id, {field: value}).
_Entry = tuple[bytes, dict[bytes, bytes]]


class RedisBackend:
    """Carry events between processes through one Redis Stream; keep history there.

    Pass it to :class:`~ssecast.Broadcaster` in every process that publishes or serves
    subscribers; backends with the same database and ``prefix`` act as one broadcaster.
    It connects on first use, never in the constructor, so a broadcaster created at
    import time survives a pre-forking server. One backend serves one broadcaster.

    :param url: where Redis is, e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` and
        ``unix://`` work too). Redis 6.2 or later.
    :param prefix: the start of every key this backend uses; backends that share it
        share their events.
    :param maxlen: about how many events the stream keeps for ``Last-Event-ID`` resume
        (trimmed with ``MAXLEN ~``, so a little more may stay).
    :raises ConfigurationError: an argument is out of range.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "ssecast:",
        maxlen: int = 10_000,
    ) -> None:
        if not isinstance(url, str) or urlsplit(url).scheme not in _SCHEMES:
            raise ConfigurationError(
                f"url must be a redis://, rediss:// or unix:// URL, got {url!r}"
            )
        if not isinstance(prefix, str):
            raise ConfigurationError(f"prefix must be a str, got {prefix!r}")
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ConfigurationError(f"maxlen must be an int of at least 1, got {maxlen!r}")
        self._url = url
        self._maxlen = maxlen
        self.key: Final = prefix + "events"
        """The key of the Redis Stream that holds the events."""
        # CLIENT SETNAME refuses spaces, line breaks and other unprintable characters.
        self.client_name: Final = "ssecast:" + "".join(
            char if "!" <= char <= "~" else "_" for char in prefix
        )
        """The name this backend's connections carry in ``CLIENT LIST``."""

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_use = 0  # commands running on the synchronous client
        self._stopping = threading.Event()
        self._closed = False
        self._deliver: Deliver | None = None
        self._thread: threading.Thread | None = None
        self._reader: redis.Redis | None = None
        self._client: redis.Redis | None = None
        self._async_clients: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}
        # The newest id in the stream when delivery began: replay's default end.
        self._origin = _STREAM_START

    def __repr__(self) -> str:
        if self._closed or self._thread:
            state = "closed" if self._closed else "listening"
        else:
            state = "started" if self._deliver else "not started"
        return f"<RedisBackend key={self.key!r} {state}>"

    # -- delivery --------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        """Remember where :meth:`listen` will deliver; connect to nothing yet.

        :param deliver: called with each event, one call at a time.
        :raises RuntimeError: the backend was started before or closed.
        """
        with self._lock:
            if self._deliver is not None or self._closed:
                raise RuntimeError("a RedisBackend serves one broadcaster and starts once")
            self._deliver = deliver

    def listen(self) -> None:
        """Note the newest id in the stream and start the thread that delivers what follows.

        Every event appended after this call returns, by any process, is passed to the
        ``deliver`` given to :meth:`start`, in stream order, from the reader thread.

        :raises BackendUnavailableError: Redis could not be reached; call again to retry.
        :raises RuntimeError: the backend was not started, listens already, or is closed.
        """
        with self._lock:
            deliver = self._deliver
            if deliver is None or self._thread is not None or self._closed:
                raise RuntimeError("a RedisBackend listens once, after start() and before close()")
            # One connection, opened by the first command: close() disconnects it to end
            # a blocking XREAD at once.
            reader = self._new_client(max_connections=1)
            try:
                newest = cast("list[_Entry]", reader.xrevrange(self.key, count=1))
            except _UNAVAILABLE as error:
                reader.close()
                raise _unavailable("could not start reading events", error) from error
            self._origin = newest[0][0].decode() if newest else _STREAM_START
            self._reader = reader
            self._thread = threading.Thread(
                target=self._read_forever,
                args=(reader, deliver, self._origin),
                name=f"ssecast-redis-reader {self.key}",
                daemon=True,
            )
            self._thread.start()

    def _read_forever(self, reader: redis.Redis, deliver: Deliver, cursor: str) -> None:
        """Deliver every event after ``cursor`` until stopped, reconnecting as needed."""
        failures = 0
        delivered = _RecentIds(self._maxlen + _RECENT_MARGIN)
        try:
            while not self._stopping.is_set():
                try:
                    if failures:
                        cursor = self._resume_point(reader, cursor)
                        logger.warning(
                            "Redis reader of %s reconnected after %d failed attempts",
                            self.key,
                            failures,
                        )
                        failures = 0
                    response = reader.xread({self.key: cursor}, count=_READ_BATCH, block=_BLOCK_MS)
                except Exception as error:
                    if self._stopping.is_set():
                        break
                    failures += 1
                    self._log_failure(error, failures)
                    self._stopping.wait(_backoff(failures))
                    continue
                for event_id, event in _read_entries(response):
                    cursor = event_id
                    if event is None or event_id in delivered:
                        continue
                    delivered.add(event_id)
                    try:
                        deliver(event)
                    except BroadcasterClosedError:
                        return  # close() is stopping this thread too
                    except Exception:
                        logger.exception("delivering event %s failed", event.id)
        finally:
            with contextlib.suppress(Exception):
                reader.close()

    def _resume_point(self, reader: redis.Redis, cursor: str) -> str:
        """Return where to read on from after a reconnection: ``cursor``, or ``0-0``."""
        if cursor == _STREAM_START or reader.xrange(self.key, cursor, cursor, count=1):
            return cursor
        logger.warning(
            "Redis stream %s no longer holds the last event this process read (Redis "
            "restarted without persistence, or trimmed the stream meanwhile); reading it "
            "from its start, skipping the events already delivered",
            self.key,
        )
        return _STREAM_START

    def _log_failure(self, error: Exception, failures: int) -> None:
        if failures == 1:
            if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
                logger.warning(
                    "Redis reader of %s lost its connection (%s); reconnecting", self.key, error
                )
            else:
                logger.exception("Redis reader of %s failed; retrying", self.key)
        else:
            logger.debug("Redis reader of %s: attempt %d failed: %s", self.key, failures, error)

    # -- publishing ------------------------------------------------------------------

    def publish(self, draft: Draft) -> Event:
        """Append ``draft`` to the stream; return it as the event it became.

        :param draft: the validated, encoded event.
        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        try:
            with self._sync_client() as client:
                stream_id = client.xadd(
                    self.key, _fields(draft), maxlen=self._maxlen, approximate=True
                )
        except _UNAVAILABLE as error:
            raise _unavailable("could not publish", error) from error
        return draft.stamp(cast("bytes", stream_id).decode())

    async def apublish(self, draft: Draft) -> Event:
        """Do what :meth:`publish` does, with this event loop's asynchronous client.

        :param draft: the validated, encoded event.
        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        client = self._async_client(asyncio.get_running_loop())
        try:
            stream_id = await client.xadd(
                self.key, _fields(draft), maxlen=self._maxlen, approximate=True
            )
        except _UNAVAILABLE as error:
            raise _unavailable("could not publish", error) from error
        return draft.stamp(cast("bytes", stream_id).decode())

    # -- history ---------------------------------------------------------------------

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> list[Event] | None:
        """Return the events on ``channels`` after id ``after``, up to ``until`` included.

        :param after: the id the client saw last.
        :param until: the last id already delivered to this process; ``None`` means the
            newest id in the stream when :meth:`start` ran.
        :param channels: the channels to keep.
        :returns: ``None`` when ``after`` is not a stream id, is not in the stream (never
            was, or trimmed away), or is newer than ``until``.
        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        start = _parse_id(after)
        end = self._origin if until is None else until
        if start is None or start > (_parse_id(end) or start):
            # Malformed, or newer than what this process has delivered (another process
            # saw it first): the broadcaster looks for it among the events arriving now.
            return None
        events: list[Event] = []
        cursor = after
        try:
            with self._sync_client() as client:
                while True:
                    # Both reads in one transaction: if the cursor entry is still there, no
                    # entry after it was trimmed before the range was read.
                    with client.pipeline(transaction=True) as pipe:
                        pipe.xrange(self.key, cursor, cursor, count=1)
                        pipe.xrange(self.key, "(" + cursor, end, count=_REPLAY_PAGE)
                        found, entries = pipe.execute()
                    if not found:
                        return None
                    for entry in entries:
                        event = _event(entry)
                        if event is not None and event.channel in channels:
                            events.append(event)
                    if len(entries) < _REPLAY_PAGE:
                        return events
                    cursor = entries[-1][0].decode()
        except _UNAVAILABLE as error:
            raise _unavailable("could not read the event history", error) from error

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reader thread and close every connection. Safe to call twice.

        Asynchronous clients are closed on their own event loops when those still run;
        call :meth:`aclose` from the loop that used :meth:`apublish` to be sure.
        """
        self._stop_reader()
        for loop, client in self._take_async_clients():
            _close_elsewhere(loop, client)

    async def aclose(self) -> None:
        """Do what :meth:`close` does without blocking the running event loop."""
        # In a worker thread, close() finds this loop running and closes its client on it.
        await asyncio.to_thread(self.close)

    def _stop_reader(self) -> None:
        with self._lock:
            self._closed = True
            # Closing the client under a running command would fail it with whatever
            # redis-py meets on the closed socket, not BackendUnavailableError.
            self._idle.wait_for(lambda: not self._in_use, _SOCKET_TIMEOUT)
            thread, reader, client = self._thread, self._reader, self._client
            self._client = None
        self._stopping.set()
        if reader is not None:
            # Disconnecting the connection in use (redis-py shuts its socket down) ends
            # the blocking XREAD at once instead of after up to a second.
            with contextlib.suppress(Exception):
                reader.connection_pool.disconnect()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_BLOCK_MS / 1000 + _SOCKET_TIMEOUT)
        if client is not None:
            client.close()

    def _take_async_clients(self) -> list[tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis]]:
        with self._lock:
            clients = list(self._async_clients.items())
            self._async_clients.clear()
        return clients

    # -- clients ---------------------------------------------------------------------

    def _new_client(self, **options: int) -> redis.Redis:
        return redis.Redis.from_url(
            self._url,
            client_name=self.client_name,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            protocol=_PROTOCOL,
            **options,
        )

    @contextlib.contextmanager
    def _sync_client(self) -> Iterator[redis.Redis]:
        """Lend the synchronous client; :meth:`close` waits until it is given back."""
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("the RedisBackend is closed")
            if self._client is None:
                self._client = self._new_client()
            client = self._client
            self._in_use += 1
        try:
            yield client
        finally:
            with self._lock:
                self._in_use -= 1
                self._idle.notify_all()

    def _async_client(self, loop: asyncio.AbstractEventLoop) -> redis.asyncio.Redis:
        # A redis.asyncio connection belongs to the loop that opened it, so each loop
        # gets its own client.
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("the RedisBackend is closed")
            client = self._async_clients.get(loop)
            if client is None:
                client = self._async_clients[loop] = redis.asyncio.Redis.from_url(
                    self._url,
                    client_name=self.client_name,
                    socket_timeout=_SOCKET_TIMEOUT,
                    socket_connect_timeout=_CONNECT_TIMEOUT,
                    retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
                    protocol=_PROTOCOL,
                )
            return client


class _RecentIds:
    """The ids of the last ``size`` events delivered, to skip them if Redis sends them again."""

    __slots__ = ("_order", "_set", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._order: deque[str] = deque()
        self._set: set[str] = set()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._set

    def add(self, event_id: str) -> None:
        """Remember ``event_id``, forgetting the oldest one when full."""
        if len(self._order) == self._size:
            self._set.discard(self._order.popleft())
        self._order.append(event_id)
        self._set.add(event_id)


def _fields(draft: Draft) -> dict[FieldT, EncodableT]:
    return {"type": draft.type, "channel": draft.channel, "data": draft.data, "body": draft.body}


def _read_entries(response: object) -> list[tuple[str, Event | None]]:
    """Return the ids and events of an XREAD reply (RESP2: ``[[key, [entry, ...]]]``)."""
    streams = cast("list[tuple[bytes, list[_Entry]]]", response)
    return [(entry[0].decode(), _event(entry)) for _key, entries in streams for entry in entries]


def _event(entry: _Entry) -> Event | None:
    """Rebuild the event of a raw stream entry, without serializing anything.

    :returns: ``None`` (and a warning) for an entry ssecast did not write, such as one from
        another version or another program: it is skipped, not allowed to stop the reader.
    """
    stream_id, fields = entry
    try:
        draft = Draft(
            fields[b"type"].decode(),
            fields[b"channel"].decode(),
            fields[b"data"].decode(),
            fields[b"body"],
        )
    except (KeyError, UnicodeDecodeError):
        logger.warning("skipped stream entry %s: not an ssecast event", stream_id.decode())
        return None
    return draft.stamp(stream_id.decode())


def _parse_id(value: str) -> tuple[int, int] | None:
    """Return a stream id as a comparable pair, or ``None`` if it is not one."""
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        return None
    milliseconds, sequence = int(match[1]), int(match[2])
    if milliseconds > _MAX_ID_PART or sequence > _MAX_ID_PART:
        return None
    return milliseconds, sequence


def _backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` attempts in a row: doubling, capped, jittered."""
    ceiling = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** min(failures - 1, 16))
    return random.uniform(ceiling / 2, ceiling)


def _unavailable(what: str, error: Exception) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"{what}: Redis is unreachable, did not answer, or refused the command "
        f"({type(error).__name__}: {error}); check that it runs, that the URL is right and "
        "that it accepts writes"
    )


def _close_elsewhere(loop: asyncio.AbstractEventLoop, client: redis.asyncio.Redis) -> None:
    """Close an asynchronous client without awaiting, as far as its event loop allows."""
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if loop is here:
        # close() called from a coroutine on that very loop: finish the closing later.
        task = loop.create_task(client.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    elif loop.is_running():
        future = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
        with contextlib.suppress(Exception):
            future.result(_SOCKET_TIMEOUT)
    elif here is None and not loop.is_closed():
        loop.run_until_complete(client.aclose())
    else:  # pragma: no cover - its connections would warn when collected, failing the test
        logger.warning(
            "could not close a Redis client of an event loop that is closed, or idle while "
            "another one runs; call aclose() from the loop that used apublish()"
        )


# Closings scheduled on a loop, kept here until they finish (the loop holds tasks weakly).
_closing: set[asyncio.Task[None]] = set()
