"""Adversarial tests of delivery: task readers that skip a poll, one clock per loop.

Every event must reach every subscriber exactly once and in order while threads and the
loop publish at once, to ASGI pumps, `async for` tasks and `for` threads together;
heartbeats must come after a heartbeat of silence and at most a quarter later; lifetimes
must end on time; the loops' clocks must not pile up.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest

from asgi_request import get_scope
from ssecast import Broadcaster, CloseReason, Subscription
from ssecast._subscription import _Clock, feed_of
from ssecast.asgi import EventStream

HEARTBEAT = b":\n\n"
HANG = 10.0
"""Seconds after which a wait counts as hung; what the tests wait for takes milliseconds."""
SLACK = 0.25
"""Seconds of lateness a timer may have on a loaded two-core machine."""


def events_of(stream: bytes) -> bytes:
    """A stream without its heartbeat comments (no test event ends with a colon)."""
    return stream.replace(HEARTBEAT, b"")


async def until(condition: Callable[[], object], seconds: float = HANG) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class AsgiClient:
    """One EventStream request served in process: its `send` keeps the timed bodies."""

    def __init__(self, b: Broadcaster, channels: list[str], **options: Any) -> None:
        self.bodies: list[tuple[float, bytes]] = []
        self.ended = False
        self.disconnected = asyncio.Event()
        stream = EventStream(b, channels, **options)
        self.task = asyncio.create_task(stream(get_scope(), self.receive, self.send))

    async def receive(self) -> MutableMapping[str, Any]:
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.bodies.append((time.monotonic(), message["body"]))
            self.ended = not message.get("more_body", False)

    @property
    def received(self) -> bytes:
        return b"".join(body for _, body in self.bodies)


# -- exactly once, in order ---------------------------------------------------------------


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(HANG)


def close_all(subs: list[Subscription]) -> None:
    for sub in subs:
        sub.close()


async def read_with_async_for(sub: Subscription, out: list[bytes]) -> None:
    async for chunk in sub:
        out.append(chunk)


async def read_mixing_read_nowait(sub: Subscription, out: list[bytes]) -> None:
    """Alternates `read_nowait` and `async for`'s `__anext__`, with yields in between."""
    iterator = aiter(sub)
    turn = 0
    while True:
        turn += 1
        if turn % 3 == 0:
            out.append(sub.read_nowait())
            await asyncio.sleep(0)
            continue
        try:
            out.append(await anext(iterator))
        except StopAsyncIteration:
            return


async def read_with_timeouts(sub: Subscription, out: list[bytes]) -> None:
    """Waits for each chunk at most a millisecond: a cancelled wait must lose nothing."""
    iterator = aiter(sub)
    while True:
        try:
            out.append(await asyncio.wait_for(anext(iterator), 0.001))
        except TimeoutError:
            continue
        except StopAsyncIteration:
            return


def read_in_thread(sub: Subscription, out: list[bytes]) -> None:
    for chunk in sub:
        out.append(chunk)


