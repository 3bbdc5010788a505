"""Adversarial tests of the writes a stream's task takes over (ssecast._pump).

When a `send` wrapper refuses a write from a loop callback (it needs its task), the
request's task sends that chunk and every later one itself, in the same copy of the
request's context as the callbacks' writes. These tests take that path on real servers,
behind real middleware, with slow clients whose sends wait, publishers in threads and
clients that resume; and in-process, with cancellations, deadlines and odd awaitables.
They check what a user sees: every event, in order, once; a middleware's context
variables carried from one write to the next; nothing left subscribed; nothing logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import re
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from typing import Any

import httpx
import pytest

from servers import free_port, running
from ssecast import Broadcaster
from ssecast.asgi import EventStream
from test_disconnect_servers_adversary import COMPLAINTS, command, new_channel, until_subscribers
from test_pump_adversary import (
    Peer,
    Stepper,
    anyio_middleware,
    assert_let_go,
    scope,
    timeout_middleware,
    until,
)

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Coroutine[Any, Any, None]]

WRITES: contextvars.ContextVar[int] = contextvars.ContextVar("writes", default=0)

HANG = 20.0
ID = re.compile(rb"^id: (\S+)$", re.M)
COUNT = re.compile(rb"^: send (\d+) cb=([01])$", re.M)


class Reader:
    """One SSE request over a bare socket, its chunked body decoded as it is read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.body = b""

    @classmethod
    async def open(cls, port: int, channel: str, last_event_id: str | None = None) -> Reader:
        """Send the GET; read the head of the response."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"GET /events/?channel={channel} HTTP/1.1\r\nHost: x\r\n"
        if last_event_id is not None:
            head += f"Last-Event-ID: {last_event_id}\r\n"
        writer.write(f"{head}\r\n".encode())
        status = await reader.readuntil(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200 "), status
        assert b"transfer-encoding: chunked" in status.lower(), status
        return cls(reader, writer)

    async def read_until(self, count: int, seconds: float = HANG) -> list[bytes]:
        """Read chunks until `count` event ids came; return the ids."""
        async with asyncio.timeout(seconds):
            while len(self.ids) < count:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    break
                self.body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        return self.ids

    @property
    def ids(self) -> list[bytes]:
        return ID.findall(self.body)

    @property
    def counts(self) -> list[tuple[int, int]]:
        """The `(N, from a callback)` of each `: send N cb=C` comment, in order."""
        return [(int(n), int(cb)) for n, cb in COUNT.findall(self.body)]

    def close(self) -> None:
        self.writer.close()


async def _publish(http: httpx.AsyncClient, channel: str, count: int, size: int) -> list[bytes]:
    """Publish `count` events of `size` padding from a thread of the server; their ids."""
    params = {"channel": channel, "count": str(count), "size": str(size)}
    response = await http.post("/control/thread/", params=params, timeout=HANG)
    response.raise_for_status()
    return [i.encode() for i in response.json()]


SERVERS = ["uvicorn-h11", "uvicorn-httptools", "hypercorn", "granian", "granian-uvloop"]


def _command(server: str, app: str, port: int) -> list[str]:
    if server == "granian-uvloop":
        argv = command("granian", app, port, "takeover_adversary_app")
        return [*argv[:-2], "uvloop", argv[-1]]  # "--loop asyncio" -> "--loop uvloop"
    return command(server, app, port, "takeover_adversary_app")


async def _slow_reader_gets_everything(server: str, app: str) -> None:
    port = free_port()
    with running(_command(server, app, port), port=port) as process:
        async with httpx.AsyncClient(base_url=process.url) as http:
            channel = new_channel()
            slow = await Reader.open(port, channel)
            fast = await Reader.open(port, channel)
            assert await until_subscribers(http, 2, 5)
            published = await _publish(http, channel, 20, 0)  # written from callbacks
            assert await fast.read_until(20) == published
            # Big ones: the task takes over (COUNTING) and, for `slow`, sends wait.
            published += await _publish(http, channel, 150, 16_000)
            published += await _publish(http, channel, 20, 0)
            assert await fast.read_until(len(published)) == published
            await asyncio.sleep(0.3)  # the slow client's sends wait meanwhile
            assert await slow.read_until(len(published)) == published
            # A client that left at the 100th event resumes after it.
            resumed = await Reader.open(port, channel, published[99].decode())
            assert await resumed.read_until(len(published) - 100) == published[100:]
            for reader in (slow, fast, resumed):
                counts = [n for n, _ in reader.counts]
                # The opening chunk is 1 (sent by the task before the pump), then on.
                assert counts == list(range(1, len(counts) + 1)), reader.counts
                reader.close()
            assert await until_subscribers(http, 0, 5)
    log = process.log()
    assert not [line for line in COMPLAINTS if line in log], log


@pytest.mark.slow
@pytest.mark.parametrize("app", ["COUNTING", "BASE", "FASTAPI"])
@pytest.mark.parametrize("server", SERVERS)
async def test_a_slow_client_gets_every_event_once_in_order_after_the_task_took_over(
    server: str, app: str
) -> None:
    """Small events from callbacks, big ones from the task (sends waiting), then a resume.

    Every client gets every event once, in order; the middleware's count, kept in a
    context variable, goes on from write to write across the takeover; when the
    clients leave, nothing stays subscribed and the server logs no complaint.
    """
    await _slow_reader_gets_everything(server, app)


async def _evicted_reader_resumes(server: str, app: str) -> None:
    port = free_port()
    with running(_command(server, app, port), port=port) as process:
        async with httpx.AsyncClient(base_url=process.url) as http:
            channel = new_channel()
            reader = await Reader.open(port, channel)
            assert await until_subscribers(http, 1, 5)
            published = await _publish(http, channel, 10, 0)
            # More than the queue holds (256) while the client reads nothing: its writes
            # wait, from the task, and the broadcaster evicts it.
            published += await _publish(http, channel, 600, 16_000)
            await asyncio.sleep(0.3)
            got: list[bytes] = []
            for _ in range(5):
                await reader.read_until(len(published) - len(got))
                got += reader.ids
                reader.close()
                if len(got) >= len(published):
                    break
                reader = await Reader.open(port, channel, got[-1].decode())  # as EventSource
            assert got == published
            assert await until_subscribers(http, 0, 5)
    log = process.log()
    assert not [line for line in COMPLAINTS if line in log], log


@pytest.mark.slow
@pytest.mark.parametrize("app", ["COUNTING", "BASE"])
@pytest.mark.parametrize("server", ["uvicorn-h11", "uvicorn-httptools"])
async def test_a_client_evicted_while_the_task_writes_resumes_and_gets_everything_once(
    server: str, app: str
) -> None:
    """A client reads nothing while 600 big events come, more than its queue holds.

    Whether it is evicted (its response ends) or not, resuming with Last-Event-ID as
    EventSource does, it gets each event once, in order, over its responses. Nothing
    stays subscribed; the server logs no complaint.
    """
    await _evicted_reader_resumes(server, app)


# --- in-process: a send wrapper that needs its task after some writes from callbacks ----


class Tracing:
    """A send wrapper that counts its bodies in a context variable, as a tracing one might.

    It logs that count when a body waits, and when the wait ends.
    A body with `hello` waits on `gate`; one with `big` needs its task (`asyncio.timeout`),
    which makes the task take over. With `absorb`, a cancel of that wait is absorbed.
    """

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log: list[tuple[str, int]] = []
        self.absorb = False

    async def send(self, message: Message) -> None:
        body = message.get("body", b"")
        if b"big" in body:
            async with asyncio.timeout(10):  # RuntimeError outside a task
                await asyncio.sleep(0)
        if b"hello" in body:
            self.log.append(("waiting", WRITES.get()))
            try:
                await self.gate
            except BaseException as error:
                self.log.append((type(error).__name__, WRITES.get()))
                if not (self.absorb and isinstance(error, asyncio.CancelledError)):
                    raise
        if body:
            WRITES.set(WRITES.get() + 1)
        await self.peer.send(message)

    def got(self, text: bytes) -> bool:
        return any(text in body for body in self.peer.bodies)


async def _taken_over(b: Broadcaster, tracing: Tracing) -> None:
    """Publish a small event (written from a callback), then a big one (the task takes over)."""
    await until(lambda: b.stats().subscribers == 1 and tracing.peer.bodies)
    b.publish("m", "small", channel="c")
    await until(lambda: tracing.got(b"small"))
    b.publish("m", "big", channel="c")
    await until(lambda: tracing.got(b"big"))


async def test_a_cancel_during_a_write_the_task_took_over_reaches_it_in_its_context() -> None:
    """Cancelled while a task-side write waits: the send sees the cancel, and its count.

    The opening chunk (from the task), `small` (from a callback) and `big` (the task took
    over) were counted in one context copy, so the waiting send sees 3, also once cancelled.
    The response ends cleanly; nothing is left subscribed.
    """
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    tracing = Tracing(peer)
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, tracing.send))
    await _taken_over(b, tracing)
    b.publish("m", "hello", channel="c")
    await until(lambda: tracing.log)
    task.cancel()
    await asyncio.wait_for(task, HANG)
    assert tracing.log == [("waiting", 3), ("CancelledError", 3)]
    assert peer.ended
    assert_let_go(b, loop)
    assert WRITES.get() == 0  # the test's own context is left alone
    await b.aclose()


async def test_a_send_that_absorbs_the_cancel_during_a_task_side_write_streams_on() -> None:
    """A task-side send that handles the cancel itself finishes; later events still arrive."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    tracing = Tracing(peer)
    tracing.absorb = True
    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, tracing.send))
    await _taken_over(b, tracing)
    b.publish("m", "hello", channel="c")
    await until(lambda: tracing.log)
    task.cancel()
    await until(lambda: tracing.got(b"hello"))
    b.publish("m", "after", channel="c")
    await until(lambda: tracing.got(b"after"))
    assert not task.done()
    peer.disconnect()
    await asyncio.wait_for(task, HANG)
    assert tracing.log == [("waiting", 3), ("CancelledError", 3)]
    assert_let_go(b, loop)
    await b.aclose()


