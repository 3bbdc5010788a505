"""Adversarial tests of the hand-stepped disconnect watch, `coroutine_of`, and the loop clock.

Shapes the earlier adversaries did not try: a receive that awaits a future of another event
loop, one that yields to the loop before it needs a task, one that awaits two futures in
turn, one closed while its future fails; context variables seen by a receive wrapper; a
reader closed from inside another reader's heartbeat write; the clock leaving and
re-forming its registry entry while other readers wait for heartbeats; `Heartbeat.stop`
from another thread racing the tick; granian's `send` stepped from loop callbacks.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import re
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import httpx
import pytest

from asgi_request import get_scope
from raw_stream import RawStream, open_many
from ssecast import Broadcaster, Subscription
from ssecast._pump import Pump
from ssecast._subscription import Heartbeat, _Clock
from ssecast._watch import DisconnectWatch
from ssecast._wire import HEARTBEAT
from ssecast.asgi import EventStream
from test_disconnect_servers_adversary import new_channel, serve

Message = MutableMapping[str, Any]
HANG = 5.0
"""Seconds after which what should take milliseconds counts as hung."""
SLACK = 0.15
"""Seconds a timer may fire late on a loaded machine."""
DISCONNECT: Message = {"type": "http.disconnect"}
BODY: Message = {"type": "http.request", "body": b"", "more_body": False}


class Gone:
    """What the watch closes: counts the calls, and can run a hook inside `close`."""

    def __init__(self, hook: Callable[[], None] | None = None) -> None:
        self.calls = 0
        self.hook = hook

    def close(self) -> None:
        self.calls += 1
        if self.hook is not None:
            self.hook()


async def until(condition: Callable[[], object], seconds: float = HANG) -> None:
    """Poll `condition` until it holds; raise TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(HANG)
    loop.close()


# -- the watch ------------------------------------------------------------------------------


async def test_a_receive_awaiting_another_loop_s_future_is_stepped_only_on_its_own_loop(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    foreign: asyncio.Future[None] = asyncio.run_coroutine_threadsafe(
        _future_on_running_loop(), other_loop
    ).result(HANG)
    here = threading.get_ident()
    threads: list[int] = []
    stay: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    first = True

    async def receive() -> Message:
        nonlocal first
        threads.append(threading.get_ident())
        if first:
            first = False
            await foreign  # the wrapper's bug: a future made on the wrong loop
            threads.append(threading.get_ident())
            return BODY
        await stay
        return DISCONNECT

    gone = Gone()
    watch = DisconnectWatch(receive, gone)
    await asyncio.sleep(0.05)
    other_loop.call_soon_threadsafe(foreign.set_result, None)
    await asyncio.sleep(0.1)
    watch.close()
    # Either outcome a task would have had: refused at once (the client taken as gone),
    # and in every case every step on this loop's thread.
    assert set(threads) == {here}, "receive() was stepped on another loop's thread"
    assert gone.calls == 1


async def _future_on_running_loop() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


async def test_a_wrapper_that_checkpoints_before_it_needs_a_task_does_not_end_the_stream() -> None:
    disconnected = asyncio.Event()

    async def receive() -> Message:
        await asyncio.sleep(0)  # anyio.lowlevel.checkpoint(), say
        async with asyncio.timeout(60):
            await disconnected.wait()
        return DISCONNECT

    gone = Gone()
    watch = DisconnectWatch(receive, gone)
    await asyncio.sleep(0.05)
    still_open = gone.calls == 0
    disconnected.set()
    await asyncio.sleep(0.05)
    watch.close()
    assert still_open, "the stream ended while its client was still there"
    assert gone.calls == 1


async def test_a_receive_that_awaits_two_futures_in_turn_is_followed_through_both() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[str]] = []
    seen: list[str] = []

    async def receive() -> Message:
        for _ in range(2):
            future: asyncio.Future[str] = loop.create_future()
            futures.append(future)
            seen.append(await future)
        return DISCONNECT

    gone = Gone()
    watch = DisconnectWatch(receive, gone)
    await until(lambda: len(futures) == 1)
    futures[0].set_result("first")
    await until(lambda: len(futures) == 2)
    assert gone.calls == 0
    futures[1].set_result("second")
    await until(lambda: gone.calls == 1)
    watch.close()
    assert seen == ["first", "second"]
    assert gone.calls == 1


