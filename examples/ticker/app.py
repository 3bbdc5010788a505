"""The ticker demo's ASGI application: a page, its event stream, and its state.

Routes:

- ``GET /``: the page, which listens with ``ssecast.js``, a wrapper of ``EventSource``.
- ``GET /events``: the stream of ``price_update`` and ``alert`` events (ssecast's ASGI
  adapter); it resumes after ``Last-Event-ID``.
- ``GET /static/ssecast.js``: the client helper the page listens with, from the package.
- ``GET /state``: recent prices and alerts, which the page loads at start and after a gap.
- ``GET /history/{ticker}?limit=N``: one ticker's recent prices.

With ``TICKER_REDIS_URL`` set, events come through Redis from a publisher in another
process (see ``__main__.py``), and the state is read from Redis too; otherwise this
process publishes, in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ssecast import Broadcaster
from ssecast.asgi import EventStream, close_on_signal

try:  # the page and the market sit beside this file
    from market import Market
except ImportError:  # pragma: no cover - imported as examples.ticker.app
    from examples.ticker.market import Market

PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
EVENT_TYPES = {"price_update", "alert"}
STATE_KEY = "ticker:state"
MAX_LIMIT = 120


def make_broadcaster(redis_url: str | None) -> Broadcaster:
    """Return the broadcaster every part of the demo uses, in memory or over Redis."""
    backend = None
    if redis_url:
        from ssecast.redis import RedisBackend

        backend = RedisBackend(redis_url, prefix="ticker:")
    return Broadcaster(event_types=EVENT_TYPES, retry=1000, heartbeat=10.0, backend=backend)


async def publish_forever(broadcaster: Broadcaster, market: Market, rate: float) -> None:
    """Publish the market's moves, ``rate`` steps a second, until cancelled."""
    while True:
        for event_type, channel, data in market.step():
            await broadcaster.apublish(event_type, data, channel=channel)
        await asyncio.sleep(1 / rate)


def create_app() -> Starlette:
    """Build the app from the environment (``TICKER_REDIS_URL``, ``TICKER_RATE``)."""
    redis_url = os.environ.get("TICKER_REDIS_URL") or None
    rate = float(os.environ.get("TICKER_RATE", "5"))
    broadcaster = make_broadcaster(redis_url)
    market = Market()

    async def state() -> dict[str, Any]:
        if redis_url is None:
            return market.snapshot()
        import redis.asyncio

        async with redis.asyncio.Redis.from_url(redis_url) as client:
            raw = await client.get(STATE_KEY)
        return json.loads(raw) if raw else {"prices": {}, "alerts": []}

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def state_route(request: Request) -> JSONResponse:
        return JSONResponse(await state(), headers={"Cache-Control": "no-cache"})

    async def history_route(request: Request) -> JSONResponse:
        ticker = request.path_params["ticker"]
        raw_limit = request.query_params.get("limit", "50")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
        prices = (await state())["prices"]
        if ticker not in prices:
            raise HTTPException(404, f"unknown ticker; known: {', '.join(sorted(prices))}")
        return JSONResponse({"ticker": ticker, "prices": prices[ticker][-int(raw_limit) :]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with close_on_signal(broadcaster):
            publisher = None
            if redis_url is None:
                publisher = asyncio.create_task(publish_forever(broadcaster, market, rate))
            try:
                yield
            finally:
                if publisher is not None:
                    publisher.cancel()
                await broadcaster.aclose()

    return Starlette(
        routes=[
            Route("/", page),
            Route("/state", state_route),
            Route("/history/{ticker}", history_route),
            Route("/events", EventStream(broadcaster, ["prices", "alerts"])),
            # ssecast.js, from the installed ssecast package.
            Mount("/static", StaticFiles(packages=[("ssecast", "static")])),
        ],
        lifespan=lifespan,
    )
