"""Keys, the per-key limit and `Broadcaster.disconnect`, in one process and across two.

The in-process tests use the memory backend. The last ones run two uvicorn servers of the
reliability app on one Redis stream, or one PostgreSQL table, as two workers of one app:
a disconnect called in one ends the matching streams of both, and the revoked clients'
reconnections go through `authorize` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import redis

from apps.reliability_client import Chunked, open_stream, post_json
from backends import POSTGRES_DSN, REDIS_URL
from servers import PYTHON, Server, free_port, running
from sse_parser import parse
from ssecast import (
    Backend,
    Broadcaster,
    BroadcasterClosedError,
    CloseReason,
    ConfigurationError,
    Deliver,
    Draft,
    Event,
    InvalidFieldError,
    ReportGap,
    TooManySubscribersError,
)

HANG = 30.0
"""Seconds after which a wait counts as hung; what the tests wait for takes milliseconds."""


# -- keys and the per-key limit -----------------------------------------------------------


def test_the_per_key_limit_refuses_one_more_with_that_key_only() -> None:
    """Two with key "u" are taken, a third is refused (429-worthy); other keys and none go on."""
    with Broadcaster(max_subscribers_per_key=2) as broadcaster:
        first = broadcaster.subscribe(key="u")
        broadcaster.subscribe(key="u")
        with pytest.raises(TooManySubscribersError) as refused:
            broadcaster.subscribe(key="u", last_event_id="an id the ring does not know")
        assert (refused.value.key, refused.value.limit) == ("u", 2)
        assert "with this key" in str(refused.value)
        broadcaster.subscribe(key="v")
        broadcaster.subscribe()
        first.close()
        broadcaster.subscribe(key="u")  # a slot came free
        stats = broadcaster.stats()
        assert (stats.subscribers, stats.refused) == (4, 1)


async def test_a_burst_of_100_subscribers_with_one_key_gets_exactly_the_limit() -> None:
    """100 threads and 100 tasks subscribing at once with one key: exactly 5 get in."""
    with Broadcaster(max_subscribers_per_key=5) as broadcaster:
        results: list[bool] = []
        barrier = threading.Barrier(100)

        def subscribe() -> None:
            barrier.wait(HANG)
            try:
                broadcaster.subscribe(key="burst")
            except TooManySubscribersError:
                results.append(False)
            else:
                results.append(True)

        threads = [threading.Thread(target=subscribe) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
        assert results.count(True) == 5

        async def asubscribe() -> bool:
            try:
                await broadcaster.asubscribe(key="tasks")
            except TooManySubscribersError:
                return False
            return True

        assert (await asyncio.gather(*(asubscribe() for _ in range(100)))).count(True) == 5
        assert broadcaster.stats().refused == 190


@pytest.mark.parametrize("limit", [0, -1, True, "2", 1.5])
def test_a_per_key_limit_out_of_range_is_refused(limit: object) -> None:
    """`max_subscribers_per_key` must be an int of at least 1."""
    with pytest.raises(ConfigurationError, match="max_subscribers_per_key"):
        Broadcaster(max_subscribers_per_key=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["", "a\nb", 7])
def test_an_invalid_key_is_refused(broadcaster: Broadcaster, key: object) -> None:
    """A key must be a non-empty str without CR, LF or NUL, in subscribe and disconnect."""
    with pytest.raises(InvalidFieldError, match="key"):
        broadcaster.subscribe(key=key)  # type: ignore[arg-type]
    with pytest.raises(InvalidFieldError, match="key"):
        broadcaster.disconnect(key=key)  # type: ignore[arg-type]


def test_the_control_channel_is_nobody_s_to_use(broadcaster: Broadcaster) -> None:
    """No one subscribes to, publishes on or disconnects ssecast's own channels."""
    with pytest.raises(InvalidFieldError, match="reserved"):
        broadcaster.subscribe("ssecast.control")
    with pytest.raises(InvalidFieldError, match="reserved"):
        broadcaster.publish("t", 1, channel="ssecast.control")
    with pytest.raises(InvalidFieldError, match="reserved"):
        broadcaster.disconnect(channel="ssecast.anything")


# -- disconnect, in one process -----------------------------------------------------------


