"""HTTP fan-out over loopback: ssecast's ASGI adapter against its peers and a floor, in one run.

For each server and each client count C, a fresh server process (pinned to CPU 0) and
this load client (pinned to CPU 1) go through:

1. memory: the server's RSS (``/proc/<pid>/status`` VmRSS) with no client, then with C
   idle SSE connections; the difference divided by C is the memory per idle connection;
2. ``rate``: a fixed-rate run (``--rate`` events/s, 100 by default) for ``--duration``
   seconds, published by a task of the server's event loop (``await asyncio.sleep``
   until each event is due): when the loop is overloaded, the publisher falls behind;
   ``thread`` (label ``T``): the same rate kept by a thread, with ``time.sleep``.
   ssecast's thread-safe ``Broadcaster.publish`` is called from it directly; the
   others get each event through ``loop.call_soon_threadsafe``, as they must;
3. ``max``: saturation, the publisher publishes as fast as it can for ``--duration``
   seconds, yielding to the event loop after every event (``await asyncio.sleep(0)``):
   events come one at a time, as from a loop that publishes each as it arrives;
4. ``burst``: saturation again, yielding after every ``--burst`` events (10 by
   default), as from a publisher that receives events in batches; a server that
   writes what is pending in one chunk per client gains here, one that writes each
   event on its own does not.

Each server runs its own publisher in its own process, started by ``POST /start``
once all C clients are connected, so all are driven the same way. Every event carries
``{"run", "seq", "t"}``: ``t`` is ``time.time_ns()`` at publish (one machine, one clock),
``seq`` a per-channel sequence number. Reported per case: the publisher's rate, the
events/s delivered (client side, summed over connections, over the time from the start
until the last event arrived), p50/p99 latency, missed events (sequence gaps plus events
never received within the grace period), server disconnects, memory per idle
connection, and the CPU used by the client and by the server during the run (a client
near 100% would mean the client, not the server, is the limit). The server's CPU time
per delivered event is the figure least disturbed by other load on the machine. With
``--repeat N`` each run is done N times on the same server and the one that delivered
most is kept. With ``--rounds N`` the whole set of servers is measured N times in turn,
so that a machine whose speed drifts over minutes slows every server alike: the run that
delivered most is kept for each case, and a note gives each round's ``%floor`` (to that
round's floor) and their median.

Ratios, to rows of the same run, C and mode: ``%floor`` (delivered/s) and ``p99/floor``
(p99) to ``floor``'s; ``cpu/asgi``, the server CPU per delivered event over
``asgi-floor``'s on the same ASGI server: what the library costs over the least any
library can on that server. After the main table, a short one per ASGI server for the
``rate`` runs: KiB per idle connection and CPU us per delivery, and what they give,
streams per GiB of server memory (1 GiB over KiB/conn) and deliveries per core-second
(1e6 over us/delivery). ``--json`` keeps every figure of both.

Servers (``--servers``):

- ``floor``: asyncio.start_server writing each pre-encoded frame to every transport.
- ``asgi-floor``: a bare ASGI app on the ASGI server: it keeps each stream's ``send`` and
  its publish awaits every one in turn with the frame encoded once (no queue, no eviction).
- ``ssecast``: ``ssecast.asgi.EventStream`` as the whole ``/events`` app.
- ``sse-starlette-queues``: sse-starlette with one ``asyncio.Queue`` per client.
- ``sse-starlette-broadcaster``: sse-starlette with ``broadcaster.Broadcast("memory://")``.
- ``ssecast-starlette`` (not in the default set): the adapter routed in Starlette.
- ``ssecast-fastapi`` (not in the default set): the adapter in FastAPI with
  ``app.mount("/events", ...)``, as docs/frameworks/fastapi.md does; the clients ask for
  ``/events/``, where a mount answers.
- ``ssecast-ops`` (not in the default set; needs prometheus-client): ``ssecast`` as an
  operator runs it: a ``ssecast.prometheus.Collector`` registered on a registry that a
  task of the server's loop scrapes once a second (``generate_latest``, the text a
  ``/metrics`` endpoint would answer), and ``key=`` on every stream (the client's port:
  one key per connection). Run it with ``ssecast`` to see what the metrics and keys cost.
- ``ssecast-redis`` (not in the default set; needs Redis at 127.0.0.1:6379, or
  ``HTTP_FANOUT_REDIS_URL``): two uvicorn workers with ``RedisBackend`` holding the
  clients (spread over both), and a third process publishing through Redis.
- ``ssecast-postgres`` (not in the default set; needs PostgreSQL's database ``test`` at
  127.0.0.1:5432, or ``HTTP_FANOUT_POSTGRES_DSN``): the same with ``PostgresBackend``, on a
  table of its own that the publisher drops when it stops.
- ``flask-sse`` (not in the default set; needs Redis too): flask-sse on two gunicorns
  with one gevent worker each (the clients spread over both), and a third process
  publishing with ``sse.publish`` in an app context. flask-sse subscribes to Redis once
  per client: before each run the benchmark waits until ``PUBSUB NUMSUB`` counts all.

In the two Redis deployments all three processes are pinned to CPU 0, like every other
server; ``--publisher-cpu client`` puts the publisher on CPU 1 with the load client
instead, leaving CPU 0 to the two workers that hold the connections.
``redis conn`` is the deployment's connections in ``CLIENT LIST`` (found by client name)
at the end of each run's publishing, and the ratio of ssecast-redis's saturated
throughput to ssecast's (memory backend) is printed when both ran. Each deployment has
its own Redis prefix (and flask-sse its own channel); nothing is flushed.

ASGI servers (``--asgi-servers NAME [NAME ...]``): ``asgi-floor``, ``ssecast``,
``ssecast-starlette``, ``ssecast-fastapi`` and ``ssecast-ops`` run on each named, each pair
its own row (``ssecast@hypercorn``; no suffix on the default); the other deployments run on
uvicorn as before. ``uvicorn`` (the default: asyncio and h11, neither uvloop nor httptools
assumed), ``uvicorn-httptools``, ``uvicorn-uvloop``, ``uvicorn-standard`` (uvloop and
httptools, as ``uvicorn[standard]`` installs them; ``--standard`` is its alias),
``hypercorn`` and ``hypercorn-uvloop`` (its asyncio worker, in the server process),
``granian`` and ``granian-uvloop`` (its ASGI interface: one worker process forked from the
server process, one runtime thread; memory and CPU are the worker's, whose pid ``/stats``
answers).

Run: ``python benchmarks/http_fanout.py`` (a few minutes); ``--quick`` for a short
run; ``--json out.json`` and ``--plot out.png`` (needs matplotlib) to keep the results.
``--ten-thousand``: 10,000 connections at 10 events/s, mode ``rate``, for ``floor``,
``asgi-floor`` and ``ssecast``, with a ``--time-cap`` of at least 900 s (the client opens
them 500 at a time; its and the servers' open-file limits must allow 10,100).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from _loadclient import (
    Clients,
    Target,
    http_json,
    rss_kib,
    wait_for_subscribers,
    wait_until_up,
)
from _report import MODE_ORDER, asgi_table, redis_hop, table
from _report import plot as draw

HERE = Path(__file__).resolve().parent
SERVE = HERE / "_servers" / "serve.py"


@dataclass(frozen=True)
class Deployment:
    """The processes of one server under test, each a ``_servers/serve.py`` app name.

    The clients are spread over the ``events`` processes, whose memory and CPU are the
    server's. The first of them runs the publisher, unless ``publisher`` names a separate
    process (for a backend that carries events between processes, such as Redis).
    """

    label: str
    events: tuple[str, ...]
    publisher: str | None = None
    redis_name: str | None = None
    """For a deployment on Redis: its connections' client name, less the run's prefix.

    Before each run the benchmark counts them in ``CLIENT LIST``."""
    pubsub: bool = False
    """Each client SUBSCRIBEs to ``<prefix>bench`` on its own connection: before a run the
    benchmark waits until Redis counts them all (``PUBSUB NUMSUB``), and a closed client
    stays subscribed until the next event is written to it."""
    asgi: bool = False
    """One ASGI app in one process: it runs on each of ``--asgi-servers`` in turn."""
    events_path: str = "/events"


SERVERS = {
    "floor": Deployment("floor (asyncio, transport.write)", ("floor",)),
    "asgi-floor": Deployment("bare ASGI app, send to every stream", ("asgi-floor",), asgi=True),
    "ssecast": Deployment("ssecast EventStream", ("ssecast",), asgi=True),
    "ssecast-starlette": Deployment(
        "ssecast routed in Starlette", ("ssecast-starlette",), asgi=True
    ),
    "ssecast-fastapi": Deployment(
        "ssecast mounted in FastAPI", ("ssecast-fastapi",), asgi=True, events_path="/events/"
    ),
    "ssecast-ops": Deployment(
        "ssecast + Collector scraped 1/s, key per stream", ("ssecast-ops",), asgi=True
    ),
    "sse-starlette-queues": Deployment(
        "sse-starlette + Queue per client", ("sse-starlette-queues",)
    ),
    "sse-starlette-broadcaster": Deployment(
        "sse-starlette + broadcaster", ("sse-starlette-broadcaster",)
    ),
    "ssecast-redis": Deployment(
        "ssecast + RedisBackend: 2 workers, 1 publisher",
        ("ssecast-redis-worker", "ssecast-redis-worker"),
        publisher="ssecast-redis-publisher",
        redis_name="ssecast:",
    ),
    "ssecast-postgres": Deployment(
        "ssecast + PostgresBackend: 2 workers, 1 publisher",
        ("ssecast-postgres-worker", "ssecast-postgres-worker"),
        publisher="ssecast-postgres-publisher",
    ),
    "flask-sse": Deployment(
        "flask-sse gunicorn+gevent: 2 workers, 1 publisher",
        ("flask-sse-worker", "flask-sse-worker"),
        publisher="flask-sse-publisher",
        redis_name="flask-sse:",
        pubsub=True,
    ),
}
REDIS_URL = os.environ.get("HTTP_FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_SERVERS = [
    "floor",
    "asgi-floor",
    "ssecast",
    "sse-starlette-queues",
    "sse-starlette-broadcaster",
]
ASGI_SERVERS = [
    "uvicorn",
    "uvicorn-httptools",
    "uvicorn-uvloop",
    "uvicorn-standard",
    "hypercorn",
    "hypercorn-uvloop",
    "granian",
    "granian-uvloop",
]
"""As ``_servers/_control.py``'s ``ASGI_SERVERS`` names them; the first is the default."""
SERVER_CPU = 0
CLIENT_CPU = 1


