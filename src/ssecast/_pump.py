"""Write a subscription to an ASGI connection from its event loop's callbacks.

An `async for` reader costs a task wake-up per chunk: the future it waits on is
resolved, the loop schedules the task, and the task resumes through every coroutine
frame between the server and the reader (server, middleware, application). With a
thousand clients on a loop and an event every few milliseconds, that is most of the
CPU a delivery costs in Python. A `Pump` skips it: it parks itself as the
subscription's waiter, and the loop's wake-up callback writes the chunk at once. One
callback serves every pump that an event woke on a loop (`Pump.ready_all`): it polls
their feeds under one hold of the broadcaster's lock, then writes to each in turn. A pump
is parked only while the callbacks write for it: when its task must act (a send that
waited or raised, the end), it withdraws until the task pumps on.

Each write is an ASGI `send` of one body message: a coroutine that nearly always
completes without waiting. A *writer* steps it: a generator that awaits each `send` it
is handed, and yields when that one completed, so that one writer serves a whole
wake-up without a coroutine per stream nor the `StopIteration` that ends a coroutine
stepped by hand. When a send does wait (the client reads slowly and the server applies
back-pressure), the pump hands the writer, stopped in that send, to the stream's own
task, which finishes it and pumps on; the callback takes a new writer for the others.
Every write, from a callback or from the task, runs in one copy of the task's context:
context variables set before the stream began are seen, and ones a `send` wrapper sets
stay in the copy, for its later writes.

Some `send` wrappers only work inside a task: Starlette's `BaseHTTPMiddleware` (and
FastAPI's `@app.middleware("http")`), anything using `asyncio.timeout` or anyio
around `send`. So the pump first sends an empty body message from a callback, which
writes nothing; if that raises, or any later send made from a callback raises anything
but `OSError`, the task takes over: it sends that chunk, and every later one, itself.

An idle stream is what a server holds most of, so a pump is one object: it is its own
awaitable (the task awaits it with no coroutine frame of its own), its own waiter and
its own `Heartbeat`, and it keeps the subscription's feed rather than the subscription.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from types import CoroutineType, TracebackType
from typing import Any, NamedTuple, NoReturn, TypeAlias, TypeVar

from ssecast._subscription import CloseReason, Heartbeat, Status, Subscription, poll_all
from ssecast._wire import HEARTBEAT

__all__ = ["Pump", "coroutine_of"]

logger = logging.getLogger("ssecast")

_Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_T = TypeVar("_T")
_Writer: TypeAlias = Generator[object, tuple[_Send, MutableMapping[str, Any]], NoReturn]


class _Ended(enum.Enum):
    ENDED = "the subscription ended"


class _Written(enum.Enum):
    WRITTEN = "the send completed"


_WRITTEN = _Written.WRITTEN


class _Refused(NamedTuple):
    """A chunk that `send` would not take from a callback: the task must send it."""

    body: bytes


_Outcome: TypeAlias = "_Waiting | _Refused | _Ended | None"
_Delegate: TypeAlias = Generator[Any, Any, None] | Coroutine[Any, Any, _Ended]


class Pump(Heartbeat, Generator[object, None, None]):
    """Sends a subscription's chunks as ASGI body messages as they come, until it ends.

    Create it in the task that serves the connection, and `await` it there once the
    response has started: it returns when the subscription ends, and raises `OSError`
    when a write found the client gone (ASGI 2.4 servers raise it). `close` ends the
    subscription, from any callback.

    Awaiting it steps it as a generator: the task sends into it (or throws into it)
    only when the stream needs the task, at its start, at its end, or for a write that
    had to wait.
    """

    __slots__ = ("_delegate", "_outcome", "_send", "context")

    def __init__(self, sub: Subscription, send: _Send) -> None:
        super().__init__(sub, asyncio.get_running_loop())
        self._send = send
        self.context = contextvars.copy_context()
        """The copy of the task's context that the writes run in."""
        # None until the task first awaits the pump.
        self._outcome: asyncio.Future[_Outcome] | None = None
        # What the task steps instead of the pump meanwhile: a write that had to wait, or,
        # once `send` needs its task, the rest of the stream.
        self._delegate: _Delegate | None = None

    def close(self) -> None:
        """End the subscription: the client left, or the stream's coroutine was closed.

        The pump, woken by the end, finishes what it was doing and returns.
        """
        self._release(self._feed, CloseReason.UNSUBSCRIBED)

    def dispose(self) -> None:
        """Let go of all the stream holds, however it ended; once the task stepped it last.

        Ends the subscription, stops the heartbeats and closes a write still in progress,
        as closing a coroutine closes what it awaits.
        """
        delegate, self._delegate = self._delegate, None
        if delegate is not None:
            delegate.close()
        self.close()
        self._stop()

    def read_nowait(self) -> bytes:
        """Return every pending frame as one chunk, or `b""`; for the stream's first write."""
        frames = self._feed.poll(None)
        return b"".join(frames) if type(frames) is list else b""

    def __await__(self) -> Generator[object, None, None]:
        return self

    def send(self, value: None) -> object:
        """Run until the task must wait again; what it must wait on is returned."""
        if self._delegate is not None:
            return self._delegated(self._delegate.send, value)
        try:
            return self._advance()
        except BaseException:
            self._stop()
            raise

    def throw(
        self,
        error: BaseException | type[BaseException],
        value: object = None,
        traceback: TracebackType | None = None,
        /,
    ) -> object:
        """Throw `error` (a cancellation, say) into the write in progress, or out of the pump."""
        if isinstance(value, BaseException):
            error = value  # the old form, throw(type, instance, traceback)
        if self._delegate is not None:
            return self._delegated(self._delegate.throw, error)
        self._stop()
        raise error

    def _delegated(self, step: Callable[[Any], object], value: object) -> object:
        """Step the delegate; when a waiting write ends, pump on; when the rest ends, end."""
        try:
            try:
                return step(value)
            except StopIteration as done:
                self._delegate = None
                if done.value is _Ended.ENDED:
                    raise
            return self._pump_on()
        except BaseException:
            self._delegate = None
            self._stop()
            raise

    def _advance(self) -> object:
        """Act on what the callbacks settled, up to the next thing to wait on.

        Its callers stop the pump when it raises, StopIteration (the end) included.
        """
        loop = self.loop
        if self._outcome is None:  # the first step: the probe decides how to write
            self._outcome = loop.create_future()
            loop.call_soon(self._probe)
            return _blocking(self._outcome)
        outcome = self._outcome.result()  # an error: the client went, or a cancellation
        if outcome is _Ended.ENDED:
            raise StopIteration
        if isinstance(outcome, _Refused):
            self._stop()
            self._delegate = self._send_from_task(outcome.body)
            return self._delegated(self._delegate.send, None)
        feed = self._feed
        if self._clock is None and (feed.heartbeat is not None or feed.expires is not None):
            self.start()  # the probe went out from a callback (or is going): so will the rest
        if isinstance(outcome, _Waiting):
            self._delegate = outcome.__await__()  # the task finishes that write
            return self._delegated(self._delegate.send, None)
        return self._pump_on()

    def _pump_on(self) -> object:
        """Write from callbacks again, and wait for what they settle next."""
        outcome_of = self._outcome = self.loop.create_future()
        self._write(_writer(), self._feed.poll(self))
        return self._advance() if outcome_of.done() else _blocking(outcome_of)

    async def _send_from_task(self, refused: bytes) -> _Ended:
        """Send the chunk `send` refused from a callback, then every later one, from here."""
        if refused:
            await self._send_in_context(refused)
        async with Subscription(self._feed, self._release) as sub:
            async for chunk in sub:
                await self._send_in_context(chunk)
        return _Ended.ENDED

    async def _send_in_context(self, body: bytes) -> None:
        """Send `body` from the task, in the context the callbacks' writes ran in."""
        writer = _writer()
        written = self.context.run(writer.send, (self._send, _body(body)))
        if written is not _WRITTEN:
            await _Waiting(self.context, writer, written)

    def _stop(self) -> None:
        self._feed.withdraw(self)
        self.stop()
        _drop(self._outcome)

    def _probe(self) -> None:
        outcome_of = self._outcome
        if outcome_of is None or outcome_of.done():
            return  # the task was cancelled, which cancels its outcome, before this ran
        if self._write(_writer(), [b""]):
            self._settle(None)

    def heartbeat_due(self) -> None:
        """Write what is pending, or a heartbeat if nothing is; the pump is parked."""
        self._write(_writer(), self._feed.poll(self), HEARTBEAT)

    @staticmethod
    def ready_all(pumps: list[Pump]) -> None:
        """Write what is pending for each of `pumps`, which frames (or their end) woke.

        The feeds are polled together, under one hold of the broadcaster's lock, and then
        written with one writer while it lasts. A pump stays parked only while it writes
        from callbacks (`_settle` withdraws it), so what a parked pump is given, it writes.
        """
        writer = _writer()
        write = writer.send  # a bound method made once, not once per write
        for pump, taken in zip(pumps, poll_all(pumps), strict=True):
            if type(taken) is bytes and pump._feed.close_reason is None:
                # One frame for an open feed: nearly every write. `_write` for that case,
                # inlined: the call and its checks were an eighth of ssecast's cost per write.
                outcome_of = pump._outcome
                if outcome_of is None or outcome_of.done():
                    continue  # the stream was cancelled since the poll (by a write, even)
                message = {"type": "http.response.body", "body": taken, "more_body": True}
                try:
                    written = pump.context.run(write, (pump._send, message))
                except BaseException as error:
                    pump._failed(error, taken)
                    writer = _writer()
                    write = writer.send
                    continue
                if written is not _WRITTEN:
                    pump._settle(_Waiting(pump.context, writer, written))
                    writer = _writer()
                    write = writer.send
                continue
            got = pump._feed.poll(pump) if taken is None and pump._writes() else taken
            if got is not None and not pump._write(writer, got):
                writer = _writer()
                write = writer.send

    def _writes(self) -> bool:
        """Whether the callbacks write: the task awaits the pump, and is not writing itself."""
        # Not when queued before the task was cancelled, nor while the task finishes a
        # write that had to wait.
        outcome_of = self._outcome
        return not self._stopped and outcome_of is not None and not outcome_of.done()

    def _write(
        self, writer: _Writer, got: bytes | list[bytes] | Status, when_idle: bytes | None = None
    ) -> bool:
        """Send what a poll got with `writer`, else `when_idle` if given; the end ends the await.

        The poll left the pump parked, so what arrives during the write wakes it again.
        Returns whether `writer` may write on: not when the send had to wait (the task is
        handed the rest of it, with `writer`), nor when it raised (the task takes over).
        """
        feed, outcome_of = self._feed, self._outcome
        assert outcome_of is not None  # a write runs only once the task awaits the pump
        while True:
            if type(got) is bytes:
                body = got
            elif type(got) is list:
                body = b"".join(got)
            elif got is Status.IDLE:
                if when_idle is None:
                    return True
                body = when_idle
            else:
                self._settle(_Ended.ENDED)
                return True
            # Since the poll, an earlier write of this callback may have cancelled the
            # stream, or revoked it: then what the poll took is dropped with the rest.
            if outcome_of.done():
                return True
            if feed.close_reason is not None and feed.discarded:
                self._settle(_Ended.ENDED)
                return True
            message = {"type": "http.response.body", "body": body, "more_body": True}  # _body
            try:
                written = self.context.run(writer.send, (self._send, message))
            except BaseException as error:
                self._failed(error, body)
                return False
            if written is not _WRITTEN:
                self._settle(_Waiting(self.context, writer, written))  # the task finishes it
                return False
            if feed.close_reason is None:
                return True
            # Ended (shut down) with frames left: the poll did not park the pump, and
            # nothing wakes it again, so it polls on to the end.
            when_idle = None
            got = feed.poll(self)

    def _failed(self, error: BaseException, body: bytes) -> None:
        """Hand the task what `send` raised when given `body` from a callback."""
        if isinstance(error, Exception) and not isinstance(error, OSError):
            self._settle(_Refused(body))  # send needs its task: the task sends this chunk
        else:
            # The client went away (OSError), the stream was cancelled, or another
            # BaseException: the task raises it, as it would from its own send.
            self._settle(error=error)

    def _settle(self, outcome: _Outcome = None, *, error: BaseException | None = None) -> None:
        """Hand the task what to do next, unless it was cancelled (by the send itself, even)."""
        assert self._outcome is not None  # a write runs only once the task awaits the pump
        # The callbacks write no more until the task pumps on (and parks the pump again).
        self._feed.withdraw(self)
        if self._outcome.done():
            if isinstance(outcome, _Waiting):
                outcome.close()
        elif error is not None:
            self._outcome.set_exception(error)
        else:
            self._outcome.set_result(outcome)