@pytest.mark.parametrize("wrap", [timeout_middleware, anyio_middleware], ids=["timeout", "anyio"])
async def test_a_deadline_around_the_app_ends_a_stream_whose_task_write_waits(
    wrap: Callable[[App, float], App],
) -> None:
    """`asyncio.timeout` or an anyio cancel scope expiring during a task-side write ends it."""
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    tracing = Tracing(peer)
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        app = wrap(EventStream(b, ["c"]), 0.5)
        task = asyncio.create_task(app(scope(), peer.receive, tracing.send))
        await _taken_over(b, tracing)
        b.publish("m", "hello", channel="c")
        await asyncio.wait_for(task, HANG)
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()
        assert tracing.log == [("waiting", 3), ("CancelledError", 3)]
        assert_let_go(b, loop)
        assert errors == []
    finally:
        loop.set_exception_handler(None)
        await b.aclose()


@pytest.mark.parametrize("how", ["close", "garbage collection"])
async def test_dropping_the_app_during_a_task_side_write_closes_that_send_quietly(
    how: str,
) -> None:
    """`coro.close()`, or dropping the app coroutine, while a task-side write waits.

    The send is closed (GeneratorExit) in the context of its earlier writes, the
    subscription is released, and Python warns of nothing (no coroutine never awaited,
    no context entered twice, no exception ignored).
    """
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    tracing = Tracing(peer)
    stepper = Stepper(EventStream(b, ["c"])(scope(), peer.receive, tracing.send))
    await stepper.run_until(lambda: peer.bodies)
    b.publish("m", "small", channel="c")
    await stepper.run_until(lambda: tracing.got(b"small"))
    b.publish("m", "big", channel="c")
    await stepper.run_until(lambda: tracing.got(b"big"))
    b.publish("m", "hello", channel="c")
    await stepper.run_until(lambda: tracing.log)
    unraisable: list[Any] = []
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("always")
        mp.setattr("sys.unraisablehook", unraisable.append)
        if how == "close":
            stepper.coro.close()
        else:
            del stepper
            gc.collect()
        await asyncio.sleep(0)
    assert tracing.log == [("waiting", 3), ("GeneratorExit", 3)]
    assert [str(w.message) for w in caught] == []
    assert unraisable == []
    assert b.stats().subscribers == 0
    await b.aclose()


