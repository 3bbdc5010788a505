"""The ASGI adapter: serve a broadcaster's events to `EventSource` clients over any ASGI server.

Install it with `pip install 'ssecast[asgi]'`; the extra adds nothing, because this module
uses only the standard library. [`EventStream`][ssecast.asgi.EventStream] is a plain ASGI
application, so it mounts in Starlette, FastAPI, Litestar or Quart, or runs on its own:

```python
import contextlib

from starlette.applications import Starlette
from starlette.routing import Route

from ssecast import Broadcaster
from ssecast.asgi import EventStream, close_on_signal

broadcaster = Broadcaster()

@contextlib.asynccontextmanager
async def lifespan(app):
    async with close_on_signal(broadcaster):
        yield

app = Starlette(
    routes=[Route("/events", EventStream(broadcaster, ["prices"]))],
    lifespan=lifespan,
)
```

(FastAPI: `app.mount("/events", EventStream(...))`, read at `/events/`; with a
channels callable, the part of the path after the mount point can name the channel.)

Shutdown. A server stops only when its open responses have ended, and an event stream
never ends by itself, so a plain SSE endpoint hangs shutdown. uvicorn, on SIGTERM or
Ctrl+C, stops accepting, waits for open responses, and only *then* runs the lifespan
shutdown, so closing the broadcaster there comes too late. The setup this module gives:

1. Enter [`close_on_signal`][ssecast.asgi.close_on_signal] in the application's lifespan
   (as above). On SIGINT or SIGTERM it closes the broadcaster, which ends every stream
   with a clean end of response, and then hands the signal on to the server's own
   handler. Nothing is installed at import time.
2. Run uvicorn with a graceful-shutdown timeout, as a backstop for a stream blocked
   writing to a client that stopped reading, which cannot end by itself:

    ```sh
    uvicorn myapp:app --timeout-graceful-shutdown 1
    ```

    When that timeout cancels a stream, [`EventStream`][ssecast.asgi.EventStream] ends the
    response cleanly instead of letting the server log a traceback; uvicorn logs one
    line saying how many tasks it cancelled.

With both, SIGTERM with a thousand open streams stops uvicorn in well under two seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import signal
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from types import FrameType
from typing import Any, TypeAlias

from ssecast._broadcaster import Broadcaster
from ssecast._event import check_channel
from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    ConfigurationError,
    InvalidFieldError,
)
from ssecast._http import (
    OPENING,
    RETRY_AFTER_SECONDS,
    STREAM_HEADERS,
    UNAVAILABLE,
    checked_lifetime,
    per_request,
    refusal,
    request_key,
    resume_id,
    unavailable_reason,
)
from ssecast._pump import Pump
from ssecast._watch import DisconnectWatch

__all__ = ["EventStream", "HealthCheck", "close_on_signal"]

logger = logging.getLogger("ssecast")

# ASGI's types, written here as Starlette's types.py writes them, so that no framework
# is needed.
Scope: TypeAlias = MutableMapping[str, Any]
"""The connection scope an ASGI server passes to the application."""
Message: TypeAlias = MutableMapping[str, Any]
"""One ASGI event, received or sent."""
Receive: TypeAlias = Callable[[], Awaitable[Message]]
"""The awaitable callable that gives the application the next incoming event."""
Send: TypeAlias = Callable[[Message], Awaitable[None]]
"""The awaitable callable that sends an event to the client."""

ChannelsFactory: TypeAlias = Callable[[Scope], Sequence[str]]
"""Picks the channels of one request from its scope; raises `LookupError` for none."""
Authorize: TypeAlias = Callable[[Scope, Sequence[str]], bool | Awaitable[bool]]
"""Decides, sync or async, whether the request may receive these channels."""
KeyFactory: TypeAlias = Callable[[Scope], str | None]
"""Picks the key of one request's subscription from its scope (a user id, say), or `None`."""
LifetimeFactory: TypeAlias = Callable[[Scope], float | None]
"""Picks the seconds one request's stream may last (until its token expires, say), or `None`."""

_ALLOWED_METHOD = "GET"
_LAST_EVENT_ID = b"last-event-id"
# When the server cancels a stream, the closing write gets this long before it is dropped.
_FINAL_WRITE_SECONDS = 0.5