@dataclass(frozen=True)
class Options:
    clients: list[int]
    servers: list[str]
    rate: float
    duration: float
    burst: int
    grace: float
    modes: list[str]
    repeat: int
    time_cap: float
    profile: str | None
    asgi_servers: list[str] = dataclasses.field(default_factory=lambda: ASGI_SERVERS[:1])
    publisher_cpu: int = 0
    """Where a deployment's separate publisher process runs (CPU 0: with the workers)."""
    rounds: int = 1
    """How many times every case is measured, in turn (see ``--rounds``)."""

    def cases(self) -> list[tuple[str, str | None]]:
        """Return each (server, ASGI server) pair to measure; ``None``: the server's own."""
        return [
            (name, asgi)
            for name in self.servers
            for asgi in (self.asgi_servers if SERVERS[name].asgi else [None])
        ]

    def label(self, mode: str) -> str:
        labels = {"rate": f"{self.rate:g}/s", "thread": f"{self.rate:g}/s T", "max": "max"}
        return labels.get(mode, f"max/{self.burst}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def row_name(name: str, asgi: str | None) -> str:
    """Return the table's server name: ``ssecast``, or ``ssecast@hypercorn`` off the default."""
    return name if asgi in (None, ASGI_SERVERS[0]) else f"{name}@{asgi}"


@contextlib.contextmanager
def deployed(name: str, log_dir: Path, pin: bool, options: Options, asgi: str | None = None):
    """Start a deployment's processes on free ports; stop each by pid however the block ends.

    ``asgi`` names the ASGI server of an ``asgi`` deployment (``HTTP_FANOUT_ASGI``).
    """
    deployment = SERVERS[name]
    env = dict(os.environ)
    # Processes of one deployment share a Redis prefix; no two deployments do.
    prefix = f"http_fanout:{os.getpid()}:{time.monotonic_ns()}:"
    env["HTTP_FANOUT_REDIS_PREFIX"] = prefix
    if options.profile:
        env["HTTP_FANOUT_PROFILE"] = options.profile
    env.pop("HTTP_FANOUT_ASGI", None)
    if asgi is not None:
        env["HTTP_FANOUT_ASGI"] = asgi
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for app in (*deployment.events, *filter(None, [deployment.publisher])):
            port = free_port()
            command = [sys.executable, str(SERVE), app, "--port", str(port)]
            if pin:
                cpu = options.publisher_cpu if app == deployment.publisher else SERVER_CPU
                command += ["--cpu", str(cpu)]
            with (log_dir / f"{app}-{port}.log").open("ab") as log:
                processes.append(
                    subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env
                    )
                )
            ports.append(port)
        count = len(deployment.events)
        target = Target(
            "127.0.0.1",
            event_ports=tuple(ports[:count]),
            control_port=ports[-1] if deployment.publisher else ports[0],
            pids=tuple(process.pid for process in processes[:count]),
            events_path=deployment.events_path,
        )
        yield target, processes, prefix
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                print(f"  pid {process.pid} did not stop in 5 s: killed", file=sys.stderr)
                process.kill()
                process.wait()


