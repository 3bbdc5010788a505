"""Adversarial tests of one wake-up writing many pumps (`Pump.ready_all`) and sticky waiters.

One event on a channel wakes every stream of the loop at once: their feeds are polled
together (`poll_all`, frames taken for all before any is written) and then written one
after another by one writer. These tests make one stream's `send` misbehave in the middle
of such a batch and check what each client sees: every event exactly once, in order,
nothing after the end, each `send` in its own stream's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, MutableMapping
from typing import Any

import httpx
import pytest

from raw_stream import RawStream, open_many
from servers import Server, free_port, running
from ssecast import Broadcaster, Event
from ssecast.asgi import EventStream
from test_disconnect_servers_adversary import command, new_channel, until_subscribers
from test_pump_adversary import OUR_FRAME, SERVERS, Peer, scope, until

HANG = 5.0
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")
SET_IN_SEND: contextvars.ContextVar[str] = contextvars.ContextVar("set_in_send", default="unset")


class Stream:
    """One in-process EventStream request: its peer, its task, and a send to wrap."""

    def __init__(
        self,
        b: Broadcaster,
        name: str,
        send: Send | None = None,
        last_event_id: str | None = None,
        channels: tuple[str, ...] = ("c",),
        **kw: Any,
    ) -> None:
        self.name = name
        self.last_event_id = last_event_id
        self.peer = Peer()
        self.send: Send = send or self.peer.send
        self.app = EventStream(b, list(channels), **kw)
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        REQUEST.set(self.name)  # as a middleware of this request would, before the app
        request = scope()
        if self.last_event_id is not None:
            request["headers"] = [
                *request["headers"],
                (b"last-event-id", self.last_event_id.encode()),
            ]
        await self.app(request, self.peer.receive, self.send)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    @property
    def data(self) -> bytes:
        """What came after the opening chunk and the pump's empty probe."""
        return b"".join(self.peer.bodies[1:])

    @property
    def probed(self) -> bool:
        return len(self.peer.bodies) >= 1  # the opening chunk; the probe follows at once


async def started(b: Broadcaster, streams: list[Stream]) -> None:
    """Start the streams in order (the batch's order) and wait until each pump is parked."""
    for stream in streams:
        stream.start()
        await until(lambda s=stream: s.probed)  # type: ignore[misc]
    await asyncio.sleep(0.05)  # each probe went out, and each pump is parked
    assert b.stats().subscribers >= len(streams)


def frames(events: list[Event]) -> bytes:
    return b"".join(event.frame for event in events)


async def finish(b: Broadcaster, streams: list[Stream]) -> None:
    await b.aclose()
    for stream in streams:
        assert stream.task is not None
        stream.task.cancel()
    await asyncio.gather(*(s.task for s in streams if s.task), return_exceptions=True)


def collect_loop_errors() -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


# --- one stream's send misbehaves in the middle of a batch -------------------------------


class Custom(BaseException):
    """A BaseException that is neither a cancellation nor an interpreter exit."""


def misbehaving(peer: Peer, act: Callable[[], Awaitable[object] | None]) -> Send:
    """A send that runs ``act`` on the first body holding an event, then passes on the rest."""
    fired = False

    async def send(message: Message) -> None:
        nonlocal fired
        if not fired and b"data:" in message.get("body", b""):
            fired = True
            result = act()
            if result is not None:
                await result
        await peer.send(message)

    return send


async def _batch_with(
    act_of: Callable[[Broadcaster, list[Stream]], Callable[[], Any]],
) -> tuple[Broadcaster, list[Stream], list[Event]]:
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(4)]
    streams[1].send = misbehaving(streams[1].peer, act_of(b, streams))
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(3)]  # one wake-up for all
    await asyncio.sleep(0.05)
    events += [b.publish("m", n, channel="c") for n in range(3, 5)]
    return b, streams, events


def _raise(error: BaseException) -> Callable[[], None]:
    def act() -> None:
        raise error

    return act


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError("gone"), ValueError("a bug in a middleware"), asyncio.CancelledError()],
    ids=["OSError", "Exception", "CancelledError"],
)
async def test_an_error_from_one_send_in_a_batch_loses_no_frame_of_the_others(
    error: BaseException,
) -> None:
    """The streams after (and before) the failing one get every event once, in order."""
    b, streams, events = await _batch_with(lambda b, s: _raise(error))
    try:
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
        await asyncio.sleep(0.05)
        for n in (0, 2, 3):
            assert streams[n].data == frames(events)
    finally:
        await finish(b, streams)


