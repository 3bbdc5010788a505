"""One client's subscription, and the audience of one channel that fans frames out to it.

The broadcaster appends frames under its lock; the consumer takes everything pending
in one chunk (one socket write however far it fell behind). A consumer with nothing to
read parks a *waiter*: a ``threading.Event`` for a thread, an ``asyncio.Future`` for a
task, or a :class:`Callback` that the loop calls itself (see ``_pump.py``). Publishers
collect the waiters they must wake and wake them after releasing the lock, with one
callback per event loop rather than one per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from enum import StrEnum
from types import TracebackType
from typing import Final, Protocol, Self, cast

from ssecast._wire import HEARTBEAT

__all__ = ["Audience", "Callback", "CloseReason", "Subscription", "Waiter", "wake"]


class Callback(Protocol):
    """An asynchronous consumer that its event loop calls, instead of waking a task."""

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """Return the loop to call :meth:`wake` on."""

    def wake(self, woken: bool) -> None:
        """Take the frames or the end that arrived (``woken``), or write a heartbeat (not)."""


Waiter = threading.Event | asyncio.Future[bool] | Callback

_WOKEN: Final = True
_TIMED_OUT: Final = False


class CloseReason(StrEnum):
    """Why a subscription ended."""

    UNSUBSCRIBED = "unsubscribed"
    """The consumer closed it, or left its ``with`` block."""
    EVICTED = "evicted"
    """It fell more than ``queue_size`` frames behind; its pending frames were dropped."""
    SHUTDOWN = "shutdown"
    """The broadcaster was closed; frames already pending are still read out."""


class Subscription:
    """A live feed of SSE frames for one client, from one or more channels.

    Iterate it (``for`` in a thread, ``async for`` in a task) to get ``bytes`` ready for
    the socket; use it as a context manager (``with`` or ``async with``) so it is
    closed when the client goes. Made by :meth:`Broadcaster.subscribe`, not directly.

    :ivar channels: the channels it receives.
    :ivar close_reason: ``None`` while open, then why it ended.
    """

    __slots__ = (
        "__weakref__",
        "_audiences",
        "_capacity",
        "_head",
        "_heartbeat",
        "_heartbeat_loop",
        "_heartbeat_timer",
        "_lock",
        "_pending",
        "_quiet_since",
        "_release",
        "_thread_waiter",
        "_waiter",
        "channels",
        "close_reason",
    )

    def __init__(
        self,
        *,
        channels: frozenset[str],
        capacity: int,
        heartbeat: float | None,
        head: list[bytes],
        lock: threading.Lock,
        release: Callable[[Subscription], None],
    ) -> None:
        self.channels = channels
        self.close_reason: CloseReason | None = None
        self._capacity = capacity
        self._heartbeat = heartbeat
        # Frames written before the live ones (retry, replay, gap); they do not count
        # against the capacity, and are the very objects the history holds, not copies.
        self._head = head
        self._lock = lock
        self._release = release
        # All below are guarded by self._lock, which the broadcaster shares.
        # The list object never changes: every audience of this subscription holds it.
        self._pending: list[bytes] = []
        self._waiter: Waiter | None = None
        self._thread_waiter: threading.Event | None = None
        self._audiences: tuple[Audience, ...] = ()
        # Only touched by an async reader, on its loop: when it last returned a chunk,
        # and the one timer that checks, at most once a heartbeat, whether it is due.
        self._quiet_since = 0.0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._heartbeat_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        state = self.close_reason or "open"
        return f"<Subscription channels={sorted(self.channels)!r} {state}>"

    @property
    def closed(self) -> bool:
        """Whether it has ended (see :attr:`close_reason`)."""
        return self.close_reason is not None

    def close(self) -> None:
        """Unsubscribe and drop pending frames; a waiting reader ends. Safe to call twice."""
        self._release(self)
        self._stop_heartbeat()

    def read_nowait(self) -> bytes:
        """Return every pending frame as one chunk, or ``b""`` if there is none; never wait."""
        with self._lock:
            frames = self._take()
        return b"".join(frames) if frames else b""

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
        waiter = self._thread_waiter
        if waiter is None:
            waiter = self._thread_waiter = threading.Event()
        deadline = None if self._heartbeat is None else time.monotonic() + self._heartbeat
        while True:
            with self._lock:
                frames = self._take()
                if frames is None:
                    self._park(waiter)
            if frames is None:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if waiter.wait(timeout):
                    continue
                frames = self._give_up_waiting(waiter)
            if not frames:
                raise StopIteration
            return b"".join(frames)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        """Wait, without blocking the loop, for a chunk, a heartbeat, or the end."""
        loop = asyncio.get_running_loop()
        self._arm_heartbeat(loop)
        while True:
            with self._lock:
                frames = self._take()
                if frames is None:
                    future: asyncio.Future[bool] = loop.create_future()
                    self._park(future)
            if frames is None:
                try:
                    woken = await future
                except BaseException:  # cancelled: no publisher may hold on to the future
                    with self._lock:
                        self._unpark(future)
                    raise
                if woken:
                    continue
                frames = self._give_up_waiting(future)
            if not frames:
                self._stop_heartbeat()
                raise StopAsyncIteration
            self._quiet_since = loop.time()
            return b"".join(frames)

    def _arm_heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the heartbeat timer of an asynchronous reader on ``loop``, unless running."""
        if self._heartbeat is not None and self._heartbeat_timer is None:
            self._heartbeat_loop = loop
            self._quiet_since = loop.time()
            self._heartbeat_timer = loop.call_at(
                self._quiet_since + self._heartbeat, _heartbeat_due, weakref.ref(self), loop
            )

    def _stop_heartbeat(self) -> None:
        """Cancel the heartbeat timer, if this thread runs the loop it is on."""
        timer = self._heartbeat_timer
        if timer is None:
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        # A timer may only be cancelled from its loop's thread; elsewhere it is left to
        # fire, find the subscription closed (or gone: it holds a weak reference), and stop.
        if here is self._heartbeat_loop:
            timer.cancel()
            self._heartbeat_timer = None

    def _heartbeat_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake a reader quiet for a heartbeat; otherwise look again when one could be due."""
        # Runs on the reader's loop. One timer per reader, not one per wait: a reader that
        # gets a chunk every few milliseconds would otherwise make and cancel a timer each.
        if self.close_reason is not None:
            self._heartbeat_timer = None
            return
        heartbeat = cast(float, self._heartbeat)
        due = self._quiet_since + heartbeat
        if loop.time() >= due:
            with self._lock:
                waiter = self._waiter
            if waiter is not None and not isinstance(waiter, threading.Event):
                _resolve(waiter, _TIMED_OUT)
            due = loop.time() + heartbeat
        self._heartbeat_timer = loop.call_at(due, _heartbeat_due, weakref.ref(self), loop)

    def _take(self) -> list[bytes] | None:
        """Take the pending frames; ``[]`` once it ended, ``None`` while open and idle.

        The caller joins them after releasing the lock: a reader far behind must not
        hold up publishers while it copies megabytes.
        """
        # Precondition: self._lock is held.
        pending = self._pending
        if self._head:
            frames = self._head + pending
            self._head = []
        elif pending:
            frames = pending.copy()
        elif self.close_reason is not None:
            return []
        else:
            return None
        pending.clear()
        return frames

    def _park(self, waiter: Waiter) -> None:
        """Register ``waiter`` to be woken by the next frame or the end."""
        # Precondition: self._lock is held, and _take() just found nothing.
        if isinstance(waiter, threading.Event):
            waiter.clear()
        self._waiter = waiter
        for audience in self._audiences:
            audience.parked[self] = None

    def _give_up_waiting(self, waiter: Waiter) -> list[bytes]:
        """Unpark ``waiter`` after a timeout; return what arrived meanwhile, or a heartbeat."""
        with self._lock:
            self._unpark(waiter)
            frames = self._take()
        return [HEARTBEAT] if frames is None else frames

    def _unpark(self, waiter: Waiter | None) -> Waiter | None:
        """Take back the parked waiter if it is ``waiter`` (any, for ``None``); return it."""
        # Precondition: self._lock is held.
        parked = self._waiter
        if parked is None or (waiter is not None and parked is not waiter):
            return None
        self._waiter = None
        for audience in self._audiences:
            del audience.parked[self]
        return parked

    def _end(self, reason: CloseReason) -> Waiter | None:
        """Mark it ended; return the waiter to wake. Frames stay only for a shutdown."""
        # Precondition: self._lock is held.
        if self.close_reason is None:
            self.close_reason = reason
        if reason is not CloseReason.SHUTDOWN:
            self._pending.clear()
            self._head = []
        return self._unpark(None)


class Audience:
    """The subscriptions of one channel, arranged so that a fan-out is one tight loop.

    Not thread-safe: the broadcaster calls it under its lock.
    """

    __slots__ = ("buffers", "capacity", "parked")

    def __init__(self) -> None:
        self.buffers: dict[Subscription, list[bytes]] = {}
        """Each member's pending list, iterated by :meth:`deliver`."""
        self.parked: dict[Subscription, None] = {}
        """Members whose reader waits for a frame."""
        self.capacity: int | None = None
        """The capacity every member shares, or ``None`` once two members differ."""

    def add(self, sub: Subscription) -> None:
        """Make ``sub`` a member; the caller also lists this audience in ``sub._audiences``."""
        if not self.buffers:
            self.capacity = sub._capacity
        elif self.capacity != sub._capacity:
            self.capacity = None
        self.buffers[sub] = sub._pending

    def deliver(
        self, frame: bytes, woken: list[Waiter | None], evicted: list[Subscription]
    ) -> None:
        """Append ``frame`` for every member; collect the waiters to wake and the overflowed.

        An overflowed member is collected, not removed, because the loop is iterating over
        the dict that holds it; removing inside the loop would skip the next one.
        """
        capacity = self.capacity
        if capacity is not None:
            # Every member has the same limit, so the loop does one comparison and one
            # append per member; the rare overflow is looked for afterwards.
            overflowed = False
            for pending in self.buffers.values():
                if len(pending) >= capacity:
                    overflowed = True
                pending.append(frame)
            if overflowed:
                evicted.extend(
                    sub for sub, pending in self.buffers.items() if len(pending) > capacity
                )
        else:
            for sub, pending in self.buffers.items():
                pending.append(frame)
                if len(pending) > sub._capacity:
                    evicted.append(sub)
        if self.parked:
            for sub in list(self.parked):
                woken.append(sub._unpark(None))


