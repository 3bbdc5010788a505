"""Soak the ticker demo: fast, slow, stalled and churning clients for a bounded time.

Starts ``python examples/ticker --port P --rate R`` (ssecast's ASGI adapter on uvicorn)
and holds, over loopback:

- ``--fast`` clients that read everything and reconnect with ``Last-Event-ID`` if the
  stream ends; their ids must run without a gap (the demo's two channels share one id
  sequence), so a gap is a missed event;
- ``--slow`` clients that read with delays (0.5 to 1.5 s of sleep between two reads), held
  to the same check: a delayed reader takes everything buffered at once, so it keeps up;
- ``--stalled`` clients that never read (a small receive buffer, so the server feels it);
  at the end each is drained: a stream that ends there was evicted by the server;
- ``--churn`` clients that connect, read a few events, disconnect and start over, half of
  them resuming with ``Last-Event-ID``.

Every ``--every`` seconds it samples the server's RSS (``/proc/<pid>/status``), the
latency of ``GET /state``, and the counts so far; at the end it stops the server with
SIGTERM, times the shutdown, prints a summary and draws ``--plot`` (matplotlib).

Run: ``python benchmarks/soak.py`` (10 minutes), ``--minutes 3``, or ``--quick`` (1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ID = re.compile(rb"\nid: ([0-9a-f]+-(\d+))\n")
GAP = b"event: ssecast.gap\n"


@dataclass
class Totals:
    events: int = 0
    missed: int = 0
    gaps: int = 0
    evicted: int = 0
    evicted_stalled: int = 0
    reconnects: int = 0
    churn_cycles: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Sample:
    seconds: float
    rss_mib: float
    events: int
    evicted: int
    churn_cycles: int
    state_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def request(last_event_id: str | None) -> bytes:
    lines = ["GET /events HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
    if last_event_id:
        lines.append(f"Last-Event-ID: {last_event_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Stream:
    """One SSE response over a raw socket: chunked decoding and event ids."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""
        self.tail = b"\n"
        self.ended = False
        self.last_id: str | None = None

    @classmethod
    async def open(cls, port: int, last_event_id: str | None, rcvbuf: int = 0) -> Stream:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        writer.write(request(last_event_id))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            writer.close()
            raise RuntimeError(f"unexpected response: {head[:40]!r}")
        return cls(reader, writer)

    def feed(self, data: bytes) -> tuple[list[int], int]:
        """Decode chunks; return the ids of the complete frames and the gap events seen."""
        self.buffer += data
        body = []
        while not self.ended:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(self.buffer[:end], 16)
            if len(self.buffer) < end + 4 + size:
                break
            body.append(self.buffer[end + 2 : end + 2 + size])
            self.buffer = self.buffer[end + 4 + size :]
            self.ended = size == 0
        text = self.tail + b"".join(body)
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self.tail = text
            return [], 0
        complete, self.tail = text[: cut + 2], text[cut + 1 :]
        matches = ID.findall(complete)
        if matches:
            self.last_id = matches[-1][0].decode()
        return [int(n) for _, n in matches], complete.count(GAP)

    def close(self) -> None:
        self.writer.close()


