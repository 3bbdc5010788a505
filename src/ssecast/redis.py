"""A Redis backend: many processes, on many hosts, act as one broadcaster.

Design
------
Every backend with the same Redis database and `prefix` shares one Redis Stream,
whose key is `prefix + "events"`:

- `publish` appends the event with one Lua script that also numbers it (`XADD <key>
  MAXLEN ~ <maxlen> *`; see `_redis_entries.py` for the fields). The stream id Redis
  assigns is the event id. Validation and serialization happen once, in the publishing
  process; every other process rebuilds the event from the encoded frame, without
  serializing again. `apublish` does the same from a worker thread, so it never blocks
  the loop and keeps nothing per event loop.
- `listen` (the broadcaster calls it before its first subscription; a process that
  only publishes never does) notes the newest entry and starts ONE reader thread per
  backend (`_redis_reader.py`), which delivers every later event in stream order. A
  process therefore holds one reading connection however many SSE clients it serves,
  and every subscriber, in every process, sees a channel's events in the stream's order.
  A process that publishes and subscribes gets its own events through its reader too.
- `replay` reads the history with `XRANGE` (exclusive start, so Redis >= 6.2) and
  keeps the events of the wanted channels. An id that is malformed, trimmed away by
  `MAXLEN` or absent from the stream gives `None`: the client gets a gap event.
  So does an id newer than the last one this process delivered (the client saw it
  through a faster process); the broadcaster then looks for it among the events that
  arrive meanwhile.

Faults
------
- `publish`, `apublish` and `replay` raise
  [`BackendUnavailableError`][ssecast.BackendUnavailableError] when Redis cannot be
  reached, does not answer in time, or refuses the command. Commands are never retried
  behind the caller's back: a retried `XADD` could publish an event twice. When the error
  comes from a timeout, Redis may still have appended the event; `publish` raising means
  only that the event was not acknowledged. Likewise, an `apublish` cancelled while its
  worker thread waits for Redis may still publish.
- The reader reconnects with backoff and goes on after the last id it read, so events
  published while it was away are delivered once Redis is back, and subscribers stay
  connected throughout. Where events may have been lost instead (the reader fell more
  than `maxlen` behind, Redis restarted, the stream was reset), every subscriber of
  the process gets an `ssecast.gap` event before the next one: never a silent hole.
  After a restart, the first publish also writes a gap marker into the stream, so that
  every process learns of it, and no client resumes across it without a gap.

Connections carry the client name `ssecast:<prefix>` (`CLIENT LIST` shows them):
one for the reader, in a process that subscribes, and a pool for publishing and replay
that grows to the number of threads doing so at once. A worker that only serves streams
holds one, and so does a process that only publishes from one thread or one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Final, cast
from urllib.parse import urlsplit

from ssecast import _fork
from ssecast._backend import Ahead, Deliver, ReportGap
from ssecast._event import Draft, Event
from ssecast._exceptions import BackendUnavailableError, ConfigurationError

try:
    import redis
except ImportError as error:  # pragma: no cover - tested in a subprocess without redis
    if error.name != "redis" and not (error.name or "").startswith("redis."):
        raise
    raise ImportError(
        "ssecast.redis needs the redis package; install it with: pip install 'ssecast[redis]'"
    ) from error

from ssecast._redis_connections import Connections, unavailable
from ssecast._redis_entries import STREAM_START, Entry, parse_id, publish_args
from ssecast._redis_reader import Reader, locate

__all__ = ["RedisBackend"]

_REPLAY_PAGE: Final = 1000
_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})


class RedisBackend:
    """Carry events between processes through one Redis Stream; keep history there.

    Pass it to [`Broadcaster`][ssecast.Broadcaster] in every process that publishes or
    serves subscribers; backends with the same database and `prefix` act as one
    broadcaster. It connects on first use, never in the constructor, so a broadcaster
    created at import time survives a pre-forking server. One backend serves one
    broadcaster.

    :param url: where Redis is, e.g. `redis://127.0.0.1:6379/0` (`rediss://` and
        `unix://` work too). Redis 6.2 or later.
    :param prefix: the start of every key this backend uses; backends that share it
        share their events.
    :param maxlen: about how many events the stream keeps for `Last-Event-ID` resume
        (trimmed with `MAXLEN ~`, so a little more may stay).
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
        self._maxlen = maxlen
        self.key: Final = prefix + "events"
        """The key of the Redis Stream that holds the events."""
        # CLIENT SETNAME refuses spaces, line breaks and other unprintable characters.
        self.client_name: Final = "ssecast:" + "".join(
            char if "!" <= char <= "~" else "_" for char in prefix
        )
        """The name this backend's connections carry in `CLIENT LIST`."""
        self._connections = Connections(url, self.client_name)

        # A leaf lock (see the table in _broadcaster.py) for the state below; never held
        # while Redis is asked anything.
        self._lock = threading.Lock()
        self._deliver: Deliver | None = None
        self._report_gap: ReportGap | None = None
        self._listening = False  # listen() was called and has not failed
        self._reader: Reader | None = None
        self._connecting: redis.Redis | None = None  # the reader's client, during listen()
        self._closed = False
        # The newest id in the stream when delivery began: replay's default end.
        self._origin = STREAM_START
        _fork.guard(self, self._lock, RedisBackend._in_child)

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._reader is not None:
            state = "listening"
        else:
            state = "started" if self._deliver else "not started"
        return f"<RedisBackend key={self.key!r} {state}>"

    # -- delivery --------------------------------------------------------------------

    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        """Remember where to deliver events and report gaps; connect to nothing yet.

        [`listen`][ssecast.redis.RedisBackend.listen] begins the delivery.

        :param deliver: called with each event, one call at a time.
        :param report_gap: called when events may have been lost before the next one.
        :raises RuntimeError: the backend was started before or closed.
        """
        with self._lock:
            if self._deliver is not None or self._closed:
                raise RuntimeError("a RedisBackend serves one broadcaster and starts once")
            self._deliver, self._report_gap = deliver, report_gap

    def listen(self) -> None:
        """Note the newest entry of the stream and start the thread that delivers what follows.

        Every event appended after this call returns, by any process, is passed to the
        `deliver` given to [`start`][ssecast.redis.RedisBackend.start], in stream order,
        from the reader thread.

        :raises BackendUnavailableError: Redis could not be reached, or the backend was
            closed meanwhile; call again to retry.
        :raises RuntimeError: the backend was not started, listens already, or is closed.
        """
        with self._lock:
            deliver, report_gap = self._deliver, self._report_gap
            if deliver is None or report_gap is None or self._listening or self._closed:
                raise RuntimeError("a RedisBackend listens once, after start() and before close()")
            self._listening = True
            client = self._connecting = self._connections.client(max_connections=1)
        try:
            with unavailable("could not start reading events", self._connections.availability):
                start = locate(client, self.key)
            reader = Reader(
                client,
                key=self.key,
                deliver=deliver,
                report_gap=report_gap,
                start=start,
                availability=self._connections.availability,
            )
            with self._lock:
                if self._closed:
                    raise BackendUnavailableError("the RedisBackend was closed while it connected")
                self._reader, self._origin = reader, start.cursor
        except BaseException:
            client.close()
            with self._lock:
                self._listening = False
            raise
        finally:
            with self._lock:
                self._connecting = None
        reader.start()

    # -- publishing ------------------------------------------------------------------

    def publish(self, draft: Draft) -> Event:
        """Append `draft` to the stream; return it as the event it became.

        :param draft: the validated, encoded event.
        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        with (
            self._connections.shared() as (client, script),
            unavailable("could not publish", self._connections.availability),
        ):
            stream_id = script(
                keys=[self.key], args=publish_args(self._maxlen, draft), client=client
            )
        return draft.stamp(cast("bytes", stream_id).decode())

    async def apublish(self, draft: Draft) -> Event:
        """Do what [`publish`][ssecast.redis.RedisBackend.publish] does, in a worker thread.

        :param draft: the validated, encoded event.
        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        return await asyncio.to_thread(self.publish, draft)

    # -- history ---------------------------------------------------------------------

    def replay(
        self, after: str, until: str | None, channels: frozenset[str]
    ) -> list[Event] | Ahead | None:
        """Return the events on `channels` after id `after`, up to `until` included.

        :param after: the id the client saw last.
        :param until: the last id already delivered to this process; `None` means the
            newest id in the stream when [`listen`][ssecast.redis.RedisBackend.listen] ran.
        :param channels: the channels to keep.
        :returns: an [`Ahead`][ssecast.Ahead] when `after` is in the stream but newer
            than `until`; `None` when it is not a stream id, is not in the stream
            (never was, or trimmed away), or events after it may be lost (a gap marker,
            or a number missing in `seq`).
        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        start = parse_id(after)
        if start is None:
            return None
        end = self._origin if until is None else until
        with (
            self._connections.shared() as (client, _),
            unavailable("could not read history", self._connections.availability),
        ):
            if start <= (parse_id(end) or start):
                return self._range(client, after, end, channels)
            if not client.xrange(self.key, after, after, count=1):
                return None  # from another stream, or lost in a restart: a gap
            # The client saw it through a faster process; this one has yet to deliver it.
            return Ahead(lambda event_id: (parse_id(event_id) or start) > start)

    def _range(
        self, client: redis.Redis, after: str, end: str, channels: frozenset[str]
    ) -> list[Event] | None:
        """Read (`after`, `end`] page by page; `None` where events may be missing."""
        events: list[Event] = []
        cursor, seq = after, None
        while True:
            # Both reads in one transaction: if the cursor entry is still there, no entry
            # after it was trimmed before the range was read.
            with client.pipeline(transaction=True) as pipe:
                pipe.xrange(self.key, cursor, cursor, count=1)
                pipe.xrange(self.key, "(" + cursor, end, count=_REPLAY_PAGE)
                found, raws = pipe.execute()
            if not found:
                return None
            for entry in map(Entry.parse, found + raws):
                if entry.gap or (entry.seq and seq and entry.seq not in (seq, seq + 1)):
                    return None  # events may be missing there: the client gets a gap
                seq = entry.seq or seq
                if entry.id != cursor and entry.event and entry.event.channel in channels:
                    events.append(entry.event)
            if len(raws) < _REPLAY_PAGE:
                return events
            cursor = raws[-1][0].decode()

    # -- health ----------------------------------------------------------------------

    def check(self) -> None:
        """Ping Redis; return when it answers.

        It waits 2 seconds at most to connect and 5 for the answer.

        :raises BackendUnavailableError: Redis could not be reached or did not answer.
        """
        with (
            self._connections.shared() as (client, _),
            unavailable("the health check failed", self._connections.availability),
        ):
            client.ping()

    @property
    def available(self) -> bool:
        """Whether the last command reached Redis (`True` before the first); no I/O."""
        return self._connections.availability.up

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reader thread and close every connection. Safe to call twice.

        It may wait a few seconds for a command in flight;
        [`aclose`][ssecast.redis.RedisBackend.aclose] waits in a worker thread.
        """
        self._connections.availability.close()  # before the reader's connection is cut
        with self._lock:
            self._closed = True
            reader, self._reader = self._reader, None
            connecting = self._connecting
        if connecting is not None:  # a listen() waiting for Redis gives up at once
            with contextlib.suppress(Exception):
                connecting.connection_pool.disconnect()
        if reader is not None:
            reader.stop()
        self._connections.close()

    async def aclose(self) -> None:
        """Do what [`close`][ssecast.redis.RedisBackend.close] does, in a worker thread."""
        await asyncio.to_thread(self.close)

    def _in_child(self) -> None:
        """In a forked child: the reader thread was the parent's; this process needs its own."""
        self._reader = None
        self._listening = False
