"""Adversarial tests of the pump awaited with no coroutine frame (ssecast._pump.Pump).

The pump is the awaitable `EventStream.__call__` awaits: it is stepped, thrown into and
closed by the task (or by whoever steps the app's coroutine). These tests cancel, throw
into and close the app at each stage, and check what a user sees: the stream ends, the
subscription is released, the loop's heartbeat clock lets go, and the `send` in progress
is finished or abandoned as a coroutine chain would be.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import re
import signal
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

import anyio
import pytest

from asgi_request import get_scope
from raw_stream import RawStream, open_many
from servers import free_port, running
from ssecast import Broadcaster
from ssecast._subscription import _Clock
from ssecast._wire import HEARTBEAT
from ssecast.asgi import EventStream
from test_disconnect_servers_adversary import (
    COMPLAINTS,
    command,
    new_channel,
    until_subscribers,
)

HANG = 5.0
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Coroutine[Any, Any, None]]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def scope() -> dict[str, Any]:
    """A GET of the stream by an `EventSource`."""
    return {**get_scope("/"), "headers": [(b"host", b"test"), (b"accept", b"text/event-stream")]}


class Peer:
    """The server side of one in-process connection: a receive that waits, a send that logs."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.gone = asyncio.get_running_loop().create_future()

    async def receive(self) -> Message:
        await self.gone
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]

    @property
    def ended(self) -> bool:
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )

    def disconnect(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)


class Held:
    """A send that holds a body with `hello` in it until `gate` is set; it logs what befell it."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log: list[str] = []

    async def send(self, message: Message) -> None:
        if b"hello" in message.get("body", b""):
            self.log.append("waiting")
            try:
                await self.gate
            except BaseException as error:
                self.log.append(type(error).__name__)
                raise
            finally:
                self.log.append("closed")
        await self.peer.send(message)


async def until(condition: Callable[[], object], seconds: float = HANG) -> None:
    """Poll ``condition``: what it watches changes in loop callbacks, which set no event."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def clock_beats(loop: asyncio.AbstractEventLoop) -> int:
    """How many heartbeats the loop's clock keeps (0 when it has no clock)."""
    clock = _Clock._clocks.get(loop)
    return 0 if clock is None else len(clock._beats)


def assert_let_go(b: Broadcaster, loop: asyncio.AbstractEventLoop) -> None:
    """Nothing of a stream is left: no subscriber, no heartbeat on the loop's clock."""
    assert b.stats().subscribers == 0
    assert clock_beats(loop) == 0


class Stepper:
    """Steps a coroutine by hand as a task would, so that a test can `close` or `throw` it."""

    async def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await self.run_until(lambda: time.monotonic() > deadline, seconds + HANG)

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.waiting_on: asyncio.Future[Any] | None = None
        self.done = False

    async def run_until(self, condition: Callable[[], object], seconds: float = HANG) -> None:
        async with asyncio.timeout(seconds):
            while not condition():
                if self.waiting_on is not None and not self.waiting_on.done():
                    await asyncio.wait({self.waiting_on}, timeout=0.01)
                    continue
                try:
                    yielded = self.coro.send(None)
                except StopIteration:
                    self.done = True
                    return
                if yielded is None:
                    self.waiting_on = None
                    await asyncio.sleep(0)
                else:
                    yielded._asyncio_future_blocking = False
                    self.waiting_on = yielded


def yielding(send: Send) -> Send:
    """A send wrapper that lets other tasks run before each message (a cooperative wrapper)."""

    async def wrapped(message: Message) -> None:
        await asyncio.sleep(0)
        await send(message)

    return wrapped


# --- heartbeats and lifetimes when every write has to wait once ---------------------------


async def test_a_lifetime_ends_the_stream_when_each_send_yields_once() -> None:
    """With a send wrapper that awaits `asyncio.sleep(0)`, `lifetime=` still ends the stream."""
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    app = EventStream(b, ["c"], lifetime=0.3)
    task = asyncio.create_task(app(scope(), peer.receive, yielding(peer.send)))
    try:
        await asyncio.wait_for(asyncio.shield(task), 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await b.aclose()
    assert peer.ended


async def test_heartbeats_come_when_each_send_yields_once() -> None:
    """With a send wrapper that awaits `asyncio.sleep(0)`, heartbeats still come when idle."""
    b = Broadcaster(heartbeat=0.1)
    peer = Peer()
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, yielding(peer.send)))
    try:
        await until(lambda: peer.bodies.count(HEARTBEAT) >= 2, 2.0)
    finally:
        peer.disconnect()
        await asyncio.wait_for(task, HANG)
        await b.aclose()


