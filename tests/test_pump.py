"""The pump (ssecast._pump): chunks sent as ASGI body messages from the loop's callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import itertools
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest

from ssecast import Broadcaster, Event, Subscription
from ssecast._pump import Pump

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Client:
    """An ASGI ``send`` that keeps the bodies it is given, and which task sent each."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.senders: list[asyncio.Task[Any] | None] = []
        self.request_ids: list[str] = []

    async def send(self, message: MutableMapping[str, Any]) -> None:
        assert message["type"] == "http.response.body"
        assert message["more_body"] is True
        self.bodies.append(message["body"])
        self.senders.append(asyncio.current_task())
        self.request_ids.append(REQUEST_ID.get())

    @property
    def received(self) -> bytes:
        return b"".join(self.bodies)

    @property
    def events(self) -> bytes:
        """What came after the first, empty, body message."""
        assert self.bodies[:1] == [b""]
        return b"".join(self.bodies[1:])


def frames(events: list[Event]) -> bytes:
    return b"".join(event.frame for event in events)


async def until(condition: Callable[[], object], seconds: float = 5.0) -> None:
    """Poll ``condition``: what it watches changes in callbacks, which set no event."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def pumping(b: Broadcaster, send: Send) -> tuple[Subscription, asyncio.Task[None]]:
    """Subscribe and pump to ``send`` in a task of its own, as EventStream does."""
    sub = await b.asubscribe()
    return sub, asyncio.create_task(awaiting(Pump(sub, send)))


async def awaiting(pump: Pump) -> None:
    """Await ``pump`` in a coroutine, as a task can run only a coroutine."""
    await pump


async def test_every_event_arrives_in_order_from_the_loop_and_from_threads() -> None:
    """Events published in the loop and from a thread all arrive, in publish order."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    _, task = await pumping(b, client.send)
    published = [b.publish("n", n) for n in range(50)]
    await asyncio.sleep(0)
    published += await asyncio.to_thread(lambda: [b.publish("n", n) for n in range(50, 100)])
    await until(lambda: client.events == frames(published))
    await b.aclose()
    await asyncio.wait_for(task, 5)  # run() returns once the subscription ended
    assert client.events == frames(published)


