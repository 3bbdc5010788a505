"""What the Prometheus collector costs: a scrape, and publishing between scrapes.

Two tables, from one run:

- ``scrape``: milliseconds for one scrape (``generate_latest``, which collects the
  registry) of a broadcaster with ``--subscribers`` open subscriptions and a registered
  ``ssecast.prometheus.Collector``, against a floor: the same eight samples kept by
  prometheus_client's own ``Gauge`` and ``Counter`` objects. Target: under 10 ms.
- ``publish``: nanoseconds per delivered event (a burst of publishes, then every subscriber
  drains) on a broadcaster with a registered collector and on one without, measured in
  alternating rounds, against the floor of appending pre-encoded bytes to a ``deque`` per
  subscriber. Target: no measurable difference, since the collector counts nothing.

Each cell is the median (and best) of ``--repeat`` measurements.

Run: ``python benchmarks/scrape.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

from fanout import EVENT_TYPE, PAYLOAD, floor_case, publishing
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ssecast import Broadcaster
from ssecast.prometheus import Collector

CHANNELS = 100


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter_ns()
    run()
    return time.perf_counter_ns() - started


def scrape_rows(subscribers: int, repeat: int) -> list[tuple[str, float, float]]:
    with Broadcaster(heartbeat=None) as broadcaster:
        subs = [broadcaster.subscribe(f"c{n % CHANNELS}") for n in range(subscribers)]
        for n in range(CHANNELS):
            broadcaster.publish(EVENT_TYPE, PAYLOAD, channel=f"c{n}")
        ours = CollectorRegistry()
        ours.register(Collector(broadcaster, labels={"broadcaster": "prices"}))
        floor = CollectorRegistry()
        Gauge("ssecast_subscribers", "x", ["broadcaster"], registry=floor).labels("p").set(1)
        for name in ("published", "delivered", "evicted", "rejected", "revoked", "expired"):
            Counter(f"ssecast_{name}", "x", ["broadcaster"], registry=floor).labels("p").inc()
        Gauge("ssecast_backend_up", "x", ["broadcaster"], registry=floor).labels("p").set(1)
        rows = []
        for label, registry in (("floor: prometheus_client metrics", floor), ("Collector", ours)):
            times = [timed(partial(generate_latest, registry)) / 1e6 for _ in range(repeat)]
            rows.append((label, statistics.median(times), min(times)))
        assert len(subs) == subscribers
    return rows


def fanout_round(broadcaster: Broadcaster, burst: int, subscribers: int) -> Callable[[], None]:
    return publishing(broadcaster, [broadcaster.subscribe() for _ in range(subscribers)], burst)


def publish_rows(subscribers: int, burst: int, repeat: int) -> list[tuple[str, float, float]]:
    registry = CollectorRegistry()
    with Broadcaster(heartbeat=None) as plain, Broadcaster(heartbeat=None) as collected:
        registry.register(Collector(collected))
        cases = {
            "floor: deque per subscriber": floor_case(subscribers, burst),
            "Broadcaster": fanout_round(plain, burst, subscribers),
            "Broadcaster + Collector": fanout_round(collected, burst, subscribers),
        }
        for run in cases.values():
            run()  # warm up
        times: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(repeat):  # alternating, so that drift on a shared machine hits all
            for label, run in cases.items():
                times[label].append(timed(run) / (burst * subscribers))
        generate_latest(registry)  # the collector works; it was simply not scraped meanwhile
    return [(label, statistics.median(ns), min(ns)) for label, ns in times.items()]


def table(title: str, unit: str, rows: list[tuple[str, float, float]]) -> str:
    floor = rows[0][1]
    lines = [f"{title:<34} | {'median ' + unit:>12} | {'best ' + unit:>10} | {'x floor':>7}"]
    lines.append("-" * len(lines[0]))
    for label, median, best in rows:
        lines.append(f"{label:<34} | {median:>12.3f} | {best:>10.3f} | {median / floor:>7.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--fanout-subscribers", type=int, default=1_000)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeat = 20 if args.quick else args.repeat
    print(
        table(
            f"scrape, {args.subscribers:,} subscribers", "ms", scrape_rows(args.subscribers, repeat)
        )
    )
    print()
    rows = publish_rows(args.fanout_subscribers, args.burst, max(5, repeat // 4))
    print(table(f"publish, {args.fanout_subscribers:,} subscribers", "ns/ev", rows))
    plain, collected = rows[1][1], rows[2][1]
    change = 100 * (collected - plain) / plain
    print(f"\nCollector registered vs not: {change:+.1f}% per delivered event")


if __name__ == "__main__":
    main()