async def test_heartbeats_and_lifetime_on_a_plain_send_stop_with_the_stream() -> None:
    """Heartbeats come while idle, the lifetime ends the stream, and the clock lets go after."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.1)
    peer = Peer()
    started = time.monotonic()
    task = asyncio.create_task(
        EventStream(b, ["c"], lifetime=0.6)(scope(), peer.receive, peer.send)
    )
    await asyncio.wait_for(task, HANG)
    took = time.monotonic() - started
    assert peer.ended
    assert peer.bodies.count(HEARTBEAT) >= 2
    assert 0.45 < took < 1.5
    assert_let_go(b, loop)
    await b.aclose()


# --- closing the app's coroutine (GeneratorExit) -----------------------------------------


async def test_closing_the_app_coroutine_lets_go_of_the_heartbeat_clock() -> None:
    """After `coro.close()` on an idle stream, the loop's clock keeps no heartbeat for it."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    stepper = Stepper(EventStream(b, ["c"], lifetime=3600)(scope(), peer.receive, peer.send))
    await stepper.run_until(lambda: clock_beats(loop) == 1)
    stepper.coro.close()
    assert b.stats().subscribers == 0
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    try:
        assert clock_beats(loop) == 0
    finally:
        await b.aclose()


async def test_closing_the_app_coroutine_closes_the_send_that_was_waiting() -> None:
    """`coro.close()` during a write that waits runs the send wrapper's `finally` at once."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    held = Held(peer)
    stepper = Stepper(EventStream(b, ["c"], lifetime=3600)(scope(), peer.receive, held.send))
    await stepper.run_until(lambda: clock_beats(loop) == 1)
    b.publish("m", "hello", channel="c")
    await stepper.run_until(lambda: "waiting" in held.log)
    stepper.coro.close()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    try:
        assert held.log == ["waiting", "GeneratorExit", "closed"]
    finally:
        await b.aclose()


async def test_closing_the_app_coroutine_while_idle_releases_the_subscription() -> None:
    """`coro.close()` on an idle stream (no timed heartbeat) ends its subscription at once."""
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    stepper = Stepper(EventStream(b, ["c"])(scope(), peer.receive, peer.send))
    await stepper.run_until(lambda: len(peer.bodies) >= 2)
    assert b.stats().subscribers == 1
    stepper.coro.close()
    assert b.stats().subscribers == 0
    await b.aclose()


# --- exceptions thrown into the pump -----------------------------------------------------


class Custom(BaseException):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, Custom], ids=lambda e: e.__name__)
async def test_a_base_exception_thrown_into_the_idle_stream_stops_it_and_propagates(
    error: type[BaseException],
) -> None:
    """`coro.throw(KeyboardInterrupt())` propagates; subscription, waiter and clock are let go."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    stepper = Stepper(EventStream(b, ["c"])(scope(), peer.receive, peer.send))
    await stepper.run_until(lambda: clock_beats(loop) == 1)
    with pytest.raises(error):
        stepper.coro.throw(error())
    assert_let_go(b, loop)
    b.publish("m", "after", channel="c")
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(b"after" in body for body in peer.bodies)
    await b.aclose()


async def test_a_base_exception_thrown_during_a_waiting_write_reaches_that_write() -> None:
    """Thrown while a write waits, the error goes into that send, then out; all is let go."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    held = Held(peer)
    stepper = Stepper(EventStream(b, ["c"])(scope(), peer.receive, held.send))
    await stepper.run_until(lambda: clock_beats(loop) == 1)
    b.publish("m", "hello", channel="c")
    await stepper.run_until(lambda: stepper.waiting_on is held.gate)
    with pytest.raises(Custom):
        stepper.coro.throw(Custom())
    assert held.log == ["waiting", "Custom", "closed"]
    assert_let_go(b, loop)
    await b.aclose()


# --- cancellation ------------------------------------------------------------------------


async def test_cancelling_during_a_waiting_write_cancels_it_and_ends_the_response() -> None:
    """A cancel while a send waits cancels that send, ends the response, releases everything."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    held = Held(peer)
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, held.send))
    await until(lambda: clock_beats(loop) == 1)
    b.publish("m", "hello", channel="c")
    await until(lambda: held.gate._callbacks)
    task.cancel()
    await asyncio.wait_for(task, HANG)  # the cancel is absorbed: the response ended cleanly
    assert held.log == ["waiting", "CancelledError", "closed"]
    assert peer.ended
    assert_let_go(b, loop)
    await b.aclose()