async def test_chunks_are_sent_by_loop_callbacks_in_the_tasks_context() -> None:
    """The stream's task does not wake per chunk, yet send sees the task's context."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    sub = await b.asubscribe()

    async def stream() -> None:
        REQUEST_ID.set("request-7")  # as a middleware of this request would
        await Pump(sub, client.send)

    task = asyncio.create_task(stream())
    await until(lambda: client.bodies)
    events = [b.publish("n", n) for n in range(3)]
    await until(lambda: client.events == frames(events))
    assert client.senders == [None, None]  # the empty probe and one chunk of 3 events
    assert client.request_ids == ["request-7", "request-7"]
    assert REQUEST_ID.get() == "none"
    await b.aclose()
    await task


async def test_a_send_that_needs_its_task_is_driven_from_the_task_from_the_start() -> None:
    """A send that fails outside a task (asyncio.timeout in it) gets every chunk from the task."""
    b = Broadcaster(heartbeat=None)
    client = Client()

    async def send_with_a_timeout(message: MutableMapping[str, Any]) -> None:
        async with asyncio.timeout(5):  # RuntimeError outside a task
            await client.send(message)

    _, task = await pumping(b, send_with_a_timeout)
    published = [b.publish("n", n) for n in range(3)]
    published += await asyncio.to_thread(lambda: [b.publish("n", n) for n in range(3, 6)])
    await until(lambda: b"".join(client.bodies) == frames(published))
    assert set(client.senders) == {task}
    await b.aclose()
    await asyncio.wait_for(task, 5)


@pytest.mark.xfail(
    sys.version_info >= (3, 12),
    strict=True,
    reason="3.12+'s wait_for needs a task, so the probe from a callback fails and the task"
    " takes over; the inner send() the probe made is never awaited, and Python warns of it",
)
async def test_a_send_in_wait_for_loses_nothing_and_leaves_no_send_unawaited() -> None:
    """A send wrapped in asyncio.wait_for gets every chunk, and no coroutine is left behind."""
    b = Broadcaster(heartbeat=None)
    client = Client()

    async def send_in_wait_for(message: MutableMapping[str, Any]) -> None:
        await asyncio.wait_for(client.send(message), 5)

    _, task = await pumping(b, send_in_wait_for)
    published = [b.publish("n", n) for n in range(3)]
    published += await asyncio.to_thread(lambda: [b.publish("n", n) for n in range(3, 6)])
    await until(lambda: b"".join(client.bodies) == frames(published))
    await b.aclose()
    await asyncio.wait_for(task, 5)
    gc.collect()  # a coroutine never awaited is reported as it is collected


async def test_a_send_that_refuses_a_later_chunk_outside_its_task_loses_nothing() -> None:
    """A send that takes the empty probe from a callback but not a chunk: the task sends it."""
    b = Broadcaster(heartbeat=None)
    client = Client()

    async def picky_send(message: MutableMapping[str, Any]) -> None:
        # A middleware that needs its task only for bodies it inspects, i.e. non-empty ones.
        if message["body"] and asyncio.current_task() is None:
            raise RuntimeError("this send must run inside a task")
        await client.send(message)

    _, task = await pumping(b, picky_send)
    await until(lambda: client.bodies == [b""])  # the probe went out from a callback
    published = [b.publish("n", n) for n in range(3)]
    await until(lambda: client.events == frames(published))
    published += [b.publish("n", n) for n in range(3, 6)]
    await until(lambda: client.events == frames(published))
    assert set(client.senders[1:]) == {task}
    await b.aclose()
    await asyncio.wait_for(task, 5)


class _StepOnce:
    """An awaitable whose iterator has only `__next__`: it waits one turn, then is done."""

    def __init__(self) -> None:
        self.waited = False

    def __await__(self) -> _StepOnce:
        return self

    def __next__(self) -> None:
        if self.waited:
            raise StopIteration
        self.waited = True


async def test_a_send_returning_an_awaitable_not_a_coroutine_is_written_by_callbacks() -> None:
    """An awaitable that `await` takes is taken from a callback too, and waits in the task."""
    b = Broadcaster(heartbeat=None)
    client = Client()

    def send(message: MutableMapping[str, Any]) -> _StepOnce:
        client.bodies.append(message["body"])
        client.senders.append(asyncio.current_task())
        return _StepOnce()

    _, task = await pumping(b, send)  # type: ignore[arg-type]  # any awaitable will do
    await until(lambda: client.bodies)
    published = [b.publish("n", n) for n in range(3)]
    await until(lambda: client.events == frames(published))
    assert client.senders[:2] == [None, None]  # the probe and the first chunk
    await b.aclose()
    await asyncio.wait_for(task, 5)


async def test_once_the_task_took_over_its_sends_see_what_earlier_sends_set() -> None:
    """Every write runs in one copy of the task's context, whoever makes it, waits included."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    sends: contextvars.ContextVar[int] = contextvars.ContextVar("sends", default=0)
    counted: list[tuple[int, bytes]] = []

    async def counting_send(message: MutableMapping[str, Any]) -> None:
        # A middleware that keeps a count in a context variable, and needs its task for
        # bodies it inspects; after the takeover, every other send also waits a turn.
        sends.set(sends.get() + 1)
        counted.append((sends.get(), message["body"]))
        if message["body"] and asyncio.current_task() is None:
            raise RuntimeError("this send must run inside a task")
        if len(counted) % 2:
            await asyncio.sleep(0)
        sends.set(sends.get() + 100)  # after the wait, still the same context
        await client.send(message)

    sub = await b.asubscribe()

    async def stream() -> int:
        REQUEST_ID.set("request-9")
        await Pump(sub, counting_send)
        return sends.get()

    task = asyncio.create_task(stream())
    await until(lambda: client.bodies == [b""])  # the probe, from a callback
    published = [b.publish("n", n) for n in range(4)]
    await until(lambda: client.events == frames(published))
    published += await asyncio.to_thread(lambda: [b.publish("n", n) for n in range(4, 8)])
    await until(lambda: client.events == frames(published))
    counts = [count for count, _ in counted]
    # The probe (and its +100), the chunk refused before its +100, its resend by the task.
    assert counts[:3] == [1, 102, 103]
    assert all(later == earlier + 101 for earlier, later in itertools.pairwise(counts[2:]))
    assert set(client.request_ids) == {"request-9"}
    assert set(client.senders[1:]) == {task}
    await b.aclose()
    assert await asyncio.wait_for(task, 5) == 0  # the task's own context is left alone
    assert sends.get() == 0


