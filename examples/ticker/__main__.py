"""Run the live ticker demo.

From the root of a clone of the repository, then open http://127.0.0.1:8000::

    python3 -m venv .venv && .venv/bin/pip install -e '.[demo]'
    .venv/bin/python examples/ticker

or watch its raw stream::

    curl -N http://127.0.0.1:8000/events

Flags:

- ``--redis redis://127.0.0.1:6379/0 --workers 3``: several uvicorn workers, fed through
  Redis by a publisher in this process, so every worker streams the same events.
- ``--rate 5``: price moves per second.
- ``--host``, ``--port``: where to listen (127.0.0.1:8000).

Needs the ``demo`` extra, plus ``redis`` for ``--redis`` (``pip install -e '.[demo,redis]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import uvicorn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from app import STATE_KEY, make_broadcaster  # noqa: E402  (after the path is set)
from market import Market  # noqa: E402


def publish_through_redis(redis_url: str, rate: float, stop: threading.Event) -> threading.Thread:
    """Start a thread that publishes the market's moves to Redis, and keeps its state there.

    Everything it needs is imported and made here, before the thread starts, so that it
    imports nothing while uvicorn starts: under coverage.py, as in the tests, a change to
    ``sys.path`` meanwhile can drop a module the thread is importing (coveragepy#2247),
    and the publisher dies.
    """
    import redis

    broadcaster = make_broadcaster(redis_url)
    market = Market()
    client = redis.Redis.from_url(redis_url)

    def publish() -> None:
        try:
            while not stop.wait(1 / rate):
                for event_type, channel, data in market.step():
                    broadcaster.publish(event_type, data, channel=channel)
                client.set(STATE_KEY, json.dumps(market.snapshot()))
        finally:
            client.close()
            broadcaster.close()

    thread = threading.Thread(target=publish, name="ticker publisher", daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description="ssecast's live ticker demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=5.0, help="price moves per second")
    parser.add_argument("--redis", metavar="URL", help="share events through this Redis")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (with --redis)")
    args = parser.parse_args()
    if args.workers > 1 and not args.redis:
        parser.error("--workers needs --redis: in memory, each worker would have its own market")
    if not args.rate > 0:
        parser.error("--rate must be positive")

    os.environ["TICKER_RATE"] = str(args.rate)
    stop = threading.Event()
    publisher = None
    if args.redis:
        os.environ["TICKER_REDIS_URL"] = args.redis
        publisher = publish_through_redis(args.redis, args.rate, stop)
    print(f"ssecast ticker demo on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(
            "app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            timeout_graceful_shutdown=1,
            # No app_dir: HERE is on sys.path already, and uvicorn would insert it again
            # while the publisher runs (see publish_through_redis).
        )
    finally:
        stop.set()
        if publisher is not None:
            publisher.join(timeout=5)


if __name__ == "__main__":
    main()
