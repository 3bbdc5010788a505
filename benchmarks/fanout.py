"""Fan-out cost in one process: nanoseconds per delivered event, publish plus drain.

Compares, in one run and on the same events:

- ``floor``: append pre-encoded bytes to a ``deque`` per subscriber, drain with one join;
  nothing can deliver bytes to N buffers for less in Python.
- ``ssecast``: ``Broadcaster.publish`` then ``Subscription.read_nowait`` per subscriber.
- ``seed after``: the seed report's fix: serialize once, put ``(type, str)`` on every
  ``queue.Queue``; each consumer formats and encodes its SSE frame.
- ``seed before``: the seed report's bug: the dict on every ``queue.Queue``; each
  consumer serializes it (N serializations for N subscribers).
- ``ssecast keys`` (with ``--keys``): ``ssecast`` with a key of its own on every
  subscription and ``max_subscribers_per_key`` set, which should cost nothing measurable.

Each round publishes a burst of ``--burst`` events, then every subscriber drains what it
has, as a server's writers do between two wake-ups. Each cell is the best of ``--repeat``.

Run: ``python benchmarks/fanout.py`` (``--quick`` for a short run, ``--keys`` to add the
keyed case and its ratio to ``ssecast``).
"""

from __future__ import annotations

import argparse
import json
import queue
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from ssecast import Broadcaster, Subscription

EVENT_TYPE = "price_update"
PAYLOAD = {"ticker": "TSLA", "price": 200.0, "volume": 1_000_000, "venue": "XNAS"}

Round = Callable[[], None]


def floor_case(subscribers: int, burst: int) -> Round:
    frame = f"event: {EVENT_TYPE}\ndata: {json.dumps(PAYLOAD)}\n\n".encode()
    buffers: list[deque[bytes]] = [deque() for _ in range(subscribers)]

    def run() -> None:
        for _ in range(burst):
            for buffer in buffers:
                buffer.append(frame)
        for buffer in buffers:
            b"".join(buffer)
            buffer.clear()

    return run


def publishing(broadcaster: Broadcaster, subs: list[Subscription], burst: int) -> Round:
    """Return a round that publishes `burst` events, then reads every subscription once."""

    def run() -> None:
        publish = broadcaster.publish
        for _ in range(burst):
            publish(EVENT_TYPE, PAYLOAD)
        for sub in subs:
            sub.read_nowait()

    return run


def ssecast_case(subscribers: int, burst: int, *, keys: bool = False) -> Round:
    per_key = 1 if keys else None
    broadcaster = Broadcaster(heartbeat=None, history=1024, max_subscribers_per_key=per_key)
    subs = [broadcaster.subscribe(key=f"user-{n}" if keys else None) for n in range(subscribers)]
    return publishing(broadcaster, subs, burst)


def seed_after_case(subscribers: int, burst: int) -> Round:
    queues: list[queue.Queue[tuple[str, str]]] = [queue.Queue(256) for _ in range(subscribers)]

    def run() -> None:
        for _ in range(burst):
            serialized = json.dumps(PAYLOAD)
            for client in queues:
                client.put_nowait((EVENT_TYPE, serialized))
        for client in queues:
            while not client.empty():
                event_type, serialized = client.get_nowait()
                f"event: {event_type}\ndata: {serialized}\n\n".encode()

    return run


def seed_before_case(subscribers: int, burst: int) -> Round:
    queues: list[queue.Queue[tuple[str, dict[str, object]]]] = [
        queue.Queue(256) for _ in range(subscribers)
    ]

    def run() -> None:
        for _ in range(burst):
            for client in queues:
                client.put_nowait((EVENT_TYPE, PAYLOAD))
        for client in queues:
            while not client.empty():
                event_type, data = client.get_nowait()
                f"event: {event_type}\ndata: {json.dumps(data)}\n\n".encode()

    return run


CASES: dict[str, Callable[[int, int], Round]] = {
    "floor": floor_case,
    "ssecast": ssecast_case,
    "seed after": seed_after_case,
    "seed before": seed_before_case,
}


def measure(case: Callable[[int, int], Round], subscribers: int, burst: int, repeat: int) -> float:
    """Return the best nanoseconds per delivered event over ``repeat`` rounds."""
    run = case(subscribers, burst)
    run()  # warm up: first-time allocations are not what we measure
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - started) / (subscribers * burst))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[10, 100, 1_000, 10_000])
    parser.add_argument("--burst", type=int, default=32, help="events per round (< queue_size)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per cell; the best counts")
    parser.add_argument("--quick", action="store_true", help="3 rounds per cell")
    parser.add_argument("--keys", action="store_true", help="add ssecast with a key per stream")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat

    cases: dict[str, Callable[[int, int], Round]] = (
        {**CASES, "ssecast keys": partial(ssecast_case, keys=True)} if args.keys else CASES
    )
    names = list(cases)
    print(f"ns per delivered event (publish + drain), burst {args.burst}, best of {repeat}")
    header = f"{'subscribers':>11} | " + " | ".join(f"{name:>11}" for name in names)
    header += " | ssecast/floor | seed after/ssecast"
    header += " | keys/ssecast" if args.keys else ""
    print(header)
    print("-" * len(header))
    for subscribers in args.subscribers:
        cells = {name: measure(cases[name], subscribers, args.burst, repeat) for name in names}
        row = f"{subscribers:>11,} | " + " | ".join(f"{cells[name]:>11.1f}" for name in names)
        row += f" | {cells['ssecast'] / cells['floor']:>12.2f}x"
        row += f" | {cells['seed after'] / cells['ssecast']:>17.2f}x"
        if args.keys:
            row += f" | {cells['ssecast keys'] / cells['ssecast']:>11.2f}x"
        print(row)


if __name__ == "__main__":
    main()
