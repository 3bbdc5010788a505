"""Behaviour the Flask and Django adapters share, checked against a running server.

test_flask.py and test_django.py start the servers (werkzeug, gunicorn, uvicorn) and call
these checks, so every server is held to the same promises. Events are read with httpx
and httpx-sse; the checks that hold hundreds of streams or a client that stops reading
use raw sockets, because that is what they are about (and 1,000 httpx clients would
cost the shared CPU more than the server under test).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from servers import Server
from sse_client import aevents, events
from ssecast import GAP_EVENT_TYPE
from ssecast._http import OPENING, RETRY_AFTER_SECONDS

TOKEN = "letmein"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEARTBEAT = 1.0
"""The heartbeat of the main test servers (``SSECAST_TEST_HEARTBEAT``), in seconds."""
MAIN_ENV = {
    "SSECAST_TEST_HEARTBEAT": str(HEARTBEAT),
    "SSECAST_TEST_HISTORY": "64",
    "SSECAST_TEST_MAX_PER_KEY": "2",
}
"""Settings of the server most checks share."""
HANG = 40.0
"""Seconds after which a wait counts as a hang; how fast things are belongs to the benchmarks.

The slowest waits here, under coverage with the other core busy: SIGTERM with 1,000 open
streams stopped uvicorn in up to 2.6 s (3.2 s with both cores busy); a WSGI server noticed
a client that left in 1.1 s (at its next heartbeat). 40 s is over ten times each, so only
a hang fails.
"""
TERMINAL_CHUNK = b"0\r\n\r\n"


def channel() -> str:
    """Return a channel name no other check uses, so leftovers never mix in."""
    return f"c-{uuid.uuid4().hex[:12]}"


def publish(
    server: Server, event_type: str, data: Any, channel: str, count: int = 1, *, raw: bool = False
) -> list[str]:
    """Publish through the app's ``/publish`` route; return the new ids."""
    event = {"type": event_type, "data": data, "channel": channel, "count": count, "raw": raw}
    body = {"events": [event]}
    response = httpx.post(f"{server.url}/publish", json=body, timeout=30)
    response.raise_for_status()
    ids: list[str] = response.json()["ids"]
    return ids


def stats(server: Server) -> dict[str, int]:
    """Return the app's ``Broadcaster.stats()``."""
    response = httpx.get(f"{server.url}/stats", timeout=10)
    response.raise_for_status()
    result: dict[str, int] = response.json()
    return result


def wait_for_stats(
    server: Server, condition: Callable[[dict[str, int]], bool], timeout: float
) -> tuple[float, dict[str, int]]:
    """Poll ``/stats`` until ``condition`` holds; return the seconds it took and the stats."""
    started = time.monotonic()
    while True:
        current = stats(server)
        elapsed = time.monotonic() - started
        if condition(current):
            return elapsed, current
        assert elapsed < timeout, f"stats never satisfied the condition: {current}"
        time.sleep(0.02)


def settle(server: Server) -> None:
    """Wait until no stream of an earlier check is open (WSGI notices a heartbeat later)."""
    wait_for_stats(server, lambda s: s["subscribers"] == 0, timeout=HANG)


@contextlib.contextmanager
def listening(
    server: Server, path: str = "/events", **kwargs: Any
) -> Iterator[Iterator[ServerSentEvent]]:
    """Open a stream; once its headers arrived the subscription is live (yield its events)."""
    headers = {**AUTH, **kwargs.pop("headers", {})}
    with (
        # A quiet stream sends a heartbeat every HEARTBEAT seconds; a read waits at most that.
        httpx.Client(timeout=httpx.Timeout(10, read=HANG)) as client,
        connect_sse(client, "GET", f"{server.url}{path}", headers=headers, **kwargs) as source,
    ):
        assert source.response.status_code == 200
        yield events(source.iter_sse())


def take(events: Iterator[ServerSentEvent], count: int) -> list[tuple[str, str, str]]:
    """Read ``count`` events as (type, id, data)."""
    # range first: zip would otherwise wait for one event more than it keeps.
    return [(e.event, e.id, e.data) for _, e in zip(range(count), events, strict=False)]


# -- the checks ----------------------------------------------------------------------


def check_headers_and_opening(server: Server) -> None:
    """The stream answers with the SSE headers and its first bytes before any event."""
    with (
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{server.url}/events", headers=AUTH) as response,
    ):
        started = time.monotonic()
        first = next(response.iter_raw())
        waited = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert first.startswith(OPENING)
    # Nothing was published and the heartbeat is HEARTBEAT away: these are the opening bytes.
    assert waited < HEARTBEAT / 2


def check_events_in_order(server: Server, path: str = "/events", name: str = "") -> None:
    """Events arrive in publish order with their type, id and data."""
    name = name or channel()
    params = {} if path != "/events" else {"channel": name}
    with listening(server, path, params=params) as events:
        ids = publish(server, "tick", {"n": 1}, name)
        ids += publish(server, "tock", "two\nlines", name, raw=True)
        ids += publish(server, "tick", [3, "é"], name)
        received = take(events, 3)
    assert received == [
        ("tick", ids[0], '{"n":1}'),
        ("tock", ids[1], "two\nlines"),
        ("tick", ids[2], '[3,"é"]'),
    ]


