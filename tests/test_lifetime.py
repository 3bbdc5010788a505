"""Stream lifetime: a subscription ends by itself (`CloseReason.EXPIRED`) and its client resumes.

The first half drives `Broadcaster.subscribe(lifetime=...)` in-process through each kind of
reader (a thread, a task, the ASGI pump); the second runs the reliability app on uvicorn
and reads it with httpx-sse and with Chromium's own `EventSource`, while events keep
flowing, and checks that the reconnections lose and repeat nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from browser import chromium
from servers import PYTHON, Server, free_port, running
from sse_client import aevents
from ssecast import Broadcaster, CloseReason, ConfigurationError, testing
from ssecast._subscription import feed_of
from ssecast.asgi import EventStream

HANG = 30.0
"""Seconds after which a wait counts as hung; the waits here last a second or two."""


# -- in-process ---------------------------------------------------------------------------


@pytest.mark.parametrize("lifetime", [0, -1.0, math.nan, math.inf, True, "10"])
def test_a_lifetime_that_is_not_positive_seconds_is_refused(lifetime: Any) -> None:
    """Zero, negative, NaN, infinite, a bool or a str: ConfigurationError, wherever it is given."""
    with Broadcaster() as broadcaster:
        with pytest.raises(ConfigurationError, match="lifetime"):
            broadcaster.subscribe(lifetime=lifetime)
        with pytest.raises(ConfigurationError, match="lifetime"):
            EventStream(broadcaster, lifetime=lifetime)
        assert broadcaster.stats().subscribers == 0


def test_lifetimes_are_cut_by_up_to_a_tenth_at_random_never_lengthened() -> None:
    """A thousand subscriptions of 100 s end between 90 and 100 s, spread over that window."""
    with Broadcaster() as broadcaster:
        before = time.monotonic()
        subs = [broadcaster.subscribe(lifetime=100) for _ in range(1000)]
        after = time.monotonic()
        ends = [feed_of(sub).expires for sub in subs]
    assert all(end is not None for end in ends)
    lasts = [end - before for end in ends if end is not None]
    assert min(lasts) >= 90
    assert max(lasts) <= 100 + (after - before)
    assert max(lasts) - min(lasts) > 8  # spread, not one instant for all


@pytest.mark.parametrize("heartbeat", [None, 10.0])
def test_a_thread_reader_ends_when_its_lifetime_runs_out(heartbeat: float | None) -> None:
    """A waiting thread reader ends at its lifetime, counted as expired; live events came first."""
    with Broadcaster(heartbeat=heartbeat) as broadcaster:
        sub = broadcaster.subscribe(lifetime=0.3)
        event = broadcaster.publish("t", 1)
        started = time.monotonic()
        assert list(sub) == [event.frame]
        assert time.monotonic() - started < HANG
        assert sub.close_reason is CloseReason.EXPIRED
        assert broadcaster.stats().expired == 1
        assert broadcaster.stats().subscribers == 0


def test_a_thread_reader_sends_heartbeats_until_a_longer_lifetime_ends() -> None:
    """With a heartbeat shorter than the lifetime, heartbeats come first, then the end."""
    with Broadcaster(heartbeat=0.05) as broadcaster:
        sub = broadcaster.subscribe(lifetime=1.0)
        chunks = list(sub)
    assert len(chunks) >= 2
    assert set(chunks) == {b":\n\n"}
    assert sub.close_reason is CloseReason.EXPIRED


def test_a_busy_thread_reader_ends_too_after_what_was_pending() -> None:
    """A reader busy elsewhere when its lifetime ran out reads what was pending, then ends."""
    with Broadcaster(heartbeat=1.0) as broadcaster:
        sub = broadcaster.subscribe(lifetime=0.1)
        sent = [broadcaster.publish("t", n).frame for n in range(3)]
        time.sleep(0.2)
        assert next(sub) == b"".join(sent)
        assert next(sub, None) is None
        assert sub.close_reason is CloseReason.EXPIRED
        assert broadcaster.stats().expired == 1


def test_a_revoked_subscription_is_not_also_counted_as_expired() -> None:
    """A subscription that ended otherwise before its lifetime keeps that reason and count."""
    with Broadcaster(heartbeat=None) as broadcaster:
        sub = broadcaster.subscribe(key="u", lifetime=0.05)
        assert broadcaster.disconnect(key="u") == 1
        time.sleep(0.1)
        assert next(sub, None) is None
        assert sub.close_reason is CloseReason.REVOKED
        stats = broadcaster.stats()
        assert (stats.revoked, stats.expired) == (1, 0)


@pytest.mark.parametrize("heartbeat", [None, 0.05, 10.0])
async def test_a_task_reader_ends_when_its_lifetime_runs_out(heartbeat: float | None) -> None:
    """`async for` ends at the lifetime, with or without heartbeats before it."""
    async with Broadcaster(heartbeat=heartbeat) as broadcaster:
        sub = await broadcaster.asubscribe(lifetime=0.3)
        event = await broadcaster.apublish("t", 1)
        async with asyncio.timeout(HANG):
            chunks = [chunk async for chunk in sub]
        assert chunks[0] == event.frame
        assert set(chunks[1:]) <= {b":\n\n"}
        assert sub.close_reason is CloseReason.EXPIRED
        assert broadcaster.stats().expired == 1


async def test_a_lifetime_timer_left_on_a_closed_subscription_does_nothing() -> None:
    """A subscription closed before its lifetime is not expired later, nor counted."""
    async with Broadcaster(heartbeat=None) as broadcaster:
        sub = await broadcaster.asubscribe(lifetime=1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await anext(sub)  # arms the timer
        await asyncio.to_thread(sub.close)  # from another thread: the timer is not cancelled
        await asyncio.sleep(1.5)
        assert sub.close_reason is CloseReason.UNSUBSCRIBED
        assert broadcaster.stats().expired == 0


@pytest.mark.parametrize("heartbeat", [None, 0.05])
def test_an_asgi_stream_ends_cleanly_at_its_lifetime(heartbeat: float | None) -> None:
    """EventStream(lifetime=...) ends the response; the key and lifetime may be callables."""
    with Broadcaster(heartbeat=heartbeat) as broadcaster:
        app = EventStream(broadcaster, key=lambda scope: "u", lifetime=lambda scope: 0.3)
        with testing.stream(app) as response:
            assert response.status == 200
            event = broadcaster.publish("t", 1)
            assert response.next_event().id == event.id
            response.read(HANG)  # returns once the response has ended
        assert broadcaster.stats().expired == 1
        assert broadcaster.stats().subscribers == 0


# -- over uvicorn -----------------------------------------------------------------------------

LIFETIME = 1.0
RATE = 100
"""Events per second published while clients reconnect."""


@contextlib.contextmanager
def serve() -> Iterator[Server]:
    """The reliability app, telling clients to reconnect after 100 ms."""
    port = free_port()
    argv = [
        *(PYTHON, "-m", "uvicorn", "apps.reliability_app:app", "--host", "127.0.0.1"),
        *("--port", str(port), "--timeout-graceful-shutdown", "1", "--no-access-log"),
    ]
    env = {"SSECAST_TEST_RETRY": "100", "SSECAST_TEST_HEARTBEAT": "0.5"}
    with running(argv, port=port, env=env) as server:
        yield server
    assert "Traceback" not in server.log()


def start_burst(server: Server, channel: str, count: int) -> None:
    """Publish ``count`` events ``{"seq": i}`` at RATE per second from the server's loop."""
    params: dict[str, str | int] = {"count": count, "rate": RATE, "channel": channel}
    httpx.post(f"{server.url}/burst", params=params, timeout=10).raise_for_status()