async def test_every_event_once_in_order_to_pumps_tasks_and_threads_while_all_publish() -> None:
    """Every reader gets every event of its channels once, in the one delivery order.

    4 threads and the loop publish on two channels; 22 readers of five kinds, some on
    both channels, with 20 ms heartbeats ticking: every reader gets exactly what its
    channels got, in the one order the broadcaster delivered it.
    """
    b = Broadcaster(heartbeat=0.02, queue_size=100_000, history=0)
    count = 400
    readers: dict[str, tuple[list[str], list[bytes]]] = {}
    tasks: list[asyncio.Task[None]] = []
    threads: list[threading.Thread] = []
    kinds = {"task": read_with_async_for, "mixed": read_mixing_read_nowait}
    kinds["timeouts"] = read_with_timeouts
    for channels in (["a"], ["a", "b"]):
        for kind, read in kinds.items():
            for n in range(2):
                out: list[bytes] = []
                readers[f"{kind}{n}@{channels}"] = (channels, out)
                tasks.append(asyncio.create_task(read(await b.asubscribe(*channels), out)))
        for n in range(2):
            out = []
            readers[f"thread{n}@{channels}"] = (channels, out)
            sub = b.subscribe(*channels)
            threads.append(threading.Thread(target=read_in_thread, args=(sub, out)))
    pumps: dict[str, tuple[list[str], AsgiClient]] = {}
    for n in range(3):
        for channels in (["a"], ["a", "b"]):
            pumps[f"pump{n}@{channels}"] = (channels, AsgiClient(b, channels))
    for thread in threads:
        thread.start()
    await until(lambda: b.stats().subscribers == len(readers) + len(pumps))

    published: list[list[bytes]] = []

    def publish_from_thread(who: int) -> None:
        frames = [b.publish("t", [who, n], channel="ab"[n % 2]).frame for n in range(count)]
        published.append(frames)

    publishers = [threading.Thread(target=publish_from_thread, args=(w,)) for w in range(4)]
    for publisher in publishers:
        publisher.start()
    mine = []
    for n in range(count):
        mine.append(b.publish("t", [99, n], channel="ab"[n % 2]).frame)
        if n % 7 == 0:
            await asyncio.sleep(0)
    published.append(mine)
    await asyncio.to_thread(join_all, publishers)
    await asyncio.sleep(0.05)  # a heartbeat or two lands among the events
    b.close()
    async with asyncio.timeout(HANG):
        await asyncio.gather(*tasks, *(pump.task for _, pump in pumps.values()))
    await asyncio.to_thread(join_all, threads)

    assert all(pump.ended for _, pump in pumps.values())
    streams = {name: (c, events_of(b"".join(out))) for name, (c, out) in readers.items()}
    streams.update({name: (c, events_of(p.received)) for name, (c, p) in pumps.items()})
    for name, (channels, stream) in streams.items():
        got = [frame + b"\n\n" for frame in stream.split(b"\n\n") if frame]
        assert len(got) == len(set(got)), name  # nothing twice
        for frames in published:
            # Channel "a" has each publisher's even events; both channels have them all.
            wanted = frames if channels == ["a", "b"] else frames[::2]
            theirs = set(frames)
            assert [f for f in got if f in theirs] == wanted, name  # all, in publish order
        assert len(got) == sum(len(f if channels == ["a", "b"] else f[::2]) for f in published)
    one_order: dict[str, bytes] = {}
    for name, (channels, stream) in streams.items():
        # Every reader of the same channels saw the one order the broadcaster delivered.
        assert stream == one_order.setdefault("".join(channels), stream), name


async def test_a_reader_moved_between_loops_and_threads_loses_nothing() -> None:
    """A reader moved between loops and threads loses nothing.

    One subscription read on three loops in turn (two in threads), then by a thread,
    then on this loop, while a thread publishes: every event once, in order.
    """
    b = Broadcaster(heartbeat=0.01, queue_size=100_000)
    sub = b.subscribe()
    chunks: list[bytes] = []
    done = threading.Event()
    published: list[bytes] = []

    def publish() -> None:
        n = 0
        while not done.is_set():
            published.append(b.publish("t", n).frame)
            n += 1
            if n % 10 == 0:
                time.sleep(0.001)

    async def read_some(count: int) -> None:
        iterator = aiter(sub)
        for _ in range(count):
            chunks.append(await anext(iterator))

    def on_a_new_loop(count: int) -> None:
        asyncio.run(read_some(count))

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        for _ in range(2):
            reader = threading.Thread(target=on_a_new_loop, args=(30,))
            reader.start()
            reader.join(HANG)
        on_thread = iter(sub)
        chunks.extend(next(on_thread) for _ in range(30))
        await read_some(30)
        chunks.append(sub.read_nowait())
    finally:
        done.set()
        await asyncio.to_thread(publisher.join, HANG)
    b.close()
    async for chunk in sub:
        chunks.append(chunk)
    assert events_of(b"".join(chunks)) == b"".join(published)


# -- the clocks -----------------------------------------------------------------------------


def closed_clocks() -> list[asyncio.AbstractEventLoop]:
    return [loop for loop in list(_Clock._clocks) if loop.is_closed()]


async def wait_for_heartbeat_on(b: Broadcaster) -> None:
    """Make this loop's clock: wait for a heartbeat, and leave the subscription open."""
    assert await anext(aiter(b.subscribe())) == HEARTBEAT


