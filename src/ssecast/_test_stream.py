"""The streams a test reads: `TestStream` (blocking) and `AsyncTestStream` (awaiting)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from types import MappingProxyType

from ssecast._exceptions import ConfigurationError
from ssecast._sse_parser import ReceivedEvent
from ssecast._test_client import App, ASGIExchange, Exchange, WSGIExchange, is_asgi

__all__ = ["AsyncTestStream", "TestStream", "astream", "stream"]

# The threads are daemons only so that an application stuck past every bound (a WSGI
# response that never yields again) cannot keep the test run from exiting; close()
# reports it. How many times the stream's timeout closing may take: an ASGI application gets one
# timeout to end after the disconnect and one more once cancelled, and its lifespan's
# shutdown as much again.
_CLOSING_TIMEOUTS = 5


class _Stream:
    """What both streams share: the exchange, the status and the headers."""

    __test__ = False  # pytest: a class named Test... that is no test

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._inbox = exchange.inbox
        self._timeout = exchange.timeout
        self._closed = False

    @property
    def status(self) -> int:
        """The response's status code: 200 for a stream, 403 or 503 for a refusal, say."""
        return self._inbox.status

    @property
    def headers(self) -> Mapping[str, str]:
        """The response's headers, by lower-case name (repeated ones joined with `", "`)."""
        return MappingProxyType(self._inbox.headers)

    def _checked_start(self) -> None:
        if not self._inbox.status:
            self._inbox.raise_error()  # the application ended without answering: say why

    def _closing_timeout(self) -> float:
        return self._timeout * _CLOSING_TIMEOUTS

    def _left(self) -> None:
        if self._inbox.finished:
            self._inbox.raise_error()
            return
        raise TimeoutError(
            f"the application did not end within {self._closing_timeout()} s of the "
            "disconnect; a WSGI response that yields nothing cannot be told sooner"
        )


class TestStream(_Stream):
    """One response read as an `EventSource` reads it, from a test that blocks.

    [`stream`][ssecast.testing.stream] hands it out once the status and headers are in.
    Events are parsed from a `200` response of type `text/event-stream` only, as a browser
    would; any other response (a refusal) has its body in [`read`][ssecast.testing.TestStream.read].
    """

    def __init__(self, exchange: Exchange, runner: threading.Thread) -> None:
        super().__init__(exchange)
        self._runner = runner

    def next_event(self, timeout: float | None = None) -> ReceivedEvent:
        """Return the next event, waiting for it if need be.

        :param timeout: seconds to wait; the stream's `timeout` when `None`.
        :raises TimeoutError: no event came within the timeout.
        :raises EOFError: the response ended and every event has been read.
        """
        wait = self._timeout if timeout is None else timeout
        self._inbox.wait(self._inbox.readable, wait, "no event")
        return self._inbox.take_event()

    def events(self, n: int, timeout: float | None = None) -> list[ReceivedEvent]:
        """Return the next `n` events, waiting for them if need be.

        :param n: how many events to read.
        :param timeout: seconds to wait for all of them; the stream's `timeout` when `None`.
        :raises TimeoutError: they did not all come within the timeout; those that did
            are left unread.
        :raises EOFError: the response ended before the `n`th event; the events before
            it are left unread.
        """
        wait = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        taken: list[ReceivedEvent] = []
        with self._inbox.unread_on_error(taken):
            for _ in range(n):
                taken.append(self.next_event(max(0.0, deadline - time.monotonic())))
        return taken

    def read(self, timeout: float | None = None) -> bytes:
        """Wait for the response to end, and return its whole body (a refusal's text, say).

        :param timeout: seconds to wait; the stream's `timeout` when `None`.
        :raises TimeoutError: the response did not end within the timeout (an event
            stream ends only when the broadcaster closes).
        """
        wait = self._timeout if timeout is None else timeout
        self._inbox.wait(lambda: self._inbox.ended, wait, "the response did not end")
        return self._inbox.take_body()

    def close(self) -> None:
        """Disconnect, as a browser closing the tab, and wait for the application to end.

        An ASGI application receives `http.disconnect`, and its later sends raise
        `OSError`; a WSGI application's response iterator is closed, as servers do.
        Calling it again does nothing.

        :raises TimeoutError: the application did not end in time after the disconnect:
            an ASGI application is cancelled one `timeout` after it; a WSGI response,
            which cannot be, is waited for up to five, then left running.
        :raises Exception: what the application raised, if no read raised it before.
        """
        if self._closed:
            return
        self._closed = True
        self._exchange.disconnect()
        with contextlib.suppress(TimeoutError):
            self._inbox.wait(lambda: self._inbox.finished, self._closing_timeout(), "")
        if self._inbox.finished:  # else a stuck WSGI thread: a join would only wait longer
            self._runner.join(min(self._timeout, threading.TIMEOUT_MAX))
        self._left()