def fill_limit(count: int) -> float:
    """Seconds to open ``count`` connections: a minute, plus a second per 100 (10,000: 160 s)."""
    return 60 + count / 100


async def measure_server(
    rows: list[dict[str, Any]],
    name: str,
    count: int,
    options: Options,
    log_dir: Path,
    pin: bool,
    asgi: str | None = None,
) -> None:
    """Run the memory measurement and every mode against a fresh server, adding to ``rows``.

    Each row is added as soon as it is measured, so a time cap keeps what was done.
    """
    deployment = SERVERS[name]
    names = {"server": row_name(name, asgi), "deployment": name, "asgi_server": asgi}
    with deployed(name, log_dir, pin, options, asgi) as (
        target,
        processes,
        prefix,
    ):
        await wait_until_up(target, limit=20)
        target = await worker_pids(target)
        redis = RedisWatch(deployment, prefix) if deployment.redis_name else None
        clients = Clients(target)
        try:
            # Warm up: the first request imports and allocates what every later one reuses.
            await clients.fill(1)
            await wait_for_subscribers(target, 1, limit=5)
            clients.close_all()
            if deployment.pubsub:
                # The closed client stays subscribed until an event is written to it.
                await clients.run(50, 0.2, 1, 0.5)
            await wait_for_subscribers(target, 0, limit=5)
            await asyncio.sleep(0.5)
            idle_before = rss_kib(target.pids)
            await clients.fill(count, limit=fill_limit(count))
            subscribed = await wait_for_subscribers(target, count, limit=30 + count / 500)
            await asyncio.sleep(1.0)
            idle_after = rss_kib(target.pids)
            memory = {
                "rss_idle_0_kib": idle_before,
                "rss_idle_c_kib": idle_after,
                "kib_per_idle_connection": (idle_after - idle_before) / count,
                "connected": len(clients.open),
                "subscribed": subscribed,
                "failed_connects": clients.failed_connects,
            }
            for mode in options.modes:
                rate = options.rate if mode in ("rate", "thread") else 0.0
                burst = options.burst if mode == "burst" else 1
                thread = mode == "thread"
                best: dict[str, Any] | None = None
                for _ in range(options.repeat):
                    await clients.fill(count, limit=fill_limit(count))
                    await wait_for_subscribers(target, count, limit=10 + count / 500)
                    extra: dict[str, Any] = {}
                    if redis is not None and deployment.pubsub:
                        extra["redis_subscribed"] = await redis.wait_subscribed(count, 10)
                    scrapes = await scrape_count(target)
                    result = await clients.run(rate, options.duration, burst, options.grace, thread)
                    if scrapes is not None:
                        extra["scrapes"] = (await scrape_count(target) or 0) - scrapes
                    if redis is not None:
                        # Now, when every process has connected: the publisher does so lazily.
                        extra["redis_connections"] = redis.connections()
                    result.update(extra)
                    for process in processes:
                        if process.poll() is not None:
                            raise RuntimeError(f"{name} exited with code {process.returncode}")
                    if best is None or result["delivered_per_s"] > best["delivered_per_s"]:
                        best = result
                rows.append({**names, "C": count, "mode": mode, **(best or {}), **memory})
        finally:
            clients.stop()
            if redis is not None:
                redis.close()


