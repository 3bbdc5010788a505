"""Reading a subscription (ssecast._subscription): threads, event loops, heartbeats, endings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from sse_parser import parse
from ssecast import Broadcaster, CloseReason, Event, Subscription
from ssecast._subscription import feed_of
from ssecast._wire import HEARTBEAT

HEARTBEAT_SECONDS = 0.05
JOIN_TIMEOUT = 10.0
BOUND_SECONDS = 5.0


def _ids(chunks: list[bytes]) -> list[str]:
    return [event.last_event_id for event in parse(b"".join(chunks)).events]


# Whether a reader is parked is not observable through the public API, yet several tests
# need it to be, so that they test waking a waiting reader and not reading a full buffer.
def _parked(sub: Subscription) -> bool:
    return feed_of(sub).waiting


def _wait_parked(sub: Subscription) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not _parked(sub):
        assert time.monotonic() < deadline, "the reader never started waiting"
        time.sleep(0.001)


async def _await_parked(sub: Subscription) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not _parked(sub):
        assert time.monotonic() < deadline, "the reader never started waiting"
        await asyncio.sleep(0.001)


class ThreadReader:
    """Iterates a subscription in its own thread, keeping every chunk, until it ends."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for chunk in self.sub:
            self.chunks.append(chunk)

    def join(self) -> list[bytes]:
        self.thread.join(JOIN_TIMEOUT)
        assert not self.thread.is_alive(), "the reader thread did not end"
        return self.chunks


async def _read_all(sub: Subscription) -> list[bytes]:
    return [chunk async for chunk in sub]


@pytest.fixture
def quiet() -> Iterator[Broadcaster]:
    """A broadcaster without heartbeats, so a waiting reader waits for events only."""
    with Broadcaster(heartbeat=None) as b:
        yield b


@pytest.fixture
def bounded() -> Iterator[Broadcaster]:
    """A broadcaster whose readers never wait long: a bug shows as a heartbeat, not a hang."""
    with Broadcaster(heartbeat=BOUND_SECONDS) as b:
        yield b


def _ended(sub: Subscription) -> bool:
    """Whether the next read ends the iteration (a heartbeat instead means it did not end)."""
    return next(sub, None) is None


# -- reading ------------------------------------------------------------------------------


def test_one_chunk_carries_every_pending_frame(bounded: Broadcaster) -> None:
    """A consumer that fell behind gets all its frames in one write, oldest first."""
    with bounded.subscribe() as sub:
        events = [bounded.publish("t", n) for n in range(5)]
        assert next(sub) == b"".join(event.frame for event in events)
        assert sub.read_nowait() == b""


def test_read_nowait_never_waits(quiet: Broadcaster) -> None:
    """With nothing pending it returns empty bytes at once, and the stream stays open."""
    with quiet.subscribe() as sub:
        assert sub.read_nowait() == b""
        assert not sub.closed


def test_a_blocked_thread_reader_is_woken_by_a_publish_from_another_thread(
    quiet: Broadcaster,
) -> None:
    """A reader waiting in ``for`` receives each event published elsewhere."""
    sub = quiet.subscribe()
    reader = ThreadReader(sub)
    _wait_parked(sub)
    first = quiet.publish("t", 1)
    # Wait for the reader to come back for more, so the second publish wakes it again.
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not (reader.chunks and _parked(sub)):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    second = quiet.publish("t", 2)
    quiet.close()
    assert reader.join() == [first.frame, second.frame]


async def test_an_async_reader_is_woken_by_a_publish_from_a_thread(quiet: Broadcaster) -> None:
    """``async for`` waits without blocking the loop and wakes for a thread's publish."""
    sub = quiet.subscribe()
    task = asyncio.ensure_future(anext(sub))
    await _await_parked(sub)
    event = await asyncio.to_thread(quiet.publish, "t", 1)
    assert await asyncio.wait_for(task, JOIN_TIMEOUT) == event.frame


def test_sync_heartbeat_when_idle_then_events() -> None:
    """An idle thread reader yields a comment frame after ``heartbeat`` seconds."""
    with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b, b.subscribe() as sub:
        started = time.monotonic()
        assert next(sub) == HEARTBEAT
        assert time.monotonic() - started >= HEARTBEAT_SECONDS * 0.9
        assert next(sub) == HEARTBEAT
        event = b.publish("t", 1)
        assert next(sub) == event.frame


