"""Write a subscription to an ASGI connection from its event loop's callbacks.

An `async for` reader costs a task wake-up per chunk: the future it waits on is
resolved, the loop schedules the task, and the task resumes through every coroutine
frame between the server and the reader (server, middleware, application). With a
thousand clients on a loop and an event every few milliseconds, that is most of the
CPU a delivery costs in Python. A `Pump` skips it: it parks itself as the
subscription's waiter, and the loop's wake-up callback writes the chunk at once.

Each write is an ASGI `send` of one body message: a coroutine that nearly always
completes without waiting. The pump starts it by hand; when it does wait (the client
reads slowly and the server applies back-pressure), the pump hands the rest of it to
the stream's own task, which finishes it and pumps on. Each write runs in a copy of
the task's context: context variables set before the stream began are seen, and ones a
`send` wrapper sets stay in the copy.

Some `send` wrappers only work inside a task: Starlette's `BaseHTTPMiddleware` (and
FastAPI's `@app.middleware("http")`), anything using `asyncio.timeout` or anyio
around `send`. So the pump first sends an empty body message from a callback, which
writes nothing; if that raises, or any later send made from a callback raises anything
but `OSError`, the task takes over: it sends that chunk, and every later one, itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from types import CoroutineType
from typing import Any, NamedTuple, TypeAlias, TypeVar

from ssecast._subscription import Heartbeat, Status, Subscription, feed_of
from ssecast._wire import HEARTBEAT

__all__ = ["Pump", "coroutine_of"]

_Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_T = TypeVar("_T")
_Steps: TypeAlias = Coroutine[Any, Any, object]


class _Ended(enum.Enum):
    ENDED = "the subscription ended"


class _Refused(NamedTuple):
    """A chunk that `send` would not take from a callback: the task must send it."""

    body: bytes


_Outcome: TypeAlias = "_Waiting | _Refused | _Ended | None"


class Pump:
    """Sends a subscription's chunks as ASGI body messages as they come, until it ends.

    Create it and await `run` in the task that serves the connection, once the
    response has started.
    """

    __slots__ = ("_beat", "_context", "_feed", "_outcome", "_send", "_stopped", "_sub", "loop")

    def __init__(self, sub: Subscription, send: _Send) -> None:
        self._sub = sub
        self._feed = feed_of(sub)
        self._send = send
        self.loop = asyncio.get_running_loop()
        """The loop whose callbacks write."""
        self._context = contextvars.copy_context()
        self._outcome: asyncio.Future[_Outcome] = self.loop.create_future()
        self._beat: Heartbeat | None = None
        self._stopped = False

    async def run(self) -> None:
        """Send every chunk until the subscription ends.

        Chunks go out from loop callbacks, the first being an empty body message. When a
        send made that way raises anything but `OSError`, `send` needs its task: this
        task then sends that chunk and every later one itself, as `async for` would.

        :raises OSError: a write found the client gone (ASGI 2.4 servers raise it).
        """
        # One coroutine for the whole stream, not two: its frame lives as long as the stream.
        loop = self.loop
        try:
            loop.call_soon(self._probe)
            outcome = await self._outcome
            timed = self._feed.heartbeat is not None or self._feed.expires is not None
            if timed and not isinstance(outcome, _Refused):
                self._beat = Heartbeat(self._sub, loop)
            while outcome is not _Ended.ENDED and not isinstance(outcome, _Refused):
                if isinstance(outcome, _Waiting):
                    await outcome  # a write that had to wait, finished in this task
                self._outcome = loop.create_future()
                self.ready()
                outcome = await self._outcome
        finally:
            self._stop()
        if isinstance(outcome, _Refused):
            await self._send_from_task(outcome.body)

    async def _send_from_task(self, refused: bytes) -> None:
        """Send the chunk `send` refused from a callback, then every later one, from here."""
        if refused:
            await self._send(_body(refused))
        async for chunk in self._sub:
            await self._send(_body(chunk))

    def _stop(self) -> None:
        self._stopped = True
        self._feed.withdraw(self)
        if self._beat is not None:
            self._beat.stop()
        _drop(self._outcome)

    def _probe(self) -> None:
        if self._outcome.done():
            return  # the task was cancelled before this callback ran
        if self._write(b""):
            self._settle(None)

    def heartbeat_due(self) -> None:
        """Write what is pending, or a heartbeat if nothing is."""
        self.ready(HEARTBEAT)

    def ready(self, when_idle: bytes | None = None) -> None:
        """Write what is pending, else `when_idle` if given; the end ends `run`.

        The poll leaves the pump parked, so what arrives during the write wakes it again.
        """
        if self._stopped or self._outcome.done():
            # Queued before the task was cancelled (which cancels the outcome it awaits),
            # or while the task finishes a write that had to wait.
            return
        feed = self._feed
        while True:
            got = feed.poll(self)
            if got is Status.ENDED:
                self._settle(_Ended.ENDED)
                return
            if got is Status.IDLE:
                if when_idle is None:
                    return
                body = when_idle
            else:
                body = b"".join(got)
            if not self._write(body) or feed.close_reason is None:
                return
            # Ended (shut down) with frames left: the poll did not park the pump, and
            # nothing wakes it again, so it polls on to the end.
            when_idle = None

    def _write(self, body: bytes) -> bool:
        """Send `body` from this callback; return False if the task must take over.

        The send is stepped by hand, as a task would step it; when it has to wait, the
        task is handed the rest of it.
        """
        try:
            steps = coroutine_of(self._send(_body(body)))
            waited_on = self._context.run(steps.send, None)
        except StopIteration:
            return True
        except (OSError, asyncio.CancelledError) as error:
            self._settle(error=error)  # the client went away, or the stream was cancelled
            return False
        except Exception:
            self._settle(_Refused(body))  # send needs its task: the task sends this chunk
            return False
        self._settle(_Waiting(self._context, steps, waited_on))  # the task finishes it
        return False

    def _settle(self, outcome: _Outcome = None, *, error: BaseException | None = None) -> None:
        """Hand the task what to do next, unless it was cancelled (by the send itself, even)."""
        if self._outcome.done():
            if isinstance(outcome, _Waiting):
                outcome.close()
        elif error is not None:
            self._outcome.set_exception(error)
        else:
            self._outcome.set_result(outcome)


def coroutine_of(awaitable: Awaitable[_T]) -> Coroutine[Any, Any, _T]:
    """Return `awaitable` as a coroutine, which steps with `send`, `throw` and `close`.

    An ASGI `send` or `receive` may return any awaitable, and the iterator of one that is
    not a coroutine need not have those (granian's has only `__next__`); awaited in a
    coroutine, it steps as a task would step it.
    """
    if type(awaitable) is CoroutineType:
        return awaitable
    return _awaiting(awaitable)


async def _awaiting(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def _body(data: bytes) -> MutableMapping[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}


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