@pytest.mark.parametrize("how", ["exception", "cancel"])
async def test_a_future_failing_in_the_same_turn_as_close_tells_nobody(how: str) -> None:
    loop = asyncio.get_running_loop()
    waited: asyncio.Future[None] = loop.create_future()
    cleaned: list[str] = []

    async def receive() -> Message:
        try:
            await waited
        finally:
            cleaned.append("done")
        return BODY

    gone = Gone()
    watch = DisconnectWatch(receive, gone)
    await until(lambda: waited._callbacks)
    # The watch's wake-up is scheduled, then the stream ends before it runs.
    if how == "cancel":
        waited.cancel()
    else:
        waited.set_exception(ConnectionResetError("the client went away"))
    watch.close()
    await asyncio.sleep(0.02)
    assert cleaned == ["done"]  # closing ran the receive's clean-up, once
    assert gone.calls == 0  # the stream was ending already: nobody is told twice


async def test_close_called_from_inside_the_gone_callback_is_harmless() -> None:
    watch: DisconnectWatch | None = None
    calls: list[int] = []

    def reenter() -> None:
        assert watch is not None
        watch.close()  # as EventStream's clean-up closes both, from the close
        watch.close()
        calls.append(1)

    async def receive() -> Message:
        await asyncio.sleep(0.01)
        return DISCONNECT

    gone = Gone(reenter)
    watch = DisconnectWatch(receive, gone)
    await until(lambda: gone.calls == 1)
    await asyncio.sleep(0.02)
    watch.close()
    assert gone.calls == 1
    assert calls == [1]


async def test_close_from_inside_the_fallback_task_s_clean_up_is_harmless() -> None:
    watch: DisconnectWatch | None = None
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    disconnected = asyncio.Event()

    async def receive() -> Message:
        async with asyncio.timeout(60):  # needs a task: the watch falls back to one
            await disconnected.wait()
        return DISCONNECT

    def reenter() -> None:
        assert watch is not None
        watch.close()  # cancels the task that is running this very call

    gone = Gone(reenter)
    watch = DisconnectWatch(receive, gone)
    await asyncio.sleep(0.02)
    disconnected.set()
    await until(lambda: gone.calls == 1)
    await asyncio.sleep(0.02)
    assert gone.calls == 1
    assert errors == []


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("adversary_request")


async def test_a_receive_wrapper_sees_context_set_before_the_stream_and_keeps_its_own() -> None:
    """The watch steps receive in a copy of the request's context, as a task would."""
    seen: list[str] = []
    counter: contextvars.ContextVar[int] = contextvars.ContextVar("calls", default=0)
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        seen.append(VAR.get("unset"))
        counter.set(counter.get() + 1)  # set by the wrapper: lives on in its context
        seen.append(f"call {counter.get()}")
        if not body_given:
            body_given = True
            return BODY
        await disconnected.wait()
        return DISCONNECT

    async def send(message: Message) -> None:
        pass

    async def request() -> None:
        VAR.set("request-42")  # a middleware's, before the stream begins
        await EventStream(b, ["room"])(get_scope(), receive, send)

    with Broadcaster(heartbeat=None) as b:
        task = asyncio.create_task(request())
        await until(lambda: b.stats().subscribers == 1 and len(seen) == 4)
        disconnected.set()
        await asyncio.wait_for(task, HANG)
    assert seen == ["request-42", "call 1", "request-42", "call 2"]
    assert VAR.get("unset") == "unset"  # nothing leaked out of the request's context


# -- the clock --------------------------------------------------------------------------------


async def test_a_reader_closed_by_another_s_heartbeat_write_does_not_stop_the_clock() -> None:
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    beats: list[float] = []
    with Broadcaster(heartbeat=0.05) as b:
        writer, victim = b.subscribe("room"), b.subscribe("room")

        async def send(message: Message) -> None:
            if message["body"] == HEARTBEAT:
                beats.append(loop.time())
                victim.close()  # a send wrapper's doing, from inside the write

        pump = asyncio.create_task(_pumped(Pump(writer, send)))
        await asyncio.sleep(0.01)  # the victim's beat joins the clock after the writer's
        reader = asyncio.create_task(_drain(victim))
        await asyncio.sleep(0.6)
        writer.close()
        await asyncio.wait_for(asyncio.gather(pump, reader), HANG)
    assert errors == []
    gaps = [after - before for before, after in itertools.pairwise(beats)]
    assert len(beats) >= 6
    assert max(gaps) <= 0.05 * 1.25 + SLACK, gaps


async def _drain(sub: Subscription) -> None:
    async for _ in sub:
        pass


async def _pumped(pump: Pump) -> None:
    await pump


