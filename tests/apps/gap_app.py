"""A page running concepts.md's ``ssecast.gap`` snippet, its ``/state``, and a publish route.

The initial price comes from ``GAP_TEST_PRICE``, so that a restarted server has a state the
page can only learn by fetching ``/state`` again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from snippets import ROOT, blocks
from ssecast import Broadcaster
from ssecast.asgi import EventStream, close_on_signal

[SNIPPET] = [b.source for b in blocks(ROOT / "docs" / "concepts.md") if "ssecast.gap" in b.source]
PAGE = f'<!doctype html>\n<p id="prices"></p>\n<script>\n{SNIPPET}</script>\n'

broadcaster = Broadcaster(event_types={"price_update"}, retry=100)
prices = {"TSLA": float(os.environ["GAP_TEST_PRICE"])}


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def state(request: Request) -> JSONResponse:
    return JSONResponse({"prices": prices})


async def publish(request: Request) -> Response:
    prices["TSLA"] = price = float(request.query_params["price"])
    await broadcaster.apublish("price_update", {"ticker": "TSLA", "price": price})
    return Response(status_code=204)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with close_on_signal(broadcaster):
        yield


app = Starlette(
    routes=[
        Route("/", page),
        Route("/state", state),
        Route("/publish", publish, methods=["POST"]),
        Route("/events", EventStream(broadcaster)),
    ],
    lifespan=lifespan,
)