async def test_async_heartbeat_when_idle_then_events() -> None:
    """An idle async reader yields a comment frame after ``heartbeat`` seconds."""
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b, b.subscribe() as sub:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == HEARTBEAT
        assert loop.time() - started >= HEARTBEAT_SECONDS * 0.9
        event = await b.apublish("t", 1)
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame


async def test_an_async_reader_fed_often_gets_no_heartbeat_until_it_goes_quiet() -> None:
    """Chunks closer together than ``heartbeat`` keep heartbeats away; quiet brings one."""
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b, b.subscribe() as sub:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < HEARTBEAT_SECONDS * 3:
            await asyncio.sleep(HEARTBEAT_SECONDS / 4)
            event = await b.apublish("t", 1)
            assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame
            quiet = loop.time()
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == HEARTBEAT
        assert loop.time() - quiet >= HEARTBEAT_SECONDS * 0.9


async def test_an_async_reader_busy_when_its_heartbeat_fell_due_gets_one_later() -> None:
    """A reader that was not waiting when a heartbeat fell due gets one once it waits."""
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b, b.subscribe() as sub:
        event = await b.apublish("t", 1)
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame
        await asyncio.sleep(HEARTBEAT_SECONDS * 2)  # busy elsewhere: not waiting on sub
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == HEARTBEAT


class TimerCount:
    """Counts the timers a loop is asked to arm, so a test sees a heartbeat stop re-arming."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = 0
        loop = asyncio.get_running_loop()
        call_at = loop.call_at

        def counting_call_at(
            when: float, callback: Any, *args: Any, **kwargs: Any
        ) -> asyncio.TimerHandle:
            if getattr(callback, "__module__", None) == "ssecast._subscription":
                self.armed += 1
            return call_at(when, callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_at", counting_call_at)


async def test_a_closed_async_reader_leaves_no_heartbeat_timer_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once its subscription ends, a reader's heartbeat timer stops re-arming itself."""
    timers = TimerCount(monkeypatch)
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b:
        sub = b.subscribe()
        reader = asyncio.ensure_future(_read_all(sub))
        await asyncio.sleep(HEARTBEAT_SECONDS * 2.5)
        assert timers.armed >= 2  # it ran: armed, fired, re-armed
        sub.close()
        assert HEARTBEAT in await asyncio.wait_for(reader, JOIN_TIMEOUT)
        armed = timers.armed
        await asyncio.sleep(HEARTBEAT_SECONDS * 3)
        assert timers.armed == armed