async def test_readers_coming_and_going_do_not_delay_the_heartbeats_of_those_that_stay() -> None:
    """The clock leaves the registry and forms again, again and again, on one loop."""
    loop = asyncio.get_running_loop()
    interval = 0.2
    stayers: list[list[float]] = [[] for _ in range(3)]
    with Broadcaster(heartbeat=interval) as b:

        async def stay(out: list[float]) -> None:
            async with b.subscribe("room") as sub:
                async for chunk in sub:
                    if chunk == HEARTBEAT:
                        out.append(loop.time())

        async def churn() -> None:
            # Short readers: each joins the clock at its first read and leaves it at once
            # when it closes on this loop.
            for n in range(150):
                async with b.subscribe(f"churn-{n % 5}") as sub:
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(_first_chunk(sub), 0.003)
                await asyncio.sleep(0.002)

        start = loop.time()
        staying = [asyncio.create_task(stay(out)) for out in stayers]
        await asyncio.wait_for(churn(), 30)
        await asyncio.sleep(max(0.0, 1.5 - (loop.time() - start)))
        for task in staying:
            task.cancel()
        await asyncio.gather(*staying, return_exceptions=True)
    assert loop not in _Clock._clocks  # every reader gone: the clock left
    for out in stayers:
        times = [start, *out]
        gaps = [after - before for before, after in itertools.pairwise(times)]
        assert len(out) >= 5
        assert max(gaps) <= interval * 1.25 + SLACK, gaps


async def _first_chunk(sub: Subscription) -> bytes:
    async for chunk in sub:
        return chunk
    return b""


async def test_churn_with_no_reader_left_between_them_leaves_and_reforms_the_clock() -> None:
    loop = asyncio.get_running_loop()
    with Broadcaster(heartbeat=0.05) as b:
        for _ in range(50):
            assert loop not in _Clock._clocks
            sub = b.subscribe("room")
            beat = Heartbeat(sub, loop).start()
            assert loop in _Clock._clocks
            beat.stop()
            sub.close()
        assert loop not in _Clock._clocks
        # And the next reader still gets its heartbeat on time.
        async with b.subscribe("room") as sub:
            before = loop.time()
            assert await asyncio.wait_for(_first_chunk(sub), HANG) == HEARTBEAT
            assert loop.time() - before <= 0.05 * 1.25 + SLACK


async def test_stop_from_another_thread_racing_the_tick_ends_only_the_stopped() -> None:
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    interval = 0.02
    with Broadcaster(heartbeat=interval) as b:
        keeper_beats: list[float] = []

        async def keep() -> None:
            async with b.subscribe("keep") as sub:
                async for chunk in sub:
                    if chunk == HEARTBEAT:
                        keeper_beats.append(loop.time())

        keeper = asyncio.create_task(keep())
        await asyncio.sleep(0.01)
        for _ in range(20):
            subs = [b.subscribe("room") for _ in range(20)]
            beats = [Heartbeat(sub, loop).start() for sub in subs]
            stopper = threading.Thread(target=_stop_all, args=(beats,))
            await asyncio.sleep(interval / 4 * 0.9)  # near the tick
            stopper.start()
            await asyncio.sleep(interval / 4)
            await asyncio.to_thread(stopper.join, HANG)
            clock = _Clock._clocks[loop]
            await until(lambda: not any(beat in clock._beats for beat in beats))  # noqa: B023
            assert _Clock._clocks[loop] is clock  # the keeper's clock stayed all along
            for sub in subs:
                sub.close()
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
    assert errors == []
    assert loop not in _Clock._clocks
    assert len(keeper_beats) >= 10


def _stop_all(beats: list[Heartbeat]) -> None:
    for beat in beats:
        beat.stop()


async def test_lifetimes_end_on_time_while_readers_come_and_go() -> None:
    loop = asyncio.get_running_loop()
    ended: list[tuple[float, float]] = []
    with Broadcaster(heartbeat=0.2) as b:

        async def timed(lifetime: float) -> None:
            start = loop.time()
            async with b.subscribe("room", lifetime=lifetime) as sub:
                async for _ in sub:
                    pass
            ended.append((lifetime, loop.time() - start))

        async def passer_by() -> None:
            for _ in range(40):
                async with b.subscribe("room"):
                    await asyncio.sleep(0.005)

        lifetimes = [0.1, 0.15, 0.25, 0.3, 0.45]
        await asyncio.wait_for(
            asyncio.gather(*(timed(t) for t in lifetimes), passer_by(), passer_by()), 10
        )
    assert len(ended) == len(lifetimes)
    for lifetime, took in ended:
        # Up to a tenth early by design (reconnects spread out), never late past the slack.
        assert lifetime * 0.9 - 0.01 <= took <= lifetime + SLACK, (lifetime, took)


# -- granian's send, stepped from loop callbacks ----------------------------------------------


FRAME = re.compile(rb"^id: (\S+)\nevent: (\w+)\ndata: \{\"n\": ?(\d+)\}\n", re.MULTILINE)
"""An event the control route publishes: its id, its type (the publisher) and its number."""