async def scrape_count(target: Target) -> int | None:
    """Return how many times the server has scraped its metrics, if it does (``ssecast-ops``)."""
    stats = await http_json(target.host, target.control_port, "GET", "/stats")
    return int(stats["scrapes"]) if "scrapes" in stats else None


async def worker_pids(target: Target) -> Target:
    """Return ``target`` with the pids the event processes report in ``/stats``, if they do.

    gunicorn's arbiter forks the worker that holds the connections: its pid is the one
    whose memory and CPU count, not the arbiter's, which the benchmark started.
    """
    answers = [await http_json(target.host, port, "GET", "/stats") for port in target.event_ports]
    if not all("pid" in answer for answer in answers):
        return target
    return dataclasses.replace(target, pids=tuple(int(answer["pid"]) for answer in answers))


class RedisWatch:
    """Reads, from Redis, how many connections and subscriptions a deployment holds."""

    def __init__(self, deployment: Deployment, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(REDIS_URL)
        self.name = f"{deployment.redis_name}{prefix}"
        self.channel = prefix + "bench"

    def connections(self) -> int:
        """Return the deployment's connections in ``CLIENT LIST`` (by their client name)."""
        return sum(1 for client in self.client.client_list() if client.get("name") == self.name)

    def subscribed(self) -> int:
        return int(dict(self.client.pubsub_numsub(self.channel)).get(self.channel.encode(), 0))

    async def wait_subscribed(self, count: int, limit: float) -> int:
        """Poll ``PUBSUB NUMSUB`` for ``limit`` s until ``count`` clients are subscribed."""
        deadline = time.monotonic() + limit
        seen = self.subscribed()
        while seen < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            seen = self.subscribed()
        return seen

    def close(self) -> None:
        self.client.close()


async def run_all(options: Options, pin: bool, log_dir: Path) -> list[dict[str, Any]]:
    """Measure every case ``options.rounds`` times in turn; keep each case's best run."""
    deadline = time.monotonic() + options.time_cap
    rounds: list[list[dict[str, Any]]] = []
    for _ in range(options.rounds):
        rows = await run_round(options, pin, log_dir, deadline)
        add_ratios(rows)
        rounds.append(rows)
    return best_of_rounds(rounds)


async def run_round(
    options: Options, pin: bool, log_dir: Path, deadline: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    runs = len(options.modes) * options.repeat
    # Per run: the quiet wait (up to 10 s while a server still drains the last run's backlog,
    # as flask-sse does for many seconds), the run, its grace, the control requests.
    # And the connections: opened twice (memory, then the runs), subscribed, closed.
    per_run = options.duration + options.grace + 20
    for count in options.clients:
        per_server = 60 + runs * per_run + 2 * fill_limit(count)
        for name, asgi in options.cases():
            label = row_name(name, asgi)
            names = {"server": label, "deployment": name, "asgi_server": asgi, "C": count}
            left = deadline - time.monotonic()
            if left <= 5:
                print(f"  {label} C={count}: skipped, the --time-cap is spent", file=sys.stderr)
                rows.append({**names, "mode": "-", "error": "time cap"})
                continue
            print(f"  {label} C={count} ...", file=sys.stderr, flush=True)
            try:
                async with asyncio.timeout(min(per_server, left)):
                    await measure_server(rows, name, count, options, log_dir, pin, asgi)
            except (TimeoutError, OSError, RuntimeError, ValueError) as error:
                where = traceback.extract_tb(error.__traceback__)
                print(
                    f"  {label} C={count}: failed: {error!r} in "
                    + " <- ".join(f"{frame.name}:{frame.lineno}" for frame in reversed(where[-6:])),
                    file=sys.stderr,
                )
                print_log_tails(SERVERS[name], log_dir)
                rows.append({**names, "mode": "-", "error": repr(error)})
    return rows


def best_of_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Return, for each case, the run that delivered most over all rounds, ratios redone.

    Each row keeps every round's ``%floor`` (to that round's floor) as ``pct_of_floor_rounds``.
    """
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    pcts: dict[tuple[Any, ...], list[float | None]] = {}
    for rows in rounds:
        for row in rows:
            key = (row["server"], row["C"], row["mode"])
            pcts.setdefault(key, []).append(row.get("pct_of_floor"))
            kept = best.get(key)
            if kept is None or row.get("delivered_per_s", -1) > kept.get("delivered_per_s", -1):
                best[key] = row
    rows = list(best.values())
    add_ratios(rows)
    if len(rounds) > 1:
        for key, row in best.items():
            row["pct_of_floor_rounds"] = pcts[key]
    return rows


def print_log_tails(deployment: Deployment, log_dir: Path) -> None:
    for app in {*deployment.events, deployment.publisher} - {None}:
        for log in sorted(log_dir.glob(f"{app}-*.log"))[-1:]:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"  last lines of {log.name}:", *tail, sep="\n    ", file=sys.stderr)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add to each row its ratios to the floors of the same run, C and mode, and what they give.

    ``pct_of_floor`` and ``p99_vs_floor``: to the ``floor`` row; ``cpu_vs_asgi_floor``: server
    CPU per delivery over the ``asgi-floor`` row's on the same ASGI server;
    ``streams_per_gib`` and ``deliveries_per_core_s`` from the memory and CPU per delivery.
    """
    floor = {
        (row["C"], row["mode"]): row
        for row in rows
        if row["server"] == "floor" and "delivered_per_s" in row
    }
    asgi_floor = {
        (row["asgi_server"], row["C"], row["mode"]): row
        for row in rows
        if row.get("deployment") == "asgi-floor" and "delivered_per_s" in row
    }
    for row in rows:
        if "delivered_per_s" not in row:
            continue
        base = floor.get((row["C"], row["mode"]), {})
        row["pct_of_floor"] = ratio(row["delivered_per_s"], base.get("delivered_per_s"), 100)
        row["p99_vs_floor"] = ratio(row.get("p99_ms"), base.get("p99_ms"))
        same = asgi_floor.get((row.get("asgi_server"), row["C"], row["mode"]), {})
        cpu = row.get("server_cpu_us_per_event")
        row["cpu_vs_asgi_floor"] = ratio(cpu, same.get("server_cpu_us_per_event"))
        kib = row.get("kib_per_idle_connection")
        row["streams_per_gib"] = 1024 * 1024 / kib if kib and kib > 0 else None
        row["deliveries_per_core_s"] = 1e6 / cpu if cpu else None


def ratio(value: float | None, base: float | None, scale: float = 1.0) -> float | None:
    """Return ``scale * value / base``, or None when either is missing or ``base`` is 0."""
    return scale * value / base if value is not None and base else None


def versions() -> dict[str, str]:
    found = {}
    names = ("ssecast", "uvicorn", "starlette", "sse-starlette", "broadcaster", "h11", "fastapi")
    names += ("httptools", "uvloop", "hypercorn", "granian")
    for name in (*names, "redis", "flask", "flask-sse", "gunicorn", "gevent"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[100, 1_000], metavar="C", help="client counts"
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        default=DEFAULT_SERVERS,
        choices=list(SERVERS),
        metavar="NAME",
        help=f"of {', '.join(SERVERS)}; default {' '.join(DEFAULT_SERVERS)}",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="events/s of the fixed-rate run")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of publishing per run")
    parser.add_argument(
        "--burst", type=int, default=10, help="events published per turn of the loop in 'burst'"
    )
    parser.add_argument(
        "--grace", type=float, default=3.0, help="seconds after a run to wait for the last events"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODE_ORDER),
        choices=list(MODE_ORDER),
        metavar="MODE",
        help=f"of {', '.join(MODE_ORDER)} (all by default)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the best is kept")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every server this many times in turn; the best run per case is kept",
    )
    parser.add_argument(
        "--time-cap", type=float, default=330.0, help="seconds; servers not reached are skipped"
    )
    parser.add_argument(
        "--quick", action="store_true", help="C=100 only, 2 s runs, 1 s grace (under a minute)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place server and client"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw a PNG (needs matplotlib)")
    parser.add_argument(
        "--asgi-servers",
        nargs="+",
        default=ASGI_SERVERS[:1],
        choices=ASGI_SERVERS,
        metavar="NAME",
        help=f"the ASGI servers that {', '.join(n for n, d in SERVERS.items() if d.asgi)}\n"
        f"run on, each its own row: of {', '.join(ASGI_SERVERS)}; default {ASGI_SERVERS[0]}",
    )
    parser.add_argument(
        "--standard",
        action="store_const",
        const=["uvicorn-standard"],
        dest="asgi_servers",
        help="--asgi-servers uvicorn-standard: uvloop and httptools, as uvicorn[standard]",
    )
    parser.add_argument(
        "--ten-thousand",
        action="store_true",
        help="--clients 10000 --rate 10 --modes rate --servers floor asgi-floor ssecast\n"
        "(and --time-cap 900 at least)",
    )
    parser.add_argument(
        "--publisher-cpu",
        choices=["client", "server"],
        default="server",
        help="where the Redis deployments' publisher process runs (default: the server's CPU)",
    )
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="run the servers under cProfile, writing PREFIX-NAME-PORT.prof (slows them)",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration, args.grace = [100], 2.0, 1.0
    if args.ten_thousand:
        args.clients, args.rate, args.modes = [10_000], 10.0, ["rate"]
        args.servers = ["floor", "asgi-floor", "ssecast"]
        args.time_cap = max(args.time_cap, 900.0)
    options = Options(
        clients=args.clients,
        servers=args.servers,
        rate=args.rate,
        duration=args.duration,
        burst=args.burst,
        grace=args.grace,
        modes=args.modes,
        repeat=max(1, args.repeat),
        rounds=max(1, args.rounds),
        time_cap=args.time_cap,
        profile=args.profile,
        asgi_servers=list(dict.fromkeys(args.asgi_servers)),
        publisher_cpu=CLIENT_CPU if args.publisher_cpu == "client" else SERVER_CPU,
    )

    sys.path.insert(0, str(HERE / "_servers"))
    from _control import raise_nofile

    nofile = raise_nofile()
    if nofile < max(options.clients) + 100:
        parser.error(f"the open-file limit is {nofile}; raise it to run {max(options.clients)}")
    pin = not args.no_pin and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    elif not args.no_pin:
        print(f"CPUs {SERVER_CPU} and {CLIENT_CPU} are not both available: not pinned")

    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="http_fanout-") as log_dir:
        rows = asyncio.run(run_all(options, pin, Path(log_dir)))
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "versions": versions(),
        "pinned": {"server": SERVER_CPU, "client": CLIENT_CPU, "publisher": options.publisher_cpu}
        if pin
        else None,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "elapsed_s": elapsed,
        "options": options.__dict__,
    }
    pinned = f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if pin else "not pinned"
    if pin and any(SERVERS[name].publisher for name in options.servers):
        pinned += f", separate publishers on CPU {options.publisher_cpu}"
    modes = ", ".join(options.label(mode) for mode in options.modes)
    print(
        f"\nSSE fan-out over loopback at {meta['utc']}: {options.duration:g} s per run, "
        f"modes {modes}, best of {options.repeat * options.rounds}; {pinned}"
    )
    print(table(rows, options.label))
    print(
        "\nmissed: sequence gaps plus events not received within the grace period; "
        "disc: connections the server closed;\n%floor, p99/floor: delivered/s and p99 over "
        "floor's (same C and mode); cpu/asgi: srv us/ev over asgi-floor's on the same ASGI "
        "server;\nKiB/conn: server RSS with C idle connections "
        "minus with none, over C; cli/srv CPU: CPU time over wall time during the run;\n"
        "cli/srv us/ev: CPU microseconds per delivered event (less sensitive to other load);\n"
        "srv wait: time the server was ready to run but another process had its CPU, over wall "
        "time (high: a disturbed run).\nsrv figures add up the server's processes "
        "(ssecast-redis has two workers on CPU 0, so its wait can pass 100%).\n"
        "redis conn: the deployment's connections in Redis's CLIENT LIST at the end of the run "
        "(ssecast-redis: ssecast:<prefix>, its 3 processes;\nflask-sse: flask-sse:<prefix>, "
        "its 2 workers; flask-sse's publisher opens a connection per sse.publish, unnamed and "
        "not counted)."
    )
    busy = [row for row in rows if row.get("client_cpu_pct", 0) > 85 and row.get("mode") != "rate"]
    for row in busy:
        print(
            f"note: the client used {row['client_cpu_pct']:.0f}% of its core in "
            f"{row['server']} C={row['C']} {options.label(row['mode'])}: "
            "the client may be the limit there"
        )
    for row in rows:
        if row.get("publisher_error"):
            print(
                f"note: {row['server']} C={row['C']} {row['mode']}: "
                f"the publisher failed: {row['publisher_error']}"
            )
    for row in rows:
        if "scrapes" in row:
            print(
                f"note: {row['server']} C={row['C']} {options.label(row['mode'])}: "
                f"{row['scrapes']} scrapes of its metrics during the run and its grace"
            )
    for row in rows:
        if row.get("server_evicted"):
            print(
                f"note: {row['server']} C={row['C']} {options.label(row['mode'])}: the server "
                f"evicted {row['server_evicted']:,} clients that fell too far behind (their "
                "responses ended; the events they did not get count as missed)"
            )
    for row in rows:
        found = [pct for pct in row.get("pct_of_floor_rounds", []) if pct is not None]
        if found and row["server"] != "floor":
            print(
                f"note: {row['server']} C={row['C']} {options.label(row['mode'])}: %floor by "
                f"round {' '.join(f'{pct:.0f}' for pct in found)}, "
                f"median {statistics.median(found):.0f}"
            )
    for line in redis_hop(rows, options.label):
        print(line)
    if "rate" in options.modes:
        print(f"\nper ASGI server, {options.label('rate')} runs (floor: no ASGI server):")
        print(asgi_table(rows))
        print(
            "streams/GiB: 1 GiB over KiB/conn, the idle streams a GiB of server memory holds; "
            "deliveries/core-s: 1e6 over srv us/ev."
        )
    for row in rows:
        if row.get("redis_subscribed") not in (None, row.get("clients")):
            print(
                f"note: {row['server']} C={row['C']} {options.label(row['mode'])}: Redis counted "
                f"{row['redis_subscribed']} subscriptions for {row['clients']} clients at the start"
            )
    versions_text = ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
    print(
        f"{elapsed:.0f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"Python {meta['python']}; {versions_text}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    if args.plot:
        try:
            draw(rows, args.plot, options.label, options.duration)
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)


if __name__ == "__main__":
    main()
