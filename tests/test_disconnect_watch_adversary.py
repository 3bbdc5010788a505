"""Adversarial tests of how an ASGI stream notices that its client left (`DisconnectWatch`).

In process: `EventStream` driven with hand-made `receive` callables shaped like real
servers' (uvicorn answers `http.disconnect` on every call once the client left; hypercorn's
`receive` is `asyncio.Queue.get`, which hands it out once) and like real middleware
wrappers. The real servers are in ``test_disconnect_servers_adversary.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest

from asgi_request import get_scope
from ssecast import Broadcaster
from ssecast.asgi import EventStream

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

HANG = 5.0
"""Seconds after which a stream that should have ended counts as hung."""

DISCONNECT: Message = {"type": "http.disconnect"}
EMPTY_BODY: Message = {"type": "http.request", "body": b"", "more_body": False}


class Client:
    """An ASGI `send` that keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def started(self) -> bool:
        return bool(self.messages)


class QueueReceive:
    """hypercorn's `receive`: `asyncio.Queue.get`, so `http.disconnect` comes only once."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.queue.put_nowait(EMPTY_BODY)

    async def __call__(self) -> Message:
        return await self.queue.get()

    def disconnect(self) -> None:
        self.queue.put_nowait(DISCONNECT)


async def until(condition: Callable[[], object], seconds: float = HANG) -> None:
    """Poll `condition` until it holds; raise TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def serve(b: Broadcaster, receive: Receive) -> tuple[Client, asyncio.Task[None]]:
    """Run one `EventStream` request in a task, as a server would; wait for its 200."""
    client = Client()
    task = asyncio.create_task(EventStream(b, ["room"])(get_scope(), receive, client.send))
    await until(lambda: client.started and b.stats().subscribers == 1)
    return client, task


async def ends_within(b: Broadcaster, task: asyncio.Task[None], seconds: float = HANG) -> bool:
    """Whether the stream's subscription ended and its task returned within `seconds`."""
    try:
        await until(lambda: b.stats().subscribers == 0, seconds)
        await asyncio.wait_for(asyncio.shield(task), seconds)
    except TimeoutError:
        task.cancel()
        await asyncio.wait([task], timeout=seconds)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: what the test asserts is that it did not end
        return False
    return True


# -- the receive shapes the watch steps by hand -------------------------------------------


async def test_a_queue_receive_s_single_disconnect_ends_the_stream() -> None:
    """Hypercorn's shape, plain: the one `http.disconnect` ends the subscription."""
    with Broadcaster(heartbeat=None) as b:
        receive = QueueReceive()
        _, task = await serve(b, receive)
        b.publish("t", 1, channel="room")
        receive.disconnect()
        assert await ends_within(b, task)


async def test_a_receive_wrapper_that_yields_to_the_loop_still_sees_the_disconnect() -> None:
    """`await asyncio.sleep(0)` (a bare yield) before and after the real receive."""
    with Broadcaster(heartbeat=None) as b:
        inner = QueueReceive()

        async def receive() -> Message:
            await asyncio.sleep(0)
            message = await inner()
            await asyncio.sleep(0)
            await asyncio.sleep(0.001)  # a timer future, not a bare yield
            return message

        _, task = await serve(b, receive)
        await asyncio.sleep(0.05)
        inner.disconnect()
        assert await ends_within(b, task)


async def test_a_receive_wrapper_bounded_by_asyncio_timeout_falls_back_to_a_task() -> None:
    """`asyncio.timeout` needs a task: the first step raises, and a task takes over."""
    with Broadcaster(heartbeat=None) as b:
        inner = QueueReceive()

        async def receive() -> Message:
            async with asyncio.timeout(60):
                return await inner()

        _, task = await serve(b, receive)
        await asyncio.sleep(0.05)
        inner.disconnect()
        assert await ends_within(b, task)


async def test_a_receive_that_raises_at_once_ends_the_stream() -> None:
    """A receive that fails outright, in a callback and then in the task: the stream ends."""
    with Broadcaster(heartbeat=None) as b:

        async def receive() -> Message:
            raise ValueError("the server broke")

        client = Client()
        stream = EventStream(b, ["room"])(get_scope(), receive, client.send)
        await asyncio.wait_for(stream, HANG)
        assert b.stats().subscribers == 0
        assert client.messages[-1] == {
            "type": "http.response.body",
            "body": b"",
            "more_body": False,
        }


async def test_body_messages_then_the_disconnect_end_the_stream() -> None:
    """A GET that carries a chunked body: each part is read, then the disconnect ends it."""
    with Broadcaster(heartbeat=None) as b:
        queue: asyncio.Queue[Message] = asyncio.Queue()

        async def receive() -> Message:
            return await queue.get()

        _, task = await serve(b, receive)
        for _ in range(50):
            queue.put_nowait({"type": "http.request", "body": b"x" * 100, "more_body": True})
            await asyncio.sleep(0)
        queue.put_nowait(EMPTY_BODY)
        await asyncio.sleep(0.02)
        assert b.stats().subscribers == 1
        queue.put_nowait(DISCONNECT)
        assert await ends_within(b, task)