def test_loops_closed_with_readers_on_them_leave_at_most_one_clock_behind() -> None:
    """20 loops in turn, each closed while a heartbeat reader still waits on it."""
    b = Broadcaster(heartbeat=0.05)
    subs = []

    async def wait_for_a_heartbeat() -> None:
        sub = b.subscribe()
        subs.append(sub)
        assert await anext(aiter(sub)) == HEARTBEAT  # and leave it open, its clock ticking

    for _ in range(20):
        asyncio.run(wait_for_a_heartbeat())
        assert len(closed_clocks()) <= 1
    b.close()


async def heartbeat_gaps(
    sub: Subscription, gaps: list[float], until_time: float = math.inf
) -> None:
    """Read `sub`, which gets nothing but heartbeats, adding the time between them to `gaps`."""
    last = time.monotonic()
    async for chunk in sub:
        now = time.monotonic()
        assert chunk == HEARTBEAT
        gaps.append(now - last)
        last = now
        if now > until_time:
            return


def test_many_loops_in_many_threads_tick_for_their_own_readers_only() -> None:
    """Loops in many threads each tick for their own readers.

    8 threads, each its own loop with 30 readers of two broadcasters (20 ms and 2 s
    heartbeats): every 20 ms reader gets heartbeats on time; the clocks go with the loops.
    """
    fast, slow = Broadcaster(heartbeat=0.02), Broadcaster(heartbeat=2.0)
    gaps: list[float] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    async def main() -> None:
        start.wait(HANG)
        ends = time.monotonic() + 0.5
        readers = [heartbeat_gaps(fast.subscribe(), gaps, ends) for _ in range(15)]
        quiet = [slow.subscribe() for _ in range(15)]
        quiet_tasks = [asyncio.create_task(anext(aiter(sub))) for sub in quiet]
        await asyncio.gather(*readers)
        for task in quiet_tasks:
            task.cancel()
        await asyncio.gather(*quiet_tasks, return_exceptions=True)
        for sub in quiet:
            sub.close()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    fast.close()
    slow.close()
    assert not errors, errors
    assert len(gaps) >= 8 * 15 * 10
    assert max(gaps) <= 0.02 * 1.25 + SLACK, max(gaps)
    # The eight closed loops linger until a new loop makes a clock, and no longer.
    asyncio.run(wait_for_heartbeat_on(Broadcaster(heartbeat=0.01)))
    assert len(closed_clocks()) <= 1


async def test_readers_stopped_from_another_thread_end_and_their_clock_goes() -> None:
    """Readers closed from another thread end at once, and their clock goes.

    Task readers waiting with heartbeats are closed from a thread: each ends at once,
    and once the last is gone the loop's clock leaves the registry.
    """
    b = Broadcaster(heartbeat=0.2)
    loop = asyncio.get_running_loop()
    subs = [await b.asubscribe() for _ in range(20)]
    tasks = [asyncio.create_task(read_with_async_for(sub, [])) for sub in subs]
    await asyncio.sleep(0.05)
    assert loop in _Clock._clocks
    started = time.monotonic()
    await asyncio.to_thread(close_all, subs)
    async with asyncio.timeout(HANG):
        await asyncio.gather(*tasks)
    assert time.monotonic() - started < SLACK
    await until(lambda: loop not in _Clock._clocks, 0.2 / 4 + SLACK)
    b.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_loop_left_unclosed_after_its_readers_closed_is_not_kept_alive() -> None:
    """An unclosed loop whose readers are gone is not kept alive by ssecast.

    A thread runs a loop until its one reader got a heartbeat and closed its
    subscription, and drops the loop without closing it: nothing of ssecast keeps it.
    """
    b = Broadcaster(heartbeat=0.05)

    async def read_one_heartbeat() -> None:
        with b.subscribe() as sub:
            assert await anext(aiter(sub)) == HEARTBEAT

    loop = asyncio.new_event_loop()
    loop.run_until_complete(read_one_heartbeat())
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    b.close()
    kept = gone()
    if kept is not None:
        kept.close()  # so that the next loop's clock lets go of it
    assert kept is None


# -- heartbeats and lifetimes ----------------------------------------------------------------