async def test_a_base_exception_from_one_send_loses_no_frame_of_the_streams_after_it() -> None:
    """A send raising a BaseException subclass must not cost the other streams their events."""
    errors = collect_loop_errors()
    b, streams, events = await _batch_with(lambda b, s: _raise(Custom()))
    try:
        await until(lambda: streams[0].data == frames(events))
        await asyncio.sleep(0.1)
        assert [streams[n].data == frames(events) for n in (2, 3)] == [True, True], errors
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await finish(b, streams)


async def test_a_base_exception_from_a_send_ends_that_stream() -> None:
    """As with an `async for` reader, the stream's task ends with the send's error."""
    collect_loop_errors()
    b, streams, _ = await _batch_with(lambda b, s: _raise(Custom()))
    try:
        task = streams[1].task
        assert task is not None
        await asyncio.wait({task}, timeout=1.0)
        assert task.done()
        assert isinstance(task.exception(), Custom)
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await finish(b, streams)


async def test_a_send_that_waits_in_a_batch_delays_only_its_own_stream() -> None:
    """One send waiting (back-pressure) mid-batch: the others go on; it gets all later, once."""
    b = Broadcaster(heartbeat=None)
    gate = asyncio.Event()
    streams = [Stream(b, f"s{n}") for n in range(4)]

    async def wait_first() -> None:
        await gate.wait()

    streams[1].send = misbehaving(streams[1].peer, wait_first)
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(3)]
    try:
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
        events += [b.publish("m", n, channel="c") for n in range(3, 6)]
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
        assert streams[1].data == b""
        gate.set()
        await until(lambda: streams[1].data == frames(events))
        events.append(b.publish("m", 6, channel="c"))
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
    finally:
        await finish(b, streams)


def _with_two_channel_second(b: Broadcaster) -> list[Stream]:
    """Four streams of channel "c", the second also of "d".

    An event on "d" right after one on "c" gives the second two frames in the wake-up
    where the others have one.
    """
    return [Stream(b, f"s{n}", channels=("c", "d") if n == 1 else ("c",)) for n in range(4)]


def noting_where(peer: Peer, from_callback: list[bool]) -> Send:
    """A send that notes, for each body holding an event, whether no task ran it."""

    async def send(message: Message) -> None:
        if b"data:" in message.get("body", b""):
            from_callback.append(asyncio.current_task() is None)
        await peer.send(message)

    return send


async def test_a_send_that_waits_on_two_frames_mid_batch_leaves_the_next_streams_whole() -> None:
    """The waiting stream is handed its write; the single frames after it go out whole."""
    b = Broadcaster(heartbeat=None)
    gate = asyncio.Event()
    streams = _with_two_channel_second(b)
    streams[1].send = misbehaving(streams[1].peer, gate.wait)
    await started(b, streams)
    live = [b.publish("m", 0, channel="c")]  # one wake-up for all four
    only_second = b.publish("m", "d", channel="d")  # before it runs: two frames for s1
    try:
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(live))  # type: ignore[misc]
        live.append(b.publish("m", 1, channel="c"))
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(live))  # type: ignore[misc]
        assert streams[1].data == b""
        gate.set()
        await until(lambda: streams[1].data == frames([live[0], only_second, live[1]]))
    finally:
        await finish(b, streams)


@pytest.mark.parametrize("pending", [1, 2], ids=["one frame", "two frames"])
async def test_a_send_that_fails_mid_batch_leaves_the_next_streams_to_the_wake_up(
    pending: int,
) -> None:
    """After one stream's send raises, the wake-up still writes the streams after it.

    Not each handed to its task, which would cost every one of them a task wake-up per event.
    """
    b = Broadcaster(heartbeat=None)
    streams = _with_two_channel_second(b)
    streams[1].send = misbehaving(streams[1].peer, _raise(ValueError("a bug in a middleware")))
    from_callback: dict[int, list[bool]] = {2: [], 3: []}
    for n, noted in from_callback.items():
        streams[n].send = noting_where(streams[n].peer, noted)
    await started(b, streams)
    live = [b.publish("m", 0, channel="c")]
    second = [*live, b.publish("m", "d", channel="d")] if pending == 2 else live
    try:
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(live))  # type: ignore[misc]
        await until(lambda: streams[1].data == frames(second))  # its task sent what failed
        assert from_callback == {2: [True], 3: [True]}
    finally:
        await finish(b, streams)


async def test_a_send_that_cancels_its_own_task_mid_batch_leaves_the_others_whole() -> None:
    """A send that cancels its stream (and waits) mid-batch: the others lose nothing."""
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(4)]

    async def cancel_self() -> None:
        assert streams[1].task is not None
        streams[1].task.cancel()
        await asyncio.sleep(1)

    streams[1].send = misbehaving(streams[1].peer, cancel_self)
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(3)]
    try:
        await asyncio.wait_for(asyncio.shield(streams[1].task), HANG)  # type: ignore[arg-type]
        assert streams[1].peer.ended
        events += [b.publish("m", n, channel="c") for n in range(3, 5)]
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
    finally:
        await finish(b, streams)