async def test_a_first_chunk_that_finds_the_client_gone_raises() -> None:
    """OSError from the empty first send means the client left: run() raises it."""
    b = Broadcaster(heartbeat=None)

    async def gone(message: MutableMapping[str, Any]) -> None:
        raise ConnectionResetError("the client went away")

    _, task = await pumping(b, gone)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(task, 5)
    await b.aclose()


async def test_frames_pending_when_the_broadcaster_closes_are_sent_then_run_ends() -> None:
    """A shutdown lets the last frames out, and then the stream ends: nothing hangs."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    _, task = await pumping(b, client.send)
    await until(lambda: client.bodies)
    await asyncio.sleep(0)  # parked
    events = [b.publish("n", n) for n in range(3)]
    b.close()  # before the wake-up the publishes queued has run
    await asyncio.wait_for(task, 5)
    assert client.events == frames(events)


async def test_a_send_that_waits_is_finished_by_the_task_before_the_next_one() -> None:
    """Back-pressure: a send that must wait ends in the stream's task; none overlap; order kept."""
    b = Broadcaster(heartbeat=None)
    gates = [asyncio.Event(), asyncio.Event()]
    sends: list[tuple[str, bytes]] = []

    async def slow_send(message: MutableMapping[str, Any]) -> None:
        sends.append(("begin", message["body"]))
        if len(sends) <= 3:
            await gates[len(sends) // 2].wait()  # the client stopped reading for a while
        sends.append(("end", message["body"]))

    _, task = await pumping(b, slow_send)
    await until(lambda: len(sends) == 1)
    gates[0].set()  # the empty first message waited too
    await until(lambda: len(sends) == 2)
    first = b.publish("n", 0)
    await until(lambda: len(sends) == 3)
    later = [b.publish("n", n) for n in range(1, 4)]
    await asyncio.sleep(0.02)
    assert sends[2:] == [("begin", first.frame)]  # nothing else is sent meanwhile
    gates[1].set()
    await until(lambda: len(sends) == 6)
    assert sends[2:] == [
        ("begin", first.frame),
        ("end", first.frame),
        ("begin", frames(later)),
        ("end", frames(later)),
    ]
    await b.aclose()
    await task


async def test_no_heartbeat_is_written_while_a_write_waits() -> None:
    """A heartbeat due during a send that waits is not sent over it; heartbeats come after."""
    b = Broadcaster(heartbeat=0.02)
    gate = asyncio.Event()
    sends: list[tuple[str, bytes]] = []

    async def slow_send(message: MutableMapping[str, Any]) -> None:
        sends.append(("begin", message["body"]))
        if message["body"] not in (b"", b":\n\n"):
            await gate.wait()  # the client stopped reading
        sends.append(("end", message["body"]))

    _, task = await pumping(b, slow_send)
    await until(lambda: ("end", b":\n\n") in sends)  # heartbeats come while idle
    event = b.publish("n", 0)
    await until(lambda: sends[-1] == ("begin", event.frame))
    await asyncio.sleep(0.2)  # ten heartbeat periods
    assert sends[-1] == ("begin", event.frame)  # nothing was sent over the waiting write
    gate.set()
    await until(lambda: sends[-2:] == [("begin", b":\n\n"), ("end", b":\n\n")])
    await b.aclose()
    await asyncio.wait_for(task, 5)


async def test_an_awaitable_that_is_not_a_coroutine_is_awaited_too() -> None:
    """A send may return any awaitable, such as a future a server resolves later."""
    b = Broadcaster(heartbeat=None)
    loop = asyncio.get_running_loop()
    bodies: list[bytes] = []

    def send(message: MutableMapping[str, Any]) -> asyncio.Future[None]:
        bodies.append(message["body"])
        done: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.01, done.set_result, None)
        return done

    _, task = await pumping(b, send)
    events = [b.publish("n", 0)]
    await until(lambda: len(bodies) == 2)
    events.append(b.publish("n", 1))
    await until(lambda: b"".join(bodies[1:]) == frames(events))
    await b.aclose()
    await task


