"""Sustained publish rate from one process: PostgreSQL against Redis, each against its floor.

For each store, in one run and with the same event:

- ``floor``: the least one durable publish costs from Python on that store: one round trip
  that appends the event and notifies (Redis: ``XADD`` with ``MAXLEN ~``; PostgreSQL: one
  autocommitted ``INSERT ... RETURNING pg_notify(...)``), from one thread.
- ``ssecast sync``: ``Broadcaster.publish`` in a loop, from 1 thread, then from 4.
- ``ssecast async``: ``await Broadcaster.apublish`` in a loop, one task on one event loop.

Nothing subscribes: this measures the publishing side only (the fan-out is
``http_fanout.py``'s). Each cell runs for ``--seconds``.

Run: ``python benchmarks/publish_rate.py`` (needs Redis on 127.0.0.1:6379 and PostgreSQL's
database ``test`` on 127.0.0.1:5432, as the tests do; ``pip install -e '.[redis,postgres]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import redis

from ssecast import Broadcaster
from ssecast.postgres import PostgresBackend
from ssecast.redis import RedisBackend

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "host=127.0.0.1 port=5432 dbname=test"
PAYLOAD = {"ticker": "TSLA", "price": 200.0, "volume": 1_000_000, "venue": "XNAS"}
MAXLEN = 10_000


def rate(publish: Callable[[], object], seconds: float, threads: int = 1) -> float:
    """Return the publishes per second of ``threads`` threads calling ``publish``."""
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(slot: int) -> None:
        while time.monotonic() < deadline:
            publish()
            counts[slot] += 1

    workers = [threading.Thread(target=loop, args=(slot,)) for slot in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.monotonic() - started)


def async_rate(broadcaster: Broadcaster, seconds: float) -> float:
    """Return the publishes per second of one task awaiting ``apublish`` in a loop."""

    async def run() -> float:
        count, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            await broadcaster.apublish("price_update", PAYLOAD)
            count += 1
        return count / (time.monotonic() - started)

    return asyncio.run(run())


def ssecast_cells(broadcaster: Broadcaster, seconds: float) -> dict[str, float]:
    def publish() -> object:
        return broadcaster.publish("price_update", PAYLOAD)

    return {
        "ssecast sync, 1 thread": rate(publish, seconds),
        "ssecast sync, 4 threads": rate(publish, seconds, threads=4),
        "ssecast async, 1 task": async_rate(broadcaster, seconds),
    }


@contextmanager
def redis_store() -> Iterator[tuple[Callable[[], object], Broadcaster]]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    body = json.dumps(PAYLOAD).encode()

    def floor() -> object:
        return client.xadd(f"{prefix}floor", {"d": body}, maxlen=MAXLEN, approximate=True)

    broadcaster = Broadcaster(backend=RedisBackend(REDIS_URL, prefix=prefix, maxlen=MAXLEN))
    try:
        yield floor, broadcaster
    finally:
        broadcaster.close()
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()


@contextmanager
def postgres_store() -> Iterator[tuple[Callable[[], object], Broadcaster]]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(POSTGRES_DSN, autocommit=True)
    admin.execute(
        f"CREATE TABLE {name}_floor (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, d text)"
    )
    insert = f"INSERT INTO {name}_floor (d) VALUES (%s) RETURNING pg_notify('{name}', id::text)"
    floor_connection = psycopg.connect(POSTGRES_DSN, autocommit=True)
    body = json.dumps(PAYLOAD)

    def floor() -> object:
        return floor_connection.execute(insert, (body,)).fetchone()

    broadcaster = Broadcaster(backend=PostgresBackend(POSTGRES_DSN, table=name, maxlen=MAXLEN))
    try:
        yield floor, broadcaster
    finally:
        broadcaster.close()
        floor_connection.close()
        admin.execute(f"DROP TABLE IF EXISTS {name}_floor, {name}")
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    for store, opened in (("Redis", redis_store), ("PostgreSQL", postgres_store)):
        with opened() as (floor, broadcaster):
            broadcaster.publish("price_update", PAYLOAD)  # connect and create, outside the timing
            cells = {"floor, 1 thread": rate(floor, args.seconds)}
            cells.update(ssecast_cells(broadcaster, args.seconds))
        results[store] = cells

    print(f"publishes per second from one process, {args.seconds:g} s per cell")
    header = ["case".rjust(24), "Redis".rjust(8), "/floor", "PostgreSQL", "/floor", "PG/Redis"]
    print(" | ".join(header))
    print("-" * 80)
    redis_cells, pg_cells = results["Redis"], results["PostgreSQL"]
    for case in redis_cells:
        r, p = redis_cells[case], pg_cells[case]
        r_floor, p_floor = redis_cells["floor, 1 thread"], pg_cells["floor, 1 thread"]
        print(
            f"{case:>24} | {r:>8,.0f} | {r / r_floor:>5.2f}x | {p:>10,.0f} | {p / p_floor:>5.2f}x"
            f" | {p / r:>7.2f}x"
        )


if __name__ == "__main__":
    main()