class EventStream:
    """An ASGI application that streams a broadcaster's events to each client that GETs it.

    Each GET subscribes to the channels, answers `200` with `text/event-stream`
    headers and a first comment at once (so proxies and browsers see the stream open),
    then writes each chunk of events as it comes. It resumes after the `Last-Event-ID`
    header, or a `lastEventId` query parameter for clients that cannot set headers.
    When the client disconnects, its subscription is closed at once; when the broadcaster
    closes, or evicts the client for falling behind, the response ends cleanly.

    Chunks are written from the event loop's wake-up callback rather than by waking the
    request's task for each one, which saves most of the Python work of a delivery. The
    `send` runs in a copy of the request's context (context variables set before the
    stream began are seen; ones a middleware sets inside `send` stay there). Middleware
    whose `send` works only inside its task, such as Starlette's `BaseHTTPMiddleware`,
    is detected when such a write raises (on the first, empty, chunk or any later one),
    and the request's task then does the writing, beginning with the refused chunk. (A
    wrapper that passes the message on and only then raises gets that chunk twice: no
    chunk is lost, and which of the two happened cannot be told from outside.)

    Each GET is checked in this order: the method, `channels`, `key`, `authorize`,
    `lifetime`, then the broadcaster's limits. Refusals are short `text/plain` answers:
    `405` (with `Allow`) for a method other than GET, `404` when the `channels` callable
    raises `LookupError`, `400` for an invalid channel name or key (a `str` with a line
    break, say; a key that is not a `str` at all is the app's bug, a `500`), `403` when
    `authorize` says no (nothing is subscribed). With `authorize`, an unknown channel is
    answered as a refusal (`403 forbidden`), so that a caller cannot learn which channels
    exist. When `max_subscribers` (or `max_subscribers_per_key` with its key) are open, or
    the broadcaster is closed, or its backend is unavailable, the refusal is for a while: an
    `EventSource` (a request with `Accept: text/event-stream`) gets a `200` stream holding a
    `retry:` field and one `ssecast.unavailable` event, which makes it reconnect after that
    delay; any other client gets `503` with `Retry-After` (`429` for the per-key limit).
    Exceptions raised by the callables for other reasons propagate to the server as bugs.

    :param broadcaster: where the events come from.
    :param channels: the channels every request receives, or a callable taking the ASGI
        scope and returning them (from the path or query, say); it raises
        `LookupError` for a channel that does not exist.
    :param authorize: called as `authorize(scope, channels)` before subscribing; a
        plain or `async` function returning a bool.
    :param headers: extra response headers for the stream; a name given here replaces
        the default header of that name.
    :param key: the key of each request's subscription (see
        [`Broadcaster.subscribe`][ssecast.Broadcaster.subscribe]), or a callable taking
        the scope and returning it (a user id, say) or `None`.
    :param lifetime: seconds after which each stream ends cleanly (less up to 10% at
        random), so that its client reconnects and resumes with `Last-Event-ID`, or a
        callable taking the scope and returning them (until the client's token expires,
        say) or `None` for no end.
    :raises ConfigurationError: `channels` is a bare `str` or empty, a header
        holds CR, LF or NUL, or `lifetime` is a number out of range.
    :raises InvalidFieldError: a channel name in a fixed `channels` is invalid.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        channels: Sequence[str] | ChannelsFactory = ("default",),
        *,
        authorize: Authorize | None = None,
        headers: Mapping[str, str] | None = None,
        key: str | KeyFactory | None = None,
        lifetime: float | LifetimeFactory | None = None,
    ) -> None:
        self._broadcaster = broadcaster
        self._channels: tuple[str, ...] | ChannelsFactory = (
            channels if callable(channels) else _checked_channels(channels)
        )
        self._authorize = authorize
        self._headers = _response_headers(headers or {})
        self._key = key
        self._lifetime = checked_lifetime(lifetime)

    def __repr__(self) -> str:
        return f"<EventStream {self._channels!r} of {self._broadcaster!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: an HTTP request, or the lifespan when run alone."""
        if scope["type"] != "http":
            await _serve_other(scope, receive, send)
            return
        # Subscribed in a coroutine of its own, whose frame is then freed, and streamed
        # here by the pump, which needs none: a stream may be idle for hours.
        pump = await self._subscribe(scope, send)
        if pump is None:
            return
        watch: DisconnectWatch | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            await send(_chunk(OPENING + pump.read_nowait()))
            # Copied again: what a `send` wrapper set as the response started is seen by
            # the writes from callbacks, as by the task's own sends.
            pump.context = contextvars.copy_context()
            watch = DisconnectWatch(receive, pump, pump.context)
            await pump
            # The broadcaster closed or evicted it (or the client left): end the response
            # so that the client reconnects with Last-Event-ID.
            await send(_end())
        except OSError:
            pass  # ASGI 2.4 servers raise it from send() once the client has gone
        except asyncio.CancelledError:
            # uvicorn's --timeout-graceful-shutdown cancels the responses still open when
            # it expires. Ending ours with its final chunk lets the client see a clean end
            # and reconnect; re-raising would only make the server log a traceback for
            # every stream. A second cancellation still propagates.
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(_FINAL_WRITE_SECONDS):
                    await send(_end())
        finally:
            pump.dispose()
            if watch is not None:
                watch.close()

    async def _subscribe(self, scope: Scope, send: Send) -> Pump | None:
        """Subscribe the request and return its pump, or answer its refusal and return `None`."""
        if scope["method"] != _ALLOWED_METHOD:
            await _refuse(send, 405, "method not allowed; use GET", ("allow", _ALLOWED_METHOD))
            return None
        try:
            channels = self._channels
            if callable(channels):
                channels = _picked(channels(scope))
        except LookupError as error:
            if self._authorize is not None:
                await _refuse(send, 403, "forbidden")  # as if refused: nothing to learn here
            else:
                await _refuse(send, 404, f"no such channel: {error}")
            return None
        except InvalidFieldError as error:
            await _refuse(send, 400, str(error))
            return None
        key = request_key(self._key, scope)
        if self._authorize is not None:
            allowed = self._authorize(scope, channels)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                await _refuse(send, 403, "forbidden")
                return None
        try:
            sub = await self._broadcaster.asubscribe(
                *channels,
                last_event_id=_resume_id(scope),
                key=key,
                lifetime=per_request(self._lifetime, scope),
            )
        except InvalidFieldError as error:  # the key, from the client's own request
            await _refuse(send, 400, str(error))
            return None
        except UNAVAILABLE as error:
            refused = refusal(error, _accept(scope))
            if refused.stream:
                await send({"type": "http.response.start", "status": 200, "headers": self._headers})
                await send({"type": "http.response.body", "body": refused.stream})
            else:
                retry_after = ("retry-after", str(RETRY_AFTER_SECONDS))
                await _refuse(send, refused.status, refused.reason, retry_after)
            return None
        return Pump(sub, send)


