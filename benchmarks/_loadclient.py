r"""The load client: many SSE connections in one process, each parsed with a minimal parser.

One thread reads every connection with ``epoll`` and ``recv`` (see :class:`Collector`);
the asyncio loop of the main thread only makes the control requests. Each read keeps
the incomplete last line and pulls the ``data:`` lines out of the complete ones: one
found with ``bytes.find`` is parsed with ``json.loads``; several are parsed with one
``json.loads`` of a JSON array built from them (each is ``{"run": r, "seq": n, "t":
ns}``). That skips HTTP chunk-size lines, ``id:``/``event:`` lines and comments whatever
the server's framing (``\n`` or ``\r\n``, chunked or not). The cost is mostly the
``recv`` per read: with 1,000 connections, about 5-10 microseconds of client CPU per
event, which the benchmark reports so that a client-bound run can be told apart.

A :class:`Target` says where the events are served and where the publisher is driven,
so a deployment of several worker processes and a separate publisher (the Redis case)
runs through the same code as one process that does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Connections opened before waiting for all of them to get their headers: well under the
# servers' listen backlog (4096), so that a server slow to accept never drops a SYN (whose
# retry takes a second), and many, so that 10,000 connections take few round trips.
_CONNECT_BATCH = 500
_READ_SIZE = 262_144
# Before a run, wait until nothing arrived for _QUIET_NS, or for _QUIET_LIMIT seconds.
_QUIET_NS = 300_000_000
_QUIET_LIMIT = 10.0
_loads = json.loads
# A data line's value, whatever ends the line (LF, or CRLF as sse-starlette writes), with or
# without the optional space after the colon (flask-sse writes none).
_DATA_LINE = re.compile(rb"^data: ?([^\r\n]*)", re.MULTILINE)


@dataclass(frozen=True)
class Target:
    """Where a server under test listens, and which processes are its."""

    host: str
    event_ports: tuple[int, ...]
    """Ports serving ``/events`` and ``/stats`` (``subscribers``); clients are spread over them."""
    control_port: int
    """The port whose ``POST /start`` and ``/stats`` (run, published) drive the publisher."""
    pids: tuple[int, ...]
    """The processes holding the connections: their memory and CPU time are the server's."""
    events_path: str = "/events"
    """The path the clients ask for (``/events/`` for an app mounted at ``/events``)."""


@dataclass
class RunState:
    """What every connection adds to while a run is collected."""

    run: int = -1
    latencies_us: list[int] = field(default_factory=list)
    last_ns: int = 0
    last_read_ns: int = 0
    disconnects: int = 0