@pytest.mark.slow
async def test_granian_delivers_1000_events_once_and_in_order_to_several_clients() -> None:
    """Four publishers at once, 250 events each, to 8 clients; the pump steps granian's sends."""
    env = {"SSECAST_TEST_QUEUE_SIZE": "4096", "SSECAST_TEST_HISTORY": "16"}
    with serve("granian", "PLAIN", env=env) as server:
        channel = new_channel()
        streams = await open_many(server.port, 8, channel)
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG) as http:

            async def publish(kind: str) -> None:
                params = {"channel": channel, "count": "250", "type": kind}
                (await http.get("/control/publish", params=params)).raise_for_status()

            await asyncio.gather(*(publish(f"p{n}") for n in range(4)))
            async with asyncio.timeout(30):
                await asyncio.gather(*(_read_events(stream, 1000) for stream in streams))
        for stream in streams:
            stream.close()
    orders = set()
    for stream in streams:
        frames = FRAME.findall(stream.received)
        assert len(frames) == 1000
        assert len({event_id for event_id, _, _ in frames}) == 1000  # none twice
        for kind in (b"p0", b"p1", b"p2", b"p3"):
            assert [int(n) for _, k, n in frames if k == kind] == list(range(250))
        orders.add(tuple(event_id for event_id, _, _ in frames))
    assert len(orders) == 1  # every client saw the same interleaving


PADDED = re.compile(rb"^id: (\S+)\nevent: (\w+)\ndata: \{\"n\": ?(\d+), ?\"pad\"", re.MULTILINE)
"""An event published with padding: its id, its type and its number."""


@pytest.mark.slow
async def test_granian_sends_that_must_wait_lose_nothing_for_a_client_that_reads_late() -> None:
    """8 MB to a client that reads nothing until the end: granian's sends wait, in the task."""
    env = {"SSECAST_TEST_QUEUE_SIZE": "4096", "SSECAST_TEST_HISTORY": "16"}
    with serve("granian", "PLAIN", env=env) as server:
        channel = new_channel()
        late, prompt = await open_many(server.port, 2, channel)
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG) as http:
            params = {"channel": channel, "count": "1000", "size": "8000", "type": "big"}
            publishing = asyncio.create_task(http.get("/control/publish", params=params))
            async with asyncio.timeout(30):
                await _read_events(prompt, 1000)
                (await publishing).raise_for_status()
                await asyncio.sleep(0.2)  # the late client's sends wait meanwhile
                await _read_events(late, 1000)
        late.close()
        prompt.close()
    for stream in (late, prompt):
        frames = PADDED.findall(stream.received)
        assert [int(n) for _, _, n in frames] == list(range(1000))
        assert len({event_id for event_id, _, _ in frames}) == 1000


async def _read_events(stream: RawStream, count: int) -> None:
    """Read until `count` events in all came (counted as they arrive: megabytes may)."""
    marker = b"\nevent: "
    seen = stream.received.count(marker)
    while seen < count:
        chunk = await stream.reader.read(65536)
        if not chunk:
            raise ConnectionError("closed early")
        tail = stream.received[-(len(marker) - 1) :]
        stream.received += chunk
        seen += (tail + chunk).count(marker)


# -- closing the watch, compared with cancelling a task ---------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(
            "wait_for",
            marks=pytest.mark.xfail(
                sys.version_info >= (3, 12),
                strict=True,
                reason="3.12+'s wait_for needs a task, so the watch's first step fails and it"
                " falls back to one; the inner receive() that step made is never awaited, and"
                " Python warns of it",
            ),
        ),
        "future",
    ],
)
async def test_closing_the_watch_cancels_what_the_receive_awaits_as_a_task_would(
    shape: str,
) -> None:
    loop = asyncio.get_running_loop()
    cleaned: list[str] = []
    forever = asyncio.Event()
    returned: asyncio.Future[Message] = loop.create_future()

    async def inner() -> Message:
        try:
            await forever.wait()
        finally:
            cleaned.append("inner")
        return DISCONNECT

    async def bounded() -> Message:
        return await asyncio.wait_for(inner(), 60)

    def handed_a_future() -> asyncio.Future[Message]:
        returned.add_done_callback(lambda _: cleaned.append("future"))
        return returned

    gone = Gone()
    watch = DisconnectWatch(bounded if shape == "wait_for" else handed_a_future, gone)
    await asyncio.sleep(0.05)
    watch.close()
    await asyncio.sleep(0.05)
    left_behind = not cleaned
    forever.set()  # let the test's own leftovers end
    if not returned.done():
        returned.cancel()
    await asyncio.sleep(0.01)
    assert not left_behind, "what the receive awaited was left running after close()"
    assert gone.calls == 0