async def test_a_second_cancel_during_the_final_send_propagates_and_releases() -> None:
    """Cancelled again while writing the end of the response: it propagates, nothing is left."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    gate: asyncio.Future[None] = loop.create_future()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            await gate  # the end of the response waits
        await peer.send(message)

    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, send))
    await until(lambda: clock_beats(loop) == 1)
    task.cancel()
    await until(lambda: gate._callbacks)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, HANG)
    assert_let_go(b, loop)
    await b.aclose()


async def test_a_cancel_before_the_probe_ran_sends_nothing_more_and_releases() -> None:
    """Cancelled right after the opening chunk, before the first pump step ran its probe."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, peer.send))
    await until(lambda: len(peer.messages) >= 2)  # start and opening chunk
    task.cancel()
    await asyncio.wait_for(task, HANG)
    assert peer.ended
    assert_let_go(b, loop)
    await b.aclose()


def timeout_middleware(app: App, seconds: float) -> App:
    async def middleware(s: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout(seconds):
                await app(s, receive, send)
        except TimeoutError:
            pass

    return middleware


def anyio_middleware(app: App, seconds: float) -> App:
    async def middleware(s: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as tg:
                tg.start_soon(app, s, receive, send)

    return middleware


@pytest.mark.parametrize("wrap", [timeout_middleware, anyio_middleware], ids=["timeout", "anyio"])
@pytest.mark.parametrize("waiting", [False, True], ids=["idle", "mid-write"])
async def test_a_middleware_deadline_around_the_app_ends_the_stream(
    wrap: Callable[[App, float], App], waiting: bool
) -> None:
    """`asyncio.timeout` or an anyio cancel scope around the app ends it and releases all."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    send = Held(peer).send if waiting else peer.send
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        task = asyncio.create_task(wrap(EventStream(b, ["c"]), 0.3)(scope(), peer.receive, send))
        await until(lambda: clock_beats(loop) == 1)
        b.publish("m", "hello", channel="c")
        await asyncio.wait_for(task, HANG)
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()
        assert b.stats().subscribers == 0
        assert clock_beats(loop) == 0
        assert errors == []
    finally:
        loop.set_exception_handler(None)
        await b.aclose()


# --- the fallback: a send that needs its task --------------------------------------------


def _needs_task(send: Send) -> Send:
    """A send wrapper using `asyncio.timeout`, which refuses to run outside a task."""

    async def wrapped(message: Message) -> None:
        async with asyncio.timeout(5):
            await send(message)

    return wrapped


async def test_a_stream_sent_from_its_task_gets_heartbeats_and_lets_the_clock_go() -> None:
    """In the fallback, heartbeats still come; when the stream ends no clock beat is left."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.1)
    peer = Peer()
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, _needs_task(peer.send)))
    await until(lambda: peer.bodies.count(HEARTBEAT) >= 2, 2.0)
    assert clock_beats(loop) == 1
    peer.disconnect()
    await asyncio.wait_for(task, HANG)
    assert_let_go(b, loop)
    await b.aclose()