class HealthCheck:
    """An ASGI application that answers whether a broadcaster can serve: a readiness probe.

    A GET runs [`Broadcaster.acheck`][ssecast.Broadcaster.acheck] off the event loop and
    answers `200` with `ok`, or `503` with a short reason and `Retry-After` when the
    backend is unreachable or the broadcaster closed; the reason names no host nor
    credentials. Other methods get `405`.

    :param broadcaster: the broadcaster to check.
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self._broadcaster = broadcaster

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request.

        :raises ValueError: the connection is not HTTP (a lifespan, a websocket).
        """
        if scope["type"] != "http":
            raise ValueError(f"HealthCheck serves HTTP, not ASGI {scope['type']!r} connections")
        if scope["method"] != _ALLOWED_METHOD:
            await _refuse(send, 405, "method not allowed; use GET", ("allow", _ALLOWED_METHOD))
            return
        try:
            await self._broadcaster.acheck()
        except (BackendUnavailableError, BroadcasterClosedError) as error:
            reason = unavailable_reason(error)
            await _refuse(send, 503, reason, ("retry-after", str(RETRY_AFTER_SECONDS)))
            return
        await _refuse(send, 200, "ok")


def _picked(channels: Sequence[str]) -> tuple[str, ...]:
    """Check what a channels callable returned."""
    if isinstance(channels, str):
        raise TypeError(
            f"the channels callable returned the str {channels!r}; return a list of names"
        )
    names = tuple(check_channel(name) for name in channels)
    if not names:
        raise LookupError("the channels callable returned none")
    return names


