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

A second table reads one event per read, the hardest case for a reader: each round
publishes one event and every subscriber reads it, against the least a thread-safe
reader can cost:

- ``deque+lock``: a ``deque`` per subscriber, appended to under one lock; each reader
  pops under the lock (``with lock: buffer.popleft()``). ``read_nowait`` is ssecast's.
- ``deque+Event``: the same, and a ``threading.Event`` per reader, set by the publisher and
  cleared by the reader, as a blocking reader needs. ``next()`` is ssecast's
  ``for chunk in sub`` (a thread reader).
- ``deque+future``: a task per reader, each awaiting a future that the publisher resolves
  after appending to its ``deque``; ``async for`` is ssecast's task reader. Measured from the
  publish until every task has its event.

Run: ``python benchmarks/fanout.py`` (``--quick`` for a short run, ``--keys`` to add the
keyed case and its ratio to ``ssecast``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
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


def per_read_thread_floor(subscribers: int, blocking: bool) -> Round:
    frame = f"event: {EVENT_TYPE}\ndata: {json.dumps(PAYLOAD)}\n\n".encode()
    lock = threading.Lock()
    buffers: list[deque[bytes]] = [deque() for _ in range(subscribers)]
    events = [threading.Event() for _ in range(subscribers)]

    def run() -> None:
        with lock:
            for buffer in buffers:
                buffer.append(frame)
        if blocking:
            for event in events:
                event.set()
        for buffer, event in zip(buffers, events, strict=True):
            if blocking:
                event.wait()
                event.clear()
            with lock:
                buffer.popleft()

    return run


def per_read_ssecast(subscribers: int, blocking: bool) -> Round:
    broadcaster = Broadcaster(heartbeat=None)
    subs = [broadcaster.subscribe() for _ in range(subscribers)]

    def run() -> None:
        broadcaster.publish(EVENT_TYPE, PAYLOAD)
        if blocking:
            for sub in subs:
                next(sub)
        else:
            for sub in subs:
                sub.read_nowait()

    return run


async def per_read_tasks(subscribers: int, repeat: int, floor: bool) -> float:
    """Return the best ns per delivered event: publish one, until every task has read it."""
    loop = asyncio.get_running_loop()
    received = 0
    everyone: asyncio.Future[None] = loop.create_future()

    def got_one() -> None:
        nonlocal received
        received += 1
        if received == subscribers:
            everyone.set_result(None)

    if floor:
        frame = f"event: {EVENT_TYPE}\ndata: {json.dumps(PAYLOAD)}\n\n".encode()
        lock = threading.Lock()
        buffers: list[deque[bytes]] = [deque() for _ in range(subscribers)]
        waiting: list[asyncio.Future[None] | None] = [None] * subscribers

        async def floor_reader(index: int) -> None:
            buffer = buffers[index]
            while True:
                with lock:
                    frame = buffer.popleft() if buffer else None
                    if frame is None:
                        future = waiting[index] = loop.create_future()
                if frame is None:
                    await future
                    continue
                got_one()

        def publish() -> None:
            woken = []
            with lock:
                for index, buffer in enumerate(buffers):
                    buffer.append(frame)
                    future = waiting[index]
                    if future is not None:
                        waiting[index] = None
                        woken.append(future)
            for future in woken:
                future.set_result(None)

        tasks = [loop.create_task(floor_reader(index)) for index in range(subscribers)]
    else:
        broadcaster = Broadcaster(heartbeat=None)
        subs = [broadcaster.subscribe() for _ in range(subscribers)]

        async def reader(sub: Subscription) -> None:
            async for _ in sub:
                got_one()

        def publish() -> None:
            broadcaster.publish(EVENT_TYPE, PAYLOAD)

        tasks = [loop.create_task(reader(sub)) for sub in subs]
    await asyncio.sleep(0.05)  # every reader waits
    best = float("inf")
    for _ in range(repeat + 1):  # the first round warms up
        received, everyone = 0, loop.create_future()
        started = time.perf_counter_ns()
        publish()
        await everyone
        best = min(best, (time.perf_counter_ns() - started) / subscribers)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return best


def measure_per_read(subscribers: int, repeat: int) -> dict[str, float]:
    """Return the best ns per delivered event of each one-event-per-read case."""
    cells = {
        name: measure(
            lambda count, _, case=case, b=blocking: case(count, b), subscribers, 1, repeat
        )
        for name, case, blocking in [
            ("deque+lock", per_read_thread_floor, False),
            ("read_nowait", per_read_ssecast, False),
            ("deque+Event", per_read_thread_floor, True),
            ("next()", per_read_ssecast, True),
        ]
    }
    cells["deque+future"] = asyncio.run(per_read_tasks(subscribers, repeat, floor=True))
    cells["async for"] = asyncio.run(per_read_tasks(subscribers, repeat, floor=False))
    return cells


def print_per_read(counts: list[int], repeat: int) -> None:
    names = ["deque+lock", "read_nowait", "deque+Event", "next()", "deque+future", "async for"]
    pairs = [
        ("read_nowait", "deque+lock"),
        ("next()", "deque+Event"),
        ("async for", "deque+future"),
    ]
    print(f"\nns per delivered event, one event per read, best of {repeat}")
    header = f"{'subscribers':>11} | " + " | ".join(f"{name:>12}" for name in names)
    header += " | " + " | ".join(f"{mine + '/floor':>17}" for mine, _ in pairs)
    print(header)
    print("-" * len(header))
    for subscribers in counts:
        cells = measure_per_read(subscribers, repeat)
        row = f"{subscribers:>11,} | " + " | ".join(f"{cells[name]:>12.1f}" for name in names)
        row += " | " + " | ".join(f"{cells[mine] / cells[floor]:>16.2f}x" for mine, floor in pairs)
        print(row)


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
    print_per_read([count for count in args.subscribers if count >= 100], repeat)


if __name__ == "__main__":
    main()