class Connection:
    """One SSE client connection: counts, sequence checks and latencies of one run.

    Only the collector thread feeds it; the main thread resets it between runs, when no
    event of the new run can have arrived yet.
    """

    __slots__ = (
        "_buffer",
        "_head",
        "closed",
        "closing",
        "expected",
        "failed",
        "gaps",
        "out_of_order",
        "ready",
        "received",
        "sock",
        "state",
    )

    def __init__(self, state: RunState, sock: socket.socket) -> None:
        self.state = state
        self.sock = sock
        self._buffer = b""
        self._head: bytes | None = b""
        self.ready = False
        self.failed = ""
        self.closed = False
        self.closing = False
        self.reset()

    def reset(self) -> None:
        self.expected = 0
        self.received = 0
        self.gaps = 0
        self.out_of_order = 0

    def feed(self, data: bytes, now: int) -> bool:
        """Take the bytes of one read, received at ``now``; return False to drop the connection."""
        self.state.last_read_ns = now
        if self._head is not None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return True
            self._head = None
            status = head.split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                self.failed = f"status line {status!r}"
                return False
            self.ready = True
            data = head[end + 4 :]
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n")
        if end < 0:
            self._buffer = buffer
            return True
        self._buffer = buffer[end + 1 :]
        start = buffer.find(b"data:", 0, end)
        if start < 0:
            return True
        if buffer.find(b"data:", start + 5, end) < 0:
            # The common read with 1,000 connections: one event. (json.loads skips the
            # space after "data:" that most servers write and flask-sse does not.)
            events = [_loads(buffer[start + 5 : buffer.find(b"\n", start, end + 1)])]
        else:
            # One loads for the whole read: parsing an array amortizes the per-call cost.
            events = _loads(b"[" + b",".join(_DATA_LINE.findall(buffer, start, end)) + b"]")
        state = self.state
        run = state.run
        append = state.latencies_us.append
        expected = self.expected
        count = 0
        for event in events:
            if event["run"] != run:
                continue
            seq = event["seq"]
            if seq != expected:
                if seq > expected:
                    self.gaps += seq - expected
                else:
                    self.out_of_order += 1
            expected = seq + 1
            append((now - event["t"]) // 1000)
            count += 1
        if count:
            self.expected = expected
            self.received += count
            state.last_ns = now
        return True


class Collector(threading.Thread):
    """Reads every connection in one thread with ``epoll`` and plain ``recv`` calls.

    An asyncio protocol costs several Python calls per read on top of the parse, and
    with 1,000 connections most reads carry one event, so that overhead would make the
    client, not the server, the limit. The asyncio loop of the main thread meanwhile only
    drives the control requests and sleeps.
    """

    def __init__(self, state: RunState) -> None:
        super().__init__(name="sse-collector", daemon=True)
        self.state = state
        self._epoll = select.epoll()
        self._conns: dict[int, Connection] = {}
        # What the read loop calls, bound once per connection: it runs for every read.
        self._readers: dict[int, tuple[Callable[[int], bytes], Callable[[bytes, int], bool]]] = {}
        self._stopping = False

    def add(self, conn: Connection) -> None:
        fileno = conn.sock.fileno()
        self._conns[fileno] = conn
        self._readers[fileno] = (conn.sock.recv, conn.feed)
        self._epoll.register(fileno, select.EPOLLIN)

    def stop(self) -> None:
        self._stopping = True
        if self.is_alive():
            self.join(5)
        for fileno, conn in list(self._conns.items()):
            self._drop(fileno, conn)
        self._epoll.close()

    def run(self) -> None:
        poll = self._epoll.poll
        readers = self._readers
        clock = time.time_ns
        while not self._stopping:
            for fileno, _ in poll(0.05):
                reader = readers.get(fileno)
                if reader is None:
                    continue
                try:
                    data = reader[0](_READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data or not reader[1](data, clock()):
                    self._drop(fileno, self._conns[fileno])

    def _drop(self, fileno: int, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.ready and not conn.closing:
            self.state.disconnects += 1
        del self._conns[fileno], self._readers[fileno]
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fileno)
        conn.sock.close()


def evicted_during(before: dict[str, Any], after: dict[str, Any]) -> int | None:
    """Return the clients a server evicted between two ``/stats`` answers, if it counts them."""
    if "evicted" not in after:
        return None
    return int(after["evicted"]) - int(before.get("evicted", 0))


async def http_json(host: str, port: int, method: str, path: str, limit: float = 10.0) -> Any:
    """Make one HTTP/1.1 request on a new connection; return the JSON body (``limit`` s)."""
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Connection: close\r\nContent-Length: 0\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"{method} {path} answered {status!r}: {body[:200]!r}")
    return json.loads(body)


async def subscribers(target: Target) -> int:
    """Return the subscribers the server processes report, summed."""
    counts = await asyncio.gather(
        *(http_json(target.host, port, "GET", "/stats") for port in target.event_ports)
    )
    return sum(int(stats["subscribers"]) for stats in counts)


async def wait_for_subscribers(target: Target, count: int, limit: float) -> int:
    """Poll for ``limit`` s until the servers report ``count`` subscribers; return the last seen."""
    deadline = time.monotonic() + limit
    seen = await subscribers(target)
    while seen != count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        seen = await subscribers(target)
    return seen


async def wait_until_up(target: Target, limit: float) -> None:
    """Wait up to ``limit`` s until every server process answers ``/stats``."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await subscribers(target)
            await http_json(target.host, target.control_port, "GET", "/stats", limit=2.0)
            return
        except (OSError, RuntimeError, TimeoutError, ValueError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Clients:
    """A pool of SSE connections to a target, kept at a given size between runs."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.state = RunState()
        self.connections: list[Connection] = []
        self.failed_connects = 0
        self._next_port = 0
        self._collector = Collector(self.state)
        self._collector.start()

    @property
    def open(self) -> list[Connection]:
        return [conn for conn in self.connections if not conn.closed]

    async def fill(self, count: int, limit: float = 30.0) -> None:
        """Open connections until ``count`` are open, each past its headers, within ``limit`` s.

        In batches of ``_CONNECT_BATCH``: each batch gets its headers before the next opens.
        """
        self.connections = self.open
        missing = count - len(self.connections)
        deadline = time.monotonic() + limit
        while missing > 0:
            made = await self._connect(min(missing, _CONNECT_BATCH), deadline, limit)
            self.failed_connects += sum(1 for conn in made if not conn.ready)
            self.connections.extend(conn for conn in made if conn.ready)
            missing = count - len(self.connections)
            if not made:
                raise OSError(f"no connection made; {self.failed_connects} failed")

    async def _connect(self, count: int, deadline: float, limit: float) -> list[Connection]:
        """Open ``count`` connections; return them once each got its headers or closed."""
        host, ports = self.target.host, self.target.event_ports
        made = []
        for _ in range(count):
            port = ports[self._next_port % len(ports)]
            self._next_port += 1
            request = (
                f"GET {self.target.events_path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
            ).encode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.connections)} connections made in {limit} s")
            try:
                # Loopback connects complete in the kernel's backlog without the server.
                sock = socket.create_connection((host, port), timeout=2)
                sock.setblocking(False)
                sock.send(request)
            except OSError:
                self.failed_connects += 1
                continue
            conn = Connection(self.state, sock)
            self._collector.add(conn)
            made.append(conn)
            if len(made) % 100 == 0:
                await asyncio.sleep(0)  # keep the loop (and its timeouts) turning
        while not all(conn.ready or conn.closed for conn in made):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(not c.ready for c in made)} connections got no headers")
            await asyncio.sleep(0.01)
        return made

    def close_all(self) -> None:
        """Close every connection; the collector drops each as it sees it end."""
        for conn in self.connections:
            conn.closing = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self.connections = []

    def stop(self) -> None:
        """Close every connection and stop the collector thread."""
        self.close_all()
        self._collector.stop()

    async def run(
        self, rate: float, seconds: float, burst: int, grace: float, thread: bool = False
    ) -> dict[str, Any]:
        """Start one publishing run, collect it, and return its measurements.

        With ``thread`` the server publishes from a thread instead of a task of its loop.
        """
        target = self.target
        conns = self.open
        # A server still draining the backlog of the previous run would slow this one. Polled:
        # the collector thread, not this loop, sees the reads.
        quiet_until = time.monotonic() + _QUIET_LIMIT
        while (  # noqa: ASYNC110
            time.time_ns() - self.state.last_read_ns < _QUIET_NS and time.monotonic() < quiet_until
        ):
            await asyncio.sleep(0.05)
        before = await http_json(target.host, target.control_port, "GET", "/stats")
        state = self.state
        state.run = int(before["run"]) + 1  # set before /start: the first events come at once
        state.latencies_us = []
        state.last_ns = 0
        state.disconnects = 0
        for conn in conns:
            conn.reset()
        server_cpu = cpu_seconds(target.pids)
        client_cpu = time.process_time()
        client_times = os.times()
        server_wait = runqueue_wait_seconds(target.pids)
        client_wait = runqueue_wait_seconds((os.getpid(),))
        started_ns = time.time_ns()
        started = time.monotonic()
        query = f"/start?rate={rate:g}&seconds={seconds:g}&burst={burst}&thread={int(thread)}"
        answer = await http_json(target.host, target.control_port, "POST", query)
        if answer["run"] != state.run:
            raise RuntimeError(f"expected run {state.run}, the server started {answer['run']}")
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
        stats = await http_json(target.host, target.control_port, "GET", "/stats")
        deadline = started + seconds + grace
        while stats["publishing"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stats = await http_json(target.host, target.control_port, "GET", "/stats")
        published = int(stats["published"])
        # Polled: the condition spans every connection, and a 20 ms step costs nothing here.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            conn.expected < published for conn in conns if not conn.closed
        ):
            await asyncio.sleep(0.02)
        wall = time.monotonic() - started
        client_cpu = time.process_time() - client_cpu
        times = os.times()
        client_user, client_system = (
            times.user - client_times.user,
            times.system - client_times.system,
        )
        server_cpu = cpu_seconds(target.pids) - server_cpu
        server_wait = runqueue_wait_seconds(target.pids) - server_wait
        client_wait = runqueue_wait_seconds((os.getpid(),)) - client_wait

        received = sum(conn.received for conn in conns)
        gaps = sum(conn.gaps for conn in conns)
        late = sum(max(0, published - conn.expected) for conn in conns)
        span = (state.last_ns - started_ns) / 1e9 if state.last_ns else seconds
        latencies = sorted(state.latencies_us)
        return {
            "rate": rate,
            "seconds": seconds,
            "burst": burst,
            "thread": thread,
            "clients": len(conns),
            "published": published,
            "published_per_s": published / seconds,
            "received": received,
            "delivered_per_s": received / max(seconds, span),
            "offered": published * len(conns),
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": latencies[-1] / 1000 if latencies else None,
            "gaps": gaps,
            "late": late,
            "missed": gaps + late,
            "out_of_order": sum(conn.out_of_order for conn in conns),
            "disconnects": state.disconnects,
            "server_evicted": evicted_during(before, stats),
            "publisher_error": stats.get("failed") or None,
            "wall_s": wall,
            "client_cpu_pct": 100 * client_cpu / wall,
            "server_cpu_pct": 100 * server_cpu / wall,
            "server_cpu_us_per_event": 1e6 * server_cpu / received if received else None,
            "client_cpu_us_per_event": 1e6 * client_cpu / received if received else None,
            "client_user_s": client_user,
            "client_system_s": client_system,
            "client_wait_pct": 100 * client_wait / wall,
            "server_wait_pct": 100 * server_wait / wall,
        }


def percentile(ordered: list[int], fraction: float) -> float | None:
    """Return the ``fraction`` quantile of sorted microseconds, in milliseconds."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def rss_kib(pids: tuple[int, ...]) -> int:
    """Return the summed resident set size of ``pids`` (VmRSS), in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """Return the user plus system CPU seconds that ``pids`` have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK_TCK


def runqueue_wait_seconds(pids: tuple[int, ...]) -> float:
    """Return the seconds the threads of ``pids`` were ready to run but waited for a CPU.

    A high share during a run means other processes took the CPU: that run is disturbed.
    """
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
    return total / 1e9
