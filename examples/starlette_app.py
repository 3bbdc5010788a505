"""Live stock prices in the browser: Starlette, ssecast's ASGI adapter and ``EventSource``.

Run it from the root of a clone of the repository (the ``demo`` extra is uvicorn and
Starlette)::

    python3 -m venv .venv && .venv/bin/pip install -e '.[demo]'
    .venv/bin/uvicorn --app-dir examples starlette_app:app --timeout-graceful-shutdown 1

then open http://127.0.0.1:8000/ or watch the raw stream::

    curl -N http://127.0.0.1:8000/events

A background task publishes a price every half second. Ctrl+C stops the server at once:
``close_on_signal`` closes the broadcaster, which ends every open stream cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from ssecast import Broadcaster
from ssecast.asgi import EventStream, close_on_signal

broadcaster = Broadcaster(event_types=["price"], retry=2000)

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>ssecast prices</title>
<h1>Prices</h1>
<ul id="prices"></ul>
<script>
  const list = document.getElementById("prices");
  const source = new EventSource("/events");
  source.addEventListener("price", (event) => {
    const {ticker, price} = JSON.parse(event.data);
    const item = document.getElementById(ticker) || list.appendChild(document.createElement("li"));
    item.id = ticker;
    item.textContent = `${ticker} ${price.toFixed(2)} (event ${event.lastEventId})`;
  });
</script>
"""


async def homepage(request: object) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def publish_prices() -> None:
    prices = {"TSLA": 200.0, "AAPL": 190.0, "MSFT": 410.0}
    while True:
        ticker = random.choice(list(prices))
        prices[ticker] *= 1 + random.uniform(-0.01, 0.01)
        await broadcaster.apublish("price", {"ticker": ticker, "price": prices[ticker]})
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with close_on_signal(broadcaster):
        publisher = asyncio.create_task(publish_prices())
        yield
        publisher.cancel()


app = Starlette(
    routes=[
        Route("/", homepage),
        # A Route whose endpoint is an ASGI app passes every method through; EventStream
        # answers anything but GET with 405.
        Route("/events", EventStream(broadcaster)),
    ],
    lifespan=lifespan,
)
