"""A Starlette worker serving ``/events?channel=...`` from a PostgreSQL-backed broadcaster."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.routing import Route

from apps.postgres_support import broadcaster_from_env
from ssecast.asgi import EventStream, close_on_signal

broadcaster = broadcaster_from_env()


def channels(scope: Any) -> list[str]:
    """Every ``channel`` query parameter, or ``default``."""
    query = parse_qs(scope.get("query_string", b"").decode())
    return query.get("channel", ["default"])


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Close the broadcaster on SIGTERM, so that open streams end and uvicorn can stop."""
    async with close_on_signal(broadcaster):
        yield


app = Starlette(routes=[Route("/events", EventStream(broadcaster, channels))], lifespan=lifespan)
