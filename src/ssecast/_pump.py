"""Write a subscription to an ASGI connection from its event loop's callbacks.

An ``async for`` reader costs a task wake-up per chunk: the future it waits on is
resolved, the loop schedules the task, and the task resumes through every coroutine
frame between the server and the reader (server, middleware, application). With a
thousand clients on a loop and an event every few milliseconds, that is most of the
CPU a delivery costs in Python. A :class:`Pump` skips it: it parks itself as the
subscription's waiter, and the loop's wake-up callback writes the chunk at once.

Each write is an ASGI ``send`` of one body message: a coroutine that nearly always
completes without waiting. The pump starts it by hand; when it does wait (the client
reads slowly and the server applies back-pressure), the pump hands the rest of it to
the stream's own task, which finishes it and pumps on. Each write runs in a copy of
the task's context, so context variables that middleware set are seen as in the task.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from types import CoroutineType
from typing import Any, TypeAlias

from ssecast._subscription import Subscription
from ssecast._wire import HEARTBEAT

__all__ = ["Pump"]

_Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_Steps: TypeAlias = Coroutine[Any, Any, object] | Generator[Any, Any, object]


class Pump:
    """Sends a subscription's chunks as ASGI body messages as they come, until it ends.

    Create it and await :meth:`run` in the task that serves the connection, once the
    response has started.
    """

    __slots__ = ("_context", "_loop", "_outcome", "_send", "_stopped", "_sub")

    def __init__(self, sub: Subscription, send: _Send) -> None:
        self._sub = sub
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        self._outcome: asyncio.Future[_Waiting | None] = self._loop.create_future()
        self._stopped = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """Return the loop whose callbacks write."""
        return self._loop

    async def run(self) -> None:
        """Write every chunk until the subscription ends; raise what a write raised."""
        sub = self._sub
        sub._arm_heartbeat(self._loop)
        try:
            while True:
                self.wake(True)
                waiting = await self._outcome
                if waiting is None:
                    return
                await waiting
                sub._quiet_since = self._loop.time()
                self._outcome = self._loop.create_future()
        finally:
            self._stopped = True
            with sub._lock:
                sub._unpark(self)
            _drop(self._outcome)

    def wake(self, woken: bool) -> None:
        """Write what is pending, or a heartbeat when one is due (``woken`` false).

        Runs on the loop: from :meth:`run`, and from the subscription's wake-ups. The pump
        parks again before it writes, so what arrives meanwhile wakes it once more.
        """
        if self._stopped or self._outcome.done():
            # Queued before the task was cancelled (which cancels the outcome it awaits),
            # or while the task finishes a write that had to wait.
            return
        sub = self._sub
        with sub._lock:
            if not woken:
                sub._unpark(self)  # still parked: the heartbeat timer woke it
            frames = sub._take()
            if frames is None and not woken:
                frames = [HEARTBEAT]
            if frames is None or frames:
                sub._park(self)
        if frames is None:
            return
        if not frames:
            self._outcome.set_result(None)  # the subscription ended
            return
        message = {"type": "http.response.body", "body": b"".join(frames), "more_body": True}
        try:
            sending = self._send(message)
            # A coroutine steps itself; any other awaitable through its iterator.
            steps = sending if type(sending) is CoroutineType else sending.__await__()
            waited_on = self._context.run(steps.send, None)
        except StopIteration:
            sub._quiet_since = self._loop.time()
            return
        except Exception as error:
            self._outcome.set_exception(error)
            return
        self._outcome.set_result(_Waiting(self._context, steps, waited_on))


def _drop(outcome: asyncio.Future[_Waiting | None]) -> None:
    """Let go of an outcome the task will not await (it was cancelled meanwhile)."""
    # Retrieving the exception keeps asyncio from logging it as never retrieved.
    if outcome.done() and not outcome.cancelled() and outcome.exception() is None:
        waiting = outcome.result()
        if waiting is not None:
            waiting.close()


class _Waiting:
    """The rest of a write that had to wait: awaiting it, a task takes it over and ends it."""

    __slots__ = ("_context", "_steps", "_waited_on")

    def __init__(self, context: contextvars.Context, steps: _Steps, waited_on: object) -> None:
        self._context = context
        self._steps = steps
        self._waited_on = waited_on

    def close(self) -> None:
        """Abandon the write, as when a coroutine is closed unfinished."""
        self._context.run(self._steps.close)

    def __await__(self) -> Generator[Any, Any, None]:
        # What `await` does for a coroutine, from its second step on: hand what it waits
        # on to the task, and pass the task's answer (or exception) back into it.
        run, steps, waited_on = self._context.run, self._steps, self._waited_on
        while True:
            try:
                answer = yield waited_on
            except BaseException as error:  # cancelled, say: the write decides what to do
                try:
                    waited_on = run(steps.throw, error)
                except StopIteration:
                    return
            else:
                try:
                    waited_on = run(steps.send, answer)
                except StopIteration:
                    return