async def test_no_stream_is_silent_longer_than_a_heartbeat_and_a_quarter() -> None:
    """No stream is silent longer than 1.25 heartbeats, nor beats early.

    On one loop: broadcasters with 0.2 s and 3 s heartbeats, task readers and pumps,
    events to some readers at random moments. Between two chunks a reader waits at least
    its heartbeat (unless an event came) and at most 1.25 heartbeats (plus slack).
    """
    fast, slow = Broadcaster(heartbeat=0.2), Broadcaster(heartbeat=3.0)
    timings: dict[str, list[tuple[float, bytes]]] = {}
    rng = random.Random(7)

    async def read(name: str, sub: Subscription) -> None:
        seen = timings[name] = [(time.monotonic(), b"")]
        async for chunk in sub:
            seen.append((time.monotonic(), chunk))

    tasks = []
    for n in range(10):
        tasks.append(asyncio.create_task(read(f"fast-quiet{n}", await fast.asubscribe("q"))))
        tasks.append(asyncio.create_task(read(f"fast-busy{n}", await fast.asubscribe("e"))))
        tasks.append(asyncio.create_task(read(f"slow{n}", await slow.asubscribe())))
    pumps = {f"pump{n}": AsgiClient(fast, ["e"] if n % 2 else ["q"]) for n in range(6)}
    ends = time.monotonic() + 4.2
    while time.monotonic() < ends:
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        fast.publish("t", 1, channel="e")
    fast.close()
    slow.close()
    async with asyncio.timeout(HANG):
        await asyncio.gather(*tasks, *(pump.task for pump in pumps.values()))
    for name, pump in pumps.items():
        timings[name] = pump.bodies[:-1]  # the end is no heartbeat
    for name, seen in timings.items():
        interval = 3.0 if name.startswith("slow") else 0.2
        beats = 0
        for (before, _), (at, chunk) in itertools.pairwise(seen):
            if chunk == HEARTBEAT:
                beats += 1
                assert at - before >= interval - 0.05, (name, at - before)
            assert at - before <= 1.25 * interval + SLACK, (name, at - before)
        assert beats >= (1 if interval == 3.0 else 3), name


async def test_lifetimes_end_on_time_whatever_else_the_loop_s_clock_ticks_for() -> None:
    """Lifetimes end on time whatever else the clock ticks for.

    Lifetimes of 0.3 to 1.2 s, on a loop whose clock also ticks for 10 s heartbeats
    (added before and after them), and an EventStream with a lifetime: each ends no
    earlier than its end and no later than its end plus slack.
    """
    b = Broadcaster(heartbeat=10.0)
    quiet_before = [await b.asubscribe() for _ in range(5)]
    waits = [asyncio.create_task(anext(aiter(sub))) for sub in quiet_before]
    await asyncio.sleep(0.01)
    ended: dict[int, tuple[float, float]] = {}

    async def live(n: int, lifetime: float) -> None:
        sub = await b.asubscribe(lifetime=lifetime)
        expires = feed_of(sub).expires
        assert expires is not None
        async for _ in sub:
            pass
        assert sub.close_reason is CloseReason.EXPIRED
        ended[n] = (expires, time.monotonic())

    lifetimes = [0.3 + 0.1 * n for n in range(10)]
    readers = [asyncio.create_task(live(n, t)) for n, t in enumerate(lifetimes)]
    quiet_after = [await b.asubscribe() for _ in range(5)]
    waits += [asyncio.create_task(anext(aiter(sub))) for sub in quiet_after]
    pump = AsgiClient(b, ["default"], lifetime=0.5)
    opened = time.monotonic()
    async with asyncio.timeout(HANG):
        await asyncio.gather(*readers, pump.task)
    for n, (expires, at) in ended.items():
        assert expires - 0.005 <= at <= expires + SLACK, (lifetimes[n], at - expires)
    pump_end = pump.bodies[-1][0] - opened
    assert 0.45 - 0.005 <= pump_end <= 0.5 + SLACK, pump_end
    for task in waits:
        task.cancel()
    b.close()


# -- eviction and close ------------------------------------------------------------------------