async def test_a_heartbeat_is_sent_after_a_quiet_heartbeat_period() -> None:
    """Silence for ``heartbeat`` seconds gives a comment; an event resets the silence."""
    b = Broadcaster(heartbeat=0.05)
    client = Client()
    _, task = await pumping(b, client.send)
    await until(lambda: client.bodies[:2] == [b"", b":\n\n"])
    event = b.publish("n", 1)
    await until(lambda: event.frame in client.bodies)
    await until(lambda: client.bodies[-1] == b":\n\n")
    await b.aclose()
    await task


@pytest.mark.parametrize("when", ["at once", "after waiting"])
async def test_an_error_from_send_ends_run_with_that_error(when: str) -> None:
    """A later send that fails (the client went away) makes run() raise it; nothing follows."""
    b = Broadcaster(heartbeat=None)
    calls: list[bytes] = []

    async def failing_send(message: MutableMapping[str, Any]) -> None:
        calls.append(message["body"])
        if len(calls) == 3:
            if when == "after waiting":
                await asyncio.sleep(0)
            raise ConnectionResetError("the client went away")

    _, task = await pumping(b, failing_send)
    b.publish("n", 0)
    await until(lambda: len(calls) == 2)
    b.publish("n", 1)
    with pytest.raises(ConnectionResetError, match="went away"):
        await asyncio.wait_for(task, 5)
    b.publish("n", 2)
    await asyncio.sleep(0.01)
    assert len(calls) == 3
    await b.aclose()