# -- findings ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:coroutine 'DisconnectWatch._listen' was never awaited")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_many_body_messages_answered_at_once_do_not_kill_the_watch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Many body messages answered at once do not kill the watch.

    A receive (a middleware re-chunking a buffered body, say) that answers 3000 body
    parts without waiting, then the disconnect: the stream must still end.
    """
    with Broadcaster(heartbeat=None) as b:
        parts = 3000
        disconnected = asyncio.Event()

        async def receive() -> Message:
            nonlocal parts
            if parts:
                parts -= 1
                return {"type": "http.request", "body": b"x", "more_body": parts > 0}
            await disconnected.wait()
            return DISCONNECT

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            _, task = await serve(b, receive)
            await asyncio.sleep(0.05)
            disconnected.set()
            ended = await ends_within(b, task, 2.0)
        logged = caplog.text
        # The dead watch's frames (held by the logged traceback) hold a `_listen()` it made
        # but could not start: let them go here, where the warning is expected.
        for record in caplog.records:
            if record.exc_info and record.exc_info[2] is not None:
                traceback.clear_frames(record.exc_info[2])
        gc.collect()
        assert ended, logged


async def test_a_wrapper_that_needs_a_task_only_on_the_disconnect_still_ends_the_stream() -> None:
    """A disconnect taken by a step that then needs a task is not lost.

    A middleware that reports the disconnect under `asyncio.timeout` (needs a task):
    the task-per-stream code ended the subscription; the watch loses the message.
    """
    with Broadcaster(heartbeat=None) as b:
        inner = QueueReceive()

        async def receive() -> Message:
            message = await inner()
            if message["type"] == "http.disconnect":
                async with asyncio.timeout(1):  # report it, bounded
                    await asyncio.sleep(0)
            return message

        _, task = await serve(b, receive)
        await asyncio.sleep(0.05)
        inner.disconnect()
        assert await ends_within(b, task, 2.0)


async def test_a_receive_that_raises_its_own_error_on_the_disconnect_ends_the_stream() -> None:
    """The wrapper turns `http.disconnect` into an exception of its own."""

    class ClientDisconnectedError(Exception):
        pass

    with Broadcaster(heartbeat=None) as b:
        inner = QueueReceive()

        async def receive() -> Message:
            message = await inner()
            if message["type"] == "http.disconnect":
                raise ClientDisconnectedError
            return message

        _, task = await serve(b, receive)
        await asyncio.sleep(0.05)
        inner.disconnect()
        assert await ends_within(b, task, 2.0)


async def test_a_receive_that_raises_when_called_ends_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain-function receive that raises OSError at call time once the client left."""
    with Broadcaster(heartbeat=None) as b:
        inner = QueueReceive()
        left = False

        def receive() -> Awaitable[Message]:
            if left:
                raise OSError("the connection is gone")
            return inner()

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            _, task = await serve(b, receive)
            left = True
            # The receive in progress gets a last body part; the call after it raises.
            inner.queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
            ended = await ends_within(b, task, 2.0)
        assert ended, caplog.text


class _NextOnly:
    """An iterator with `__next__` only, as `__await__` may return (granian's does)."""

    def __init__(self, future: asyncio.Future[Message]) -> None:
        self.future = future

    def __iter__(self) -> _NextOnly:
        return self

    def __next__(self) -> asyncio.Future[Message]:
        if self.future.done():
            raise StopIteration(self.future.result())
        self.future._asyncio_future_blocking = True
        return self.future


class NextOnlyAwaitable:
    """An awaitable whose iterator has no `send`: `await` takes it, and a task too."""

    def __init__(self, future: asyncio.Future[Message]) -> None:
        self.future = future

    def __await__(self) -> _NextOnly:
        return _NextOnly(self.future)


async def test_a_receive_whose_awaitable_iterator_has_no_send_still_ends_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server's receive returning such an awaitable: `await receive()` works; so must this."""
    with Broadcaster(heartbeat=None) as b:
        loop = asyncio.get_running_loop()
        disconnected: asyncio.Future[Message] = loop.create_future()
        # typeshed's Awaitable wants a Generator from __await__; Python takes any iterator.
        assert await NextOnlyAwaitable(_done(loop, EMPTY_BODY)) == EMPTY_BODY  # type: ignore[misc]

        def receive() -> NextOnlyAwaitable:
            return NextOnlyAwaitable(disconnected)

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            _, task = await serve(b, receive)  # type: ignore[arg-type]  # as above
            disconnected.set_result(DISCONNECT)
            ended = await ends_within(b, task, 2.0)
        assert ended, caplog.text


def _done(loop: asyncio.AbstractEventLoop, message: Message) -> asyncio.Future[Message]:
    future: asyncio.Future[Message] = loop.create_future()
    future.set_result(message)
    return future