def _chunk(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


def _end() -> Message:
    return {"type": "http.response.body", "body": b"", "more_body": False}


async def _refuse(send: Send, status: int, reason: str, *extra: tuple[str, str]) -> None:
    """Answer with `reason` as a short text (a refusal, or a health check's `ok`)."""
    body = f"{reason}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        # The reason may echo a channel name from the URL; browsers must not sniff it as HTML.
        (b"x-content-type-options", b"nosniff"),
        *((name.encode(), value.encode("latin-1")) for name, value in extra),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _serve_other(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a connection that is not HTTP: the lifespan, when run alone, or a websocket."""
    kind = scope["type"]
    if kind == "lifespan":
        await _lifespan(receive, send)
    elif kind == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": "use GET"})
    else:
        raise ValueError(f"EventStream serves HTTP, not ASGI {kind!r} connections")


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge the lifespan protocol, for an EventStream served on its own."""
    while (await receive())["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _accept(scope: Scope) -> str:
    """Return the request's `Accept` lines as one list: RFC 9110 joins them with commas."""
    return ", ".join(
        value.decode("latin-1") for name, value in scope["headers"] if name == b"accept"
    )


def _resume_id(scope: Scope) -> str | None:
    query = scope.get("query_string", b"")
    return resume_id(_header(scope, _LAST_EVENT_ID), query.decode("latin-1") if query else "")


def _checked_channels(channels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(channels, str):
        raise ConfigurationError(
            f"channels must be a list of names, not the str {channels!r}; "
            f"write [{channels!r}] for one channel"
        )
    names = tuple(check_channel(name) for name in channels)
    if not names:
        raise ConfigurationError("channels must name at least one channel")
    return names


def _response_headers(extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    merged = {name.lower(): (name, value) for name, value in STREAM_HEADERS}
    for name, value in extra.items():
        for text in (name, value):
            if any(bad in text for bad in "\r\n\0"):
                raise ConfigurationError(f"header {name!r}: {value!r} holds CR, LF or NUL")
        merged[name.lower()] = (name, value)
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in merged.values()
    ]


@contextlib.asynccontextmanager
async def close_on_signal(
    broadcaster: Broadcaster,
    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
) -> AsyncIterator[Broadcaster]:
    """Close `broadcaster` when the process gets a stop signal, so that servers can stop.

    Enter it in the application's lifespan, which runs in the server's event loop. For
    each of `signals` whose handler is a Python function (uvicorn's, granian's,
    `hypercorn --workers 0`'s), it installs a handler that schedules `broadcaster.aclose()`
    on the loop and then calls the handler it replaced, so the server goes on to shut down
    as usual, now with every event stream ending at once. Signals left at their default or
    ignored are not touched, and outside the main thread (where Python takes no signal
    handlers) nothing is installed. On leaving the block it puts the replaced handlers back
    and closes the broadcaster.

    In the main thread with none of `signals` handled, it logs a warning, for it can end no
    stream early there: a hypercorn worker process (`--workers 1`, the default, or more)
    leaves the stop signals to its parent, and on Python 3.12+ it then waits for every
    open stream to end before it exits.

    :param broadcaster: the broadcaster to close.
    :param signals: the signals that mean "stop"; SIGINT and SIGTERM by default.
    :returns: an async context manager that yields `broadcaster`.
    """
    loop = asyncio.get_running_loop()
    signals = tuple(signals)
    closing: set[asyncio.Task[None]] = set()

    def close() -> None:
        task = loop.create_task(broadcaster.aclose())
        closing.add(task)
        task.add_done_callback(closing.discard)

    installed: dict[int, tuple[Callable[[int, FrameType | None], Any], Any]] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous = signal.getsignal(sig)
            if callable(previous):
                handler = _chained(loop, close, previous)
                signal.signal(sig, handler)
                installed[sig] = (handler, previous)
        if not installed:
            logger.warning(
                "close_on_signal: no handler for %s in this process, so a stop signal will"
                " not end the event streams (a hypercorn worker: serve with --workers 0,"
                " or give the streams a lifetime)",
                " or ".join(signal.Signals(sig).name for sig in signals),
            )
    try:
        yield broadcaster
    finally:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)
        await broadcaster.aclose()


def _chained(
    loop: asyncio.AbstractEventLoop,
    close: Callable[[], None],
    previous: Callable[[int, FrameType | None], Any],
) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the main thread, possibly while
        # it holds the broadcaster's lock, so the closing is left to the event loop.
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            loop.call_soon_threadsafe(close)
        previous(signum, frame)

    return handler
