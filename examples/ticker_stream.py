"""Publish a few stock prices from a thread and print the SSE stream two clients receive.

Run it from the root of a clone of the repository (no extra needed)::

    python3 -m venv .venv && .venv/bin/pip install -e .
    .venv/bin/python examples/ticker_stream.py

It prints the bytes a browser would receive, then the broadcaster's counters, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time

from ssecast import Broadcaster

TICKERS = {"TSLA": 200.0, "AAPL": 190.0, "MSFT": 410.0}


def publish_prices(broadcaster: Broadcaster, count: int, interval: float) -> None:
    """Publish ``count`` price updates, and an alert whenever a price moves over 1%."""
    prices = dict(TICKERS)
    rng = random.Random(7)
    for _ in range(count):
        ticker = rng.choice(list(prices))
        old = prices[ticker]
        prices[ticker] = new = round(old * (1 + rng.uniform(-0.015, 0.015)), 2)
        broadcaster.publish("price_update", {"ticker": ticker, "price": new}, channel="prices")
        if abs(new - old) / old > 0.01:
            message = f"{ticker} moved {100 * (new - old) / old:+.1f}%"
            broadcaster.publish("alert", {"ticker": ticker, "message": message}, channel="alerts")
        time.sleep(interval)
    broadcaster.close()


def read_in_thread(broadcaster: Broadcaster) -> None:
    """Print what a WSGI-style client gets: a thread blocking on its subscription."""
    with broadcaster.subscribe("prices", "alerts") as sub:
        for chunk in sub:
            print(f"[thread client] {chunk.decode()!r}")


async def read_in_task(broadcaster: Broadcaster) -> None:
    """Print what an ASGI-style client gets: a task awaiting its subscription."""
    async with broadcaster.subscribe("alerts") as sub:
        async for chunk in sub:
            print(f"[async client]  {chunk.decode()!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="price updates to publish")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between them")
    args = parser.parse_args()

    broadcaster = Broadcaster(retry=2000)
    # Subscribe before publishing: a subscription is live as soon as subscribe() returns.
    reader = threading.Thread(target=read_in_thread, args=(broadcaster,))
    reader.start()

    async def run() -> None:
        task = asyncio.create_task(read_in_task(broadcaster))
        await asyncio.sleep(0.05)  # let both clients subscribe
        await asyncio.to_thread(publish_prices, broadcaster, args.count, args.interval)
        await task

    asyncio.run(run())
    reader.join()
    print(broadcaster.stats())


if __name__ == "__main__":
    main()
