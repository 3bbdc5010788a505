"""Adversarial tests of the pump parked only while the callbacks write for it.

A pump that settles an outcome (a send that waits, a send that raises, the end) is
withdrawn from its feed; a wake-up takes frames only for a pump still parked, and writes a
single frame for an open feed inline. These tests make a send wait or raise while more
events, wake-ups, heartbeats, lifetimes, shutdowns, revocations and evictions come, and
check what each client sees: every event exactly once and in order, or a clean end; no
stream left hanging; nothing left subscribed; nothing the loop complains about.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest

from raw_stream import RawStream
from ssecast import Broadcaster, BroadcasterClosedError, Event
from ssecast._wire import HEARTBEAT
from test_batch_adversary import (
    Stream,
    collect_loop_errors,
    dechunked,
    finish,
    frames,
    ids_in,
    publish,
    read_until_ids,
    served_streams,
    started,
)
from test_disconnect_servers_adversary import until_subscribers
from test_pump_adversary import HANG, OUR_FRAME, SERVERS, Peer, clock_beats, until

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class Scripted:
    """A send that runs an action before the n-th body holding events (1-based), then logs it.

    An action may return an awaitable, which the send awaits (the write then waits).
    """

    def __init__(self, peer: Peer, actions: dict[int, Callable[[], Awaitable[None] | None]]):
        self.peer = peer
        self.actions = actions
        self.count = 0

    async def send(self, message: Message) -> None:
        if b"data:" in message.get("body", b""):
            self.count += 1
            act = self.actions.get(self.count)
            if act is not None:
                result = act()
                if result is not None:
                    await result
        await self.peer.send(message)


def without_heartbeats(data: bytes) -> bytes:
    return data.replace(HEARTBEAT, b"")


def everything(stream: Stream) -> bytes:
    """The events a stream got, the replay in its opening chunk included."""
    return without_heartbeats(b"".join(stream.peer.bodies))


def ended_once(peer: Peer) -> bool:
    """The response ended with one final body, and nothing came after it."""
    ends = [
        n
        for n, m in enumerate(peer.messages)
        if m["type"] == "http.response.body" and not m.get("more_body", False)
    ]
    return ends == [len(peer.messages) - 1]


def publish_in_thread(b: Broadcaster, count: int, channel: str = "c") -> list[Event]:
    """Publish ``count`` events from another thread, one after another; return them."""
    out: list[Event] = []

    def run() -> None:
        for n in range(count):
            out.append(b.publish("t", n, channel=channel))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive()
    return out


# --- a send that waits while wake-ups for its pump are already queued --------------------


async def test_a_wake_up_queued_before_a_send_waits_neither_loses_nor_repeats() -> None:
    """The waiting send itself publishes (queueing a wake-up for its parked pump), then waits.

    More come while it waits, from the loop and from a thread; every stream gets every
    event once, in order, and the waiting one gets them once its write completes.
    """
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=None)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    streams = [Stream(b, f"s{n}") for n in range(4)]
    early: list[Event] = []

    def publish_then_wait() -> Awaitable[None]:
        early.append(b.publish("x", "queued", channel="c"))  # wakes the still-parked pump
        return gate

    script = Scripted(streams[1].peer, {1: publish_then_wait})
    streams[1].send = script.send
    await started(b, streams)
    events = [b.publish("m", 0, channel="c")]
    try:
        await until(lambda: early)
        await asyncio.sleep(0.02)  # the queued wake-up ran while the write waited
        events += early
        events += [b.publish("m", n, channel="c") for n in range(1, 3)]
        events += publish_in_thread(b, 20)
        await asyncio.sleep(0.02)
        assert streams[1].data == b""
        # The gate opens and, in the same callback, more come: the pump is not parked.
        asyncio.get_running_loop().call_soon(gate.set_result, None)
        asyncio.get_running_loop().call_soon(
            lambda: events.append(b.publish("m", "after", channel="c"))
        )
        await asyncio.sleep(0.05)
        events += [b.publish("m", n, channel="c") for n in range(3, 5)]
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
        await asyncio.sleep(0.05)
        assert [s.data == frames(events) for s in streams] == [True] * 4
        assert errors == []
    finally:
        await finish(b, streams)


async def test_every_write_waiting_in_turn_under_a_thread_publisher_loses_nothing() -> None:
    """Sends that wait on every k-th write (k differs per stream) while a thread publishes."""
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=0.01, queue_size=100_000)
    streams = [Stream(b, f"s{n}") for n in range(6)]
    for n, stream in enumerate(streams):
        k = n + 1
        stream.send = Scripted(
            stream.peer, {i: (lambda: asyncio.sleep(0.001)) for i in range(k, 400, k)}
        ).send
    await started(b, streams)
    events: list[Event] = []
    try:
        for _ in range(5):
            events += await asyncio.to_thread(publish_in_thread, b, 60)
            events += [b.publish("m", n, channel="c") for n in range(3)]
            await asyncio.sleep(0.003)
        for stream in streams:
            await until(
                lambda s=stream: without_heartbeats(s.data) == frames(events)  # type: ignore[misc]
            )
        await asyncio.sleep(0.05)
        assert [without_heartbeats(s.data) == frames(events) for s in streams] == [True] * 6
        assert errors == []
    finally:
        await finish(b, streams)
    assert b.stats().subscribers == 0


# --- a send that raises an Exception on the n-th write: the task takes over ---------------


@pytest.mark.parametrize("nth", [1, 2, 3])
@pytest.mark.parametrize("burst", [1, 3], ids=["single", "burst"])
async def test_a_send_refusing_the_nth_write_hands_over_with_nothing_lost(
    nth: int, burst: int
) -> None:
    """The n-th write raises ValueError (once): its chunk is sent again from the task.

    Events come right before and after, from the loop and from a thread; the stream that
    took over and the others get every event once, in order, and end at the shutdown.
    """
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(3)]
    refused: list[bytes] = []

    def refuse_once() -> None:
        if not refused:
            refused.append(b"x")
            raise ValueError("a send wrapper that needs its task")

    streams[1].send = Scripted(streams[1].peer, {nth: refuse_once}).send
    await started(b, streams)
    events: list[Event] = []
    try:
        for round_ in range(nth + 2):
            events += [b.publish("m", round_ * 10 + k, channel="c") for k in range(burst)]
            events += publish_in_thread(b, 2)
            await asyncio.sleep(0.01)
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
        assert refused
        events += [b.publish("m", "late", channel="c")]
        await b.aclose()
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams if s.task)), HANG)
        for stream in streams:
            assert stream.data == frames(events)
            assert ended_once(stream.peer)
        assert errors == []
        assert b.stats().subscribers == 0
    finally:
        await finish(b, streams)


# --- ends that come while a write waits ---------------------------------------------------


@pytest.mark.parametrize("ending", ["close", "disconnect", "evict"])
async def test_an_end_while_a_write_waits_ends_the_stream_once_the_write_completes(
    ending: str,
) -> None:
    """Shutdown reads out what was pending, in order; a revocation or eviction drops it.

    The stream whose write waits is withdrawn from its feed: the end wakes no one, and the
    task, finishing the write, must still find the end and end the response.
    """
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=0.01, queue_size=5)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    streams = [Stream(b, "s0"), Stream(b, "s1", key="slow-user"), Stream(b, "s2")]
    streams[1].send = Scripted(streams[1].peer, {1: lambda: gate}).send
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(2)]
    try:
        await until(lambda: streams[0].data.replace(HEARTBEAT, b"") == frames(events))
        events += [b.publish("m", n, channel="c") for n in range(2, 5)]
        await asyncio.sleep(0.05)  # heartbeats fall due while the write waits
        if ending == "close":
            await b.aclose()
        elif ending == "disconnect":
            assert b.disconnect(key="slow-user") == 1
        else:
            events += [b.publish("m", n, channel="c") for n in range(5, 9)]
            assert b.stats().evicted == 1
        task = streams[1].task
        assert task is not None
        await asyncio.sleep(0.05)
        assert not task.done()  # it is still in the write
        gate.set_result(None)
        await asyncio.wait_for(asyncio.shield(task), HANG)
        got = without_heartbeats(streams[1].data)
        if ending == "close":
            assert got == frames(events)
        else:
            assert got == frames(events[:2])  # the write that waited, then the end
        assert ended_once(streams[1].peer)
        for n in (0, 2):
            await until(
                lambda n=n: without_heartbeats(streams[n].data) == frames(events)  # type: ignore[misc]
            )
        assert errors == []
    finally:
        await finish(b, streams)


async def test_a_lifetime_running_out_while_a_write_waits_reads_out_and_ends() -> None:
    """A lifetime running out mid-write: what was pending at the expiry comes, then the end."""
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=0.01)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stream = Stream(b, "s", lifetime=0.3)
    stream.send = Scripted(stream.peer, {1: lambda: gate}).send
    await started(b, [stream])
    events = [b.publish("m", 0, channel="c")]
    try:
        events += [b.publish("m", n, channel="c") for n in range(1, 4)]
        await until(lambda: b.stats().subscribers == 0)  # expired while the write waits
        b.publish("m", "after the end", channel="c")
        assert stream.task is not None
        assert not stream.task.done()
        gate.set_result(None)
        await asyncio.wait_for(asyncio.shield(stream.task), HANG)
        assert without_heartbeats(stream.data) == frames(events)
        assert ended_once(stream.peer)
        assert clock_beats(asyncio.get_running_loop()) == 0
        assert errors == []
    finally:
        await finish(b, [stream])


async def test_heartbeats_resume_after_a_long_waiting_write_and_never_split_events() -> None:
    """Heartbeats due while a write waits are not written meanwhile; they come after it."""
    b = Broadcaster(heartbeat=0.02)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stream = Stream(b, "s")
    script = Scripted(stream.peer, {1: lambda: gate})
    stream.send = script.send
    await started(b, [stream])
    events = [b.publish("m", 0, channel="c")]
    try:
        await asyncio.sleep(0.02)
        at_wait = len(stream.peer.messages)
        await asyncio.sleep(0.15)
        assert len(stream.peer.messages) == at_wait  # nothing written around the waiting one
        events += [b.publish("m", n, channel="c") for n in range(1, 3)]
        gate.set_result(None)
        await until(lambda: without_heartbeats(stream.data) == frames(events))
        count = stream.data.count(HEARTBEAT)
        await until(lambda: stream.data.count(HEARTBEAT) >= count + 2)
        events.append(b.publish("m", 3, channel="c"))
        await until(lambda: without_heartbeats(stream.data) == frames(events))
        for body in stream.peer.bodies[1:]:
            assert body in (b"", HEARTBEAT) or body.endswith(b"\n\n")
    finally:
        await finish(b, [stream])


# --- a stream's send ends another stream while the other's write waits ----------------------


async def test_a_send_cancelling_a_stream_whose_write_waits_ends_it_cleanly() -> None:
    """s0's send cancels s1's task while s1's write (earlier in the batch) waits."""
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=None)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    streams = [Stream(b, f"s{n}") for n in range(3)]
    streams[0].send = Scripted(streams[0].peer, {2: lambda: cancel(streams[1])}).send
    streams[1].send = Scripted(streams[1].peer, {2: lambda: gate}).send
    # s1 first in the batch, so that its write waits before s0's send cancels it.
    await started(b, [streams[1], streams[0], streams[2]])

    def cancel(stream: Stream) -> None:
        assert stream.task is not None
        stream.task.cancel()

    events = [b.publish("m", 0, channel="c")]
    try:
        await until(lambda: [s.data for s in streams] == [frames(events)] * 3)
        events.append(b.publish("m", 1, channel="c"))
        task = streams[1].task
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), HANG)
        assert ended_once(streams[1].peer)
        assert not gate.done()
        assert streams[1].data == frames(events[:1])
        events += [b.publish("m", n, channel="c") for n in range(2, 4)]
        for n in (0, 2):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
        assert b.stats().subscribers == 2
        assert errors == []
    finally:
        await finish(b, streams)


