"""The pump (ssecast._pump): chunks sent as ASGI body messages from the loop's callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import threading
from collections.abc import MutableMapping
from typing import Any

import pytest

from ssecast import Broadcaster, Event, Subscription
from ssecast._pump import Pump

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


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


def frames(events: list[Event]) -> bytes:
    return b"".join(event.frame for event in events)


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Poll ``condition``: what it watches changes in callbacks, which set no event."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_every_event_arrives_in_order_from_the_loop_and_from_threads() -> None:
    """Events published in the loop and from a thread all arrive, in publish order."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, client.send).run())
    published = [b.publish("n", n) for n in range(50)]
    await asyncio.sleep(0)
    published += await asyncio.to_thread(lambda: [b.publish("n", n) for n in range(50, 100)])
    await until(lambda: client.received == frames(published))
    await b.aclose()
    await asyncio.wait_for(pumping, 5)  # run() returns once the subscription has ended
    assert client.received == frames(published)


async def test_live_chunks_are_sent_by_loop_callbacks_in_the_tasks_context() -> None:
    """The stream's task does not wake per chunk, yet send sees the task's context."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    sub = await b.asubscribe()

    async def stream() -> None:
        REQUEST_ID.set("request-7")  # as a middleware of this request would
        await Pump(sub, client.send).run()

    pumping = asyncio.create_task(stream())
    await asyncio.sleep(0)
    events = [b.publish("n", n) for n in range(3)]
    await until(lambda: client.received == frames(events))
    assert client.senders == [None]  # one chunk, written by a callback, not by a task
    assert client.request_ids == ["request-7"]
    assert REQUEST_ID.get() == "none"
    await b.aclose()
    await pumping


async def test_a_send_that_waits_is_finished_by_the_task_before_the_next_one() -> None:
    """Back-pressure: a send that must wait ends in the stream's task; none overlap; order kept."""
    b = Broadcaster(heartbeat=None)
    gate = asyncio.Event()
    sends: list[tuple[str, bytes]] = []

    async def slow_send(message: MutableMapping[str, Any]) -> None:
        sends.append(("begin", message["body"]))
        if len(sends) == 1:
            await gate.wait()  # the client stopped reading for a while
        sends.append(("end", message["body"]))

    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, slow_send).run())
    first = b.publish("n", 0)
    await until(lambda: len(sends) == 1)
    later = [b.publish("n", n) for n in range(1, 4)]
    await asyncio.sleep(0.02)
    assert sends == [("begin", first.frame)]  # nothing else is sent meanwhile
    gate.set()
    await until(lambda: len(sends) == 4)
    assert sends == [
        ("begin", first.frame),
        ("end", first.frame),
        ("begin", frames(later)),
        ("end", frames(later)),
    ]
    await b.aclose()
    await pumping


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

    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, send).run())
    events = [b.publish("n", 0)]
    await until(lambda: len(bodies) == 1)
    events.append(b.publish("n", 1))
    await until(lambda: b"".join(bodies) == frames(events))
    await b.aclose()
    await pumping


async def test_a_heartbeat_is_sent_after_a_quiet_heartbeat_period() -> None:
    """Silence for ``heartbeat`` seconds gives a comment; an event resets the silence."""
    b = Broadcaster(heartbeat=0.05)
    client = Client()
    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, client.send).run())
    await until(lambda: client.bodies[:1] == [b":\n\n"])
    event = b.publish("n", 1)
    await until(lambda: event.frame in client.bodies)
    await until(lambda: client.bodies[-1] == b":\n\n")
    await b.aclose()
    await pumping


@pytest.mark.parametrize("when", ["at once", "after waiting"])
async def test_an_error_from_send_ends_run_with_that_error(when: str) -> None:
    """A send that fails (the client went away) makes run() raise it; nothing is sent after."""
    b = Broadcaster(heartbeat=None)
    calls: list[bytes] = []

    async def failing_send(message: MutableMapping[str, Any]) -> None:
        calls.append(message["body"])
        if len(calls) == 2:
            if when == "after waiting":
                await asyncio.sleep(0)
            raise ConnectionResetError("the client went away")

    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, failing_send).run())
    b.publish("n", 0)
    await until(lambda: len(calls) == 1)
    b.publish("n", 1)
    with pytest.raises(ConnectionResetError, match="went away"):
        await asyncio.wait_for(pumping, 5)
    b.publish("n", 2)
    await asyncio.sleep(0.01)
    assert len(calls) == 2
    await b.aclose()


async def test_a_send_that_raises_before_returning_an_awaitable_ends_run() -> None:
    """A plain function that raises instead of returning an awaitable is reported the same way."""
    b = Broadcaster(heartbeat=None)

    def broken_send(message: MutableMapping[str, Any]) -> asyncio.Future[None]:
        raise RuntimeError("a bug in a middleware")

    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, broken_send).run())
    b.publish("n", 0)
    with pytest.raises(RuntimeError, match="bug in a middleware"):
        await asyncio.wait_for(pumping, 5)
    await b.aclose()


async def test_cancelling_run_during_a_waiting_send_cancels_that_send() -> None:
    """A server cancelling the stream's task reaches the send it waits in."""
    b = Broadcaster(heartbeat=None)
    cancelled = asyncio.Event()

    async def stuck_send(message: MutableMapping[str, Any]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, stuck_send).run())
    b.publish("n", 0)
    await asyncio.sleep(0.01)
    pumping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pumping
    assert cancelled.is_set()
    await b.aclose()


async def test_a_send_may_absorb_the_cancellation_and_finish() -> None:
    """A waiting send that handles the cancel itself ends normally, and the pump goes on."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    calls = 0

    async def stubborn_send(message: MutableMapping[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        await client.send(message)

    sub = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, stubborn_send).run())
    first = b.publish("n", 0)
    await until(lambda: calls == 1)
    pumping.cancel()
    await until(lambda: client.received == first.frame)
    second = b.publish("n", 1)
    await until(lambda: client.received == frames([first, second]))
    await b.aclose()
    await asyncio.wait_for(pumping, 5)


def test_a_cancel_that_comes_first_leaves_nothing_behind() -> None:
    """Cancelled before it took a write's outcome, run() closes the write and its error quietly."""
    reports: list[dict[str, Any]] = []
    abandoned = threading.Event()

    async def scenario(failing: bool) -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: reports.append(context)
        )
        b = Broadcaster(heartbeat=None)

        async def send(message: MutableMapping[str, Any]) -> None:
            if failing:
                raise ConnectionResetError("gone")
            try:
                await asyncio.Event().wait()
            finally:
                abandoned.set()

        sub = await b.asubscribe()
        pumping = asyncio.create_task(Pump(sub, send).run())
        await asyncio.sleep(0)  # parked
        b.publish("n", 0)
        await asyncio.sleep(0)  # the wake-up ran: the outcome is set, the task not yet back
        pumping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pumping
        await b.aclose()

    asyncio.run(scenario(failing=True))
    asyncio.run(scenario(failing=False))
    gc.collect()
    assert abandoned.is_set()
    assert reports == []


async def test_a_wake_up_queued_before_a_cancel_sends_nothing() -> None:
    """An event that arrives as the stream is cancelled is not written after the end."""
    b = Broadcaster(heartbeat=None)
    client = Client()
    sub: Subscription = await b.asubscribe()
    pumping = asyncio.create_task(Pump(sub, client.send).run())
    await asyncio.sleep(0)  # parked
    b.publish("n", 0)  # queues the wake-up
    pumping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pumping
    await asyncio.sleep(0.01)
    assert client.bodies == []
    await b.aclose()
