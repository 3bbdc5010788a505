"""EventStream behind send wrappers that make the request's task take over its writes.

``COUNTING``: Starlette whose ``/events`` stream is wrapped by ``Counting``: a middleware
that numbers each body it passes on in a context variable, and whose ``send`` needs its
task (``asyncio.timeout``) for a body bigger than 1 KiB. Small events go out from loop
callbacks; the first big one makes the task take over.

``BASE``: the same behind Starlette's ``BaseHTTPMiddleware``; ``FASTAPI``: behind FastAPI's
``@app.middleware("http")``. Each mounts ``Control`` at ``/control``, which also has
``/control/thread`` to publish from a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.routing import BaseRoute, Mount

from apps.asgi_support import (
    Control,
    broadcaster_from_env,
    channels_from_query,
    lifespan,
    mark_response,
)
from ssecast.asgi import EventStream

broadcaster = broadcaster_from_env()

SENDS: contextvars.ContextVar[int] = contextvars.ContextVar("sends", default=0)
"""How many bodies this request's ``Counting`` passed on: the number in its comment."""

BIG = 1024
"""Bodies above this size are sent by ``Counting`` under ``asyncio.timeout``."""


class Counting:
    """Prefixes each body with ``: send N cb=C``, N counted in a context variable.

    C is 1 when the body went out from a loop callback (no task), else 0. A body over
    ``BIG`` bytes is sent under ``asyncio.timeout``, which raises outside a task.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting(message: Any) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or not body:
                await send(message)
                return
            if len(body) > BIG:
                async with asyncio.timeout(10):  # RuntimeError outside a task
                    await asyncio.sleep(0)
            count = SENDS.get() + 1
            SENDS.set(count)
            no_task = int(asyncio.current_task() is None)
            await send({**message, "body": b": send %d cb=%d\n\n" % (count, no_task) + body})

        await self.app(scope, receive, counting)


class Thread:
    """``/control/thread?channel=&count=&size=``: publishes from a thread, answers the ids."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
        channel, count = query["channel"], int(query.get("count", "1"))
        pad = "x" * int(query.get("size", "0"))

        def publish() -> list[str]:
            return [
                broadcaster.publish("tick", {"n": n, "pad": pad}, channel=channel).id
                for n in range(count)
            ]

        body = json.dumps(await asyncio.to_thread(publish)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def app_lifespan(app: Any) -> AbstractAsyncContextManager[None]:
    return lifespan(broadcaster)


def _routes() -> list[BaseRoute]:
    return [
        Mount("/events", Counting(EventStream(broadcaster, channels_from_query))),
        Mount("/control/thread", Thread()),
        Mount("/control", Control(broadcaster)),
    ]


class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Any, call_next: Any) -> Any:
        return await call_next(request)


COUNTING = Starlette(routes=_routes(), lifespan=app_lifespan)
BASE = Starlette(routes=_routes(), middleware=[Middleware(Passthrough)], lifespan=app_lifespan)
FASTAPI = FastAPI(routes=_routes(), lifespan=app_lifespan)
FASTAPI.middleware("http")(mark_response)