# --- everything at once, in process ---------------------------------------------------------


def _behaviour(rng: random.Random, peer: Peer) -> Send:
    """A send that, at random writes, waits a little, yields, or refuses once (takeover)."""
    actions: dict[int, Callable[[], Awaitable[None] | None]] = {}
    refused = False

    def refuse() -> None:
        nonlocal refused
        if not refused:
            refused = True
            raise ValueError("needs its task")

    for n in range(1, 300):
        roll = rng.random()
        if roll < 0.08:
            actions[n] = lambda: asyncio.sleep(0.002)
        elif roll < 0.16:
            actions[n] = lambda: asyncio.sleep(0)
        elif roll < 0.17:
            actions[n] = refuse
    return Scripted(peer, actions).send


@pytest.mark.parametrize("seed", range(4))
async def test_many_streams_with_waiting_refusing_and_resuming_sends_get_everything(
    seed: int,
) -> None:
    """30 streams, each send waiting, yielding or refusing at random writes, 5 ms heartbeats.

    A thread and the loop publish in bursts; streams resume from Last-Event-ID mid-way.
    Each gets every event after its start once, in order; all end at the shutdown.
    """
    rng = random.Random(seed)
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=0.005, queue_size=100_000, history=10_000)
    streams: list[Stream] = []
    starts: list[int] = []
    for n in range(20):
        stream = Stream(b, f"s{n}")
        stream.send = _behaviour(rng, stream.peer)
        streams.append(stream)
        starts.append(0)
    await started(b, streams)
    events: list[Event] = []
    try:
        for round_ in range(12):
            if round_ % 2:
                events += await asyncio.to_thread(publish_in_thread, b, rng.randrange(1, 30))
            else:
                events += [b.publish("m", n, channel="c") for n in range(rng.randrange(1, 5))]
            if round_ in (3, 6, 9) and events:
                # A client resumes from an event a few back, with events still coming.
                at = rng.randrange(len(events))
                stream = Stream(b, f"r{round_}", last_event_id=events[at].id)
                stream.send = _behaviour(rng, stream.peer)
                stream.start()
                streams.append(stream)
                starts.append(at + 1)
            await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
        for stream, start in zip(streams, starts, strict=True):
            await until(
                lambda s=stream, a=start: everything(s) == frames(events[a:]),  # type: ignore[misc]
                10,
            )
        await b.aclose()
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams if s.task)), HANG)
        for stream, start in zip(streams, starts, strict=True):
            assert everything(stream) == frames(events[start:]), stream.name
            assert ended_once(stream.peer), stream.name
        assert errors == []
        assert b.stats().subscribers == 0
        assert clock_beats(asyncio.get_running_loop()) == 0
    finally:
        await finish(b, streams)