async def test_a_reader_closed_from_another_thread_is_not_kept_alive_by_its_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timer cannot be cancelled from another thread; it finds the end and stops."""
    timers = TimerCount(monkeypatch)
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b:
        kept = b.subscribe()
        dropped = b.subscribe()
        event = await b.apublish("t", 1)
        for sub in (kept, dropped):
            assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame
            await asyncio.to_thread(sub.close)
        gone = weakref.ref(dropped)
        del dropped, sub
        gc.collect()
        assert gone() is None  # its timer holds it weakly
        await asyncio.sleep(HEARTBEAT_SECONDS * 2)  # both timers fire and stop
        armed = timers.armed
        await asyncio.sleep(HEARTBEAT_SECONDS * 3)
        assert timers.armed == armed
        assert kept.closed


async def test_a_frame_that_lands_as_the_heartbeat_fires_is_read_instead() -> None:
    """The timer woke the reader, then a frame came before it ran: it gets the frame."""
    async with Broadcaster(heartbeat=JOIN_TIMEOUT) as b, b.subscribe() as sub:
        reader = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0)  # the reader waits
        waiter = feed_of(sub).parked_on(asyncio.get_running_loop())
        assert waiter is not None
        waiter.heartbeat_due()  # what the timer does once the reader has been quiet
        event = b.publish("t", 1)  # before the reader runs again
        assert await asyncio.wait_for(reader, JOIN_TIMEOUT) == event.frame


async def test_a_heartbeat_due_twice_before_the_reader_runs_is_sent_once() -> None:
    """The clock may tick again before the woken reader runs: still one heartbeat."""
    async with Broadcaster(heartbeat=JOIN_TIMEOUT) as b, b.subscribe() as sub:
        reader = asyncio.ensure_future(anext(sub))
        await _await_parked(sub)
        waiter = feed_of(sub).parked_on(asyncio.get_running_loop())
        assert waiter is not None
        waiter.heartbeat_due()
        waiter.heartbeat_due()  # the reader has not run yet: it is still parked
        assert await asyncio.wait_for(reader, JOIN_TIMEOUT) == HEARTBEAT
        event = b.publish("t", 1)
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame


def test_an_async_reader_gets_heartbeats_on_every_event_loop_it_is_read_on() -> None:
    """Read under one asyncio.run() and then another, a subscription still gets heartbeats."""
    with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b, b.subscribe() as sub:

        async def read_two() -> list[bytes]:
            return [await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) for _ in range(2)]

        first = asyncio.run(read_two())
        second = asyncio.run(read_two())  # the first loop, and its timer, are gone
        assert first == second == [HEARTBEAT, HEARTBEAT]


def _publish_into(b: Broadcaster, number: int, published: list[Event]) -> None:
    published.append(b.publish("t", number))


async def test_a_frame_arriving_as_the_heartbeat_falls_due_is_not_lost() -> None:
    """When a publish and the heartbeat coincide, the frame is read, in this chunk or the next."""
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b:
        sub = b.subscribe()
        loop = asyncio.get_running_loop()
        published: list[Event] = []
        for number in range(3):
            reader = asyncio.ensure_future(anext(sub))
            await asyncio.sleep(0)  # the reader fixes its heartbeat deadline and waits
            # Due when the reader's heartbeat is, give or take the microseconds since it began.
            loop.call_at(loop.time() + HEARTBEAT_SECONDS, _publish_into, b, number, published)
            chunk = await asyncio.wait_for(reader, JOIN_TIMEOUT)
            if chunk == HEARTBEAT:
                chunk = await asyncio.wait_for(anext(sub), JOIN_TIMEOUT)
            assert chunk == published[number].frame


def test_retry_prelude_is_the_first_thing_a_reader_gets() -> None:
    """With ``retry`` set, the first chunk begins with the ``retry:`` field."""
    with Broadcaster(retry=1500, heartbeat=BOUND_SECONDS) as b, b.subscribe() as sub:
        event = b.publish("t", 1)
        chunk = next(sub)
    assert chunk == b"retry: 1500\n\n" + event.frame
    assert parse(chunk).retry == 1500


# -- how a subscription ends ---------------------------------------------------------------


def test_close_unsubscribes_drops_pending_and_is_safe_twice(bounded: Broadcaster) -> None:
    """After close() the reason is unsubscribed, nothing more is read, and iteration ends."""
    sub = bounded.subscribe()
    bounded.publish("t", 1)
    sub.close()
    sub.close()
    assert sub.close_reason is CloseReason.UNSUBSCRIBED
    assert sub.closed
    assert sub.read_nowait() == b""
    assert _ended(sub)
    assert bounded.stats().subscribers == 0
    assert "unsubscribed" in repr(sub)


def test_leaving_the_with_block_unsubscribes(quiet: Broadcaster) -> None:
    """The context manager closes the subscription, even on an error."""
    sub = quiet.subscribe("a")
    assert "open" in repr(sub)

    def fail_inside() -> None:
        with sub:
            raise KeyError

    with pytest.raises(KeyError):
        fail_inside()
    assert sub.close_reason is CloseReason.UNSUBSCRIBED


async def test_leaving_the_async_with_block_unsubscribes(quiet: Broadcaster) -> None:
    """``async with`` closes the subscription too."""
    async with quiet.subscribe() as sub:
        pass
    assert sub.close_reason is CloseReason.UNSUBSCRIBED
    assert await asyncio.wait_for(_read_all(sub), JOIN_TIMEOUT) == []


def test_eviction_ends_the_stream_and_drops_its_frames(bounded: Broadcaster) -> None:
    """An evicted subscription yields nothing more and says why it ended."""
    sub = bounded.subscribe(queue_size=2)
    for number in range(3):
        bounded.publish("t", number)
    assert sub.close_reason is CloseReason.EVICTED
    assert _ended(sub)
    sub.close()
    assert sub.close_reason is CloseReason.EVICTED


def test_shutdown_lets_pending_frames_be_read_first(bounded: Broadcaster) -> None:
    """Closing the broadcaster ends each stream only after what was already sent to it."""
    sub = bounded.subscribe()
    events = [bounded.publish("t", n) for n in range(3)]
    bounded.close()
    assert sub.close_reason is CloseReason.SHUTDOWN
    assert next(sub) == b"".join(event.frame for event in events)
    assert _ended(sub)


async def test_shutdown_lets_an_async_reader_drain_first(quiet: Broadcaster) -> None:
    """An async reader reads out its pending frames, then ``async for`` ends."""
    sub = quiet.subscribe()
    event = quiet.publish("t", 1)
    await quiet.aclose()
    assert await asyncio.wait_for(_read_all(sub), JOIN_TIMEOUT) == [event.frame]
    assert sub.close_reason is CloseReason.SHUTDOWN


def test_closing_after_shutdown_drops_what_is_left(quiet: Broadcaster) -> None:
    """The consumer's own close still discards pending frames and keeps the first reason."""
    sub = quiet.subscribe()
    quiet.publish("t", 1)
    quiet.close()
    sub.close()
    assert sub.close_reason is CloseReason.SHUTDOWN
    assert sub.read_nowait() == b""