def wake(waiters: Iterable[Waiter | None]) -> None:
    """Wake parked readers: threads directly, the others by one callback per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool] | Callback]] = {}
    last_loop: asyncio.AbstractEventLoop | None = None
    waiting: list[asyncio.Future[bool] | Callback] = []
    for waiter in waiters:
        if isinstance(waiter, threading.Event):
            waiter.set()
        elif waiter is not None:
            loop = waiter.get_loop()
            if loop is not last_loop:  # readers come in runs of one loop: one lookup per run
                last_loop, waiting = loop, by_loop.setdefault(loop, [])
            waiting.append(waiter)
    if not by_loop:
        return
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    for loop, waiting in by_loop.items():
        if loop is here:
            # Later, not now: a callback then writes what several events brought at once,
            # and never inside the publisher's own write.
            loop.call_soon(_resolve_all, waiting)
        else:
            # A closed loop raises RuntimeError; its readers are gone with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, waiting)


def _heartbeat_due(ref: weakref.ref[Subscription], loop: asyncio.AbstractEventLoop) -> None:
    # The timer holds the subscription weakly, so that one closed in another thread (where
    # its timer cannot be cancelled) is not kept alive until the timer fires.
    sub = ref()
    if sub is not None:
        sub._heartbeat_due(loop)


def _resolve(waiter: asyncio.Future[bool] | Callback, result: bool) -> None:
    if isinstance(waiter, asyncio.Future):
        if not waiter.done():
            waiter.set_result(result)
    else:
        waiter.wake(result)


def _resolve_all(waiting: list[asyncio.Future[bool] | Callback]) -> None:
    for waiter in waiting:
        _resolve(waiter, _WOKEN)