def burst_done(server: Server) -> bool:
    """Whether the burst has published every event."""
    stats = httpx.get(f"{server.url}/stats", timeout=10).json()
    return bool(stats["burst"]["done"])


async def test_httpx_sse_resumes_across_lifetimes_with_nothing_lost_or_repeated() -> None:
    """A client reconnecting with Last-Event-ID after each lifetime gets every event once."""
    count = 6 * RATE  # six seconds of events: five or six lifetimes
    with serve() as server:
        seqs: list[int] = []
        lasted: list[float] = []
        last_id = None
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG) as client:
            async with asyncio.timeout(10 * HANG):
                while len(seqs) < count:
                    headers: dict[str, str] = {} if last_id is None else {"Last-Event-ID": last_id}
                    path = f"/events?channel=flow&lifetime={LIFETIME}"
                    async with aconnect_sse(client, "GET", path, headers=headers) as source:
                        assert source.response.status_code == 200
                        opened = time.monotonic()
                        if last_id is None:  # subscribed: now the events may flow
                            await asyncio.to_thread(start_burst, server, "flow", count)
                        async for event in aevents(source.aiter_sse()):
                            seqs.append(json.loads(event.data)["seq"])
                            last_id = event.id
                            if len(seqs) == count:
                                break
                        else:
                            lasted.append(time.monotonic() - opened)
            stats = (await client.get("/stats")).json()
    print(f"{len(lasted)} streams ended by their lifetime, after {sorted(lasted)} s")
    assert seqs == list(range(count))
    assert len(lasted) >= 3
    # Never later than the lifetime (a loaded loop may run its timer late: 10x margin),
    # never sooner than 90% of it (less the time the response took to reach the client).
    assert all(0.9 * LIFETIME - 0.1 < seconds < 10 * LIFETIME for seconds in lasted)
    assert stats["expired"] >= len(lasted)


def test_a_browser_eventsource_resumes_across_lifetimes_with_nothing_lost_or_repeated() -> None:
    """Chromium's EventSource, ended every second, reconnects by itself and misses nothing."""
    count = 6 * RATE
    with serve() as server, chromium() as driver:
        driver.get(f"{server.url}/page?channel=browser&lifetime={LIFETIME}")
        deadline = time.monotonic() + HANG
        while driver.execute_script("return window.opened") < 1:
            assert time.monotonic() < deadline, "the EventSource never opened"
            time.sleep(0.05)
        start_burst(server, "browser", count)
        deadline = time.monotonic() + 10 * HANG
        last = f'"seq":{count - 1},'
        while not driver.execute_script(
            "return window.received.some(([id, data]) => data.includes(arguments[0]))", last
        ):
            assert time.monotonic() < deadline, "the page never received the last event"
            time.sleep(0.1)
        received = driver.execute_script("return window.received")
        opened = driver.execute_script("return window.opened")
        assert burst_done(server)
    seqs = [json.loads(data)["seq"] for _, data in received]
    print(f"the EventSource opened {opened} times for {count} events")
    assert seqs == list(range(count))
    assert len({event_id for event_id, _ in received}) == count
    assert opened >= 4
