"""EventStream behind `receive` wrappers of several shapes, for the disconnect adversary tests.

Every app mounts ``EventStream`` at ``/events/`` (channel from ``?channel=``) and the
control routes at ``/control/``, on one broadcaster built from the ``SSECAST_TEST_*``
variables (``SSECAST_TEST_HEARTBEAT``: its heartbeat).
The server runs ``apps.disconnect_adversary_app:NAME``:

- ``PLAIN``: no middleware.
- ``PASS``: a pure ASGI middleware whose ``receive`` wrapper just awaits the server's.
- ``SLEEP``: the wrapper yields to the loop (``asyncio.sleep(0)``) around the receive.
- ``TIMEOUT``: the wrapper bounds the receive with ``asyncio.timeout`` (needs a task).
- ``FASTAPI``: FastAPI with an ``@app.middleware("http")`` function (BaseHTTPMiddleware).
- ``REPORTS``: the wrapper reports a disconnect under ``asyncio.timeout`` once it has it.
- ``RAISES``: the wrapper turns ``http.disconnect`` into an exception of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI

from apps.asgi_support import (
    Control,
    broadcaster_from_env,
    channels_from_query,
    lifespan,
    mark_response,
    routed,
)
from ssecast import Broadcaster
from ssecast.asgi import EventStream

broadcaster = broadcaster_from_env()
if "SSECAST_TEST_HEARTBEAT" in os.environ:  # the heartbeat tests' own broadcaster
    broadcaster = Broadcaster(heartbeat=float(os.environ["SSECAST_TEST_HEARTBEAT"]))
events = EventStream(broadcaster, channels_from_query)
control = Control(broadcaster)

Receive = Callable[[], Awaitable[Any]]
Wrap = Callable[[Receive], Receive]


PLAIN = routed(broadcaster, events, control)


def wrapping(wrap: Wrap) -> Callable[[Any, Any, Any], Awaitable[None]]:
    """A pure ASGI middleware around `PLAIN` that wraps each HTTP request's `receive`."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            receive = wrap(receive)
        await PLAIN(scope, receive, send)

    return app


def passing(receive: Receive) -> Receive:
    async def wrapped() -> Any:
        return await receive()

    return wrapped


def sleeping(receive: Receive) -> Receive:
    async def wrapped() -> Any:
        await asyncio.sleep(0)
        message = await receive()
        await asyncio.sleep(0)
        return message

    return wrapped


def bounded(receive: Receive) -> Receive:
    async def wrapped() -> Any:
        async with asyncio.timeout(3600):
            return await receive()

    return wrapped


def reporting(receive: Receive) -> Receive:
    async def wrapped() -> Any:
        message = await receive()
        if message["type"] == "http.disconnect":
            async with asyncio.timeout(1):  # report it somewhere, bounded
                await asyncio.sleep(0)
        return message

    return wrapped


class ClientDisconnectedError(Exception):
    """What the ``RAISES`` wrapper raises instead of answering ``http.disconnect``."""


def raising(receive: Receive) -> Receive:
    async def wrapped() -> Any:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError
        return message

    return wrapped


PASS = wrapping(passing)
SLEEP = wrapping(sleeping)
TIMEOUT = wrapping(bounded)
REPORTS = wrapping(reporting)
RAISES = wrapping(raising)


def app_lifespan(app: Any) -> AbstractAsyncContextManager[None]:
    return lifespan(broadcaster)


FASTAPI = FastAPI(lifespan=app_lifespan)
FASTAPI.mount("/events", events)
FASTAPI.mount("/control", control)

FASTAPI.middleware("http")(mark_response)