# --- a real server: writes that wait on slow clients ----------------------------------------


@contextlib.asynccontextmanager
async def slow_and_fast(
    server: str, rounds: int, burst: int
) -> AsyncIterator[tuple[httpx.AsyncClient, str, list[RawStream], list[RawStream], list[str]]]:
    """Serve ``PLAIN`` on ``server`` to 8 clients; back up events of 60 kB on the first 4.

    Publishes ``rounds`` rounds (``burst`` events, then one, in turn) while no client
    reads: far more than the socket buffers hold. Yields the control client, the channel,
    the 4 slow and the 4 fast streams and the ids published; checks, once the server has
    stopped, that it logged no error of ssecast's.
    """
    async with served_streams(server, "PLAIN", 8, "0.02") as (
        process,
        http,
        channel,
        streams,
    ):
        published: list[str] = []
        for round_ in range(rounds):
            published += await publish(http, channel, 1 if round_ % 2 else burst, _BIG)
        yield http, channel, streams[:4], streams[4:], published
    log = process.log()
    # Hypercorn on 3.11 logs its own reader's cancellation at shutdown: only ours count.
    assert not OUR_FRAME.search(log), log


_BIG = 60_000
"""Bytes of padding per event in `slow_and_fast`."""


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_a_shutdown_while_slow_clients_writes_wait_reads_out_everything_then_ends(
    server: str,
) -> None:
    """4 clients stop reading under 9.5 MB of events, 4 read; the broadcaster closes meanwhile.

    Every client, once it reads again, gets every event once, in order, and then the
    response's end; the server logs no error of ssecast's.
    """
    async with slow_and_fast(server, rounds=10, burst=30) as (http, channel, slow, fast, published):
        await asyncio.gather(*(read_until_ids(s, len(published), 20) for s in fast))
        await asyncio.sleep(0.2)  # heartbeats fall due while the slow writes wait
        published += await publish(http, channel, 3, _BIG)
        (await http.post("/control/close")).raise_for_status()
        ends = await asyncio.wait_for(asyncio.gather(*(s.read_to_end() for s in slow + fast)), 30)
    assert ends == [True] * 8
    assert [ids_in(s.received) == published for s in slow + fast] == [True] * 8


