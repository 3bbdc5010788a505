"""One client's subscription: its pending frames, how it is read, and the audience that feeds it.

The broadcaster appends frames to a `Feed` under its lock; a reader takes
everything pending in one chunk (one socket write however far it fell behind). Every
reader does that through one operation, `Feed.poll`, which takes what is pending
and parks a *waiter*, which stays parked, and is woken whenever a frame comes to the feed
a poll left empty, and when the feed ends:

- a `threading.Event` for a thread (`for chunk in sub`), which it waits on;
- a `Callback` for an event loop: the loop calls its class's `ready_all()` with the
  readers of the loop that frames or the end woke, and a `Heartbeat` calls its
  `heartbeat_due()` once the reader has been quiet for a heartbeat. A task (`async for`)
  parks one that resolves the future it awaits; the ASGI pump (`_pump.py`) is one, and
  writes from the callback.

A subscription with a lifetime ends when it runs out: a thread reader bounds its waits by
it, and the clock of a loop reader's loop (one timer for all its `Heartbeat`s) fires at it.

Publishers collect the waiters to wake under the lock and wake them after releasing it,
with one callback per event loop rather than one per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

from ssecast._wire import HEARTBEAT

__all__ = [
    "Audience",
    "Callback",
    "CloseReason",
    "Feed",
    "Heartbeat",
    "Reader",
    "Status",
    "Subscription",
    "Waiter",
    "feed_of",
    "poll_all",
    "wake",
]


class Callback(Protocol):
    """A reader on an event loop, which the loop calls instead of waking a thread."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop that calls it (an attribute: it is read for every wake-up)."""

    @staticmethod
    def ready_all(waiters: list[Any]) -> None:
        """Poll the feeds of `waiters` (of this class, on this loop): frames, or the end, came."""

    def heartbeat_due(self) -> None:
        """Poll the feed, and send a heartbeat if still idle: the reader has been quiet."""


Waiter = threading.Event | Callback


class Status(enum.Enum):
    """What `Feed.poll` found when it found no frames."""

    IDLE = "nothing pending; the waiter is parked"
    ENDED = "the subscription ended, and every frame left was read"


class CloseReason(enum.StrEnum):
    """Why a subscription ended."""

    UNSUBSCRIBED = "unsubscribed"
    """The consumer closed it, or left its `with` block."""
    EVICTED = "evicted"
    """It fell more than `queue_size` frames behind; its pending frames were dropped."""
    SHUTDOWN = "shutdown"
    """The broadcaster was closed; frames already pending are still read out."""
    EXPIRED = "expired"
    """Its stream's `lifetime` ran out; the client reconnects and resumes."""
    REVOKED = "revoked"
    """`Broadcaster.disconnect` ended it."""


_READ_OUT = frozenset((CloseReason.SHUTDOWN, CloseReason.EXPIRED))
"""The ends whose pending frames are still read: the others drop them."""