def test_disconnect_by_key_by_channel_or_both_ends_exactly_those() -> None:
    """Each call ends the matching subscriptions (REVOKED, frames dropped); the rest go on."""
    with Broadcaster() as broadcaster:
        subs = {
            "u@a": broadcaster.subscribe("a", key="u"),
            "u@b": broadcaster.subscribe("b", key="u"),
            "v@a": broadcaster.subscribe("a", key="v"),
            "-@a": broadcaster.subscribe("a"),
            "-@c": broadcaster.subscribe("c"),
        }
        broadcaster.publish("t", "pending", channel="a")
        assert broadcaster.disconnect(channel="a", key="u") == 1
        assert broadcaster.disconnect(key="u") == 1
        assert broadcaster.disconnect(channel="a") == 2
        assert broadcaster.disconnect(key="nobody") == 0
        ended = {name for name, sub in subs.items() if sub.closed}
        assert ended == {"u@a", "u@b", "v@a", "-@a"}
        assert {subs[name].close_reason for name in ended} == {CloseReason.REVOKED}
        assert all(subs[name].read_nowait() == b"" for name in ended)
        event = broadcaster.publish("t", "still here", channel="c")
        assert subs["-@c"].read_nowait() == event.frame
        stats = broadcaster.stats()
        assert (stats.subscribers, stats.revoked, stats.published) == (1, 4, 2)


async def test_disconnect_ends_waiting_readers_in_threads_and_tasks() -> None:
    """A thread blocked in `for` and a task in `async for` both end at once."""
    async with Broadcaster(heartbeat=None) as broadcaster:
        thread_sub = broadcaster.subscribe(key="u")
        task_sub = await broadcaster.asubscribe(key="u")
        reader = asyncio.create_task(asyncio.to_thread(list, thread_sub))

        async def read() -> list[bytes]:
            return [chunk async for chunk in task_sub]

        task_reader = asyncio.create_task(read())
        await asyncio.sleep(0.05)  # both wait
        assert await broadcaster.adisconnect(key="u") == 2
        async with asyncio.timeout(HANG):
            assert await reader == []
            assert await task_reader == []


def test_disconnect_needs_a_channel_or_a_key_and_an_open_broadcaster() -> None:
    """No argument is a ConfigurationError (not "everyone"); after close, it raises closed."""
    broadcaster = Broadcaster()
    with pytest.raises(ConfigurationError, match="a channel or a key"):
        broadcaster.disconnect()
    broadcaster.close()
    with pytest.raises(BroadcasterClosedError):
        broadcaster.disconnect(key="u")


class Relay:
    """A backend that hands what it is given to `deliver`, and lets a test deliver more."""

    def __init__(self) -> None:
        self.deliver: Deliver | None = None
        self.count = 0

    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        self.deliver = deliver

    def listen(self) -> None:
        pass

    def publish(self, draft: Draft) -> Event:
        assert self.deliver is not None
        self.count += 1
        event = draft.stamp(f"relay-{self.count}")
        self.deliver(event)
        return event

    async def apublish(self, draft: Draft) -> Event:
        return self.publish(draft)

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> None:
        return None

    def check(self) -> None:
        pass

    @property
    def available(self) -> bool:
        return True

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("ssecast.disconnect", "not json"),
        ("ssecast.disconnect", '{"origin": "x", "channel": 7, "key": null}'),
        ("ssecast.disconnect", '{"origin": "x"}'),
        ("ssecast.disconnect", "[]"),
        ("ssecast.future-order", '{"origin": "x", "channel": "a", "key": null}'),
    ],
)
def test_a_control_message_this_version_does_not_know_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture, event_type: str, data: str
) -> None:
    """A malformed or unknown order ends nothing, reaches no one and stops no delivery."""
    relay = Relay()
    backend: Backend = relay
    with Broadcaster(backend=backend) as broadcaster, caplog.at_level(logging.WARNING, "ssecast"):
        sub = broadcaster.subscribe("a", key="u")
        assert relay.deliver is not None
        relay.deliver(Event(event_type, "relay-0", "ssecast.control", data, b""))
        event = broadcaster.publish("t", "after", channel="a")
        assert sub.read_nowait() == event.frame
    assert "ignored control message relay-0" in caplog.text