async def test_cancelling_the_fallback_releases_everything() -> None:
    """A cancel while the task sends for a send that needs it ends the response cleanly."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.1)
    peer = Peer()
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, _needs_task(peer.send)))
    await until(lambda: clock_beats(loop) == 1)
    task.cancel()
    await asyncio.wait_for(task, HANG)
    assert peer.ended
    assert_let_go(b, loop)
    await b.aclose()


async def test_closing_the_app_coroutine_during_the_fallback_releases_the_subscription() -> None:
    """`coro.close()` while the task sends for a send that needs it: nothing stays subscribed."""
    b = Broadcaster(heartbeat=None)
    peer = Peer()

    async def task_send(message: Message) -> None:
        if asyncio.current_task() is None:
            raise RuntimeError("needs a task")
        await peer.send(message)

    # Loop callbacks run in no task: the probe is refused, and the fallback is stepped by hand.
    stepper = Stepper(EventStream(b, ["c"])(scope(), peer.receive, task_send))
    await stepper.run_until(lambda: len(peer.bodies) >= 1)  # the opening chunk
    await stepper.run_for(0.1)  # the probe is refused; the fallback waits for events
    b.publish("m", "hello", channel="c")
    await stepper.run_until(lambda: any(b"hello" in body for body in peer.bodies))
    stepper.coro.close()
    assert b.stats().subscribers == 0
    await b.aclose()


async def test_starlette_base_http_middleware_stream_ends_and_releases_on_disconnect() -> None:
    """Behind `BaseHTTPMiddleware` (the fallback), events arrive and a disconnect releases all."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.routing import Mount

    loop = asyncio.get_running_loop()

    class Passthrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            return await call_next(request)

    b = Broadcaster(heartbeat=0.2)
    app = Starlette(
        routes=[Mount("/", EventStream(b, ["c"]))], middleware=[Middleware(Passthrough)]
    )
    peer = Peer()
    task = asyncio.create_task(app(scope(), peer.receive, peer.send))
    await until(lambda: b.stats().subscribers == 1)
    b.publish("m", "hello", channel="c")
    await until(lambda: any(b"hello" in body for body in peer.bodies))
    peer.disconnect()
    await asyncio.wait_for(task, HANG)
    for _ in range(5):
        await asyncio.sleep(0)
    assert_let_go(b, loop)
    await b.aclose()


# --- context -----------------------------------------------------------------------------


async def test_context_set_by_a_middleware_and_by_the_receive_wrapper_reaches_the_send() -> None:
    """A request id set before the app is seen by both wrappers; one set in receive, in send."""
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    seen_in_send: list[tuple[str, str]] = []
    seen_in_receive: list[str] = []
    FROM_RECEIVE: contextvars.ContextVar[str] = contextvars.ContextVar("r", default="unset")

    async def receive() -> Message:
        seen_in_receive.append(REQUEST_ID.get())
        FROM_RECEIVE.set("set-in-receive")
        return await peer.receive()

    async def send(message: Message) -> None:
        seen_in_send.append((REQUEST_ID.get(), FROM_RECEIVE.get()))
        await peer.send(message)

    async def middleware(s: MutableMapping[str, Any], r: Receive, snd: Send) -> None:
        REQUEST_ID.set("req-1")
        await EventStream(b, ["c"])(s, r, snd)

    task = asyncio.create_task(middleware(scope(), receive, send))
    await until(lambda: b.stats().subscribers == 1 and seen_in_receive)
    b.publish("m", "hello", channel="c")
    await until(lambda: any(b"hello" in body for body in peer.bodies))
    peer.disconnect()
    await asyncio.wait_for(task, HANG)
    assert seen_in_receive == ["req-1"]
    assert {rid for rid, _ in seen_in_send} == {"req-1"}
    # The event went out from a callback, in the copy the receive wrapper also runs in.
    assert ("req-1", "set-in-receive") in seen_in_send
    assert REQUEST_ID.get() == "none"
    await b.aclose()


# --- eager tasks (3.12+) -----------------------------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_streams_served_by_eager_tasks_deliver_and_end() -> None:
    """With `eager_task_factory`, streams deliver, end on disconnect and on cancel, and release."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        b = Broadcaster(heartbeat=0.1)
        peers = [Peer() for _ in range(3)]
        tasks = [
            asyncio.create_task(EventStream(b, ["c"], lifetime=60)(scope(), p.receive, p.send))
            for p in peers
        ]
        await until(lambda: clock_beats(loop) == 3)
        b.publish("m", "hello", channel="c")
        await until(lambda: all(any(b"hello" in x for x in p.bodies) for p in peers))
        await until(lambda: all(p.bodies.count(HEARTBEAT) >= 1 for p in peers), 2.0)
        peers[0].disconnect()
        tasks[1].cancel()
        await asyncio.wait_for(asyncio.gather(tasks[0], tasks[1]), HANG)
        assert b.stats().subscribers == 1
        peers[2].disconnect()
        await asyncio.wait_for(tasks[2], HANG)
        assert b.stats().subscribers == 0
        assert clock_beats(loop) == 0
        await b.aclose()

    asyncio.run(main())


# --- real servers ------------------------------------------------------------------------

SERVERS = ["uvicorn-h11", "uvicorn-httptools", "hypercorn", "granian"]


OUR_FRAME = re.compile(r"[/\\]ssecast[/\\]\w+\.py")
"""A traceback line in one of ssecast's modules (not a checkout directory named ssecast)."""


