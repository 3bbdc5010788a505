"""Noticing a client's disconnect without a task (ssecast._watch), with every shape of receive.

Each `receive` here is one an ASGI server or a middleware could hand an app: it answers
at once, waits on a future, yields to the loop, fails, or works only inside a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest

from ssecast._watch import DisconnectWatch

Message = MutableMapping[str, Any]
BOUND_SECONDS = 5.0  # only a hang reaches it
DISCONNECT: Message = {"type": "http.disconnect"}
BODY: Message = {"type": "http.request", "body": b"", "more_body": False}


class Gone:
    """What the watch closes (a subscription): counts the calls and lets a test await one."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def close(self) -> None:
        self.calls += 1
        self.event.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), BOUND_SECONDS)


class Server:
    """A receive like uvicorn's: the request's body first, then a wait until the client goes."""

    def __init__(self) -> None:
        self.gone = asyncio.get_running_loop().create_future()
        self.body_sent = False
        self.calls = 0
        self.finished = 0  # receives that ran their clean-up (`finally`)

    async def receive(self) -> Message:
        self.calls += 1
        if not self.body_sent:
            self.body_sent = True
            return BODY
        try:
            await self.gone
        finally:
            self.finished += 1
        return DISCONNECT


async def test_a_disconnect_after_the_body_calls_gone_once() -> None:
    server, gone = Server(), Gone()
    watch = DisconnectWatch(server.receive, gone)
    await asyncio.sleep(0.01)
    assert server.calls == 2  # the body, then a wait
    assert gone.calls == 0
    server.gone.set_result(None)
    await gone.wait()
    watch.close()
    assert gone.calls == 1


async def test_no_task_is_made_for_a_receive_that_waits_on_a_future() -> None:
    server = Server()
    before = len(asyncio.all_tasks())
    watch = DisconnectWatch(server.receive, Gone())
    await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) == before
    watch.close()


async def test_closing_abandons_the_receive_and_runs_its_clean_up() -> None:
    server, gone = Server(), Gone()
    watch = DisconnectWatch(server.receive, gone)
    await asyncio.sleep(0.01)
    watch.close()
    watch.close()  # safe twice
    assert server.finished == 1
    assert server.gone.cancelled()  # what it waited on, as a cancelled task leaves it
    await asyncio.sleep(0.01)
    assert gone.calls == 0


async def test_closed_before_it_began_it_never_calls_receive() -> None:
    server = Server()
    watch = DisconnectWatch(server.receive, Gone())
    watch.close()
    await asyncio.sleep(0.01)
    assert server.calls == 0


async def test_a_receive_that_yields_to_the_loop_is_run_again() -> None:
    gone = Gone()

    async def receive() -> Message:
        for _ in range(3):
            await asyncio.sleep(0)  # a bare yield, as anyio's checkpoints do
        return DISCONNECT

    watch = DisconnectWatch(receive, gone)
    await gone.wait()
    watch.close()


@pytest.mark.parametrize(
    "failure",
    [asyncio.CancelledError(), ConnectionResetError("the client went away")],
    ids=["cancelled", "oserror"],
)
async def test_a_receive_whose_wait_fails_means_the_client_is_gone(
    failure: BaseException,
) -> None:
    gone = Gone()
    waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def receive() -> Message:
        await waited
        return BODY

    watch = DisconnectWatch(receive, gone)
    await asyncio.sleep(0.01)
    if isinstance(failure, asyncio.CancelledError):
        waited.cancel()
    else:
        waited.set_exception(failure)
    await gone.wait()
    watch.close()


def needing_a_task(server: Server) -> Callable[[], Awaitable[Message]]:
    """Wrap `server.receive` as a middleware needing a task would (anyio's, say)."""

    async def receive() -> Message:
        if asyncio.current_task() is None:
            raise RuntimeError("no current task")
        return await server.receive()

    return receive


async def test_a_receive_that_needs_a_task_is_awaited_in_one() -> None:
    """A wrapper that fails outside a task is read in a task from then on."""
    server, gone = Server(), Gone()
    watch = DisconnectWatch(needing_a_task(server), gone)
    await asyncio.sleep(0.01)
    assert server.calls == 2  # the body, then a wait, both in the task
    server.gone.set_result(None)
    await gone.wait()
    watch.close()
    assert gone.calls == 1