def test_an_order_from_another_broadcaster_is_carried_out_and_replayed_to_no_one() -> None:
    """An order another process sent ends the matches here; a resume across it sees no trace."""
    relay = Relay()
    with Broadcaster(backend=relay) as broadcaster:
        before = broadcaster.publish("t", "before", channel="a")
        sub = broadcaster.subscribe("a", key="u")
        assert relay.deliver is not None
        order = '{"origin":"another","channel":null,"key":"u"}'
        relay.deliver(Event("ssecast.disconnect", "relay-x", "ssecast.control", order, b""))
        assert sub.close_reason is CloseReason.REVOKED
        after = broadcaster.publish("t", "after", channel="a")
        with broadcaster.subscribe("a", last_event_id=before.id) as resumed:
            assert resumed.read_nowait() == after.frame
        assert broadcaster.stats().revoked == 1


# -- across two servers sharing a backend -------------------------------------------------


@contextlib.contextmanager
def two_workers(kind: str) -> Iterator[tuple[Server, Server]]:
    """Two uvicorn servers of the reliability app on one Redis stream or PostgreSQL table."""
    name = uuid.uuid4().hex[:16]
    if kind == "redis":
        env = {"SSECAST_TEST_REDIS_URL": REDIS_URL, "SSECAST_TEST_REDIS_PREFIX": f"test-{name}:"}
    else:
        env = {
            "SSECAST_TEST_POSTGRES_DSN": POSTGRES_DSN,
            "SSECAST_TEST_POSTGRES_TABLE": f"t_{name}",
        }
    env["SSECAST_TEST_HEARTBEAT"] = "1"
    servers = []
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(2):
                port = free_port()
                argv = [
                    *(PYTHON, "-m", "uvicorn", "apps.reliability_app:app", "--host", "127.0.0.1"),
                    *("--port", str(port), "--timeout-graceful-shutdown", "1", "--no-access-log"),
                ]
                servers.append(stack.enter_context(running(argv, port=port, env=env)))
            yield servers[0], servers[1]
    finally:
        if kind == "redis":
            with redis.Redis.from_url(REDIS_URL) as admin:
                admin.delete(f"test-{name}:events")
        else:
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
                admin.execute(f"DROP TABLE IF EXISTS t_{name}")
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


async def read_until(reader: asyncio.StreamReader, chunked: Chunked, marker: bytes) -> bytes:
    """Read body bytes until ``marker`` arrived, or the response ended; return them."""
    body = b""
    async with asyncio.timeout(HANG):
        while marker not in body and not chunked.finished:
            data = await reader.read(65536)
            if not data:
                break
            body += chunked.feed(data)
    return body


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_disconnect_in_one_worker_ends_the_user_s_streams_in_both(kind: str) -> None:
    """disconnect(key=...) in worker A ends alice's streams on A and B; bob's goes on, untouched.

    Alice's reconnections are refused by ``authorize``; bob's stream never shows the order,
    and a resume across it replays exactly the events, on either worker.
    """
    with two_workers(kind) as (a, b):
        first = post_json(a.port, "/publish?channel=room&data=first")
        streams = {
            name: await open_stream(server.port, f"/events?channel=room&user={user}")
            for name, server, user in [
                ("alice@a", a, "alice"),
                ("alice@b", b, "alice"),
                ("bob@b", b, "bob"),
            ]
        }
        assert {response.status for _, _, response in streams.values()} == {200}
        try:
            chunked = {name: Chunked() for name in streams}
            for server in (a, b):
                post_json(server.port, "/deny?user=alice")
            assert post_json(a.port, "/disconnect?user=alice") == 1
            for name in ("alice@a", "alice@b"):
                reader = streams[name][0]
                await read_until(reader, chunked[name], b"never sent")
                assert chunked[name].finished, f"{name} was not ended"
            post_json(a.port, "/publish?channel=room&data=last")
            got = await read_until(streams["bob@b"][0], chunked["bob@b"], b"data: last")
        finally:
            for _, writer, _ in streams.values():
                writer.close()
        assert [event.data for event in parse(got).events] == ["last"]
        for server in (a, b):
            refused = await asyncio.to_thread(
                httpx.get, f"{server.url}/events?channel=room&user=alice", timeout=10
            )
            assert (refused.status_code, refused.text) == (403, "forbidden\n")
            stats = await asyncio.to_thread(httpx.get, f"{server.url}/stats", timeout=10)
            assert stats.json()["revoked"] == 1
            # A resume from before the order replays the events around it, and only them.
            resume = {"Last-Event-ID": first}
            reader, writer, _ = await open_stream(
                server.port, "/events?channel=room&user=carol", resume
            )
            try:
                body = await read_until(reader, Chunked(), b"data: last")
            finally:
                writer.close()
            assert [(e.type, e.data) for e in parse(body).events] == [("tick", "last")]