def _served(server: str, app: str, env: dict[str, str]) -> Any:
    """Run ``apps.pump_adversary_app:<app>`` on ``server`` with ``env``."""
    port = free_port()
    return running(command(server, app, port, "pump_adversary_app"), port=port, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
async def test_a_real_server_s_streams_get_heartbeats_and_end_at_their_lifetime(
    server: str,
) -> None:
    """On each server, idle streams get heartbeats and end cleanly when their lifetime is up."""
    env = {"SSECAST_TEST_HEARTBEAT": "0.2", "SSECAST_TEST_LIFETIME": "1.0"}
    with _served(server, "PLAIN", env) as process:
        streams = [await RawStream.open(process.port, new_channel()) for _ in range(3)]
        started = time.monotonic()
        ended = await asyncio.wait_for(asyncio.gather(*(s.read_to_end() for s in streams)), 4)
        took = time.monotonic() - started
        for stream in streams:
            stream.close()
    assert all(ended)
    assert 0.6 < took < 2.0, took
    assert all(stream.received.count(b":\n\n") >= 3 for stream in streams)
    assert not [line for line in COMPLAINTS if line in process.log()], process.log()


@pytest.mark.slow
async def test_behind_a_yielding_send_wrapper_streams_still_end_at_their_lifetime() -> None:
    """On uvicorn, behind a send wrapper that awaits `sleep(0)`, the lifetime still ends it."""
    env = {"SSECAST_TEST_HEARTBEAT": "0.2", "SSECAST_TEST_LIFETIME": "0.5"}
    with _served("uvicorn-h11", "YIELDING", env) as process:
        stream = await RawStream.open(process.port, new_channel())
        try:
            ended = await asyncio.wait_for(stream.read_to_end(), 3)
        finally:
            stream.close()
    assert ended


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn-httptools", "granian", "hypercorn"])
async def test_churning_300_connections_leaves_no_subscriber_and_no_complaint(
    server: str,
) -> None:
    """Opening and dropping 300 streams (100 at a time) leaves none subscribed, nothing logged."""
    import httpx

    env = {"SSECAST_TEST_HEARTBEAT": "0.05"}
    with _served(server, "PLAIN", env) as process:
        async with httpx.AsyncClient(base_url=process.url, timeout=HANG) as http:
            for _ in range(3):
                streams = await open_many(process.port, 100, new_channel())
                assert await until_subscribers(http, 100, HANG)
                for stream in streams:
                    stream.close()
                assert await until_subscribers(http, 0, HANG)
        seconds = process.stop()
    assert seconds < 5, seconds
    assert not [line for line in COMPLAINTS if line in process.log()], process.log()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn-httptools", "hypercorn", "granian"])
async def test_sigterm_with_100_open_streams_stops_the_server_promptly(server: str) -> None:
    """SIGTERM with 100 idle streams open: every stream ends and the server exits in time."""
    with _served(server, "PLAIN", {"SSECAST_TEST_HEARTBEAT": "0.1"}) as process:
        streams = await open_many(process.port, 100, new_channel())

        async def to_the_end(stream: Any) -> bool:
            ended = await stream.read_to_end()
            stream.close()  # as a browser would: an idle keep-alive connection holds the server
            return bool(ended)

        stopping = asyncio.create_task(asyncio.to_thread(process.stop, signal.SIGTERM, 20.0))
        try:
            async with asyncio.timeout(20):
                ended = await asyncio.gather(*(to_the_end(stream) for stream in streams))
            seconds = await stopping
        finally:
            for stream in streams:
                stream.close()
    assert seconds < 5, seconds
    assert all(ended)
    assert not [line for line in COMPLAINTS if line in process.log()], process.log()


async def test_the_three_argument_throw_propagates_the_instance_thrown() -> None:
    """`coro.throw(KeyError, err, None)` into a stream raises `err` itself, as a coroutine does."""
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    stepper = Stepper(EventStream(b, ["c"])(scope(), peer.receive, peer.send))
    await stepper.run_until(lambda: len(peer.bodies) >= 2)
    await stepper.run_for(0.05)
    error = KeyError("the instance")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(KeyError) as raised:
                stepper.coro.throw(KeyError, error, None)
        assert raised.value is error
        assert b.stats().subscribers == 0
    finally:
        await b.aclose()
