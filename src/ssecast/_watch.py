"""Notice that an ASGI client has gone, by stepping `receive()` from the loop's callbacks.

A stream learns that its client left from `receive()`, which answers `http.disconnect`
then. Awaiting it in a task of its own costs each idle stream a task, its coroutine and
its entry in the loop's set of tasks: about a third of what ssecast adds to an idle
stream. A `DisconnectWatch` steps the `receive()` coroutine itself instead, as a task
would: it sends into it, and when it waits on a future, asks that future to call back.

Some `receive` wrappers work only inside a task (anything using anyio, such as
Starlette's `BaseHTTPMiddleware`). When a step raises anything but `OSError` before the
receive could take anything from the client (before it returned a message or waited on a
future), the watch awaits `receive()` in a task of its own from then on, as before. A
failure after that means the client is gone: the receive may have taken the disconnect
with it, and some servers (hypercorn) answer it only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Protocol, TypeAlias, cast

from ssecast._pump import coroutine_of

logger = logging.getLogger("ssecast")

__all__ = ["Closable", "DisconnectWatch"]

_Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Steps: TypeAlias = Coroutine[Any, Any, MutableMapping[str, Any]]


class Closable(Protocol):
    """What the watch closes when the client goes: a subscription."""

    def close(self) -> None:
        """End it."""


class DisconnectWatch:
    """Closes `sub` once `receive()` says the client disconnected, or fails.

    Create it in the connection's task, then `close` it when the stream ends, whichever
    way. The steps run in `context`, by default a copy of the task's context.
    """

    __slots__ = (
        "_closed",
        "_context",
        "_fresh",
        "_loop",
        "_receive",
        "_steps",
        "_sub",
        "_task",
        "_waited_on",
    )

    def __init__(
        self, receive: _Receive, sub: Closable, context: contextvars.Context | None = None
    ) -> None:
        self._receive = receive
        self._sub = sub  # not its bound `close`: that would be one more object per stream
        self._loop = asyncio.get_running_loop()
        # The stream's writes may run in a copy already: one copy per stream is enough.
        self._context = contextvars.copy_context() if context is None else context
        self._steps: _Steps | None = None
        self._waited_on: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Nothing can have been taken from the client yet: no receive() returned, and none
        # waited for anything but a turn of the loop.
        self._fresh = True
        # From a callback, not from this task: a receive wrapper that needs a task must
        # find none and fail at once, rather than begin in this task and go on elsewhere.
        self._loop.call_soon(self._read, context=self._context)

    def close(self) -> None:
        """Stop watching: abandon the `receive()` in progress. Safe to call twice."""
        self._closed = True
        steps, self._steps = self._steps, None
        if steps is not None:
            self._context.run(self._cancel, steps)
        if self._task is not None:
            self._task.cancel()

    def _cancel(self, steps: _Steps) -> None:
        """Cancel the receive as a task is cancelled: what it waits on, then the receive."""
        if self._waited_on is not None:
            self._waited_on.cancel()  # a receive in asyncio.wait_for cancels its inner task
        try:
            steps.throw(asyncio.CancelledError())
        except (Exception, asyncio.CancelledError):
            return  # it ended, as it should
        with contextlib.suppress(RuntimeError):  # it waits on: abandon it
            steps.close()

    def _read(self) -> None:
        """Call receive() until one waits, or the client is gone; runs in the watch's context.

        A loop, not a recursion: a receive may answer many body messages at once.
        """
        while not self._closed:
            try:
                steps = coroutine_of(self._receive())
            except Exception as error:  # raised by the call itself, not by awaiting it
                self._failed(error)
                return
            self._steps = steps
            if not self._step(steps.send, None):
                return

    def _step(self, step: Callable[[Any], object], value: object) -> bool:
        """Run the receive to its next wait, or to its end; return whether to read on."""
        try:
            waited_on = step(value)
        except StopIteration as stop:
            self._steps = None
            self._fresh = False
            if stop.value["type"] == "http.disconnect":
                self._end()
                return False
            return True  # the request's (empty) body: read on
        except asyncio.CancelledError:
            self._steps = None
            self._end()
            return False
        except Exception as error:
            self._steps = None
            self._failed(error)
            return False
        if waited_on is None:  # a bare yield: run again on the next turn of the loop
            self._loop.call_soon(self._resume, None, context=self._context)
        elif (
            getattr(waited_on, "_asyncio_future_blocking", False)
            and cast("asyncio.Future[Any]", waited_on).get_loop() is self._loop
        ):
            future = self._waited_on = cast("asyncio.Future[Any]", waited_on)
            future._asyncio_future_blocking = False
            future.add_done_callback(self._woken, context=self._context)
            self._fresh = False  # what it waited for may be a message it takes
        else:  # what a task would refuse too (a bad yield, another loop's future)
            steps, self._steps, self._closed = self._steps, None, True
            self._cancel(cast("_Steps", steps))  # in the watch's context already
            self._sub.close()
        return False

    def _failed(self, error: Exception) -> None:
        if self._fresh and not isinstance(error, OSError):
            # It failed before it could take any message: a receive that needs a task
            # (anyio's wrappers), awaited in one from now on.
            # From a callback of its own: this one runs in the watch's context, which an
            # eager task (3.12+) would enter again, and fail.
            self._loop.call_soon(self._listen_in_task)
        else:
            # It may have taken the disconnect with it: the client is as good as gone, as
            # a task awaiting receive() would have decided too.
            logger.debug("receive() raised %r: the client is taken as gone", error)
            self._end()

    def _woken(self, future: asyncio.Future[Any]) -> None:
        self._waited_on = None
        # As a task wakes up: an exception is thrown in; a result is not sent, the receive
        # reads it from the future (and an iterator that is not a generator takes none).
        try:
            future.result()
        except BaseException as error:  # thrown into the receive, as a task throws it
            self._resume(error, error=True)
        else:
            self._resume(None)

    def _resume(self, value: object, *, error: bool = False) -> None:
        steps = self._steps
        # steps is None once the watch was closed, and the receive abandoned.
        if steps is not None and self._step(steps.throw if error else steps.send, value):
            self._read()

    def _end(self) -> None:
        if not self._closed:
            self._sub.close()

    def _listen_in_task(self) -> None:
        if not self._closed:
            self._task = self._loop.create_task(self._listen(), context=self._context)

    async def _listen(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass  # the (empty) request body of the GET
        finally:
            # Also when receive() fails: nobody awaits this task, so an error raised here
            # would only be logged as never retrieved, while the stream went on.
            self._end()