async def test_a_send_that_publishes_mid_batch_gives_everyone_everything_in_order() -> None:
    """A send that publishes (an audit event, say) mid-batch: every stream gets both, in order."""
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(4)]
    published: list[Event] = []

    def publish() -> None:
        published.append(b.publish("audit", "x", channel="c"))

    streams[1].send = misbehaving(streams[1].peer, publish)
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(3)]
    try:
        await until(lambda: published)
        events += published
        events += [b.publish("m", n, channel="c") for n in range(3, 5)]
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
        await asyncio.sleep(0.05)
        assert [s.data == frames(events) for s in streams] == [True] * 4
    finally:
        await finish(b, streams)


async def test_a_send_that_closes_the_broadcaster_mid_batch_ends_every_stream_whole() -> None:
    """`broadcaster.close()` from a send mid-batch: each stream gets what came before, then ends."""
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(4)]
    streams[1].send = misbehaving(streams[1].peer, b.close)
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(3)]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams if s.task)), HANG)
        for stream in streams:
            assert stream.peer.ended
            assert stream.data == frames(events)
            last = stream.peer.messages[-1]
            assert last["type"] == "http.response.body"
            assert not last.get("more_body", False)
    finally:
        await finish(b, streams)


@pytest.mark.parametrize("events", [1, 2])
@pytest.mark.parametrize("ending", ["disconnect", "cancel"])
async def test_a_stream_another_send_ends_mid_batch_gets_only_its_end(
    ending: str, events: int
) -> None:
    """A stream ended from inside another's send writes nothing more from that wake-up.

    It is revoked by `disconnect(key=...)`, or its task is cancelled (a server's shutdown
    timeout, say); the wake-up took one event for it, or two published in one turn.
    """
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(3)] + [Stream(b, "s3", key="revoked-user")]
    marks: dict[str, int] = {}

    def end_the_last() -> None:
        if ending == "disconnect":
            b.disconnect(key="revoked-user")
        else:
            assert streams[3].task is not None
            streams[3].task.cancel()
        marks["at"] = len(streams[3].peer.messages)

    streams[1].send = misbehaving(streams[1].peer, end_the_last)
    await started(b, streams)
    for _ in range(events):
        b.publish("m", "secret", channel="c")
    try:
        await asyncio.wait_for(asyncio.shield(streams[3].task), HANG)  # type: ignore[arg-type]
        after = streams[3].peer.messages[marks["at"] :]
        assert [m.get("body") for m in after] == [b""]  # the end of the response alone
    finally:
        await finish(b, streams)


# --- context -----------------------------------------------------------------------------


async def test_each_send_in_a_batch_sees_its_own_context_and_leaks_nothing() -> None:
    """A send wrapper reading and setting context variables, across batches and waits."""
    b = Broadcaster(heartbeat=None)
    seen: dict[str, list[tuple[str, str]]] = {}
    streams: list[Stream] = []
    for n in range(6):
        stream = Stream(b, f"s{n}")
        seen[stream.name] = []

        def wrap(inner: Send, name: str, n: int = n) -> Send:
            count = 0

            async def send(message: Message) -> None:
                nonlocal count
                count += 1
                seen[name].append((REQUEST.get(), SET_IN_SEND.get()))
                SET_IN_SEND.set(f"{name}-{count}")
                if n % 3 == 1 and count % 2 == 0:
                    await asyncio.sleep(0)  # this write waits: the task finishes it
                if n == 5 and count == 6:
                    raise RuntimeError("needs its task")  # the task takes over from here
                await inner(message)

            return send

        stream.send = wrap(stream.peer.send, stream.name)
        streams.append(stream)
    await started(b, streams)
    events: list[Event] = []
    try:
        for round_ in range(6):
            events += [b.publish("m", round_ * 10 + k, channel="c") for k in range(round_ % 3 + 1)]
            await asyncio.sleep(0.01)
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
        for name, log in seen.items():
            assert {rid for rid, _ in log} == {name}, (name, log)
            setters = [mark for _, mark in log if mark != "unset"]
            assert all(mark.startswith(f"{name}-") for mark in setters), (name, log)
    finally:
        await finish(b, streams)
    assert REQUEST.get() == "none"
    assert SET_IN_SEND.get() == "unset"