class Feed:
    """What one subscription shares with the broadcaster: its frames, its waiter, its end.

    Its lock is the broadcaster's. Methods documented "the caller holds the lock" are the
    broadcaster's, called during a fan-out; the others take the lock themselves.

    :ivar channels: the channels it receives.
    :ivar capacity: the most frames it may have pending.
    :ivar heartbeat: seconds of silence before its reader sends a heartbeat, or `None`.
    :ivar key: the key it was tagged with, or `None`.
    :ivar expires: when its lifetime runs out (`time.monotonic()`), or `None`.
    :ivar close_reason: `None` while open, then why it ended.
    """

    __slots__ = (
        "_audiences",
        "_head",
        "_lock",
        "_pending",
        "_waiter",
        "capacity",
        "channels",
        "close_reason",
        "expires",
        "heartbeat",
        "held_for",
        "key",
        "taken",
    )

    def __init__(
        self,
        *,
        channels: frozenset[str],
        capacity: int,
        heartbeat: float | None,
        head: list[bytes],
        lock: threading.Lock,
        key: str | None = None,
        expires: float | None = None,
    ) -> None:
        self.channels = channels
        self.capacity = capacity
        self.heartbeat = heartbeat
        self.key = key
        self.expires = expires
        self.close_reason: CloseReason | None = None
        self.taken = False
        """Whether a poll took frames since its reader's `Heartbeat` last looked."""
        self.held_for: str | None = None
        """The id it waits for before it joins its audiences; see `Broadcaster._hold`."""
        self._lock = lock
        # Frames written before the live ones (retry, replay, gap); they do not count
        # against the capacity, and are the very objects the history holds, not copies.
        self._head: list[bytes] | None = head or None
        # Never replaced, only cleared: every audience of this feed holds this very list.
        self._pending: list[bytes] = []
        self._waiter: Waiter | None = None
        self._audiences: tuple[Audience, ...] = ()

    @property
    def closed(self) -> bool:
        """Whether it has ended; read without the lock, so a hint unless it says True."""
        return self.close_reason is not None

    @property
    def discarded(self) -> bool:
        """Whether it ended with its frames dropped: unsubscribed, evicted or revoked."""
        return self.close_reason is not None and self.close_reason not in _READ_OUT

    @property
    def waiting(self) -> bool:
        """Whether a waiter is parked; read without the lock, so a hint."""
        return self._waiter is not None

    def poll(self, waiter: Waiter | None) -> list[bytes] | Status:
        """Take what is pending, and leave `waiter` parked unless the feed has ended.

        It replaces whatever waiter was parked before (a subscription has one reader at a
        time); `None` parks nothing. A parked waiter is woken when a frame comes to the
        feed this poll left empty, or when the feed ends; it stays parked (so the next
        poll need not park it again) until a poll parks another, or `withdraw`. The
        frames come back as a list for the caller to join after the lock is released: a
        reader far behind must not hold up publishers while it copies megabytes.

        :returns: the frames, oldest first; else `Status.IDLE` (`waiter` will be
            woken when more come) or `Status.ENDED`.
        """
        # acquire/release rather than `with`: this runs once per read, and on CPython 3.11
        # `with` costs a lock-free read's worth more (benchmarks/fanout.py, one per read).
        lock = self._lock
        lock.acquire()
        try:
            pending = self._pending
            frames: list[bytes] | None
            if self._head:
                frames, self._head = self._head, None
                frames += pending
                pending.clear()
                self.taken = True
            elif pending:
                frames = pending.copy()
                pending.clear()
                self.taken = True
            elif self.close_reason is not None:
                return Status.ENDED
            else:
                frames = None
            self._waiter = None if self.close_reason is not None else waiter
        finally:
            lock.release()
        return Status.IDLE if frames is None else frames

    def withdraw(self, waiter: Waiter) -> None:
        """Take back `waiter` if it is the one parked (its reader stopped waiting)."""
        with self._lock:
            if self._waiter is waiter:
                self._waiter = None

    def parked_on(self, loop: asyncio.AbstractEventLoop) -> Callback | None:
        """Return the waiter parked by a reader on `loop`, if there is one."""
        with self._lock:
            waiter = self._waiter
        if waiter is None or isinstance(waiter, threading.Event) or waiter.loop is not loop:
            return None
        return waiter

    def join(self, audiences: tuple[Audience, ...]) -> None:
        """Become a member of `audiences`, one per channel. The caller holds the lock."""
        self._audiences = audiences
        for audience in audiences:
            audience.add(self)

    def push(self, frame: bytes, woken: list[Waiter | None]) -> bool:
        """Append `frame`; collect the waiter to wake; return whether it overflowed.

        The caller holds the lock.
        """
        pending = self._pending
        if not pending and self._waiter is not None:
            woken.append(self._waiter)
        pending.append(frame)
        return len(pending) > self.capacity

    def end(self, reason: CloseReason) -> Waiter | None:
        """Mark it ended; return the waiter to wake. The caller holds the lock.

        Frames stay only for a shutdown or an expiry, so that its reader gets what was
        published first.
        """
        if self.close_reason is None:
            self.close_reason = reason
        if reason not in _READ_OUT:
            self._pending.clear()
            self._head = None
        waiter, self._waiter = self._waiter, None
        return waiter