@pytest.mark.parametrize(
    "error",
    [ValueError("needs its task"), ConnectionResetError("gone")],
    ids=["Exception", "OSError"],
)
async def test_a_write_refused_right_after_a_waiting_one_hands_over_or_ends(
    error: BaseException,
) -> None:
    """Write 1 waits while events pile up; write 2 (from the task, pumping on) raises.

    A plain Exception: the task sends that chunk itself and streams on, everything once
    and in order. An OSError: the client is gone; the stream ends and is let go.
    """
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=0.01)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def fail() -> None:
        raise error

    stream = Stream(b, "s")
    stream.send = Scripted(stream.peer, {1: lambda: gate, 2: fail}).send
    await started(b, [stream])
    events = [b.publish("m", 0, channel="c")]
    try:
        await asyncio.sleep(0.02)
        events += [b.publish("m", n, channel="c") for n in range(1, 4)]
        events += publish_in_thread(b, 5)
        asyncio.get_running_loop().call_soon(gate.set_result, None)
        asyncio.get_running_loop().call_soon(
            lambda: events.append(b.publish("m", "with the gate", channel="c"))
        )
        task = stream.task
        assert task is not None
        if isinstance(error, OSError):
            await asyncio.wait_for(asyncio.shield(task), HANG)
            assert without_heartbeats(stream.data) == frames(events[:1])
            await until(lambda: b.stats().subscribers == 0)
            assert clock_beats(asyncio.get_running_loop()) == 0
        else:
            await asyncio.sleep(0.05)
            events += [b.publish("m", n, channel="c") for n in range(4, 6)]
            await until(lambda: without_heartbeats(stream.data) == frames(events))
            await b.aclose()
            await asyncio.wait_for(asyncio.shield(task), HANG)
            assert without_heartbeats(stream.data) == frames(events)
            assert ended_once(stream.peer)
        assert errors == []
    finally:
        await finish(b, [stream])