async def test_a_variable_a_send_wrapper_sets_on_the_response_start_is_seen_by_later_writes() -> (
    None
):
    """A wrapper that notes the status on `http.response.start` and reads it for each body."""
    b = Broadcaster(heartbeat=None)
    status: contextvars.ContextVar[int] = contextvars.ContextVar("status", default=0)
    stream = Stream(b, "s0")
    seen: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.set(message["status"])
        else:
            seen.append(status.get())
        await stream.peer.send(message)

    stream.send = send
    await started(b, [stream])
    events = [b.publish("m", n, channel="c") for n in range(2)]
    try:
        await until(lambda: stream.data == frames(events))
        assert set(seen) == {200}, seen
    finally:
        await finish(b, [stream])


async def test_a_resumed_stream_joining_a_busy_batch_gets_replay_then_live_once() -> None:
    """Streams opened with Last-Event-ID amid live ones: replay then live, no gap, no duplicate."""
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(3)]
    await started(b, streams)
    events = [b.publish("m", n, channel="c") for n in range(10)]
    late: list[Stream] = []
    try:
        for k in range(4):
            resumed = Stream(b, f"r{k}", last_event_id=events[2 * k].id)
            resumed.start()
            late.append(resumed)
            events.append(b.publish("m", 100 + k, channel="c"))
            await asyncio.sleep(0)
            events.append(b.publish("m", 200 + k, channel="c"))
        events += [b.publish("m", 300 + k, channel="c") for k in range(3)]
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
        for k, resumed in enumerate(late):
            want = frames(events[2 * k + 1 :])
            await until(lambda r=resumed, w=want: b"".join(r.peer.bodies) == b":\n\n" + w)  # type: ignore[misc]
    finally:
        await finish(b, streams + late)


async def test_a_slow_stream_evicted_mid_batch_ends_cleanly_and_the_others_lose_nothing() -> None:
    """queue_size=3: a stream whose write waits falls behind and is evicted; the rest go on."""
    b = Broadcaster(heartbeat=0.02, queue_size=3)
    gate = asyncio.Event()
    streams = [Stream(b, f"s{n}") for n in range(4)]

    async def stuck() -> None:
        await gate.wait()

    streams[2].send = misbehaving(streams[2].peer, stuck)
    await started(b, streams)
    events: list[Event] = []
    try:
        for round_ in range(8):
            events += [b.publish("m", round_ * 10 + k, channel="c") for k in range(2)]
            await asyncio.sleep(0.03)  # heartbeats fall due meanwhile
        assert b.stats().evicted == 1
        gate.set()
        await asyncio.wait_for(asyncio.shield(streams[2].task), HANG)  # type: ignore[arg-type]
        assert streams[2].peer.ended
        got = streams[2].data.replace(b":\n\n", b"")
        assert got == frames(events[:2])  # the write that waited, then the end
        for n in (0, 1, 3):
            await until(
                lambda n=n: streams[n].data.replace(b":\n\n", b"") == frames(events)  # type: ignore[misc]
            )
    finally:
        await finish(b, streams)