class Audience:
    """The feeds of one channel, arranged so that a fan-out is one tight loop.

    Not thread-safe: the broadcaster calls it under its lock.
    """

    __slots__ = ("alone", "capacity", "channels", "feeds")

    def __init__(self, channel: str) -> None:
        self.channels = frozenset((channel,))
        """Its channel, as the `channels` of a feed that receives it alone."""
        self.alone = (self,)
        """Itself, as the audiences of a feed that receives its channel alone."""
        self.feeds: dict[Feed, list[bytes]] = {}
        """Each member's pending list, iterated by `deliver`."""
        self.capacity: int | None = None
        """The capacity every member shares, or `None` once two members differ."""

    def __len__(self) -> int:
        return len(self.feeds)

    def add(self, feed: Feed) -> None:
        """Make `feed` a member (see `Feed.join`)."""
        if not self.feeds:
            self.capacity = feed.capacity
        elif self.capacity != feed.capacity:
            self.capacity = None
        self.feeds[feed] = feed._pending

    def remove(self, feed: Feed) -> None:
        """Stop delivering to `feed`; `Feed.end` takes back its waiter."""
        del self.feeds[feed]

    def deliver(self, frame: bytes, woken: list[Waiter | None], evicted: list[Feed]) -> None:
        """Append `frame` for every member; collect the waiters to wake and the overflowed.

        An overflowed member is collected, not removed, because the loop is iterating over
        the dict that holds it; removing inside the loop would skip the next one.
        """
        # A member its reader's poll left empty is woken, if the reader left a waiter.
        capacity = self.capacity
        if capacity is not None:
            # Every member has the same limit, so the loop does one comparison and one
            # append per member; the rare overflow is looked for afterwards.
            overflowed = False
            for feed, pending in self.feeds.items():
                if not pending:
                    if feed._waiter is not None:
                        woken.append(feed._waiter)
                elif len(pending) >= capacity:
                    overflowed = True
                pending.append(frame)
            if overflowed:
                evicted.extend(
                    feed for feed, pending in self.feeds.items() if len(pending) > capacity
                )
        else:
            for feed, pending in self.feeds.items():
                if not pending and feed._waiter is not None:
                    woken.append(feed._waiter)
                pending.append(frame)
                if len(pending) > feed.capacity:
                    evicted.append(feed)