@pytest.mark.parametrize("closer", ["subscription", "broadcaster"])
def test_a_reader_in_another_thread_is_woken_by_close(quiet: Broadcaster, closer: str) -> None:
    """A thread blocked waiting for events ends promptly when either side closes."""
    sub = quiet.subscribe()
    reader = ThreadReader(sub)
    _wait_parked(sub)
    if closer == "subscription":
        sub.close()
    else:
        quiet.close()
    assert reader.join() == []
    expected = CloseReason.UNSUBSCRIBED if closer == "subscription" else CloseReason.SHUTDOWN
    assert sub.close_reason is expected


async def test_an_async_reader_is_woken_by_close_from_another_thread(quiet: Broadcaster) -> None:
    """A task waiting in ``async for`` ends when a thread closes the broadcaster."""
    sub = quiet.subscribe()
    task = asyncio.ensure_future(_read_all(sub))
    await _await_parked(sub)
    await asyncio.to_thread(quiet.close)
    assert await asyncio.wait_for(task, JOIN_TIMEOUT) == []


@pytest.mark.parametrize("heartbeat", [None, HEARTBEAT_SECONDS])
async def test_cancelling_an_async_reader_leaves_no_parked_waiter(heartbeat: float | None) -> None:
    """After a cancelled read, publishing works and the subscription still reads and closes."""
    async with Broadcaster(heartbeat=heartbeat) as b:
        sub = b.subscribe()
        task = asyncio.ensure_future(anext(sub))
        await _await_parked(sub)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _parked(sub)
        event = b.publish("t", 1)
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame
        task = asyncio.ensure_future(anext(sub))
        await _await_parked(sub)
        sub.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(task, JOIN_TIMEOUT)
        assert sub.close_reason is CloseReason.UNSUBSCRIBED


# -- threads and event loops together --------------------------------------------------------


async def test_sync_and_async_consumers_get_the_same_events_from_threads_and_the_loop() -> None:
    """Events published from two threads and from the loop reach a thread and a task alike."""
    per_source = 100
    b = Broadcaster(heartbeat=None, queue_size=10 * per_source)
    async_sub = b.subscribe()
    thread_reader = ThreadReader(b.subscribe())
    async_reader = asyncio.ensure_future(_read_all(async_sub))
    await _await_parked(async_sub)
    _wait_parked(thread_reader.sub)

    def from_thread(name: str) -> None:
        for number in range(per_source):
            b.publish("t", {"source": name, "n": number})

    async def from_loop() -> None:
        for number in range(per_source):
            b.publish("t", {"source": "loop", "n": number})
            await b.apublish("t", {"source": "aloop", "n": number})
            await asyncio.sleep(0)

    await asyncio.gather(
        asyncio.to_thread(from_thread, "a"), asyncio.to_thread(from_thread, "b"), from_loop()
    )
    await b.aclose()
    async_chunks = await asyncio.wait_for(async_reader, JOIN_TIMEOUT)
    thread_chunks = await asyncio.to_thread(thread_reader.join)
    async_events = parse(b"".join(async_chunks)).events
    thread_events = parse(b"".join(thread_chunks)).events
    assert len(async_events) == 4 * per_source
    assert async_events == thread_events
    assert len({event.last_event_id for event in async_events}) == 4 * per_source