def check_resume(server: Server, *, by_query: bool) -> None:
    """Resuming after an id replays exactly the missed events, then goes on live."""
    name = channel()
    ids = publish(server, "step", None, name, count=5)
    if by_query:
        options: dict[str, Any] = {"params": {"channel": name, "lastEventId": ids[1]}}
    else:
        options = {"params": {"channel": name}, "headers": {"Last-Event-ID": ids[1]}}
    with listening(server, **options) as events:
        replayed = [event_id for _, event_id, _ in take(events, 3)]
        live = publish(server, "step", None, name)
        assert take(events, 1)[0][1] == live[0]
    assert replayed == ids[2:]


def check_gap(server: Server) -> None:
    """Resuming after an id the server no longer knows begins with the gap event."""
    name = channel()
    newest = publish(server, "step", None, name, count=2)[-1]
    headers = {"Last-Event-ID": "forgotten-id-1"}
    with listening(server, params={"channel": name}, headers=headers) as events:
        gap = take(events, 1)
        live = publish(server, "step", None, name)
        after = take(events, 1)
    assert gap[0][0] == GAP_EVENT_TYPE
    assert after[0][1] == live[0]
    # Anything newer than the gap's id is yet to come, so a reconnect resumes from it.
    assert gap[0][1] in (newest, live[0])


def check_disconnect(server: Server) -> float:
    """A client that goes away is gone from stats(); return how long that took."""
    settle(server)
    with listening(server, params={"channel": channel()}):
        assert stats(server)["subscribers"] == 1
    elapsed, _ = wait_for_stats(server, lambda s: s["subscribers"] == 0, timeout=HANG)
    return elapsed


def check_forbidden(server: Server) -> None:
    """The app's own authorization answers 403 and subscribes nothing."""
    settle(server)
    before = stats(server)["subscribers"]
    response = httpx.get(f"{server.url}/events", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 403
    assert stats(server)["subscribers"] == before == 0


def check_invalid_channel(server: Server) -> None:
    """A channel name the core refuses is a 400, not a 500, and subscribes nothing."""
    settle(server)
    for bad in ("line\nbreak", "nul\x00byte", ""):
        response = httpx.get(f"{server.url}/events", params={"channel": bad}, headers=AUTH)
        assert response.status_code == 400, bad
    assert stats(server)["subscribers"] == 0


def check_refused(server: Server) -> None:
    """A refused subscription is a 503 with Retry-After for a client other than EventSource."""
    response = httpx.get(f"{server.url}/events", headers={**AUTH, "Accept": "*/*"}, timeout=5)
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)


def check_too_many(server: Server, limit: int) -> None:
    """Beyond max_subscribers the next client gets 503 + Retry-After; the others stay."""
    name = channel()
    with contextlib.ExitStack() as stack:
        streams = [
            stack.enter_context(listening(server, params={"channel": name})) for _ in range(limit)
        ]
        check_refused(server)
        ids = publish(server, "still", "here", name)
        for events in streams:
            assert take(events, 1)[0][1] == ids[0]


def check_per_key_limit(server: Server, limit: int = 2) -> None:
    """Beyond max_subscribers_per_key, that key's next stream is a 429 with Retry-After."""
    params = {"channel": channel(), "user": "alice"}
    with contextlib.ExitStack() as stack:
        for _ in range(limit):
            stack.enter_context(listening(server, params=params))
        refused = httpx.get(f"{server.url}/events", params=params, headers=AUTH, timeout=10)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
        with listening(server, params={**params, "user": "bob"}):
            pass


def check_lifetime(server: Server, path: str = "/events", name: str = "") -> None:
    """A stream ends at its lifetime; resuming with Last-Event-ID misses and repeats nothing.

    Events are published while each stream is open and while the client is away.
    """
    name = name or channel()
    params = {"lifetime": "0.5", "user": "carol"}
    if path == "/events":
        params["channel"] = name
    sent: list[str] = []
    got: list[str] = []
    for _ in range(3):
        headers = {"Last-Event-ID": got[-1]} if got else {}
        with listening(server, path, params=params, headers=headers) as events:
            sent += publish(server, "live", "while open", name, count=2)
            got += [event.id for event in events]  # until the server ends the stream
        sent += publish(server, "away", "while away", name)
    with listening(server, path, params=params, headers={"Last-Event-ID": got[-1]}) as events:
        got += [event_id for _, event_id, _ in take(events, 1)]
    assert got == sent
    wait_for_stats(server, lambda s: s["expired"] >= 3, timeout=HANG)