async def test_a_task_side_send_that_publishes_delivers_that_event_next() -> None:
    """A send that publishes while the task writes: its event comes once, right after."""
    b = Broadcaster(heartbeat=None)
    peer = Peer()
    published: list[str] = []

    async def send(message: Message) -> None:
        if asyncio.current_task() is None:
            raise RuntimeError("needs its task")
        body = message.get("body", b"")
        await peer.send(message)
        for _ in range(body.count(b"trigger")):
            published.append(b.publish("m", "echo", channel="c").id)
            await asyncio.sleep(0)

    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, send))
    await until(lambda: b.stats().subscribers == 1 and peer.bodies)
    ids = [b.publish("m", f"trigger-{n}", channel="c").id for n in range(3)]
    await until(lambda: len(published) == 3)
    await until(lambda: ID.findall(b"".join(peer.bodies))[-1:] == [published[-1].encode()])
    got = [i.decode() for i in ID.findall(b"".join(peer.bodies))]
    assert sorted(got) == sorted(ids + published)
    assert len(got) == len(set(got)) == 6
    assert got[:1] == ids[:1]
    peer.disconnect()
    await asyncio.wait_for(task, HANG)
    assert b.stats().subscribers == 0
    await b.aclose()


class _NextOnly:
    """An awaitable whose iterator has only `__next__`: it waits on a future, then is done."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def __await__(self) -> Generator[Any, Any, None]:
        return self  # type: ignore[return-value]  # an iterator is all `await` needs

    def __next__(self) -> asyncio.Future[None]:
        if self.future.done():
            raise StopIteration
        self.future._asyncio_future_blocking = True
        return self.future


async def test_cancelling_a_task_side_write_whose_awaitable_has_only_next_ends_it() -> None:
    """A send whose awaitable has only `__next__`, written by the task and cancelled.

    The cancel reaches what it waits on; the response ends; nothing is left.
    """
    loop = asyncio.get_running_loop()
    b = Broadcaster(heartbeat=0.5)
    peer = Peer()
    gate: asyncio.Future[None] = loop.create_future()

    def send(message: Message) -> _NextOnly:
        if asyncio.current_task() is None:
            raise RuntimeError("needs its task")  # the probe: the task takes over
        body = message.get("body", b"")
        peer.messages.append(message)
        if b"hello" in body:
            return _NextOnly(gate)
        done: asyncio.Future[None] = loop.create_future()
        done.set_result(None)
        return _NextOnly(done)

    task = asyncio.create_task(EventStream(b, ["c"])(scope(), peer.receive, send))
    await until(lambda: b.stats().subscribers == 1)
    b.publish("m", "hello", channel="c")
    await until(lambda: any(b"hello" in body for body in peer.bodies))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait_for(task, HANG)
    assert gate.cancelled()
    assert peer.ended
    assert_let_go(b, loop)
    await b.aclose()


# --- eager tasks (3.12+) and a receive that needs its task -------------------------------

_EAGER_RECEIVE_NEEDS_TASK = """
import asyncio
from ssecast import Broadcaster
from ssecast.asgi import EventStream