async def test_streams_on_many_loops_with_publishers_on_each_get_everything_in_order() -> None:
    """Four loops in threads serve streams; every loop publishes; each stream gets it all once."""
    b = Broadcaster(heartbeat=None, queue_size=10_000)
    loops = 4
    per_loop = 150
    results: list[list[bytes]] = []
    barrier = threading.Barrier(loops)

    async def serve() -> list[bytes]:
        streams = [Stream(b, f"l{n}") for n in range(5)]
        await started(b, streams)
        await asyncio.to_thread(barrier.wait, HANG)
        me = threading.get_ident() % 100_000
        for n in range(per_loop):
            b.publish("m", {"t": me, "n": n}, channel="c")
            if n % 7 == 0:
                await asyncio.sleep(0)
        await until(lambda: all(s.data.count(b"data:") >= loops * per_loop for s in streams), 20)
        data = [s.data for s in streams]
        for stream in streams:
            stream.peer.disconnect()
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams if s.task)), HANG)
        return data

    def run() -> None:
        results.append(asyncio.run(serve()))

    threads = [threading.Thread(target=run) for _ in range(loops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join, 60)
    await b.aclose()
    assert len(results) == loops
    for data in (d for loop_data in results for d in loop_data):
        lines = [line for line in data.split(b"\n") if line.startswith(b"data:")]
        assert len(lines) == loops * per_loop
        by_thread: dict[bytes, list[int]] = {}
        for line in lines:
            t, n = line.split(b'"t":')[1].split(b',"n":')
            by_thread.setdefault(t, []).append(int(n.rstrip(b"}")))
        assert all(ns == list(range(per_loop)) for ns in by_thread.values())


async def test_two_channel_streams_get_both_channels_from_threads_and_the_loop_in_order() -> None:
    """Pumps of `["a", "b"]` streams next to one-channel ones; publishers in threads and loop."""
    b = Broadcaster(heartbeat=None, queue_size=10_000)
    both = [Stream(b, f"ab{n}", channels=("a", "b")) for n in range(4)]
    only_a = [Stream(b, f"a{n}", channels=("a",)) for n in range(2)]
    await started(b, both + only_a)
    per = 200

    def publish(p: int) -> None:
        for n in range(per):
            b.publish("m", {"p": p, "n": n}, channel="a" if (n + p) % 2 else "b")

    try:
        loop_publisher = asyncio.create_task(asyncio.to_thread(publish, 9))
        await asyncio.gather(*(asyncio.to_thread(publish, p) for p in range(3)))
        for n in range(per):
            b.publish("m", {"p": 8, "n": n}, channel="a" if n % 2 else "b")
            if n % 5 == 0:
                await asyncio.sleep(0)
        await loop_publisher
        for stream in both:
            await until(lambda s=stream: s.data.count(b"data:") >= 5 * per)  # type: ignore[misc]
        for stream in only_a:
            await until(lambda s=stream: s.data.count(b"data:") >= 5 * per // 2)  # type: ignore[misc]
        await asyncio.sleep(0.05)
        for stream in both + only_a:
            lines = [x for x in stream.data.split(b"\n") if x.startswith(b"data:")]
            by_publisher: dict[bytes, list[int]] = {}
            for line in lines:
                who, number = line.split(b'"p":')[1].split(b',"n":')
                by_publisher.setdefault(who, []).append(int(number.rstrip(b"}")))
            for who, ns in by_publisher.items():
                want = list(range(per))
                if stream in only_a:
                    shift = 0 if who == b"8" else int(who)  # the loop's publisher: a when n is odd
                    want = [n for n in want if (n + shift) % 2]
                assert ns == want, (stream.name, who)
    finally:
        await finish(b, both + only_a)


async def test_streams_reaching_their_lifetime_amid_bursts_end_cleanly_with_no_gap() -> None:
    """lifetime=0.2 on some streams while events stream: each gets an in-order prefix, ends."""
    b = Broadcaster(heartbeat=0.05)
    short = [Stream(b, f"short{n}", lifetime=0.2) for n in range(3)]
    long = [Stream(b, f"long{n}") for n in range(3)]
    await started(b, short + long)
    events: list[Event] = []
    try:
        for round_ in range(40):
            events += [b.publish("m", round_ * 10 + k, channel="c") for k in range(round_ % 3)]
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*(s.task for s in short if s.task)), HANG)
        for stream in short:
            got = stream.data.replace(b":\n\n", b"")
            assert stream.peer.ended
            assert frames(events).startswith(got)
            assert 0 < len(got) < len(frames(events))
        for stream in long:
            await until(
                lambda s=stream: s.data.replace(b":\n\n", b"") == frames(events)  # type: ignore[misc]
            )
    finally:
        await finish(b, short + long)


# --- awaitables that are not coroutines ----------------------------------------------------


class _NextOnly:
    """An iterator with only `__next__`, as granian's send awaitable returns."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __next__(self) -> None:
        if self.steps == 0:
            raise StopIteration
        self.steps -= 1


class _NextOnlyAwaitable:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __await__(self) -> Any:
        return _NextOnly(self.steps)


@types.coroutine
def _generator_coroutine(steps: int) -> Generator[None, None, None]:
    for _ in range(steps):
        yield


@pytest.mark.parametrize(
    "kind",
    ["done future", "later future", "next-only 0", "next-only 2", "generator 0", "generator 1"],
)
async def test_non_coroutine_awaitables_in_a_batch_deliver_everything_once(kind: str) -> None:
    """Sends returning futures or next-only iterators, mixed with coroutines, in one batch."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(4)]

    def odd_send(peer: Peer) -> Callable[[Message], Any]:
        def send(message: Message) -> Any:
            peer.messages.append(message)
            if kind == "done future":
                done: asyncio.Future[None] = loop.create_future()
                done.set_result(None)
                return done
            if kind == "later future":
                later: asyncio.Future[None] = loop.create_future()
                loop.call_later(0.005, later.set_result, None)
                return later
            if kind.startswith("generator"):
                return _generator_coroutine(int(kind[-1]))
            return _NextOnlyAwaitable(int(kind[-1]))

        return send

    for n in (0, 2):
        streams[n].send = odd_send(streams[n].peer)
    await started(b, streams)
    events: list[Event] = []
    try:
        for round_ in range(5):
            events += [b.publish("m", round_ * 10 + k, channel="c") for k in range(2)]
            await asyncio.sleep(0.01)
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
    finally:
        await finish(b, streams)


# --- middleware that keeps or mutates the message dicts --------------------------------------