async def check_many_clients(server: Server, clients: int = 200, count: int = 10) -> float:
    """``clients`` concurrent clients all receive every event, in order; return seconds."""
    name = channel()
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
    opened = asyncio.Semaphore(0)

    async def listen(client: httpx.AsyncClient) -> list[str]:
        params = {"channel": name}
        # A copy: httpx-sse adds its Accept header to the dict it is given.
        headers = dict(AUTH)
        async with aconnect_sse(client, "GET", "/events", params=params, headers=headers) as source:
            assert source.response.status_code == 200
            opened.release()
            received = []
            async for event in aevents(source.aiter_sse()):
                received.append(event.id)
                if len(received) == count:
                    return received
        raise AssertionError("the stream ended early")

    timeout = httpx.Timeout(30)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(listen(client)) for _ in range(clients)]
        try:
            async with asyncio.timeout(60):
                for _ in range(clients):
                    await opened.acquire()
            started = time.monotonic()
            ids = await asyncio.to_thread(publish, server, "fan", {"to": "all"}, name, count)
            async with asyncio.timeout(30):
                results = await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
        finally:
            for task in tasks:
                task.cancel()
    assert results == [ids] * clients
    return elapsed


def check_slow_reader(server: Server, queue_size: int) -> None:
    """A client that stops reading is evicted; the publisher and a reading client go on."""
    name = channel()
    size, batch = 60_000, queue_size // 2
    # 24 MB at most: far more than the socket buffers between the server and the client.
    most = 400
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(10)
    try:
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(request_bytes(f"/events?channel={name}"))
        head = b""
        while OPENING not in head:
            head += slow.recv(4096)
        # From here on the slow client reads nothing.
        with listening(server, params={"channel": name}) as events:
            published: list[str] = []
            received: list[str] = []
            slowest = 0.0
            while stats(server)["evicted"] == 0 and len(published) < most:
                started = time.monotonic()
                published += publish(server, "big", "x" * size, name, count=batch, raw=True)
                slowest = max(slowest, time.monotonic() - started)
                # The reading client keeps up batch by batch, so only the slow one falls behind.
                received += [e.id for _, e in zip(range(batch), events, strict=False)]
        assert stats(server)["evicted"] == 1
        assert received == published
        assert slowest < 2  # the publisher never waits for a subscriber
    finally:
        slow.close()


def request_bytes(path: str) -> bytes:
    """Return a raw GET for a stream that asks the server to close after it."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


@dataclass
class RawStream:
    """One open stream on a raw connection, and everything it received."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytes

    async def until_end(self) -> float:
        """Read until the server closes the connection; return when that was (monotonic)."""
        while chunk := await self.reader.read(65536):
            self.received += chunk
        self.writer.close()
        return time.monotonic()

    @property
    def ended_cleanly(self) -> bool:
        """Whether the body ended with HTTP's own terminator rather than being cut off."""
        return self.received.endswith(TERMINAL_CHUNK)


async def open_raw_streams(server: Server, count: int, path: str = "/events") -> list[RawStream]:
    """Open ``count`` streams, a few at a time so the listen backlog never overflows."""
    gate = asyncio.Semaphore(32)

    async def one() -> RawStream:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request_bytes(path))
            received = b""
            while OPENING not in received:
                chunk = await reader.read(4096)
                assert chunk, f"closed before the stream opened: {received!r}"
                received += chunk
            assert re.match(rb"HTTP/1\.1 200 ", received), received[:100]
            return RawStream(reader, writer, received)

    async with asyncio.timeout(90):
        return list(await asyncio.gather(*(one() for _ in range(count))))


async def check_close_ends_streams(server: Server, count: int) -> float:
    """With ``count`` streams open, broadcaster.close() ends all of them; return the time."""
    streams = await open_raw_streams(server, count)
    assert stats(server)["subscribers"] == count
    ends = [asyncio.create_task(s.until_end()) for s in streams]
    started = time.monotonic()
    response = await asyncio.to_thread(httpx.post, f"{server.url}/close", timeout=10)
    assert response.status_code == 204
    async with asyncio.timeout(HANG):  # up to 1.4 s under coverage with the other core busy
        finished = await asyncio.gather(*ends)
    elapsed = max(finished) - started
    assert all(s.ended_cleanly for s in streams)
    check_refused(server)  # and a closed broadcaster refuses newcomers with 503
    return elapsed


async def check_sigterm(server: Server, count: int, *, clean: bool = True) -> float:
    """With ``count`` streams open, SIGTERM stops the server, with no traceback.

    Under gunicorn and uvicorn the app's close hook ends the streams, not the server's
    5 s graceful timeout: that would stop gunicorn's worker with the streams cut short
    (``clean`` wants each to end with the terminal chunk), and uvicorn would log that it
    cancelled them. werkzeug's dev server just dies (``clean=False``).
    """
    streams = await open_raw_streams(server, count)
    ends = [asyncio.create_task(s.until_end()) for s in streams]
    # stop() kills the server at HANG, so a stop that took that long was a hang.
    elapsed = await asyncio.to_thread(server.stop, signal.SIGTERM, HANG)
    async with asyncio.timeout(10):
        await asyncio.gather(*ends)
    assert elapsed < HANG, server.log()[-3000:]
    assert "Traceback" not in server.log()
    assert "timeout graceful shutdown exceeded" not in server.log()
    if clean:
        assert all(s.ended_cleanly for s in streams)
    return elapsed