def _loop_of_streams(
    b: Broadcaster, seed: int, ready: threading.Event, out: dict[int, Any]
) -> None:
    """Serve 6 streams with misbehaving sends on a loop of this thread, until they end."""

    async def main() -> None:
        errors = collect_loop_errors()
        rng = random.Random(seed)
        streams = [Stream(b, f"t{seed}-{n}") for n in range(6)]
        for stream in streams:
            stream.send = _behaviour(rng, stream.peer)
        await started(b, streams)
        ready.set()
        try:
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams if s.task)), 20)
        finally:
            out[seed] = (
                [(everything(s), ended_once(s.peer)) for s in streams],
                errors,
                clock_beats(asyncio.get_running_loop()),
            )
            for stream in streams:
                if stream.task is not None:
                    stream.task.cancel()

    asyncio.run(main())


async def test_a_shutdown_from_a_thread_amid_a_thread_publisher_ends_streams_on_two_loops() -> None:
    """Streams on two other loops, sends waiting and refusing; a thread publishes; close().

    Every stream gets every event published before the shutdown, once and in order (what
    was pending is read out), and then its end.
    """
    b = Broadcaster(heartbeat=0.005, queue_size=100_000)
    out: dict[int, Any] = {}
    readies = [threading.Event() for _ in range(2)]
    loops = [
        threading.Thread(target=_loop_of_streams, args=(b, seed, readies[seed], out))
        for seed in range(2)
    ]
    for thread in loops:
        thread.start()
    events: list[Event] = []
    stop = threading.Event()

    def publish_until_closed() -> None:
        n = 0
        while not stop.is_set() and n < 20_000:
            try:
                events.append(b.publish("m", n, channel="c"))
            except BroadcasterClosedError:
                return
            n += 1
            if n % 50 == 0:
                time.sleep(0.001)

    try:
        for ready in readies:
            assert await asyncio.to_thread(ready.wait, HANG)
        publisher = threading.Thread(target=publish_until_closed)
        publisher.start()
        await asyncio.sleep(0.15)
        await asyncio.to_thread(b.close)
        await asyncio.to_thread(publisher.join, HANG)
        assert not publisher.is_alive()
        for thread in loops:
            await asyncio.to_thread(thread.join, 25)
            assert not thread.is_alive()
    finally:
        stop.set()
        b.close()
    assert len(events) > 100
    for seed in range(2):
        streams, errors, beats = out[seed]
        assert [got == frames(events) for got, _ in streams] == [True] * 6, seed
        assert [ended for _, ended in streams] == [True] * 6, seed
        assert errors == []
        assert beats == 0
    assert b.stats().subscribers == 0


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_slow_clients_leaving_while_their_writes_wait_are_let_go(server: str) -> None:
    """4 clients stop reading under 5 MB of events, then leave while writes to them wait.

    Their subscriptions are let go, the 4 readers get everything once and in order, and
    the server logs no error of ssecast's.
    """
    async with slow_and_fast(server, rounds=6, burst=25) as (http, channel, slow, fast, published):
        await asyncio.gather(*(read_until_ids(s, len(published), 20) for s in fast))
        for stream in slow:
            stream.close()
        published += await publish(http, channel, 5, _BIG)
        await asyncio.gather(*(read_until_ids(s, len(published), 20) for s in fast))
        assert await until_subscribers(http, 4, HANG)
        published += await publish(http, channel, 2)
        got_fast = await asyncio.gather(*(read_until_ids(s, len(published), 20) for s in fast))
    assert [ids == published for ids in got_fast] == [True] * 4


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn-h11", "granian"])
async def test_a_shutdown_amid_thread_publishers_and_waiting_writes_ends_every_client_alike(
    server: str,
) -> None:
    """Every write waits once (YIELDING); two threads publish; the broadcaster closes meanwhile.

    Each of 100 clients reads out the same events (fewer than its queue holds), once, in
    the same order, each thread's in its order, and then the end.
    """
    async with served_streams(server, "YIELDING", 100, "0.01") as (
        process,
        http,
        channel,
        streams,
    ):

        async def close_once_events_flow() -> None:
            # Not after a fixed delay: on a busy machine the threads may not have
            # published yet, and a stream of no events would test nothing.
            first = streams[0]
            while b"data:" not in first.received:
                chunk = await first.reader.read(65536)
                assert chunk, "the stream ended before its first event"
                first.received += chunk
            (await http.post("/control/close")).raise_for_status()

        publishing = http.post("/control/tpublish", params={"channel": channel, "count": 100})
        # Each thread stops at the close: it answers the ids it published before.
        response, _ = await asyncio.wait_for(
            asyncio.gather(publishing, close_once_events_flow()), HANG
        )
        ends = await asyncio.wait_for(asyncio.gather(*(s.read_to_end() for s in streams)), 30)
    assert ends == [True] * 100
    got = [ids_in(s.received) for s in streams]
    assert response.status_code == 200
    assert sorted(got[0]) == sorted(response.json()[0] + response.json()[1])
    assert len(got[0]) > 0
    assert len(set(got[0])) == len(got[0])
    assert [ids == got[0] for ids in got] == [True] * 100
    body = dechunked(streams[0].received)
    for t in range(2):
        ns = [
            int(line.split(b'"n":')[1].rstrip(b"}"))
            for line in body.split(b"\n")
            if line.startswith(f'data: {{"t":{t},'.encode())
        ]
        assert ns == list(range(len(ns))), t
    assert not OUR_FRAME.search(process.log()), process.log()