class AsyncTestStream(_Stream):
    """One response read as an `EventSource` reads it, from an async test.

    The blocking methods of [`TestStream`][ssecast.testing.TestStream] become coroutines
    with an `a` prefix, as everywhere in ssecast: `await s.anext_event()`, `await
    s.aevents(n)`, `await s.aread()`, `await s.aclose()`. `status` and `headers` are the same.
    """

    def __init__(self, exchange: Exchange, runner: threading.Thread | asyncio.Task[None]) -> None:
        super().__init__(exchange)
        self._runner = runner

    async def anext_event(self, timeout: float | None = None) -> ReceivedEvent:  # noqa: ASYNC109 - its twin's signature
        """Return the next event, awaiting it if need be.

        :param timeout: seconds to wait; the stream's `timeout` when `None`.
        :raises TimeoutError: no event came within the timeout.
        :raises EOFError: the response ended and every event has been read.
        """
        wait = self._timeout if timeout is None else timeout
        await self._inbox.await_(self._inbox.readable, wait, "no event")
        return self._inbox.take_event()

    async def aevents(self, n: int, timeout: float | None = None) -> list[ReceivedEvent]:  # noqa: ASYNC109 - its twin's signature
        """Return the next `n` events, awaiting them if need be.

        :param n: how many events to read.
        :param timeout: seconds to wait for all of them; the stream's `timeout` when `None`.
        :raises TimeoutError: they did not all come within the timeout; those that did
            are left unread.
        :raises EOFError: the response ended before the `n`th event; the events before
            it are left unread.
        """
        wait = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        taken: list[ReceivedEvent] = []
        with self._inbox.unread_on_error(taken):
            for _ in range(n):
                taken.append(await self.anext_event(max(0.0, deadline - time.monotonic())))
        return taken

    async def aread(self, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - its twin's signature
        """Await the end of the response, and return its whole body (a refusal's text, say).

        :param timeout: seconds to wait; the stream's `timeout` when `None`.
        :raises TimeoutError: the response did not end within the timeout.
        """
        wait = self._timeout if timeout is None else timeout
        await self._inbox.await_(lambda: self._inbox.ended, wait, "the response did not end")
        return self._inbox.take_body()

    async def aclose(self) -> None:
        """Disconnect, as a browser closing the tab, and await the end of the application.

        :raises TimeoutError: the application did not end in time after the disconnect:
            an ASGI application is cancelled one `timeout` after it; a WSGI response,
            which cannot be, is waited for up to five, then left running.
        :raises Exception: what the application raised, if no read raised it before.
        """
        if self._closed:
            return
        self._closed = True
        self._exchange.disconnect()
        with contextlib.suppress(TimeoutError):
            await self._inbox.await_(lambda: self._inbox.finished, self._closing_timeout(), "")
        if isinstance(self._runner, threading.Thread):
            if self._inbox.finished:  # else a stuck WSGI thread: a join would block the loop
                self._runner.join(min(self._timeout, threading.TIMEOUT_MAX))
        else:
            await asyncio.wait([self._runner], timeout=self._timeout)
        self._left()


_NO_START = "the application started no response"


def _start_timeout(timeout: float, lifespan: bool) -> float:
    # The lifespan's startup has a timeout of its own, before the request's.
    return timeout * 2 if lifespan else timeout


def _exchange(
    app: App,
    path: str,
    headers: Mapping[str, str] | None,
    last_event_id: str | None,
    timeout: float,
    lifespan: bool,
    loop: asyncio.AbstractEventLoop | None,
) -> Exchange:
    merged = {"host": "localhost", "accept": "text/event-stream", "cache-control": "no-cache"}
    if last_event_id:  # an EventSource whose last event id is "" sends no header
        merged["last-event-id"] = last_event_id
    for name, value in (headers or {}).items():
        merged[name.lower()] = value
    if is_asgi(app):
        return ASGIExchange(app, path, merged, timeout, lifespan=lifespan, loop=loop)
    if lifespan:
        raise ConfigurationError(f"lifespan=True is for ASGI applications; {app!r} is WSGI")
    return WSGIExchange(app, path, merged, timeout)


@contextlib.contextmanager
def stream(
    app: App,
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    last_event_id: str | None = None,
    timeout: float = 5.0,
    lifespan: bool = False,
) -> Iterator[TestStream]:
    """Open one GET request to `app`, in this process, and read it as an `EventSource`.

    No server and no socket are involved: an ASGI application runs on an event loop in a
    thread of its own, a WSGI application's response is iterated in a thread of its own.
    Whether `app` is ASGI is told by `app`, or its `__call__`, being a coroutine function
    (Starlette, FastAPI, Litestar, Quart and Django's ASGI handler are; Flask and Django's
    WSGI handler are not). Leaving the block closes the stream, and nothing it started
    runs any more.

    :param app: the ASGI or WSGI application.
    :param path: the path, with a query string if any, e.g. `"/events?channel=prices"`.
    :param headers: request headers, added to (or replacing) an `EventSource`'s
        `Accept: text/event-stream`, `Cache-Control: no-cache` and `Host: localhost`.
        A refusal for a while (a full or closed broadcaster) answers an `EventSource` with
        a stream of one `ssecast.unavailable` event; `{"Accept": "*/*"}` gets the `503`
        other clients get.
    :param last_event_id: sent as `Last-Event-ID`, as a reconnecting `EventSource` does:
        not at all when it is `""`, the id of events that came with none.
    :param timeout: the default number of seconds any read of the stream may wait, and
        the wait for the response to start. Closing waits longer for an application
        that ignores the disconnect: see [`close`][ssecast.testing.TestStream.close].
    :param lifespan: run an ASGI application's lifespan startup before the request and
        its shutdown after it; off by default, since a lifespan that closes a shared
        broadcaster closes it for every later test.
    :returns: a context manager yielding the [`TestStream`][ssecast.testing.TestStream],
        once the status and headers are in.
    :raises TimeoutError: the application started no response within `timeout`.
    :raises ConfigurationError: `lifespan=True` with a WSGI application.
    :raises Exception: what the application raised before it started a response.
    """
    exchange = _exchange(app, path, headers, last_event_id, timeout, lifespan, None)
    runner = threading.Thread(target=exchange.serve, name="ssecast-testing", daemon=True)
    runner.start()
    opened = TestStream(exchange, runner)
    try:
        started = exchange.inbox.started
        exchange.inbox.wait(started, _start_timeout(timeout, lifespan), _NO_START)
        opened._checked_start()
        yield opened
    except BaseException:
        with contextlib.suppress(Exception):
            opened.close()
        raise
    else:
        opened.close()


@contextlib.asynccontextmanager
async def astream(
    app: App,
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    last_event_id: str | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - the same signature as stream()
    lifespan: bool = False,
) -> AsyncIterator[AsyncTestStream]:
    """Do what [`stream`][ssecast.testing.stream] does, in an async test.

    An ASGI application runs as a task of the running loop (so it may share the test's
    asyncio objects), a WSGI one in a thread of its own. Leaving the block closes the
    stream, and nothing it started runs any more.

    :param app: the ASGI or WSGI application.
    :param path: the path, with a query string if any.
    :param headers: request headers, added to (or replacing) an `EventSource`'s.
    :param last_event_id: sent as `Last-Event-ID`.
    :param timeout: the default number of seconds any read of the stream may wait, and
        the wait for the response to start. Closing waits longer for an application
        that ignores the disconnect: see
        [`aclose`][ssecast.testing.AsyncTestStream.aclose].
    :param lifespan: run an ASGI application's lifespan around the request.
    :returns: an async context manager yielding the
        [`AsyncTestStream`][ssecast.testing.AsyncTestStream], once the status and headers
        are in.
    :raises TimeoutError: the application started no response within `timeout`.
    :raises ConfigurationError: `lifespan=True` with a WSGI application.
    :raises Exception: what the application raised before it started a response.
    """
    loop = asyncio.get_running_loop()
    exchange = _exchange(app, path, headers, last_event_id, timeout, lifespan, loop)
    runner: threading.Thread | asyncio.Task[None]
    if isinstance(exchange, ASGIExchange):
        runner = loop.create_task(exchange.run())
    else:
        runner = threading.Thread(target=exchange.serve, name="ssecast-testing", daemon=True)
        runner.start()
    opened = AsyncTestStream(exchange, runner)
    try:
        started = exchange.inbox.started
        await exchange.inbox.await_(started, _start_timeout(timeout, lifespan), _NO_START)
        opened._checked_start()
        yield opened
    except BaseException:
        with contextlib.suppress(Exception):
            await opened.aclose()
        raise
    else:
        await opened.aclose()
