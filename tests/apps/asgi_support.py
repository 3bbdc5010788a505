"""What the ASGI test apps share: settings from the environment, channels, control routes.

The test process drives a server through the control routes: ``POST /control/publish``
publishes events, ``GET /control/stats`` reads ``Broadcaster.stats()`` and ``POST
/control/close`` closes the broadcaster. They are a plain ASGI app, mounted by each app.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ssecast import Broadcaster
from ssecast.asgi import close_on_signal

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

HEADERS = {"Access-Control-Allow-Origin": "*"}
"""The extra response header every app's EventStream adds."""

TOKEN = "letmein"
"""The token that opens the ``private`` channel."""


def broadcaster_from_env() -> Broadcaster:
    """Build the app's broadcaster from the ``SSECAST_TEST_*`` variables the test sets."""
    env = os.environ
    max_subscribers = env.get("SSECAST_TEST_MAX_SUBSCRIBERS")
    return Broadcaster(
        queue_size=int(env.get("SSECAST_TEST_QUEUE_SIZE", "256")),
        history=int(env.get("SSECAST_TEST_HISTORY", "1024")),
        max_subscribers=int(max_subscribers) if max_subscribers else None,
    )


def _query(scope: Any) -> dict[str, str]:
    pairs = parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True)
    return {name: values[-1] for name, values in pairs.items()}


def channels_from_query(scope: Any) -> list[str]:
    """The ``channel`` query parameter; names starting with ``missing`` do not exist."""
    name = _query(scope).get("channel", "default")
    if name.startswith("missing"):
        raise LookupError(name)
    return [name]


def authorize(scope: Any, channels: Sequence[str]) -> bool:
    """Everyone may read every channel but ``private``, which needs ``?token=``."""
    return "private" not in channels or _query(scope).get("token") == TOKEN


async def authorize_async(scope: Any, channels: Sequence[str]) -> bool:
    """The same rule as :func:`authorize`, as a coroutine."""
    return authorize(scope, channels)


@contextlib.asynccontextmanager
async def lifespan(broadcaster: Broadcaster) -> AsyncIterator[None]:
    """Install ssecast's shutdown hook unless ``SSECAST_TEST_SIGNAL_HOOK=0``."""
    if os.environ.get("SSECAST_TEST_SIGNAL_HOOK", "1") == "1":
        async with close_on_signal(broadcaster):
            yield
    else:
        yield


def routed(broadcaster: Broadcaster, events: Any, control: Any) -> Any:
    """Return a plain ASGI app: ``events`` at ``/events/``, ``control`` else, and the lifespan."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            async with lifespan(broadcaster):
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["path"].startswith("/events"):
            await events(scope, receive, send)
        else:
            await control(scope, receive, send)

    return app


class Control:
    """The control routes, as an ASGI app mounted at ``/control``."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"].rstrip("/")
        query = _query(scope)
        if path.endswith("/stats"):
            result: Any = self.broadcaster.stats()._asdict()
        elif path.endswith("/publish"):
            pad = "x" * int(query.get("size", "0"))
            event_type = query.get("type", "tick")
            channel = query.get("channel", "default")
            result = []
            for n in range(int(query.get("count", "1"))):
                data = {"n": n, "pad": pad} if pad else {"n": n}
                event = await self.broadcaster.apublish(event_type, data, channel=channel)
                result.append(event.id)
        elif path.endswith("/close"):
            await self.broadcaster.aclose()
            result = "closed"
        else:
            result = None
        body = json.dumps(result).encode()
        status = 404 if result is None else 200
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def mark_response(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """An ``@app.middleware("http")`` function (a ``BaseHTTPMiddleware``): it marks the answer."""
    response = await call_next(request)
    response.headers["x-middleware"] = "seen"
    return response