async def test_a_send_that_raises_cancelled_error_at_once_ends_run_with_it() -> None:
    """CancelledError raised by a send is that stream's, not the wake-up callback's."""
    b = Broadcaster(heartbeat=None)
    other = Client()
    calls = 0

    async def cancelled_send(message: MutableMapping[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise asyncio.CancelledError

    _, task = await pumping(b, cancelled_send)
    _, healthy = await pumping(b, other.send)
    await until(lambda: calls == 1 and other.bodies)
    event = b.publish("n", 0)  # one wake-up callback for both pumps
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await until(lambda: other.events == event.frame)
    await b.aclose()
    await healthy


async def test_a_send_that_raises_before_returning_an_awaitable_ends_run() -> None:
    """A plain function that raises instead of returning an awaitable is reported the same way."""
    b = Broadcaster(heartbeat=None)
    client = Client()

    def broken_send(message: MutableMapping[str, Any]) -> Awaitable[None]:
        if client.bodies:
            raise ValueError("a bug in a middleware")
        return client.send(message)

    _, task = await pumping(b, broken_send)
    await until(lambda: client.bodies)
    b.publish("n", 0)
    with pytest.raises(ValueError, match="bug in a middleware"):
        await asyncio.wait_for(task, 5)
    await b.aclose()


async def test_cancelling_run_during_a_waiting_send_cancels_that_send() -> None:
    """A server cancelling the stream's task reaches the send it waits in."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    cancelled = asyncio.Event()

    async def stuck_send(message: MutableMapping[str, Any]) -> None:
        if not client.bodies:
            await client.send(message)
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    _, task = await pumping(b, stuck_send)
    await until(lambda: client.bodies)
    b.publish("n", 0)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    await b.aclose()


@pytest.mark.parametrize("then", ["waits", "raises"])
async def test_a_send_that_cancels_its_own_stream_ends_it_quietly(then: str) -> None:
    """A send that cancels the stream's task, then waits or fails, ends it without an error."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    reports: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reports.append(context))
    abandoned = asyncio.Event()
    stream: asyncio.Task[None] | None = None

    async def self_cancelling_send(message: MutableMapping[str, Any]) -> None:
        if not client.bodies:
            await client.send(message)
            return
        assert stream is not None
        stream.cancel()  # as a middleware that gives up on the request might
        try:
            if then == "raises":
                raise ConnectionResetError("given up")
            await asyncio.Event().wait()
        finally:
            abandoned.set()

    _, stream = await pumping(b, self_cancelling_send)
    await until(lambda: client.bodies)
    b.publish("n", 0)
    with pytest.raises(asyncio.CancelledError):
        await stream
    assert abandoned.is_set()
    assert reports == []
    await b.aclose()


async def test_a_send_may_absorb_the_cancellation_and_finish() -> None:
    """A waiting send that handles the cancel itself ends normally, and the pump goes on."""
    b = Broadcaster(heartbeat=None)
    client = Client()

    async def stubborn_send(message: MutableMapping[str, Any]) -> None:
        if len(client.bodies) == 1:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        await client.send(message)

    _, task = await pumping(b, stubborn_send)
    await until(lambda: client.bodies)
    first = b.publish("n", 0)
    await asyncio.sleep(0.01)
    task.cancel()
    await until(lambda: client.events == first.frame)
    second = b.publish("n", 1)
    await until(lambda: client.events == frames([first, second]))
    await b.aclose()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("failing", [True, False])
def test_a_cancel_that_comes_first_leaves_nothing_behind(failing: bool) -> None:
    """Cancelled before it took a write's outcome, run() closes the write and its error quietly."""
    reports: list[dict[str, Any]] = []
    abandoned: list[bool] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: reports.append(context)
        )
        b = Broadcaster(heartbeat=None)
        client = Client()

        async def send(message: MutableMapping[str, Any]) -> None:
            if not client.bodies:
                await client.send(message)
                return
            if failing:
                raise ConnectionResetError("gone")
            try:
                await asyncio.Event().wait()
            finally:
                abandoned.append(True)

        _, task = await pumping(b, send)
        await until(lambda: client.bodies)
        await asyncio.sleep(0)  # parked
        b.publish("n", 0)
        await asyncio.sleep(0)  # the wake-up ran: the outcome is set, the task not yet back
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await b.aclose()

    asyncio.run(scenario())
    gc.collect()
    assert abandoned == ([] if failing else [True])
    assert reports == []


async def test_nothing_is_sent_when_cancelled_before_the_first_chunk() -> None:
    """A stream cancelled as it starts sends nothing at all."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    _, task = await pumping(b, client.send)
    await asyncio.sleep(0)  # it has started and queued the callback of its first message
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert client.bodies == []
    await b.aclose()


async def test_a_wake_up_queued_before_a_cancel_sends_nothing() -> None:
    """An event that arrives as the stream is cancelled is not written after the end."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    _, task = await pumping(b, client.send)
    await until(lambda: client.bodies)
    await asyncio.sleep(0)  # parked
    b.publish("n", 0)  # queues the wake-up
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert client.bodies == [b""]
    await b.aclose()