async def test_closing_stops_the_task_of_a_receive_that_needs_one() -> None:
    server, gone = Server(), Gone()
    watch = DisconnectWatch(needing_a_task(server), gone)
    await asyncio.sleep(0.01)
    watch.close()
    await asyncio.sleep(0.01)
    assert server.finished == 1
    assert gone.calls == 0


async def test_a_watch_closed_just_as_its_receive_needed_a_task_starts_none() -> None:
    """Closed right after the receive failed outside a task: no task calls it again."""
    server, gone = Server(), Gone()
    watch = DisconnectWatch(needing_a_task(server), gone)
    asyncio.get_running_loop().call_soon(watch.close)  # runs right after the first read
    await asyncio.sleep(0.01)
    assert server.calls == 0
    assert gone.calls == 0


async def test_a_receive_that_waits_on_something_not_a_future_ends_the_watch() -> None:
    """What a task would refuse (a bad yield) is a broken receive: the stream ends."""
    gone = Gone()

    class Odd:
        def __await__(self) -> Any:
            yield "not a future"

    async def receive() -> Message:
        await Odd()
        return DISCONNECT  # pragma: no cover - never resumed

    DisconnectWatch(receive, gone)
    await gone.wait()


async def test_a_receive_that_ignores_closing_does_not_break_close() -> None:
    waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def stubborn() -> Message:
        try:
            await waited
        except GeneratorExit:
            await waited  # a receive must not, but one that does cannot stop close()
        return DISCONNECT  # pragma: no cover - never resumed

    watch = DisconnectWatch(stubborn, Gone())
    await asyncio.sleep(0.01)
    watch.close()
    waited.cancel()


async def test_thousands_of_body_messages_answered_at_once_are_read_past() -> None:
    """A receive may answer many messages without waiting: read in a loop, not a recursion."""
    gone = Gone()
    parts = iter(range(5000))

    async def receive() -> Message:
        return BODY if next(parts, None) is not None else DISCONNECT

    DisconnectWatch(receive, gone)
    await gone.wait()


async def test_a_receive_that_fails_after_it_began_means_the_client_is_gone() -> None:
    """It may have taken the disconnect with it: a second receive() would wait forever."""
    server, gone = Server(), Gone()

    async def reports_the_end_its_own_way() -> Message:
        message = await server.receive()
        if message["type"] == "http.disconnect":
            raise RuntimeError("a middleware's own error for a client that left")
        return message

    watch = DisconnectWatch(reports_the_end_its_own_way, gone)
    await asyncio.sleep(0.01)
    server.gone.set_result(None)
    await gone.wait()
    watch.close()
    assert server.calls == 2  # not called again after it failed


@pytest.mark.parametrize("error", [OSError("gone"), RuntimeError("broken")], ids=type)
async def test_a_receive_that_raises_when_called_ends_the_stream(error: Exception) -> None:
    gone = Gone()

    def receive() -> Awaitable[Message]:
        raise error

    watch = DisconnectWatch(receive, gone)  # RuntimeError: once more in a task, then gone
    await gone.wait()
    watch.close()


async def test_an_awaitable_whose_iterator_has_only_next_is_stepped_as_await_would() -> None:
    """The awaitable granian's receive() returns: its iterator has no send()."""
    gone = Gone()
    waited: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    class NextOnly:
        def __init__(self) -> None:
            self._steps = waited.__await__()

        def __iter__(self) -> NextOnly:
            return self

        def __next__(self) -> object:
            return next(self._steps)

    class Awaitable_:
        def __await__(self) -> NextOnly:
            return NextOnly()

    # typeshed's Awaitable wants a Generator from __await__; Python takes any iterator.
    watch = DisconnectWatch(Awaitable_, gone)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    waited.set_result(DISCONNECT)
    await gone.wait()
    watch.close()


async def test_a_body_that_comes_after_a_wait_is_read_past() -> None:
    gone = Gone()
    loop = asyncio.get_running_loop()
    messages: list[asyncio.Future[Message]] = [loop.create_future() for _ in range(2)]

    async def receive() -> Message:
        return await messages.pop(0)

    first, second = messages
    watch = DisconnectWatch(receive, gone)
    await asyncio.sleep(0.01)
    first.set_result(BODY)
    await asyncio.sleep(0.01)
    assert gone.calls == 0
    second.set_result(DISCONNECT)
    await gone.wait()
    watch.close()