async def test_publishing_from_a_loop_reaches_readers_on_it_and_on_another_loop() -> None:
    """A publish inside a running loop wakes a task on that loop and one on a loop in a thread."""
    b = Broadcaster(heartbeat=None)
    here, there = b.subscribe(), b.subscribe()
    other_loop_chunks: list[bytes] = []
    thread = threading.Thread(
        target=lambda: other_loop_chunks.extend(asyncio.run(_read_all(there))), daemon=True
    )
    thread.start()
    local = asyncio.ensure_future(_read_all(here))
    await _await_parked(here)
    await _await_parked(there)
    first = b.publish("t", 1)
    await _await_parked(there)
    second = await b.apublish("t", 2)
    await b.aclose()
    await asyncio.to_thread(thread.join, JOIN_TIMEOUT)
    assert not thread.is_alive()
    frames = first.frame + second.frame
    assert b"".join(await asyncio.wait_for(local, JOIN_TIMEOUT)) == frames
    assert b"".join(other_loop_chunks) == frames


async def test_readers_of_two_loops_subscribed_in_runs_all_wake_for_one_publish() -> None:
    """Readers parked on two loops, two by two, each get an event a thread publishes."""
    b = Broadcaster(heartbeat=None)
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        reads: list[asyncio.Future[bytes] | concurrent.futures.Future[bytes]] = []
        for number in range(6):
            sub = b.subscribe()
            if number // 2 % 2:
                reads.append(asyncio.run_coroutine_threadsafe(anext(sub), other))
            else:
                reads.append(asyncio.ensure_future(anext(sub)))
            await _await_parked(sub)
        event = await asyncio.to_thread(b.publish, "t", 1)
        for read in reads:
            result = read if isinstance(read, asyncio.Future) else asyncio.wrap_future(read)
            assert await asyncio.wait_for(result, JOIN_TIMEOUT) == event.frame
    finally:
        other.call_soon_threadsafe(other.stop)
        await asyncio.to_thread(thread.join, JOIN_TIMEOUT)
        other.close()
        await b.aclose()


def test_a_reader_whose_event_loop_closed_does_not_break_publishing(quiet: Broadcaster) -> None:
    """Publishing after a waiting reader's loop was closed neither raises nor loses the frame."""
    sub = quiet.subscribe()
    loop = asyncio.new_event_loop()
    abandoned: list[dict[str, Any]] = []
    # The abandoned read is reported when the task is collected; keep that out of the log.
    loop.set_exception_handler(lambda _loop, context: abandoned.append(context))
    task = loop.create_task(_read_all(sub))
    loop.run_until_complete(_await_parked(sub))
    loop.close()
    event = quiet.publish("t", 1)
    assert sub.read_nowait() == event.frame
    assert not task.done()
    sub.close()


async def test_an_async_reader_that_never_catches_up_still_lets_other_tasks_run() -> None:
    """A reader always finding frames pending yields to the loop once per chunk."""
    with Broadcaster(heartbeat=None) as b, b.subscribe(queue_size=10_000) as sub:
        for n in range(100):
            b.publish("t", n)
        other_ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(other_ran.set)
        chunks = 0
        while not other_ran.is_set():
            b.publish("t", "more")  # there is always something pending
            await anext(sub)
            chunks += 1
            assert chunks < 10, "the reader kept the loop to itself"


async def test_a_wake_up_still_queued_when_the_reader_reads_again_does_not_spin_it() -> None:
    """Read, publish, read again before the loop ran the wake-up, then wait: no busy loop.

    The second read took the frame and parked the same waiter again; the late wake-up
    then resolves the future of a waiter that is still parked. The reader must take a
    new waiter, not find the old one "parked, so nothing came" and await a done future
    forever without letting the loop run.
    """
    async with Broadcaster(heartbeat=None) as b, b.subscribe() as sub:
        waiting = asyncio.ensure_future(anext(sub))
        await _await_parked(sub)
        first = b.publish("t", 1)
        assert await asyncio.wait_for(waiting, JOIN_TIMEOUT) == first.frame  # it waited
        second = b.publish("t", 2)  # its wake-up is queued on the loop, not run yet
        assert await anext(sub) == second.frame  # read without yielding to the loop
        waiting = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0.01)  # the late wake-up runs; the reader waits again
        third = b.publish("t", 3)
        assert await asyncio.wait_for(waiting, JOIN_TIMEOUT) == third.frame


