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
the task's context: context variables set before the stream began are seen, and ones a
``send`` wrapper sets stay in the copy.

Some ``send`` wrappers only work inside a task: Starlette's ``BaseHTTPMiddleware`` (and
FastAPI's ``@app.middleware("http")``), anything using ``asyncio.timeout`` or anyio
around ``send``. So the pump first sends an empty body message from a callback, which
writes nothing; if that raises, it sends nothing more and the caller writes from its task.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from types import CoroutineType
from typing import Any, TypeAlias

from ssecast._subscription import Subscription
from ssecast._wire import HEARTBEAT

__all__ = ["Pump"]

_Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_Steps: TypeAlias = Coroutine[Any, Any, object] | Generator[Any, Any, object]


class _Mark(enum.Enum):
    ENDED = "the subscription ended"
    REFUSED = "send must run in its task"


_Outcome: TypeAlias = "_Waiting | _Mark | None"


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
        self._outcome: asyncio.Future[_Outcome] = self._loop.create_future()
        self._stopped = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """Return the loop whose callbacks write."""
        return self._loop

    async def run(self) -> bool:
        """Send every chunk until the subscription ends; return True.

        First an empty body message goes out from a loop callback, as every chunk will.
        If that raises anything but ``OSError``, ``send`` needs its task: nothing more is
        sent, and ``run`` returns False for the caller to send the chunks itself.

        :raises OSError: a write found the client gone (ASGI 2.4 servers raise it).
        """
        loop, sub = self._loop, self._sub
        loop.call_soon(self._probe)
        try:
            outcome = await self._outcome
            if outcome is _Mark.REFUSED:
                return False
            sub._arm_heartbeat(loop)
            while outcome is not _Mark.ENDED:
                if isinstance(outcome, _Waiting):
                    await outcome  # a write that had to wait, finished in this task
                    sub._quiet_since = loop.time()
                self._outcome = loop.create_future()
                self.wake(True)
                outcome = await self._outcome
            return True
        finally:
            self._stopped = True
            with sub._lock:
                sub._unpark(self)
            _drop(self._outcome)

    def _probe(self) -> None:
        if self._outcome.done():
            return  # the task was cancelled before this callback ran
        try:
            waiting = self._start(b"")
        except OSError as error:
            self._settle(error=error)
        except (Exception, asyncio.CancelledError):
            self._settle(_Mark.REFUSED)
        else:
            self._settle(waiting)

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
            # Ended (shut down) with frames left: these are the last, nothing wakes it again.
            last = sub.close_reason is not None
            if frames is None and not woken:
                frames = [HEARTBEAT]
            if frames is None or (frames and not last):
                sub._park(self)
        if frames is None:
            return
        if not frames:
            self._settle(_Mark.ENDED)
            return
        try:
            waiting = self._start(b"".join(frames))
        except (Exception, asyncio.CancelledError) as error:
            self._settle(error=error)
            return
        if waiting is not None:
            self._settle(waiting)  # the task finishes it, then wakes the pump once more
        elif last:
            self._settle(_Mark.ENDED)
        else:
            sub._quiet_since = self._loop.time()

    def _start(self, body: bytes) -> _Waiting | None:
        """Send ``body`` by hand; return the rest of the send if it has to wait."""
        sending = self._send({"type": "http.response.body", "body": body, "more_body": True})
        # A coroutine steps itself; any other awaitable through its iterator.
        steps = sending if type(sending) is CoroutineType else sending.__await__()
        try:
            waited_on = self._context.run(steps.send, None)
        except StopIteration:
            return None
        return _Waiting(self._context, steps, waited_on)

    def _settle(self, outcome: _Outcome = None, *, error: BaseException | None = None) -> None:
        """Hand the task what to do next, unless it was cancelled (by the send itself, even)."""
        if self._outcome.done():
            if isinstance(outcome, _Waiting):
                outcome.close()
        elif error is not None:
            self._outcome.set_exception(error)
        else:
            self._outcome.set_result(outcome)


def _drop(outcome: asyncio.Future[_Outcome]) -> None:
    """Let go of an outcome the task will not await (it was cancelled meanwhile)."""
    # Retrieving the exception keeps asyncio from logging it as never retrieved.
    if outcome.done() and not outcome.cancelled() and outcome.exception() is None:
        waiting = outcome.result()
        if isinstance(waiting, _Waiting):
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
        steps, waited_on = self._steps, self._waited_on
        while True:
            step: Callable[[Any], object]
            try:
                answer = yield waited_on
            except BaseException as error:  # cancelled, say: the write decides what to do
                step, answer = steps.throw, error
            else:
                step = steps.send
            try:
                waited_on = self._context.run(step, answer)
            except StopIteration:
                return