async def test_a_stream_taken_over_mid_way_keeps_its_heartbeats_and_lifetime() -> None:
    """A send refuses a write from a callback mid-stream: the task streams on.

    It beats, and ends at its lifetime, as before; the loop's clock lets go of it.
    """
    errors = collect_loop_errors()
    b = Broadcaster(heartbeat=0.01)
    stream = Stream(b, "s", lifetime=0.8)

    def refuse() -> None:
        raise ValueError("needs its task")

    stream.send = Scripted(stream.peer, {2: refuse}).send
    await started(b, [stream])
    events = [b.publish("m", 0, channel="c")]
    try:
        await until(lambda: without_heartbeats(stream.data) == frames(events))
        events.append(b.publish("m", 1, channel="c"))  # refused, then sent by the task
        await until(lambda: without_heartbeats(stream.data) == frames(events))
        beats = stream.data.count(HEARTBEAT)
        await until(lambda: stream.data.count(HEARTBEAT) >= beats + 3)
        events.append(b.publish("m", 2, channel="c"))
        assert stream.task is not None
        await asyncio.wait_for(asyncio.shield(stream.task), HANG)
        assert without_heartbeats(stream.data) == frames(events)
        assert ended_once(stream.peer)
        assert b.stats().subscribers == 0
        assert clock_beats(asyncio.get_running_loop()) == 0
        assert errors == []
    finally:
        await finish(b, [stream])