async def test_a_send_wrapper_that_mutates_and_keeps_messages_gets_a_dict_per_write() -> None:
    """Each write is its own dict: mutating one (or keeping it) does not touch another's."""
    b = Broadcaster(heartbeat=None)
    kept: list[Message] = []
    streams = [Stream(b, f"s{n}") for n in range(4)]

    def wrap(inner: Send, name: str) -> Send:
        async def send(message: Message) -> None:
            kept.append(message)
            assert "seen_by" not in message
            await inner(dict(message))
            message["body"] = b"mangled by " + name.encode()  # after passing it on
            message["seen_by"] = name

        return send

    for stream in streams:
        stream.send = wrap(stream.peer.send, stream.name)
    await started(b, streams)
    events: list[Event] = []
    try:
        for round_ in range(3):
            events += [b.publish("m", round_ * 10 + k, channel="c") for k in range(2)]
            await asyncio.sleep(0.01)
        for stream in streams:
            await until(lambda s=stream: s.data == frames(events))  # type: ignore[misc]
        assert len({id(m) for m in kept}) == len(kept)
    finally:
        await finish(b, streams)


# --- sticky waiters: thread and task readers ------------------------------------------------


def _thread_reader(b: Broadcaster, channels: tuple[str, ...], out: list[bytes], n: int) -> None:
    with b.subscribe(*channels) as sub:
        ready.set()
        for chunk in sub:
            out.append(chunk)
            if b"".join(out).count(b"data:") >= n:
                return


ready = threading.Event()


async def test_thread_and_task_readers_get_every_event_from_many_publishers() -> None:
    """Threads (`for`), tasks (`async for`, breaking and resuming), publishers in threads."""
    b = Broadcaster(heartbeat=None, queue_size=100_000)
    per_publisher = 300
    publishers = 4
    total = per_publisher * publishers
    thread_outs: list[list[bytes]] = [[] for _ in range(3)]
    threads = []
    for out in thread_outs:
        ready.clear()
        thread = threading.Thread(target=_thread_reader, args=(b, ("a", "b"), out, total))
        thread.start()
        threads.append(thread)
        assert ready.wait(HANG)
    subs = [await b.asubscribe("a", "b") for _ in range(4)]
    task_outs: list[list[bytes]] = [[] for _ in subs]

    async def read(sub: Any, out: list[bytes], style: int) -> None:
        while b"".join(out).count(b"data:") < total:
            async for chunk in sub:
                out.append(chunk)
                if style == 1:
                    break  # break out, and resume with a new `async for`
                if style == 2:
                    extra = sub.read_nowait()
                    if extra:
                        out.append(extra)
                    await asyncio.sleep(0)
                if b"".join(out).count(b"data:") >= total:
                    return

    readers = [
        asyncio.create_task(read(sub, out, n % 3))
        for n, (sub, out) in enumerate(zip(subs, task_outs, strict=True))
    ]

    def publish(p: int) -> list[str]:
        ids = []
        for n in range(per_publisher):
            channel = "a" if n % 2 else "b"
            ids.append(b.publish("m", {"p": p, "n": n}, channel=channel).id)
        return ids

    try:
        await asyncio.wait_for(
            asyncio.gather(*(asyncio.to_thread(publish, p) for p in range(publishers))), 30
        )
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
            assert not thread.is_alive()
    finally:
        for sub in subs:
            sub.close()
        await b.aclose()
    for out in thread_outs + task_outs:
        got = b"".join(out)
        assert got.count(b"data:") == total
        for p in range(publishers):
            ns = [
                int(line.split(b'"n":')[1].rstrip(b"}"))
                for line in got.split(b"\n")
                if line.startswith(b"data:") and f'"p":{p},'.encode() in line
            ]
            assert ns == list(range(per_publisher)), p


# --- real servers ------------------------------------------------------------------------


