"""Machine instructions per delivery to ASGI streams, in process: ssecast against a bare loop.

N streams on one event loop, each with a ``send`` shaped like uvicorn's (httptools): it
checks the message, chunk-encodes the body and hands it to a transport that only counts
bytes. The publisher publishes one event per turn of the loop, the hardest case (every
event is one write per stream). Cases:

- ``bare``: the floor, what ``http_fanout.py``'s ``asgi-floor`` does: a loop that awaits
  every stream's ``send`` in turn with a new message dict, no queue, no eviction;
- ``ssecast``: ``ssecast.asgi.EventStream`` serving every stream;
- ``async-for``: a task per stream that reads a ``Subscription`` with ``async for`` and
  awaits ``send``, as a hand-written endpoint on ssecast would.

Each case runs under valgrind's callgrind twice, with E and 3E events, so that setup and
teardown cancel out: instructions per delivery = (count(3E) - count(E)) / (2E x N).
Instruction counts, unlike seconds, do not drift with what else the machine runs, so two
commits compare in one run of this script each. Needs ``valgrind`` on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

CASES = ("bare", "ssecast", "async-for")


class Transport:
    """Counts what it is given, as a socket's transport would send it."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)


class Connection:
    """One stream's ASGI ``send`` and ``receive``, shaped like uvicorn's httptools cycle."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.started = False

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind}")
            self.started = True
            self.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {kind}")
        body = message.get("body", b"")
        content = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
        if not message.get("more_body", False):
            content.append(b"0\r\n\r\n")
        self.transport.write(b"".join(content))

    async def receive(self) -> dict[str, Any]:
        await asyncio.get_running_loop().create_future()  # the client never leaves
        raise AssertionError("unreachable")


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "path": "/events",
    "query_string": b"",
    "headers": [],
}


async def run(case: str, streams: int, events: int) -> None:
    """Serve ``streams`` connections and publish ``events`` events, one per turn of the loop."""
    from ssecast import Broadcaster
    from ssecast.asgi import EventStream

    connections = [Connection() for _ in range(streams)]
    if case == "bare":
        for connection in connections:
            await connection.send({"type": "http.response.start", "status": 200, "headers": []})
        for seq in range(events):
            frame = b'event: tick\ndata: {"seq":%d}\n\n' % seq
            for connection in connections:
                await connection.send(
                    {"type": "http.response.body", "body": frame, "more_body": True}
                )
            await asyncio.sleep(0)
        return
    broadcaster = Broadcaster(queue_size=events + 10, heartbeat=None)
    if case == "ssecast":
        app = EventStream(broadcaster, ["ticks"])
        tasks = [
            asyncio.create_task(app(SCOPE, connection.receive, connection.send))
            for connection in connections
        ]
    else:

        async def read(connection: Connection) -> None:
            await connection.send({"type": "http.response.start", "status": 200, "headers": []})
            async with broadcaster.subscribe("ticks") as subscription:
                async for chunk in subscription:
                    await connection.send(
                        {"type": "http.response.body", "body": chunk, "more_body": True}
                    )

        tasks = [asyncio.create_task(read(connection)) for connection in connections]
    while broadcaster.stats().subscribers < streams:
        failed = [task for task in tasks if task.done()]
        if failed:
            await failed[0]  # raises what ended it
            raise RuntimeError(f"{case}: a stream ended before the first event")
        await asyncio.sleep(0.001)
    for seq in range(events):
        broadcaster.publish("tick", {"seq": seq}, channel="ticks")
        await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)
    delivered = broadcaster.stats().delivered
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await broadcaster.aclose()
    if delivered != streams * events:
        raise RuntimeError(f"{case}: delivered {delivered} of {streams * events}")


def instructions(case: str, streams: int, events: int, out_dir: Path) -> int:
    """Return the instructions callgrind counts for one run of ``case``."""
    out = out_dir / f"{case}-{events}.out"
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            case,
            str(streams),
            str(events),
        ],
        capture_output=True,
        text=True,
        check=True,
        # Hashes seeded alike: dict and set layouts, and so the counts, repeat run to run.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind for {case}:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams on the loop (N)")
    parser.add_argument("--events", type=int, default=100, help="events of the short run (E)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--child", nargs=3, metavar=("CASE", "N", "E"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, streams, events = args.child
        asyncio.run(run(case, int(streams), int(events)))
        return
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not on the PATH (Debian: apt-get install valgrind)")
    streams, events = args.streams, args.events
    per_delivery: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="asgi_instructions-") as out_dir:
        for case in args.cases:
            short = instructions(case, streams, events, Path(out_dir))
            long = instructions(case, streams, 3 * events, Path(out_dir))
            per_delivery[case] = (long - short) / (2 * events * streams)
    floor = per_delivery.get("bare")
    print(
        f"\nInstructions per delivery, {streams:,} ASGI streams on one loop, one event per "
        f"turn (callgrind, {events} and {3 * events} events); Python {sys.version.split()[0]}"
    )
    print(f"{'case':>10} | {'instructions':>12} | {'x bare':>6} | {'over bare':>9}")
    print("-" * 47)
    for case, count in per_delivery.items():
        ratio = f"{count / floor:6.2f}" if floor else f"{'-':>6}"
        over = f"{count - floor:9,.0f}" if floor else f"{'-':>9}"
        print(f"{case:>10} | {count:12,.0f} | {ratio} | {over}")


if __name__ == "__main__":
    main()