async def test_a_reader_of_two_channels_is_woken_by_either_once_per_publish() -> None:
    """Woken through one channel, it is no longer parked on the other: each publish wakes it."""
    async with Broadcaster(heartbeat=None) as b, b.subscribe("a", "b") as sub:
        for channel in ("a", "b", "a"):
            waiting = asyncio.ensure_future(anext(sub))
            await _await_parked(sub)
            event = b.publish("t", channel, channel=channel)
            assert await asyncio.wait_for(waiting, JOIN_TIMEOUT) == event.frame


async def test_a_reader_with_a_shorter_heartbeat_is_not_held_to_the_loops_longer_one() -> None:
    """Two broadcasters on one loop: the clock ticks for the shorter heartbeat at once."""
    async with (
        Broadcaster(heartbeat=JOIN_TIMEOUT) as slow,
        Broadcaster(heartbeat=HEARTBEAT_SECONDS) as fast,
        slow.subscribe() as idle,
        fast.subscribe() as beating,
    ):
        waiting = asyncio.ensure_future(anext(idle))
        await _await_parked(idle)  # the clock now ticks for a JOIN_TIMEOUT heartbeat
        started = time.monotonic()
        assert await asyncio.wait_for(anext(beating), JOIN_TIMEOUT) == HEARTBEAT
        # Due after 0.05 s of silence and at most a quarter more; the bound catches a clock
        # that went on ticking for the slow heartbeat (a quarter of 10 s).
        assert time.monotonic() - started < JOIN_TIMEOUT / 8
        waiting.cancel()


def test_a_loop_closed_with_readers_on_it_leaves_no_clock_behind() -> None:
    """A loop closed while a reader waits on it is forgotten when the next reader starts."""
    from ssecast._subscription import _Clock

    with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b:
        abandoned = b.subscribe()
        loop = asyncio.new_event_loop()
        reader = loop.create_task(_read_all(abandoned))
        loop.run_until_complete(asyncio.sleep(HEARTBEAT_SECONDS / 2))  # it waits, timed
        assert loop in _Clock._clocks
        reader.cancel()
        loop.run_until_complete(asyncio.gather(reader, return_exceptions=True))
        loop.close()  # with the clock still registered: its timer will never fire

        async def read_once() -> asyncio.AbstractEventLoop:
            with b.subscribe() as sub:
                assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == HEARTBEAT
            return asyncio.get_running_loop()

        second = asyncio.run(read_once())
        assert loop not in _Clock._clocks  # dropped when the second loop made its clock
        assert second not in _Clock._clocks  # its reader stopped on it: it left at once
        abandoned.close()


async def test_a_heartbeat_due_while_nobody_waits_is_sent_when_the_reader_waits_again() -> None:
    """The timer finds no reader waiting (it read with read_nowait): it does nothing, then beats."""
    async with Broadcaster(heartbeat=HEARTBEAT_SECONDS) as b, b.subscribe() as sub:
        event = b.publish("t", 1)
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == event.frame
        assert sub.read_nowait() == b""  # takes the waiter back: nobody waits now
        await asyncio.sleep(HEARTBEAT_SECONDS * 3)  # the timer fired, with nobody to wake
        assert await asyncio.wait_for(anext(sub), JOIN_TIMEOUT) == HEARTBEAT


def test_a_frame_that_lands_as_a_thread_readers_heartbeat_falls_due_is_read_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait timed out, and a frame came before the reader looked again: it gets the frame."""
    with Broadcaster(heartbeat=JOIN_TIMEOUT) as b, b.subscribe() as sub:
        published: list[Event] = []

        def times_out_as_a_frame_lands(event: threading.Event, timeout: float | None) -> bool:
            published.append(b.publish("t", 1))
            return False

        monkeypatch.setattr(threading.Event, "wait", times_out_as_a_frame_lands)
        chunk = next(sub)
        monkeypatch.undo()
        assert chunk == published[0].frame