async def test_eviction_still_ends_a_parked_task_reader_a_pump_and_a_thread() -> None:
    """Eviction still ends readers of every kind that stopped reading.

    Readers that stopped reading (a task holding its chunk, a pump whose send hangs,
    a thread asleep) are evicted after queue_size + 1 frames; readers that keep up go on.
    """
    b = Broadcaster(heartbeat=None, queue_size=5)
    slow_task_sub = await b.asubscribe()
    first = asyncio.create_task(anext(aiter(slow_task_sub)))
    keeping_up: list[bytes] = []
    keeper = asyncio.create_task(read_with_async_for(await b.asubscribe(), keeping_up))
    hung = asyncio.Event()

    async def hanging_send(message: MutableMapping[str, Any]) -> None:
        if message.get("body"):
            await hung.wait()

    async def receive() -> MutableMapping[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    pump = asyncio.create_task(EventStream(b, ["default"])(get_scope(), receive, hanging_send))
    thread_sub = b.subscribe()
    await until(lambda: b.stats().subscribers == 4)
    b.publish("t", 0)
    await asyncio.wait_for(first, HANG)  # it took one chunk and holds on
    for n in range(1, 12):
        b.publish("t", n)
        await asyncio.sleep(0)
    await until(lambda: b.stats().evicted == 3)
    assert slow_task_sub.close_reason is CloseReason.EVICTED
    assert thread_sub.close_reason is CloseReason.EVICTED
    assert list(thread_sub) == []
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(aiter(slow_task_sub)), HANG)
    hung.set()
    await asyncio.wait_for(pump, HANG)
    await until(lambda: events_of(b"".join(keeping_up)).count(b"data:") == 12)
    b.close()
    await asyncio.wait_for(keeper, HANG)


async def test_a_parked_two_channel_reader_evicted_by_one_channel_leaves_the_other_sound() -> None:
    """Evicted by channel a while parked on a and b, from a thread; b goes on delivering."""
    b = Broadcaster(heartbeat=0.05, queue_size=3)
    evicted = await b.asubscribe("a", "b")
    waiting = asyncio.create_task(anext(aiter(evicted)))
    on_b: list[bytes] = []
    other = asyncio.create_task(read_with_async_for(await b.asubscribe("b", queue_size=100), on_b))
    both: list[bytes] = []
    keeping = await b.asubscribe("a", "b", queue_size=100)  # one capacity per audience no more
    keeper = asyncio.create_task(read_with_async_for(keeping, both))
    await asyncio.sleep(0.01)

    def flood() -> None:
        for n in range(5):
            b.publish("t", n, channel="a")  # one delivery wakes it; it is not read in time

    await asyncio.to_thread(flood)
    done, _ = await asyncio.wait([waiting], timeout=HANG)  # a chunk, or the end at once
    assert done
    assert waiting.exception() is None or isinstance(waiting.exception(), StopAsyncIteration)
    await until(lambda: evicted.close_reason is CloseReason.EVICTED)
    for n in range(5):
        b.publish("t", n, channel="b")
        await asyncio.sleep(0.01)
    await until(lambda: events_of(b"".join(on_b)).count(b"data:") == 5)
    await until(lambda: events_of(b"".join(both)).count(b"data:") == 10)
    assert await anext(aiter(evicted), None) is None
    b.close()
    await asyncio.wait_for(asyncio.gather(other, keeper), HANG)


def test_on_uvloop_heartbeats_and_lifetimes_keep_their_bounds() -> None:
    """On uvloop, heartbeats and lifetimes keep their bounds.

    uvloop's clock reads whole milliseconds, cached per turn of the loop: heartbeats of
    0.2 s still come within 1.25 heartbeats, and lifetimes end no later than their end.
    """
    import uvloop

    b = Broadcaster(heartbeat=0.2)
    gaps: list[float] = []
    lateness: list[float] = []

    async def lives(lifetime: float) -> None:
        sub = await b.asubscribe("lives", lifetime=lifetime)
        expires = feed_of(sub).expires
        assert expires is not None
        async for _ in sub:
            pass
        lateness.append(time.monotonic() - expires)

    async def main() -> None:
        subs = [await b.asubscribe() for _ in range(10)]
        readers = [asyncio.create_task(heartbeat_gaps(sub, gaps)) for sub in subs]
        await asyncio.gather(*(lives(0.3 + 0.05 * n) for n in range(10)))
        await asyncio.sleep(0.5)
        b.close()
        await asyncio.gather(*readers)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), HANG))
    assert len(gaps) >= 10 * 4
    assert max(gaps) <= 0.2 * 1.25 + SLACK, max(gaps)
    assert min(gaps) >= 0.2 - 0.05, min(gaps)
    assert len(lateness) == 10
    assert max(lateness) <= SLACK, lateness
