"""Run one request against an ASGI or WSGI application in-process, as an `EventSource` would.

No server and no socket: the application is called directly. An ASGI application runs on
an event loop (the test's own under `astream`, a thread's own under `stream`); a WSGI
application's response is iterated in a thread of its own, so that a wait for an event
can time out. Either way the application's side fills an `Inbox` (status, headers,
parsed events, the end) and the test's side reads it, blocking or awaiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from string import punctuation
from typing import Any, TypeAlias
from urllib.parse import quote, unquote_to_bytes

from ssecast._sse_parser import EventStreamParser, ReceivedEvent
from ssecast._wsgi import DISCONNECT_KEY

__all__ = ["ASGIExchange", "App", "Exchange", "Inbox", "WSGIExchange", "is_asgi"]

Message: TypeAlias = MutableMapping[str, Any]
App: TypeAlias = Callable[..., Any]
"""An ASGI application, or a WSGI one."""

HOST = "localhost"
# 2.3, although send() raises OSError once the client has gone as 2.4 says: told 2.4, an
# app may wait for that error instead of listening for http.disconnect (Starlette's
# StreamingResponse does), and a stream that sends nothing would never see a close().
_ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
_CLIENT = ("127.0.0.1", 50000)


def is_asgi(app: object) -> bool:
    """Whether `app` is an ASGI application: it, or its `__call__`, is a coroutine function.

    Starlette, FastAPI, Litestar, Quart and Django's ASGI handler define `async def
    __call__`; Flask and Django's WSGI handler a plain `def`.
    """
    call = getattr(app, "__call__", None)  # noqa: B004 - its kind, not whether it is callable
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call)


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return merged


class Inbox:
    """What the application has answered so far: filled by its side, read by the test's.

    The two sides may be two threads, so every access takes the lock; async readers are
    woken through their loop's `call_soon_threadsafe`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._parser: EventStreamParser | None = None
        self._events: deque[ReceivedEvent] = deque()
        self._body: list[bytes] = []
        self.status = 0  # until the response starts
        self.headers: dict[str, str] = {}
        self.ended = False  # the response is complete, or the application returned
        self.finished = False  # the application and its lifespan are done
        self.error: BaseException | None = None

    # The application's side.

    def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Keep the status and headers the response began with."""
        with self._lock:
            self.status, self.headers = status, _lower(headers)
            # EventSource reads events only from a 200 with this content type.
            kind = self.headers.get("content-type", "").partition(";")[0].strip().lower()
            self._parser = EventStreamParser() if (status, kind) == (200, _SSE) else None
            self._notify()

    def body(self, chunk: bytes) -> None:
        """Keep a chunk of the body, and the events it completes."""
        with self._lock:
            self._body.append(chunk)
            if self._parser is not None:
                self._events.extend(self._parser.feed(chunk))
            self._notify()

    def end(self, error: BaseException | None = None) -> None:
        """Mark the response complete, or the application returned (or raised `error`)."""
        with self._lock:
            self.ended = True
            self.error = self.error or error
            self._notify()

    def finish(self) -> None:
        """Mark the application, and its lifespan, as done."""
        with self._lock:
            self.ended = self.finished = True
            self._notify()

    def _notify(self) -> None:
        # The lock is held.
        self._changed.notify_all()
        for loop, waker in self._wakers:
            with contextlib.suppress(RuntimeError):  # the reader's loop is closed
                loop.call_soon_threadsafe(_wake, waker)
        self._wakers.clear()

    # The test's side.

    def started(self) -> bool:
        """Whether the status and headers are in, or the application ended without them."""
        return bool(self.status) or self.ended

    def readable(self) -> bool:
        """Whether `take_event` returns or raises at once."""
        return bool(self._events) or self.ended

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until `ready()`; raise `TimeoutError` after `timeout` seconds."""
        with self._lock:
            # threading's waits overflow past TIMEOUT_MAX (292 years): math.inf is "no bound".
            if not self._changed.wait_for(ready, min(timeout, threading.TIMEOUT_MAX)):
                raise TimeoutError(f"{what} within {timeout} s")

    async def await_(self, ready: Callable[[], bool], seconds: float, what: str) -> None:
        """Wait for `ready()` without blocking the loop; raise `TimeoutError` at `seconds`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                while True:
                    with self._lock:
                        if ready():
                            return
                        waker = loop.create_future()
                        self._wakers.append((loop, waker))
                    try:
                        await waker
                    finally:  # a wait that timed out must not leave its waker behind
                        with self._lock, contextlib.suppress(ValueError):  # or woken: gone
                            self._wakers.remove((loop, waker))
        except TimeoutError:
            raise TimeoutError(f"{what} within {seconds} s") from None

    def take_event(self) -> ReceivedEvent:
        """Return the oldest unread event, once `readable()`.

        :raises EOFError: the response ended and every event was read.
        """
        with self._lock:
            if self._events:
                return self._events.popleft()
            self._raise_error()
            raise EOFError(f"the response ({self.status}) ended; no event is left")

    @contextlib.contextmanager
    def unread_on_error(self, taken: list[ReceivedEvent]) -> Iterator[None]:
        """Put the events in `taken` back, first in line, if the block raises."""
        try:
            yield
        except BaseException:
            with self._lock:
                self._events.extendleft(reversed(taken))
            raise

    def take_body(self) -> bytes:
        """Return the whole body, once the response has ended."""
        with self._lock:
            self._raise_error()
            return b"".join(self._body)

    def raise_error(self) -> None:
        """Raise what the application raised, once."""
        with self._lock:
            self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


_SSE = "text/event-stream"


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


class Exchange:
    """One GET request to one application, served to its end by a subclass."""

    def __init__(self, app: App, path: str, headers: Mapping[str, str], timeout: float) -> None:
        self.app = app
        # As a browser's URL parser does: non-ASCII characters (as UTF-8), spaces and
        # controls are percent-encoded; the escapes already there are kept.
        self.path, _, self.query = quote(path, safe=punctuation).partition("?")
        self.headers = list(headers.items())
        self.timeout = timeout
        self.inbox = Inbox()

    def disconnect(self) -> None:  # pragma: no cover - every subclass has its own
        """Tell the application that the client has gone; safe from any thread."""
        raise NotImplementedError

    def serve(self) -> None:  # pragma: no cover - every subclass has its own
        """Serve the request to its end, in the calling thread."""
        raise NotImplementedError


class ASGIExchange(Exchange):
    """A request to an ASGI application, run by the coroutine `run()` on some loop."""

    def __init__(
        self,
        app: App,
        path: str,
        headers: Mapping[str, str],
        timeout: float,
        *,
        lifespan: bool,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        super().__init__(app, path, headers, timeout)
        self.lifespan = lifespan
        # The loop run() runs on: the test's own (astream), or a new one (None) that
        # serve() runs in a thread. Known from the start: no disconnect comes too early.
        self._loop = loop or asyncio.new_event_loop()
        self._gone = asyncio.Event()  # it binds to the loop on its first wait

    def disconnect(self) -> None:
        """Tell the application that the client has gone; safe from any thread."""
        with contextlib.suppress(RuntimeError):  # run() has ended, and its loop is closed
            self._loop.call_soon_threadsafe(self._gone.set)

    def serve(self) -> None:
        """Serve the request to its end on the exchange's loop, in the calling thread.

        What `asyncio.run` does, but with an executor of our own that is shut down here,
        waiting for its threads: `asyncio.run` leaves that to a thread of its own, still
        exiting when the loop is done, and no thread may outlive the stream.
        """
        loop = self._loop
        executor = ThreadPoolExecutor(thread_name_prefix="ssecast-testing")
        loop.set_default_executor(executor)
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.run())
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            executor.shutdown(wait=True)
            loop.close()

    async def run(self) -> None:
        """Run the lifespan's startup if asked, the request until it ends, then the shutdown."""
        try:
            state: dict[str, Any] = {}
            lifespan = (
                await _Lifespan.start(self.app, state, self.timeout) if self.lifespan else None
            )
            try:
                await self._request(state)
            finally:
                if lifespan is not None:
                    await lifespan.stop()
        except Exception as error:
            self.inbox.end(error)
        finally:
            self.inbox.finish()

    async def _request(self, state: dict[str, Any]) -> None:
        gone = self._gone
        scope = {
            "type": "http",
            "asgi": _ASGI_VERSION,
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": unquote_to_bytes(self.path).decode("utf-8", "replace"),
            "raw_path": self.path.encode("latin-1"),
            "query_string": self.query.encode("latin-1"),
            "root_path": "",
            "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.headers],
            "client": _CLIENT,
            "server": (HOST, 80),
            "state": dict(state),
        }
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()  # set on a disconnect, and once the response is complete
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if gone.is_set():
                raise _Disconnected("the client has disconnected")  # what ASGI 2.4 says
            # Out of order, a server refuses the message, as uvicorn does: the app raises.
            started = self.inbox.status != 0
            if message["type"] == "http.response.start":
                if started:
                    raise RuntimeError("http.response.start sent twice")
                headers = message.get("headers", [])
                self.inbox.start(
                    int(message["status"]),
                    [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
                )
            elif message["type"] == "http.response.body":
                if not started:
                    raise RuntimeError("http.response.body sent before http.response.start")
                self.inbox.body(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    gone.set()
                    self.inbox.end()

        loop = asyncio.get_running_loop()
        task = loop.create_task(self.app(scope, receive, send))
        waiter = loop.create_task(gone.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        await asyncio.wait([waiter])
        done, _ = await asyncio.wait([task], timeout=self.timeout)
        if not done:
            task.cancel()
            await asyncio.wait([task], timeout=self.timeout)
            raise TimeoutError(
                f"the application did not end within {self.timeout} s of the disconnect"
            )
        error = None if task.cancelled() else task.exception()
        if isinstance(error, _Disconnected):
            error = None
        if not self.inbox.status and error is None:
            error = RuntimeError("the application returned without starting a response")
        self.inbox.end(error)


class _Disconnected(OSError):
    """What `send` raises once the client has gone."""


class _Lifespan:
    """The ASGI lifespan protocol, as a server runs it around its requests."""

    def __init__(self, app: App, state: dict[str, Any], timeout: float) -> None:
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": _ASGI_VERSION, "state": state}
        coroutine = app(scope, self._to_app.get, self._from_app.put)
        self._task = asyncio.get_running_loop().create_task(coroutine)
        self._timeout = timeout

    @classmethod
    async def start(cls, app: App, state: dict[str, Any], seconds: float) -> _Lifespan:
        """Run the startup; raise what the application answered if it was not complete."""
        lifespan = cls(app, state, seconds)
        try:
            await lifespan._step("startup")
        except Exception:
            await lifespan._end()
            raise
        return lifespan

    async def stop(self) -> None:
        """Run the shutdown, and wait for the lifespan coroutine to return."""
        try:
            await self._step("shutdown")
            await asyncio.wait([self._task], timeout=self._timeout)
        finally:
            await self._end()

    async def _end(self) -> None:
        # A lifespan still running past its bound is cancelled: on the test's own loop
        # (astream), nothing the stream started may outlive it.
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self._timeout)

    async def _step(self, step: str) -> None:
        await self._to_app.put({"type": f"lifespan.{step}"})
        answer = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait(
            [answer, self._task], timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not answer.done():
            answer.cancel()
            if self._task.done():
                self._task.result()  # raises what the lifespan raised
            raise RuntimeError(f"the application's lifespan {step} did not complete")
        message = answer.result()
        if message["type"] != f"lifespan.{step}.complete":
            raise RuntimeError(f"lifespan {step} failed: {message.get('message', '')}")


class WSGIExchange(Exchange):
    """A request to a WSGI application, whose response `serve()` iterates in a thread.

    A WSGI application learns that its client has gone only when a write fails, which a
    server tells it by closing the response iterator. The test's disconnect does the same
    at the next chunk; and ssecast's own responses, which may wait a heartbeat for one,
    register a closer under `DISCONNECT_KEY` in the environ to end at once.
    """

    def __init__(self, app: App, path: str, headers: Mapping[str, str], timeout: float) -> None:
        super().__init__(app, path, headers, timeout)
        self._lock = threading.Lock()
        self._gone = False
        self._closers: list[Callable[[], None]] = []

    def disconnect(self) -> None:
        """Tell the application that the client has gone; safe from any thread."""
        with self._lock:
            self._gone = True
            closers, self._closers = self._closers, []
        for close in closers:
            close()

    def _on_disconnect(self, close: Callable[[], None]) -> None:
        with self._lock:
            if not self._gone:
                self._closers.append(close)
                return
        close()

    def _environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(self.path).decode("latin-1"),
            "QUERY_STRING": self.query,
            "SERVER_NAME": HOST,
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": _CLIENT[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            DISCONNECT_KEY: self._on_disconnect,
        }
        for name, value in self.headers:
            key = name.upper().replace("-", "_")
            # PEP 3333 (from CGI): these two have no HTTP_ prefix.
            environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
        return environ

    def _start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], None]:
        # Nothing was sent yet when an error handler calls it again: its answer wins.
        self.inbox.start(int(status.split(maxsplit=1)[0]), headers)
        return self.inbox.body

    def serve(self) -> None:
        """Call the application, iterate its response, close it: what a server's thread does."""
        try:
            response = self.app(self._environ(), self._start_response)
            if inspect.isawaitable(response):
                with contextlib.suppress(AttributeError):
                    response.close()  # type: ignore[attr-defined]
                raise TypeError(
                    f"{self.app!r} returned an awaitable: it is an ASGI application whose "
                    "__call__ is not a coroutine function; wrap it in an async def"
                )
            try:
                for chunk in response:
                    if self._gone:
                        break  # the write would fail: a server stops here
                    self.inbox.body(chunk)
            finally:
                close = getattr(response, "close", None)
                if close is not None:
                    close()
            if not self.inbox.status:
                raise RuntimeError("the application returned without calling start_response")
        except Exception as error:
            self.inbox.end(error)
        finally:
            self.inbox.finish()