class Heartbeat:
    """A reader's heartbeats and lifetime on `loop`, kept by the loop's clock once started.

    A poll that takes frames marks the feed `taken`, so that a write costs the reader
    nothing more; the clock reads and clears the mark. It calls `heartbeat_due()` on the
    reader's waiter once the reader has been quiet for a heartbeat, and ends the
    subscription (`CloseReason.EXPIRED`) when its lifetime runs out. One clock per loop
    ticks for every reader on it, so that an idle stream keeps no timer of its own: a
    heartbeat comes after `heartbeat` seconds of silence, at most a quarter of that
    later; a lifetime ends on time.
    """

    __slots__ = (
        "_clock",
        "_ends",
        "_feed",
        "_interval",
        "_quiet_since",
        "_release",
        "_stopped",
        "loop",
    )

    def __init__(self, sub: Subscription, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._feed = sub._feed
        self._release = sub._release
        self._stopped = False
        self._clock: _Clock | None = None

    def start(self) -> Self:
        """Have the loop's clock keep it, from now on; on the loop's thread."""
        feed, loop = self._feed, self.loop
        # No heartbeat, or no lifetime, is one that never comes.
        self._interval = math.inf if feed.heartbeat is None else feed.heartbeat
        now = loop.time()
        # In the loop's time, which need not be time.monotonic()'s.
        self._ends = math.inf if feed.expires is None else now + feed.expires - time.monotonic()
        self._quiet_since = now
        self._clock = _Clock.of(loop)
        self._clock.add(self)
        return self

    def stop(self) -> None:
        """Stop it; from another thread, the clock lets go of it at its next tick."""
        self._stopped = True
        # The clock is touched only on its loop's thread.
        if self._clock is not None and _running_loop() is self.loop:
            self._clock.drop(self)

    def due(self, now: float) -> bool:
        """Beat or end if it is time; return whether the clock is to keep it."""
        if self._stopped or self._feed.closed:
            return False
        if now >= self._ends:
            self._release(self._feed, CloseReason.EXPIRED)
            return False
        if self._feed.taken:
            self._feed.taken = False
            self._quiet_since = now
        elif now >= self._quiet_since + self._interval:
            waiter = self._feed.parked_on(self.loop)
            if waiter is not None:
                waiter.heartbeat_due()
            self._quiet_since = now
        return True


class _Clock:
    """The one timer of a loop's `Heartbeat`s: ticks while it has any, a quarter heartbeat apart.

    Touched only on its loop's thread. The registry of clocks is a plain dict: each loop
    adds and removes only its own clock, and the GIL keeps each of those steps whole. A
    clock leaves it when its last reader goes (at once when the reader stops on the loop,
    at the next tick when another thread stopped it); one whose loop closed first stays
    until the next clock is made, which drops it.
    """

    __slots__ = ("_beats", "_loop", "_tick", "_timer", "_wakes_at")

    _clocks: ClassVar[dict[asyncio.AbstractEventLoop, _Clock]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._beats: dict[Heartbeat, None] = {}
        self._tick = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._wakes_at = math.inf

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Clock:
        """Return the clock of `loop`, made on first use."""
        clock = cls._clocks.get(loop)
        if clock is None:
            for other in list(cls._clocks):
                if other.is_closed():  # closed with readers still on it
                    cls._clocks.pop(other, None)
            clock = cls._clocks[loop] = _Clock(loop)
        return clock

    def add(self, beat: Heartbeat) -> None:
        """Tick for `beat` from now on."""
        self._beats[beat] = None
        self._tick = min(self._tick, beat._interval / 4)
        self._arm(min(self._loop.time() + self._tick, beat._ends))

    def drop(self, beat: Heartbeat) -> None:
        """Stop ticking for `beat`; with no other, stop, so that the loop can be collected."""
        if beat in self._beats:
            del self._beats[beat]
            if not self._beats:
                self._stop()

    def _stop(self) -> None:
        # Precondition: it is its loop's registered clock. A heartbeat's write during a
        # tick may drop other beats, but never the writer's own: a tick cannot empty it.
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._wakes_at, self._tick = None, math.inf, math.inf
        del self._clocks[self._loop]

    def _arm(self, at: float) -> None:
        if at < self._wakes_at and at != math.inf:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(at, self._fire)
            self._wakes_at = at

    def _fire(self) -> None:
        self._timer, self._wakes_at = None, math.inf
        now = self._loop.time()
        next_end = math.inf
        # A copy: a heartbeat's write runs a `send`, which may close other readers of the
        # loop, and so drop their beats meanwhile.
        for beat in list(self._beats):
            if beat.due(now):
                next_end = min(next_end, beat._ends)
            else:
                self._beats.pop(beat, None)
        if self._beats:
            self._arm(min(now + self._tick, next_end))
        else:
            self._stop()


class Subscription:
    """A live feed of SSE frames for one client, from one or more channels.

    Iterate it (`for` in a thread, `async for` in a task) to get `bytes` ready for the
    socket; use it as a context manager (`with` or `async with`) so it is closed when the
    client goes. Made by [`Broadcaster.subscribe`][ssecast.Broadcaster.subscribe], not
    directly. One reader at a time: two threads iterating the same subscription take turns
    badly.

    :ivar channels: the channels it receives.
    """

    __slots__ = (
        "__weakref__",
        "_beat",
        "_busy",
        "_feed",
        "_release",
        "_task_waiter",
        "_thread_waiter",
        "channels",
    )

    def __init__(self, feed: Feed, release: Callable[[Feed, CloseReason], None]) -> None:
        self.channels = feed.channels
        self._feed = feed
        self._release = release
        self._thread_waiter: threading.Event | None = None
        # Only touched by an async reader, on its loop.
        self._task_waiter: _TaskWaiter | None = None
        self._beat: Heartbeat | None = None
        self._busy = False  # the last read returned without waiting

    def __repr__(self) -> str:
        state = self.close_reason or ("waiting" if self._feed.waiting else "open")
        return f"<Subscription channels={sorted(self.channels)!r} {state}>"

    @property
    def close_reason(self) -> CloseReason | None:
        """`None` while open, then why it ended."""
        return self._feed.close_reason

    @property
    def closed(self) -> bool:
        """Whether it has ended (see [`close_reason`][ssecast.Subscription.close_reason])."""
        return self._feed.closed

    def close(self) -> None:
        """Unsubscribe and drop pending frames; a waiting reader ends. Safe to call twice."""
        self._release(self._feed, CloseReason.UNSUBSCRIBED)
        if self._beat is not None:
            self._beat.stop()

    def read_nowait(self) -> bytes:
        """Return every pending frame as one chunk, or `b""` if there is none; never wait."""
        frames = self._feed.poll(None)
        return b"".join(frames) if type(frames) is list else b""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        """Block this thread until there is a chunk, a heartbeat is due, or it ends."""
        feed = self._feed
        waiter = self._thread_waiter
        if waiter is None:
            waiter = self._thread_waiter = threading.Event()
        beat_at = None if feed.heartbeat is None else time.monotonic() + feed.heartbeat
        while True:
            if feed.expires is not None and time.monotonic() >= feed.expires:
                self._release(feed, CloseReason.EXPIRED)  # what is pending is still read
            # Cleared before polling: a wake-up that lands in between comes with frames,
            # which the poll takes.
            waiter.clear()
            got = feed.poll(waiter)
            if got is Status.IDLE:
                expiring = feed.expires is not None and (beat_at is None or feed.expires < beat_at)
                wake_at = feed.expires if expiring else beat_at
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                if waiter.wait(timeout) or expiring:
                    continue
                got = feed.poll(None)
                if got is Status.IDLE:
                    return HEARTBEAT
            if got is Status.ENDED:
                raise StopIteration
            return b"".join(got)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        """Wait, without blocking the loop, for a chunk, a heartbeat, or the end."""
        feed = self._feed
        loop = asyncio.get_running_loop()
        beat = self._beat
        timed = feed.heartbeat is not None or feed.expires is not None
        if timed and (beat is None or beat.loop is not loop):
            if beat is not None:
                beat.stop()  # it belongs to a loop this subscription was read on before
            beat = self._beat = Heartbeat(self, loop).start()
        if self._busy:
            # A reader that never catches up would otherwise never let other tasks run;
            # it yields once per chunk, before taking anything, so a cancel loses nothing.
            await asyncio.sleep(0)
        self._busy = True
        while True:
            waiter = self._task_waiter
            got: list[bytes] | Status
            if waiter is None or waiter.future.done() or waiter.loop is not loop:
                waiter = self._task_waiter = _TaskWaiter(loop.create_future())
                got = feed.poll(waiter)
            elif feed._waiter is waiter:
                # Parked by the poll that took everything, and not woken since: nothing
                # came, so no need to take the lock to find that out.
                got = Status.IDLE
            else:
                got = feed.poll(waiter)
            if got is Status.IDLE:
                self._busy = False
                try:
                    heartbeat_due = await waiter.future
                except BaseException:  # cancelled: no publisher may hold on to the future
                    feed.withdraw(waiter)
                    raise
                if not heartbeat_due:
                    continue
                got = feed.poll(None)
                if got is Status.IDLE:
                    got = [HEARTBEAT]
            if got is Status.ENDED:
                if beat is not None:
                    beat.stop()
                raise StopAsyncIteration
            return b"".join(got)


class _TaskWaiter:
    """The waiter of a task: resolves the future it awaits, with whether a heartbeat is due."""

    __slots__ = ("future", "loop")

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future
        self.loop = future.get_loop()

    @staticmethod
    def ready_all(waiters: list[_TaskWaiter]) -> None:
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_result(False)

    def heartbeat_due(self) -> None:
        if not self.future.done():
            self.future.set_result(True)


class Reader(Callback, Protocol):
    """A `Callback` that reads one feed, such as the ASGI pump."""

    _feed: Feed


def poll_all(readers: Sequence[Reader]) -> list[bytes | list[bytes] | None]:
    """Take what is pending for each reader still parked on its feed, under one hold of the lock.

    The readers are ones `wake` woke together, so one broadcaster's, whose lock all their
    feeds share (so at least one). A single frame comes as itself rather than in a list.
    `None` where the reader must poll in full if it still reads: nothing pending, frames
    ahead of the live ones, the feed ended, or the reader withdrew since it was woken.
    """
    polled: list[bytes | list[bytes] | None] = []
    lock = readers[0]._feed._lock
    lock.acquire()
    try:
        for reader in readers:
            feed = reader._feed
            pending = feed._pending
            # What a wake-up nearly always finds: `poll` for that case inlined. A parked
            # waiter stays parked, and only on an open feed.
            if pending and feed._waiter is reader and not feed._head:
                polled.append(pending[0] if len(pending) == 1 else pending.copy())
                pending.clear()
                feed.taken = True
            else:
                polled.append(None)
    finally:
        lock.release()
    return polled


def feed_of(sub: Subscription) -> Feed:
    """Return the feed behind `sub`, for readers outside this module (the pump)."""
    return sub._feed


def wake(waiters: Iterable[Waiter | None]) -> None:
    """Wake parked readers: threads directly, the others by one callback per loop and kind.

    The waiters are one broadcaster's (see `poll_all`); `None` is skipped.
    """
    batches: dict[tuple[asyncio.AbstractEventLoop, type[Callback]], list[Callback]] = {}
    last_loop: asyncio.AbstractEventLoop | None = None
    last_kind: type[Callback] | None = None
    batch: list[Callback] = []
    for waiter in waiters:
        # Readers come in runs of one loop and kind: one lookup per run.
        if type(waiter) is last_kind and waiter.loop is last_loop:
            batch.append(waiter)
        elif isinstance(waiter, threading.Event):
            waiter.set()
        elif waiter is not None:
            last_loop, last_kind = waiter.loop, type(waiter)
            batch = batches.setdefault((last_loop, last_kind), [])
            batch.append(waiter)
    if not batches:
        return
    here = _running_loop()
    for (loop, kind), batch in batches.items():
        if loop is here:
            # Later, not now: a callback then writes what several events brought at once,
            # and never inside the publisher's own write.
            loop.call_soon(kind.ready_all, batch)
        else:
            # A closed loop raises RuntimeError; its readers are gone with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(kind.ready_all, batch)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