def dechunked(received: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response, as far as it came."""
    at = received.find(b"\r\n\r\n") + 4
    parts = []
    while True:
        line_end = received.find(b"\r\n", at)
        if line_end < 0:
            break
        size = int(received[at:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0 or len(received) < start + size + 2:
            break
        parts.append(received[start : start + size])
        at = start + size + 2
    return b"".join(parts)


def ids_in(received: bytes) -> list[str]:
    body = dechunked(received)
    return [line[4:].decode() for line in body.split(b"\n") if line.startswith(b"id: ")]


async def read_until_ids(stream: RawStream, count: int, seconds: float) -> list[str]:
    """Read until ``count`` ids came (or the response ended, or time ran out)."""
    try:
        async with asyncio.timeout(seconds):
            # A rough count while reading (an id line split by chunking is missed): exact below.
            while stream.received.count(b"\nid: ") < count and not stream.ended_cleanly:
                chunk = await stream.reader.read(262144)
                if not chunk:
                    break
                stream.received += chunk
            while len(ids_in(stream.received)) < count and not stream.ended_cleanly:
                chunk = await stream.reader.read(262144)
                if not chunk:
                    break
                stream.received += chunk
    except TimeoutError:
        pass
    return ids_in(stream.received)


async def publish(http: httpx.AsyncClient, channel: str, count: int, size: int = 0) -> list[str]:
    response = await http.post(
        "/control/publish", params={"channel": channel, "count": count, "size": size}
    )
    response.raise_for_status()
    return list(response.json())


def _served(server: str, app: str, env: dict[str, str] | None = None) -> Any:
    port = free_port()
    return running(command(server, app, port, "batch_adversary_app"), port=port, env=env)


@contextlib.asynccontextmanager
async def served_streams(
    server: str, app: str, count: int, heartbeat: str
) -> AsyncIterator[tuple[Server, httpx.AsyncClient, str, list[RawStream]]]:
    """Serve ``app`` on ``server`` to ``count`` streams of a new channel, all subscribed.

    Yields the server, a control client, the channel and the streams; closes the streams.
    """
    with _served(server, app, {"SSECAST_TEST_HEARTBEAT": heartbeat}) as process:
        channel = new_channel()
        streams: list[RawStream] = []
        try:
            streams = await open_many(process.port, count, channel)
            async with httpx.AsyncClient(base_url=process.url, timeout=HANG) as http:
                assert await until_subscribers(http, count, HANG)
                yield process, http, channel, streams
        finally:
            for stream in streams:
                stream.close()


# The plain app on every server; the wrappers, and the fallback to the task, on two.
_WRAPPED_ON = ("uvicorn-h11", "granian")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "app"),
    [(server, "PLAIN") for server in SERVERS]
    + [(server, app) for server in _WRAPPED_ON for app in ("CONTEXT", "MUTATING")],
)
async def test_200_clients_get_every_burst_and_single_event_once_in_order(
    server: str, app: str
) -> None:
    """200 streams; bursts of 30 and single events: each client gets the ids published, once."""
    with _served(server, app, {"SSECAST_TEST_HEARTBEAT": "0.05"}) as process:
        channel = new_channel()
        streams: list[RawStream] = []
        try:
            for n in range(4):
                streams += await open_many(process.port, 50, f"{channel}&rid=r{n}")
            async with httpx.AsyncClient(base_url=process.url, timeout=HANG) as http:
                assert await until_subscribers(http, 200, HANG)
                published: list[str] = []
                for round_ in range(6):
                    published += await publish(http, channel, 30 if round_ % 2 else 1)
                    published += await publish(http, channel, 1)
            got = await asyncio.gather(*(read_until_ids(s, len(published), 20) for s in streams))
        finally:
            for stream in streams:
                stream.close()
    wrong = [n for n, ids in enumerate(got) if ids != published]
    assert not wrong, (len(wrong), got[wrong[0]][:5] if wrong else None, published[:5])
    bodies = [dechunked(s.received) for s in streams]
    assert not [b for b in bodies if b"mangled" in b or b"duplicate-dict" in b or b":leak=" in b]
    if app == "CONTEXT":
        for n, body in enumerate(bodies):
            rids = {line for line in body.split(b"\n") if line.startswith(b":rid=")}
            assert rids == {f":rid=r{n // 50}".encode()}, (n, rids)
    # hypercorn on 3.11 logs its own reader's cancellation at shutdown: only ours count.
    assert not OUR_FRAME.search(process.log()), process.log()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "app"),
    [(server, "PLAIN") for server in SERVERS] + [(server, "BASE_HTTP") for server in _WRAPPED_ON],
)
async def test_clients_that_stop_reading_get_everything_later_and_fast_ones_meanwhile(
    server: str, app: str
) -> None:
    """8 clients stop reading while 32 read: big events back up on the slow ones only."""
    size = 60_000  # 5 MB in all for each client: more than the socket buffers hold
    with _served(server, app, {"SSECAST_TEST_HEARTBEAT": "0.05"}) as process:
        channel = new_channel()
        streams: list[RawStream] = []
        try:
            streams = await open_many(process.port, 40, channel)
            slow, fast = streams[:8], streams[8:]
            async with httpx.AsyncClient(base_url=process.url, timeout=HANG) as http:
                assert await until_subscribers(http, 40, HANG)
                published: list[str] = []
                for round_ in range(8):
                    published += await publish(http, channel, 20 if round_ % 2 else 1, size)
                    await asyncio.sleep(0.02)
                got_fast = await asyncio.gather(
                    *(read_until_ids(s, len(published), 20) for s in fast)
                )
                await asyncio.sleep(0.3)  # heartbeats fall due while the slow writes wait
                published += await publish(http, channel, 2, size)
                got_fast = await asyncio.gather(
                    *(read_until_ids(s, len(published), 20) for s in fast)
                )
                got_slow = await asyncio.gather(
                    *(read_until_ids(s, len(published), 30) for s in slow)
                )
        finally:
            for stream in streams:
                stream.close()
    assert [ids == published for ids in got_fast] == [True] * len(fast)
    assert [ids == published for ids in got_slow] == [True] * len(slow)
    for stream in streams:
        body = dechunked(stream.received)
        datas = [line for line in body.split(b"\n") if line.startswith(b"data:")]
        assert len(datas) == len(published)
        assert all(line.count(b"x") == size for line in datas)
    assert not OUR_FRAME.search(process.log()), process.log()


@pytest.mark.slow
@pytest.mark.parametrize("server", _WRAPPED_ON)
@pytest.mark.parametrize("app", ["THREADS", "YIELDING"])
async def test_thread_publishers_during_writes_reach_200_clients_once_in_order(
    server: str, app: str
) -> None:
    """Two threads in the server publish while the loop writes to 200 streams."""
    async with served_streams(server, app, 200, "0.05") as (
        process,
        http,
        channel,
        streams,
    ):
        by_thread: list[list[str]] = [[], []]
        for _ in range(3):
            response = await http.post(
                "/control/tpublish", params={"channel": channel, "count": 40}
            )
            response.raise_for_status()
            for t, ids in enumerate(response.json()):
                by_thread[t] += ids
        total = sum(len(ids) for ids in by_thread)
        got = await asyncio.gather(*(read_until_ids(s, total, 20) for s in streams))
    wanted = set(by_thread[0]) | set(by_thread[1])
    for ids in got:
        assert len(ids) == total
        assert set(ids) == wanted
        assert [i for i in ids if i in set(by_thread[0])] == by_thread[0]
        assert [i for i in ids if i in set(by_thread[1])] == by_thread[1]
    assert not OUR_FRAME.search(process.log()), process.log()


# --- sticky waiters: readers that stop and resume --------------------------------------------


def test_a_thread_reader_that_breaks_resumes_and_reads_nowait_gets_everything_once() -> None:
    """`for` broken out of every few chunks, `read_nowait` between, heartbeats meanwhile."""
    b = Broadcaster(heartbeat=0.005, queue_size=100_000)
    total = 2000
    sub = b.subscribe("c")
    got: list[bytes] = []

    def read() -> None:
        rounds = 0
        while b"".join(got).count(b"data:") < total and rounds < 100_000:
            rounds += 1
            for k, chunk in enumerate(sub):
                got.append(chunk)
                if k == rounds % 4:
                    break
            if rounds % 3 == 0:
                got.append(sub.read_nowait())

    reader = threading.Thread(target=read)
    reader.start()
    publishers = [
        threading.Thread(
            target=lambda p=p: [b.publish("m", {"p": p, "n": n}, channel="c") for n in range(500)]
        )
        for p in range(4)
    ]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join(30)
    reader.join(30)
    alive = reader.is_alive()
    sub.close()
    b.close()
    assert not alive
    data = b"".join(got).replace(b":\n\n", b"")
    lines = [x for x in data.split(b"\n") if x.startswith(b"data:")]
    assert len(lines) == total
    for p in range(4):
        ns = [int(x.split(b'"n":')[1].rstrip(b"}")) for x in lines if f'"p":{p},'.encode() in x]
        assert ns == list(range(500))


async def test_an_async_reader_moved_to_another_loop_and_back_loses_nothing() -> None:
    """Read on this loop, break, read on a loop in a thread, break, read here again."""
    b = Broadcaster(heartbeat=None)
    sub = await b.asubscribe("c")
    got: list[bytes] = []
    events: list[Event] = []

    async def take(count: int) -> None:
        async with asyncio.timeout(HANG):
            async for chunk in sub:
                got.append(chunk)
                if b"".join(got).count(b"data:") >= count:
                    break

    try:
        events += [b.publish("m", n, channel="c") for n in range(3)]
        await take(3)
        other = threading.Thread(target=lambda: asyncio.run(take(6)))
        other.start()
        await asyncio.sleep(0.02)
        events += [b.publish("m", n, channel="c") for n in range(3, 6)]
        await asyncio.to_thread(other.join, HANG)
        assert not other.is_alive()
        events.append(b.publish("m", 6, channel="c"))  # its waiter of the other loop is stale
        await take(7)
        events.append(b.publish("m", 7, channel="c"))
        await take(8)
        assert b"".join(got) == frames(events)
    finally:
        sub.close()
        await b.aclose()