SCOPE = {
    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
    "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
    "headers": [(b"host", b"t"), (b"accept", b"text/event-stream")],
    "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
}

async def main():
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)
    complaints = []
    loop.set_exception_handler(lambda _, context: complaints.append(context["message"]))
    b = Broadcaster(heartbeat=None)
    gone = loop.create_future()
    bodies = []

    async def receive():
        if asyncio.current_task() is None:
            raise RuntimeError("this receive must run inside a task")
        await gone
        return {"type": "http.disconnect"}

    async def send(message):
        bodies.append(message.get("body", b""))

    task = asyncio.create_task(EventStream(b, ["c"])(SCOPE, receive, send))
    await asyncio.sleep(0.05)
    b.publish("m", "hello", channel="c")
    await asyncio.sleep(0.05)
    gone.set_result(None)
    await asyncio.wait_for(task, 5)
    print("delivered", any(b"hello" in body for body in bodies))
    print("subscribers", b.stats().subscribers)
    print("complaints", complaints)

asyncio.run(asyncio.wait_for(main(), 10))
"""


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_with_eager_tasks_a_receive_that_needs_its_task_still_sees_the_disconnect() -> None:
    """With `eager_task_factory`, a receive that needs its task: the stream still ends.

    Run in a process of its own, bounded: the loop may wedge.
    """
    try:
        result = subprocess.run(
            [sys.executable, "-c", _EAGER_RECEIVE_NEEDS_TASK],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the event loop hung")
    assert result.stdout.splitlines() == [
        "delivered True",
        "subscribers 0",
        "complaints []",
    ], result.stderr