class Soak:
    def __init__(self, port: int, deadline: float) -> None:
        self.port = port
        self.deadline = deadline
        self.totals = Totals()
        self.prefix: str | None = None

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def error(self, kind: str, detail: object) -> None:
        if len(self.totals.errors) < 50:
            self.totals.errors.append(f"{kind}: {detail}")
        else:
            self.totals.errors.append(kind)

    async def reader(self, delay: tuple[float, float] | None) -> None:
        """Read every event, checking the ids; with ``delay``, sleep between two reads.

        A slow reader takes everything buffered at each read, so it keeps up however long
        it sleeps, as long as it wakes before ``queue_size`` frames are pending.
        """
        last: int | None = None
        resume: str | None = None
        while self.running():
            try:
                stream = await Stream.open(self.port, resume)
            except (OSError, RuntimeError) as error:
                self.error("connect", error)
                await asyncio.sleep(1)
                continue
            try:
                while self.running() and not stream.ended:
                    try:
                        async with asyncio.timeout(max(0.1, self.deadline - time.monotonic())):
                            data = await stream.reader.read(1 << 20)
                    except TimeoutError:
                        break
                    if not data:
                        break
                    ids, gaps = stream.feed(data)
                    self.totals.gaps += gaps
                    if gaps:
                        last = None  # the client reloads its state and goes on from here
                    for n in ids:
                        if last is not None and n != last + 1:
                            self.totals.missed += max(0, n - last - 1)
                            if n <= last:
                                self.error("order", f"{n} after {last}")
                        last = n
                    self.totals.events += len(ids)
                    if delay is not None:
                        await asyncio.sleep(random.uniform(*delay))
                resume = stream.last_id or resume
                if self.running():
                    self.totals.reconnects += 1
                    if stream.ended:
                        self.totals.evicted += 1
            finally:
                stream.close()

    async def stalled(self) -> None:
        """Open a stream and never read it; at the end, drain it to see whether it was evicted."""
        try:
            stream = await Stream.open(self.port, None, rcvbuf=4096)
        except (OSError, RuntimeError) as error:
            self.error("stalled connect", error)
            return
        try:
            await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))
            # An evicted stream ends right after what the kernel buffered: read it all.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while not stream.ended:
                        data = await stream.reader.read(1 << 20)
                        if not data:
                            break
                        stream.feed(data)
            if stream.ended:
                self.totals.evicted_stalled += 1
        finally:
            stream.close()

    async def churn(self) -> None:
        resume: str | None = None
        while self.running():
            try:
                stream = await Stream.open(self.port, resume if random.random() < 0.5 else None)
                try:
                    got = 0
                    async with asyncio.timeout(5):
                        while got < 3 and not stream.ended:
                            data = await stream.reader.read(65536)
                            if not data:
                                break
                            ids, _ = stream.feed(data)
                            got += len(ids)
                    self.totals.events += got
                    resume = _full_id(stream, resume)
                finally:
                    stream.close()
                self.totals.churn_cycles += 1
            except (OSError, RuntimeError, TimeoutError) as error:
                if self.running():
                    self.error("churn", error)
                await asyncio.sleep(0.5)


def _full_id(stream: Stream, previous: str | None) -> str | None:
    """Return the id to resume after: the last one this stream delivered, else the previous."""
    return stream.last_id or previous


async def state_latency(port: int) -> float:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await reader.read()
    writer.close()
    return (time.monotonic() - started) * 1000


async def soak(args: argparse.Namespace, port: int, pid: int) -> tuple[Soak, list[Sample]]:
    seconds = args.minutes * 60
    started = time.monotonic()
    run = Soak(port, started + seconds)
    tasks = [asyncio.create_task(run.reader(None), name=f"fast-{n}") for n in range(args.fast)]
    tasks += [
        asyncio.create_task(run.reader((0.5, 1.5)), name=f"slow-{n}") for n in range(args.slow)
    ]
    tasks += [asyncio.create_task(run.stalled(), name=f"stalled-{n}") for n in range(args.stalled)]
    tasks += [asyncio.create_task(run.churn(), name=f"churn-{n}") for n in range(args.churn)]
    samples: list[Sample] = []
    print(f"{'s':>6} {'RSS MiB':>8} {'events':>10} {'ended':>8} {'churn':>7} {'/state ms':>9}")
    while run.running():
        await asyncio.sleep(min(args.every, max(0.0, run.deadline - time.monotonic())))
        try:
            latency = await state_latency(port)
        except OSError as error:
            run.error("state", error)
            latency = float("nan")
        t = run.totals
        sample = Sample(
            time.monotonic() - started, rss_mib(pid), t.events, t.evicted, t.churn_cycles, latency
        )
        samples.append(sample)
        print(
            f"{sample.seconds:6.0f} {sample.rss_mib:8.1f} {sample.events:10d} "
            f"{sample.evicted:8d} {sample.churn_cycles:7d} {sample.state_ms:9.1f}",
            flush=True,
        )
    _, stuck = await asyncio.wait(tasks, timeout=30)
    for task in stuck:
        run.error("client still running 30 s after the end", task.get_name())
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            run.error("client crashed", repr(task.exception()))
    return run, samples


def plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.seconds / 60 for s in samples]
    rates = [0.0] + [
        (b.events - a.events) / max(1e-9, b.seconds - a.seconds)
        for a, b in itertools.pairwise(samples)
    ]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(minutes, [s.rss_mib for s in samples], color="tab:blue")
    top.set_ylabel("server RSS (MiB)")
    top.set_ylim(bottom=0)
    top.set_title(title)
    bottom.plot(minutes, rates, color="tab:green", label="events delivered/s")
    bottom.set_ylabel("events delivered / s")
    bottom.set_ylim(bottom=0)
    twin = bottom.twinx()
    twin.plot(minutes, [s.state_ms for s in samples], color="tab:gray", label="GET /state (ms)")
    twin.set_ylabel("GET /state latency (ms)")
    bottom.set_xlabel("minutes")
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.45))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="a 1-minute run")
    parser.add_argument("--rate", type=float, default=400.0, help="the ticker's moves per second")
    parser.add_argument("--fast", type=int, default=25)
    parser.add_argument("--slow", type=int, default=20)
    parser.add_argument("--stalled", type=int, default=20)
    parser.add_argument("--churn", type=int, default=10)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "soak.png")
    parser.add_argument("--json", type=Path, help="also write the samples and totals here")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.every = 1.0, 2.0

    port = free_port()
    log = open(f"/tmp/ssecast-soak-{port}.log", "wb")  # noqa: SIM115  (closed in finally)
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "ticker"),
            "--port",
            str(port),
            "--rate",
            str(args.rate),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the ticker did not start") from None
                time.sleep(0.1)
        print(
            f"soak: {args.minutes:g} min, ticker at {args.rate:g} moves/s; clients: "
            f"{args.fast} fast, {args.slow} slow, {args.stalled} stalled, {args.churn} churning "
            f"(server pid {server.pid})"
        )
        run, samples = asyncio.run(soak(args, port, server.pid))
        rss_end = rss_mib(server.pid)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutdown = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    server_log = Path(log.name).read_text(errors="replace")
    if "Traceback" in server_log:
        run.error("server traceback", server_log[-2000:])
    t = run.totals
    rss = [s.rss_mib for s in samples]
    after_first_minute = [s.rss_mib for s in samples if s.seconds >= 60] or rss
    summary = {
        "minutes": args.minutes,
        "rate": args.rate,
        "clients": {
            "fast": args.fast,
            "slow": args.slow,
            "stalled": args.stalled,
            "churn": args.churn,
        },
        "events_delivered": t.events,
        "missed_by_fast_and_slow_readers": t.missed,
        "gap_events": t.gaps,
        "stalled_evicted": t.evicted_stalled,
        "reader_streams_ended_by_server": t.evicted,
        "reader_reconnects": t.reconnects,
        "churn_cycles": t.churn_cycles,
        "errors": len(t.errors),
        "rss_mib": {
            "first": rss[0],
            "max": max(rss),
            "last": rss_end,
            "after_first_minute": [min(after_first_minute), max(after_first_minute)],
        },
        "state_ms_max": max(s.state_ms for s in samples),
        "shutdown_seconds": shutdown,
    }
    print(json.dumps(summary, indent=2))
    for line in t.errors[:20]:
        print("error:", line)
    title = (
        f"ssecast soak: ticker at {args.rate:g}/s, {args.fast} fast, {args.slow} slow, "
        f"{args.stalled} stalled, {args.churn} churning clients"
    )
    plot(samples, args.plot, title)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(
            json.dumps({"summary": summary, "samples": [s.__dict__ for s in samples]})
        )


if __name__ == "__main__":
    main()
