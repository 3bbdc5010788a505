"""EventStream behind middleware whose ``send`` only works inside the request's task.

``FASTAPI``: FastAPI with an ``@app.middleware("http")`` function (Starlette's
``BaseHTTPMiddleware``, built on anyio). ``TIMEOUT``: a plain ASGI middleware that bounds
each ``send`` with ``asyncio.timeout``. uvicorn serves ``apps.middleware_app:FASTAPI`` or
``apps.middleware_app:TIMEOUT``.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from apps.asgi_support import (
    Control,
    broadcaster_from_env,
    channels_from_query,
    lifespan,
    mark_response,
)
from ssecast.asgi import EventStream

broadcaster = broadcaster_from_env()


def app_lifespan(app: Any) -> AbstractAsyncContextManager[None]:
    return lifespan(broadcaster)


FASTAPI = FastAPI(lifespan=app_lifespan)
FASTAPI.mount("/events", EventStream(broadcaster, channels_from_query))
FASTAPI.mount("/control", Control(broadcaster))

FASTAPI.middleware("http")(mark_response)


class SendTimeout:
    """Fails any ``send`` that takes longer than 10 s, as some servers' wrappers do."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def bounded_send(message: Any) -> None:
            async with asyncio.timeout(10):
                await send(message)

        await self.app(scope, receive, bounded_send)


TIMEOUT = SendTimeout(
    Starlette(
        routes=[
            Mount("/events", EventStream(broadcaster, channels_from_query)),
            Mount("/control", Control(broadcaster)),
        ],
        lifespan=app_lifespan,
    )
)