def _blocking(future: asyncio.Future[_Outcome]) -> asyncio.Future[_Outcome]:
    """Mark `future` as awaited, as `await future` does, for the task to wait on it."""
    future._asyncio_future_blocking = True
    return future


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


@types.coroutine
def _writing() -> Generator[object, tuple[_Send, MutableMapping[str, Any]], NoReturn]:
    # Yields _WRITTEN when a send completed, or what a send waits on.
    while True:
        send, message = yield _WRITTEN
        awaitable = send(message)
        if type(awaitable) is CoroutineType:
            yield from awaitable  # type: ignore[misc]  # types.coroutine allows it
        else:
            # As `await` takes it: its iterator may have only `__next__`, which
            # `yield from` would refuse.
            yield from _awaiting(awaitable)


def _writer() -> _Writer:
    """Return a writer: send it `(send, message)`, and it awaits `send(message)`.

    It yields `_WRITTEN` when that send completed, or what the send waits on; so it writes
    one stream after another, each step in that stream's context, without the
    `StopIteration` that ends a coroutine stepped by hand.
    """
    writer = _writing()
    next(writer)
    return writer


def _body(data: bytes) -> MutableMapping[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}


def _drop(outcome: asyncio.Future[_Outcome] | None) -> None:
    """Let go of an outcome the task will not await (it was cancelled meanwhile)."""
    # Retrieving the exception keeps asyncio from logging it as never retrieved.
    if (
        outcome is not None
        and outcome.done()
        and not outcome.cancelled()
        and outcome.exception() is None
    ):
        waiting = outcome.result()
        if isinstance(waiting, _Waiting):
            waiting.close()


class _Waiting:
    """The rest of a write that had to wait: awaiting it, a task takes it over and ends it."""

    __slots__ = ("_context", "_waited_on", "_writer")

    def __init__(self, context: contextvars.Context, writer: _Writer, waited_on: object) -> None:
        self._context = context
        self._writer = writer
        self._waited_on = waited_on

    def close(self) -> None:
        """Abandon the write, as when a coroutine is closed unfinished.

        A send that awaits even so (in a `finally`, say) makes closing it fail: that is
        logged, not raised, so that the wake-up or the clock closing it goes on to the
        other streams.
        """
        try:
            self._context.run(self._writer.close)
        except Exception:
            logger.exception("an abandoned send (its stream was cancelled) would not stop")

    def __await__(self) -> Generator[Any, Any, None]:
        # What `await` does for a coroutine, from its second step on: hand what it waits
        # on to the task, and pass the task's answer (or exception) back into it.
        writer, waited_on = self._writer, self._waited_on
        while waited_on is not _WRITTEN:
            step: Callable[[Any], object]
            try:
                answer = yield waited_on
            except BaseException as error:  # cancelled, say: the write decides what to do
                step, answer = writer.throw, error
            else:
                step = writer.send
            waited_on = self._context.run(step, answer)
        writer.close()
