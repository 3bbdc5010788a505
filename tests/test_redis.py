"""The Redis backend: broadcasters sharing a stream act as one, resume anywhere, outlive Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import ssecast._redis_reader
import ssecast.redis
from reading import Client, assert_told_of_every_hole, printed_event
from servers import PYTHON, TESTS, free_port, running
from sse_parser import ParsedEvent, parse
from ssecast import (
    GAP_EVENT_TYPE,
    Ahead,
    BackendUnavailableError,
    Broadcaster,
    BroadcasterClosedError,
    ConfigurationError,
    Draft,
    Event,
    Subscription,
)
from ssecast._redis_reader import Position
from ssecast.redis import RedisBackend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REDIS_URL = "redis://127.0.0.1:6379/0"
PYTHONPATH = list(filter(None, [os.environ.get("PYTHONPATH")]))


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix no other test uses; its stream is deleted afterwards."""
    name = f"ssecast-test:{uuid.uuid4().hex}:"
    yield name
    with redis.Redis.from_url(REDIS_URL) as client:
        client.delete(name + "events")


def redis_broadcaster(
    prefix: str, *, url: str = REDIS_URL, maxlen: int = 10_000, **options: Any
) -> Broadcaster:
    """A broadcaster on a RedisBackend, with a short heartbeat so reads never hang."""
    options.setdefault("heartbeat", 0.1)
    return Broadcaster(backend=RedisBackend(url, prefix=prefix, maxlen=maxlen), **options)


def stream_order(event: Event) -> tuple[int, int]:
    milliseconds, sequence = event.id.split("-")
    return int(milliseconds), int(sequence)


def expected(events: list[Event], *channels: str) -> list[tuple[str, str, str]]:
    return [(e.id, e.type, e.data) for e in events if e.channel in channels]


def seen(events: list[ParsedEvent]) -> list[tuple[str, str, str]]:
    return [(e.last_event_id, e.type, e.data) for e in events]


class Reader(Client):
    """A client reading one subscription from this thread, keeping all it received."""

    def exactly(self, wanted: list[tuple[str, str, str]], marker: Event) -> None:
        """Assert that ``wanted``, then ``marker``, is all that arrived: no gap, no extra."""
        assert seen(self.until(marker)) == [*wanted, (marker.id, marker.type, marker.data)]


async def read_async(sub: Subscription, count: int, seconds: float = 15.0) -> list[ParsedEvent]:
    """Read ``sub`` with ``async for`` until ``count`` events arrived; return them."""
    stream = b""
    async with asyncio.timeout(seconds):
        async for chunk in sub:
            stream += chunk
            events = parse(stream).events
            if len(events) >= count:
                return events
    raise AssertionError(f"the subscription ended: {sub.close_reason}")


def redis_server_argv(port: int, directory: Path) -> list[str]:
    """A throwaway redis-server without persistence: a restart empties it."""
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]


# -- many broadcasters as one -----------------------------------------------------


def test_two_broadcasters_on_one_prefix_act_as_one(prefix: str) -> None:
    """Events published on either of two broadcasters reach both's subscribers, in stream order."""
    with redis_broadcaster(prefix) as a, redis_broadcaster(prefix) as b:
        channel_sets = [("x",), ("y",), ("x", "y")]
        readers = {
            (name, channels): Reader(broadcaster.subscribe(*channels))
            for name, broadcaster in (("a", a), ("b", b))
            for channels in channel_sets
        }
        published: list[Event] = []
        lock = threading.Lock()

        def publish_on(broadcaster: Broadcaster, name: str) -> None:
            for n in range(50):
                event = broadcaster.publish("tick", {"from": name, "n": n}, channel="xy"[n % 2])
                with lock:
                    published.append(event)

        threads = [threading.Thread(target=publish_on, args=pair) for pair in ((a, "a"), (b, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        in_stream_order = sorted(published, key=stream_order)
        for (_name, channels), reader in readers.items():
            wanted = expected(in_stream_order, *channels)
            assert seen(reader.events(len(wanted))) == wanted


PUBLISHER = textwrap.dedent(
    """
    import json, sys
    from ssecast import Broadcaster
    from ssecast.redis import RedisBackend

    url, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Broadcaster(backend=RedisBackend(url, prefix=prefix)) as b:
        for n in range(count):
            event = b.publish("note", f"line {n}\\nsecond line é", channel="notes", raw=True)
            print(json.dumps([event.id, event.frame.decode()]), flush=True)
    """
)


def test_events_from_a_publisher_process_arrive_byte_for_byte(prefix: str) -> None:
    """A subscriber here receives exactly the frames another process's publish returned."""
    with redis_broadcaster(prefix) as b:
        sub = b.subscribe("notes")
        result = subprocess.run(
            [PYTHON, "-c", PUBLISHER, REDIS_URL, prefix, "20"],
            capture_output=True,
            check=True,
            text=True,
            timeout=30,
        )
        frames = [json.loads(line)[1].encode() for line in result.stdout.splitlines()]
        assert len(frames) == 20
        wanted = b"".join(frames)
        received = b""
        deadline = time.monotonic() + 15
        while len(received) < len(wanted) and time.monotonic() < deadline:
            chunk = next(sub)
            if chunk != b":\n\n":
                received += chunk
        assert received == wanted
        assert parse(received).events[0].data == "line 0\nsecond line é"


# -- resume -----------------------------------------------------------------------


def test_resume_on_another_broadcaster_gets_exactly_the_missed_events(prefix: str) -> None:
    """An id from broadcaster A resumes on a fresh broadcaster B with only the missed events."""
    with redis_broadcaster(prefix) as a:
        watcher = Reader(a.subscribe("x", "y"))
        events = [a.publish("n", n, channel="xy"[n % 2]) for n in range(10)]
        watcher.events(10)
        # The client saw events[3] on A, lost its connection, and reconnects to B.
        with redis_broadcaster(prefix) as b:
            resumed = Reader(b.subscribe("x", last_event_id=events[3].id))
            marker = a.publish("n", "live", channel="x")
            resumed.exactly(expected(events[4:], "x"), marker)


def test_resume_older_than_the_ring_reads_redis_while_events_flow(prefix: str) -> None:
    """Resuming from an id older than the local ring, while others publish, has no gap or dup."""
    with redis_broadcaster(prefix) as a, redis_broadcaster(prefix, history=100) as b:
        watcher = Reader(b.subscribe("x", "y"))
        first = [a.publish("n", n, channel="xy"[n % 2]) for n in range(120)]
        watcher.events(120)  # b has delivered them all; its ring keeps the last 100
        later: list[Event] = []

        def keep_publishing() -> None:
            later.extend(a.publish("n", n, channel="xy"[n % 2]) for n in range(120, 320))

        publisher = threading.Thread(target=keep_publishing)
        publisher.start()
        resumed = Reader(b.subscribe("x", last_event_id=first[5].id))
        publisher.join(30)
        marker = a.publish("n", "last", channel="x")
        resumed.exactly(expected(first[6:] + later, "x"), marker)


@pytest.mark.parametrize(
    "kind", ["garbage", "three parts", "out of range", "never published", "trimmed"]
)
def test_unusable_resume_id_begins_with_a_gap(prefix: str, kind: str) -> None:
    """A malformed, unknown or trimmed Last-Event-ID starts the stream with ssecast.gap."""
    with redis_broadcaster(prefix, maxlen=10) as a:
        events = [a.publish("n", n) for n in range(300 if kind == "trimmed" else 3)]
        resume_from = {
            "garbage": "hello",
            "three parts": "1-2-3",
            "out of range": "99999999999999999999-0",
            "never published": "1-1",
            "trimmed": events[0].id,
        }[kind]
        if kind == "trimmed":
            with redis.Redis.from_url(REDIS_URL) as client:
                assert client.xrange(prefix + "events", resume_from, resume_from) == []
        with redis_broadcaster(prefix) as b:
            resumed = Reader(b.subscribe(last_event_id=resume_from))
            after = a.publish("n", "after")
            got = resumed.events(2)
            assert [event.type for event in got] == [GAP_EVENT_TYPE, "n"]
            assert got[1].last_event_id == after.id


# -- faults -----------------------------------------------------------------------


def test_unreachable_redis_raises_backend_unavailable(prefix: str) -> None:
    """With nothing listening, publish and subscribe raise BackendUnavailableError quickly."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    with redis_broadcaster(prefix, url=url) as b:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="Redis is unreachable"):
            b.publish("n", 1)
        with pytest.raises(BackendUnavailableError):
            b.subscribe()
        assert time.monotonic() - started < 5
        assert b.stats().published == 0


def test_redis_restart_mid_stream_loses_no_acknowledged_event(
    prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Across a Redis kill and restart, subscribers stay and get every acknowledged event."""
    caplog.set_level(logging.DEBUG, logger="ssecast")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = redis_server_argv(port, tmp_path)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running(argv, port=port))
        publisher = stack.enter_context(redis_broadcaster(prefix, url=url))
        elsewhere = stack.enter_context(redis_broadcaster(prefix, url=url))
        readers = [Reader(publisher.subscribe("x")), Reader(elsewhere.subscribe("x"))]
        acked = [publisher.publish("n", f"secret-{n}", channel="x") for n in range(10)]
        for reader in readers:
            reader.events(10)

        server.stop(signal.SIGKILL)
        with pytest.raises(BackendUnavailableError):
            publisher.publish("n", "secret-refused", channel="x")
        with pytest.raises(BackendUnavailableError):
            elsewhere.subscribe("x", last_event_id="1-1")  # resuming needs Redis's history
        for reader in readers:
            assert next(reader.sub) == b":\n\n"  # still connected, kept alive meanwhile

        stack.enter_context(running(argv, port=port))
        acked += [publish_when_back(publisher, f"secret-{n}", "x") for n in range(10, 20)]
        # Every acknowledged event arrives. The server lost whatever was published between
        # the readers' last read and the kill, if anything, so they were told: a gap.
        for reader in readers:
            got = reader.until(acked[-1])
            assert GAP_EVENT_TYPE in [event.type for event in got[10:]]
            assert_told_of_every_hole(got, acked)
            assert [event.data for event in got if event.type != GAP_EVENT_TYPE] == [
                event.data for event in acked
            ]
            assert reader.sub.close_reason is None
        publisher.close()  # before the server stops, which the readers would log
        elsewhere.close()
    assert "is unavailable" in caplog.text
    assert "available again" in caplog.text
    assert "secret" not in caplog.text


def publish_when_back(
    broadcaster: Broadcaster, data: object, channel: str = "default", within: float = 10.0
) -> Event:
    """Publish once the restarted Redis takes commands (it may still be loading)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return broadcaster.publish("n", data, channel=channel)
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_redis_back_from_an_older_snapshot_delivers_nothing_twice(
    prefix: str, tmp_path: Path
) -> None:
    """After Redis restarts from an older snapshot, the reader skips what it delivered."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = redis_server_argv(port, tmp_path)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running(argv, port=port))
        b = stack.enter_context(redis_broadcaster(prefix, url=url))
        reader = Reader(b.subscribe())
        acked = [b.publish("n", n) for n in range(5)]
        with redis.Redis.from_url(url) as admin:
            admin.save()  # the snapshot holds the first five events only
        acked += [b.publish("n", n) for n in range(5, 10)]
        reader.events(10)
        server.stop(signal.SIGKILL)
        stack.enter_context(running(argv, port=port))
        acked += [publish_when_back(b, n) for n in range(10, 15)]
        # Events 5 to 9 are gone from Redis (and what followed them, the reader cannot
        # know): a gap, then the new events, and none of the first ten twice.
        got = reader.until(acked[-1])
        assert GAP_EVENT_TYPE in [event.type for event in got[10:]]
        assert_told_of_every_hole(got, acked)
        assert [event.data for event in got if event.type != GAP_EVENT_TYPE] == [
            event.data for event in acked
        ]
        # A process that starts only now never saw the restart, yet a client that saw
        # event 2 and resumes there is told of the loss: the reader left a gap marker.
        with redis_broadcaster(prefix, url=url) as fresh:
            (gap, *_) = Reader(fresh.subscribe(last_event_id=acked[2].id)).events(1)
            assert gap.type == GAP_EVENT_TYPE
        b.close()  # before the server stops, which its reader would log


async def test_async_subscribers_outlive_a_redis_restart(
    prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With asubscribe and apublish too, a Redis restart loses no acknowledged event."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = redis_server_argv(port, tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        server = stack.enter_context(running(argv, port=port))
        b = await stack.enter_async_context(redis_broadcaster(prefix, url=url))
        sub = await b.asubscribe()
        acked = [await b.apublish("n", n) for n in range(3)]
        assert seen(await read_async(sub, 3)) == expected(acked, "default")
        server.stop(signal.SIGKILL)
        with pytest.raises(BackendUnavailableError):
            await b.apublish("n", "refused")
        stack.enter_context(running(argv, port=port))
        async with asyncio.timeout(10):
            while True:  # the restarted server may still be loading
                try:
                    acked.append(await b.apublish("n", "after"))
                    break
                except BackendUnavailableError:
                    await asyncio.sleep(0.05)
        acked += [await b.apublish("n", n) for n in range(4, 6)]
        got = await read_async(sub, 4)
        while got[-1].last_event_id != acked[-1].id:
            got += await read_async(sub, 1)
        assert got[0].type == GAP_EVENT_TYPE  # what was published before the kill may be lost
        assert_told_of_every_hole(got, acked[3:])
        assert [event.data for event in got if event.type != GAP_EVENT_TYPE] == [
            event.data for event in acked[3:]
        ]
        await b.aclose()  # before the server stops, which the reader would log
    assert "is unavailable" in caplog.text
    assert "reading it from its start" in caplog.text


async def test_apublish_during_an_outage_raises(prefix: str, tmp_path: Path) -> None:
    """An apublish while Redis is down raises BackendUnavailableError; before, it works."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with running(redis_server_argv(port, tmp_path), port=port) as server:
        async with redis_broadcaster(prefix, url=url) as b:
            sub = b.subscribe()
            event = await b.apublish("n", 1)
            assert seen(await read_async(sub, 1)) == expected([event], "default")
            server.stop(signal.SIGKILL)
            with pytest.raises(BackendUnavailableError):
                await b.apublish("n", 2)


# -- the async client -------------------------------------------------------------


async def test_apublish_reaches_async_subscribers_without_blocking_the_loop(prefix: str) -> None:
    """An apublish yields to other tasks while Redis answers; its events reach subscribers."""
    async with redis_broadcaster(prefix) as b, b.subscribe("x") as sub:
        events = [await b.apublish("n", 0, channel="x")]
        other_task_ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(other_task_ran.set)
        events.append(await b.apublish("n", 1, channel="x"))
        assert other_task_ran.is_set()
        events += [await b.apublish("n", n, channel="x") for n in range(2, 5)]
        assert seen(await read_async(sub, 5)) == expected(events, "x")


# -- resources --------------------------------------------------------------------


def named_connections_of(prefix: str) -> int:
    """How many connections to the shared Redis carry the name backends on ``prefix`` use."""
    name = RedisBackend(REDIS_URL, prefix=prefix).client_name
    with redis.Redis.from_url(REDIS_URL) as admin:
        return sum(1 for client in admin.client_list() if client["name"] == name)


def named_connections(backend: RedisBackend) -> int:
    return named_connections_of(backend.key.removesuffix("events"))


def test_redis_connections_do_not_grow_with_subscribers(prefix: str) -> None:
    """One subscriber or 200: the process holds one reader and one publisher connection."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    with Broadcaster(backend=backend, heartbeat=0.1) as b:
        readers = [Reader(b.subscribe("x"))]
        b.publish("n", 0, channel="x")
        readers[0].events(1)
        with_one = named_connections(backend)
        readers += [Reader(b.subscribe("x")) for _ in range(199)]
        event = b.publish("n", 1, channel="x")
        for reader in readers[1:]:
            assert seen(reader.events(1)) == expected([event], "x")
        with_two_hundred = named_connections(backend)
    assert with_one == with_two_hundred == 2


def reader_thread(backend: RedisBackend) -> threading.Thread:
    [thread] = [t for t in threading.enumerate() if t.name == f"ssecast-redis-reader {backend.key}"]
    return thread


def wait_for_no_connections(backend: RedisBackend) -> None:
    deadline = time.monotonic() + 5
    while named_connections(backend) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert named_connections(backend) == 0


def test_close_stops_the_reader_thread_promptly(prefix: str) -> None:
    """close() ends the reader thread at once and the backend's connections go away."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    b = Broadcaster(backend=backend)
    b.subscribe()
    b.publish("n", 1)
    thread = reader_thread(backend)
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 0.5
    assert not thread.is_alive()
    wait_for_no_connections(backend)


async def test_aclose_stops_the_reader_and_closes_the_async_client(prefix: str) -> None:
    """aclose() ends the reader thread and closes the loop's client, leaving no connection."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    b = Broadcaster(backend=backend)
    sub = await b.asubscribe()
    event = await b.apublish("n", 1)
    assert seen(await read_async(sub, 1)) == expected([event], "default")
    thread = reader_thread(backend)
    started = time.monotonic()
    await b.aclose()
    assert time.monotonic() - started < 0.5
    assert not thread.is_alive()
    await asyncio.to_thread(wait_for_no_connections, backend)


def test_a_burst_written_at_once_arrives_whole_and_in_order(prefix: str) -> None:
    """1,000 entries appended in one go (by another program, without seq) all arrive, in order.

    The reader delivers them 100 at a time. Whether a subscriber with a smaller queue than
    the burst keeps up depends on its thread being scheduled between two batches, which
    nothing guarantees on a loaded machine; so this one has room for all of them.
    """
    with redis_broadcaster(prefix) as b, redis.Redis.from_url(REDIS_URL) as admin:
        reader = Reader(b.subscribe(queue_size=1000))
        with admin.pipeline(transaction=False) as pipe:
            for n in range(1000):
                body = f"event: n\ndata: {n}\n\n".encode()
                pipe.xadd(
                    prefix + "events",
                    {"type": "n", "channel": "default", "data": str(n), "body": body},
                )
            pipe.execute()
        events = reader.events(1000)
        assert [event.data for event in events] == [str(n) for n in range(1000)]
        assert reader.sub.close_reason is None


def test_a_process_that_only_publishes_holds_one_connection_and_reads_nothing(
    prefix: str,
) -> None:
    """publish() alone starts no reader: one connection, and nobody's events parsed here."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    with Broadcaster(backend=backend, heartbeat=0.1) as b, redis.Redis.from_url(REDIS_URL) as admin:
        events = [b.publish("n", n) for n in range(3)]
        stored = admin.xrange(backend.key)
        assert [entry_id.decode() for entry_id, _ in stored] == [e.id for e in events]
        assert named_connections(backend) == 1
        assert not [t for t in threading.enumerate() if t.name.startswith("ssecast-redis-reader")]
        assert "listening" not in repr(backend)
        # Subscribing later starts the reader; an id published before resumes from Redis.
        resumed = Reader(b.subscribe(last_event_id=events[0].id))
        assert seen(resumed.events(2)) == expected(events[1:], "default")
        assert "listening" in repr(backend)


def test_events_keep_coming_after_the_loop_that_subscribed_first_ends(prefix: str) -> None:
    """A broadcaster first used in asyncio.run delivers to later subscribers: nothing is lost."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    with Broadcaster(backend=backend, heartbeat=0.1) as b, redis_broadcaster(prefix) as other:

        async def first_request() -> Event:
            async with await b.asubscribe() as sub:
                event = other.publish("n", "during the loop")
                assert seen(await read_async(sub, 1)) == expected([event], "default")
                return event

        seen_last = asyncio.run(first_request())
        later = [other.publish("n", n) for n in range(3)]
        resumed = Reader(b.subscribe(last_event_id=seen_last.id))
        marker = other.publish("n", "marker")
        resumed.exactly(expected(later, "default"), marker)


# -- configuration and packaging --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options"),
    [
        (("http://127.0.0.1:6379",), {}),
        ((REDIS_URL,), {"maxlen": 0}),
        ((REDIS_URL,), {"maxlen": True}),
        ((REDIS_URL,), {"prefix": None}),
    ],
)
def test_bad_arguments_raise_configuration_error(
    args: tuple[Any, ...], options: dict[str, Any]
) -> None:
    """A wrong URL scheme, a maxlen below 1 or a non-str prefix is refused at construction."""
    with pytest.raises(ConfigurationError):
        RedisBackend(*args, **options)


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    return result.stdout


def test_import_without_redis_names_the_extra() -> None:
    """Without the redis package, importing ssecast.redis says which extra to install."""
    out = run_python(
        """
        import sys
        sys.modules["redis"] = None  # what Python does when redis is not installed
        try:
            import ssecast.redis
        except ImportError as error:
            print(error)
        """
    )
    assert "pip install 'ssecast[redis]'" in out


def test_import_error_from_another_module_is_not_disguised(tmp_path: Path) -> None:
    """When redis is present but one of its own imports fails, that error is raised unchanged."""
    fake = tmp_path / "redis"
    fake.mkdir()
    (fake / "__init__.py").write_text("import ssecast_missing_dependency\n")
    out = run_python(
        """
        try:
            import ssecast.redis
        except ImportError as error:
            print(type(error).__name__, error.name, error)
        """,
        PYTHONPATH=str(tmp_path),
    )
    assert out.strip() == (
        "ModuleNotFoundError ssecast_missing_dependency "
        "No module named 'ssecast_missing_dependency'"
    )


# -- many processes: three workers, a publisher process, 300 clients -------------

E2E_PUBLISHER = textwrap.dedent(
    """
    import json, sys
    import redis
    from ssecast import Broadcaster
    from ssecast.redis import RedisBackend

    url, prefix, first, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    backend = RedisBackend(url, prefix=prefix)
    with Broadcaster(backend=backend) as b:
        for n in range(first, stop):
            event = b.publish("tick", {"n": n}, channel="xy"[n % 2])
            print(json.dumps([event.type, event.id, event.channel, event.data]), flush=True)
        with redis.Redis.from_url(url) as admin:
            names = [client["name"] for client in admin.client_list()]
        print(json.dumps(names.count(backend.client_name)), flush=True)
    """
)


async def publish_from_another_process(prefix: str, numbers: range) -> list[Event]:
    """Run the publisher process for ``numbers``; return the events it published.

    Before it exits, it counts the connections on the prefix: the workers' and its own.
    """
    publisher = await asyncio.create_subprocess_exec(
        PYTHON, "-c", E2E_PUBLISHER, REDIS_URL, prefix, str(numbers.start), str(numbers.stop),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(publisher.communicate(), 30)
    assert publisher.returncode == 0
    *lines, connections = output.splitlines()
    published = [printed_event(line) for line in lines]
    assert len(published) == len(numbers)
    # One reader per worker (3) and one publishing connection: no reader in the publisher.
    assert json.loads(connections) == 4
    return published


def uvicorn_worker(port: int) -> list[str]:
    return [
        *(PYTHON, "-m", "uvicorn", "apps.redis_asgi_app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        *("--timeout-graceful-shutdown", "1"),
    ]


def gunicorn_flask_worker(port: int) -> list[str]:
    return [
        *(PYTHON, "-m", "gunicorn", "apps.redis_flask_app:app"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--log-level", "warning"),
        *("--worker-class", "gthread", "--threads", "160", "--graceful-timeout", "1"),
    ]


class StreamClient:
    """One SSE client over HTTP, keeping everything it received."""

    def __init__(self, http: httpx.AsyncClient, url: str, channels: tuple[str, ...]) -> None:
        self.http = http
        self.url = url
        self.channels = channels
        self.opened = asyncio.Event()

    async def listen(self, count: int, last_event_id: str | None = None) -> list[ParsedEvent]:
        """Connect, then read until ``count`` events arrived; return them and disconnect."""
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        params = httpx.QueryParams([("channel", channel) for channel in self.channels])
        async with self.http.stream("GET", self.url, params=params, headers=headers) as response:
            assert response.status_code == 200
            stream = b""
            async for chunk in response.aiter_raw():
                self.opened.set()  # the first chunk comes once the subscription is live
                stream += chunk
                events = parse(stream).events
                if len(events) >= count:
                    return events
        raise AssertionError(f"the stream from {self.url} ended early")


async def test_three_workers_bring_a_publisher_process_to_300_clients(prefix: str) -> None:
    """Two uvicorn and one gunicorn-Flask worker deliver every event, in order, to 300 clients."""
    env = {"SSECAST_TEST_REDIS_URL": REDIS_URL, "SSECAST_TEST_REDIS_PREFIX": prefix}
    ports = [free_port() for _ in range(3)]
    argvs = [uvicorn_worker(ports[0]), uvicorn_worker(ports[1]), gunicorn_flask_worker(ports[2])]
    count = 40
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(running(argv, port=port, env=env))
            for argv, port in zip(argvs, ports, strict=True)
        ]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            channel_sets = [("x",), ("y",), ("x", "y")]
            clients = [
                StreamClient(http, f"{servers[i % 3].url}/events", channel_sets[i // 3 % 3])
                for i in range(300)
            ]
            # This one leaves a uvicorn worker after 10 events and comes back to Flask.
            leaving = StreamClient(http, f"{servers[0].url}/events", ("x", "y"))
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(client.listen(count // 2 * len(client.channels)))
                    for client in clients
                ]
                left = group.create_task(leaving.listen(10))
                async with asyncio.timeout(30):
                    for client in [*clients, leaving]:
                        await client.opened.wait()

                published = await publish_from_another_process(prefix, range(count // 2))
                saw = await asyncio.wait_for(left, 30)  # it leaves before the second half
                published += await publish_from_another_process(prefix, range(count // 2, count))
                async with asyncio.timeout(60):
                    received = [await task for task in tasks]
            for client, events in zip(clients, received, strict=True):
                assert seen(events) == expected(published, *client.channels)
            # One reading connection per worker process, whatever the number of clients.
            assert named_connections_of(prefix) == 3

            assert seen(saw) == expected(published[: len(saw)], "x", "y")
            async with redis_broadcaster(prefix) as local:
                returning = StreamClient(http, f"{servers[2].url}/events", ("x", "y"))
                since = saw[-1].last_event_id
                resumed = asyncio.create_task(returning.listen(count - len(saw) + 1, since))
                await asyncio.wait_for(returning.opened.wait(), 30)
                marker = await local.apublish("tick", "marker", channel="y")
                got = await asyncio.wait_for(resumed, 30)
            missed = expected(published[len(saw) :], "x", "y")
            assert seen(got) == [*missed, (marker.id, marker.type, marker.data)]


# -- the Backend contract, directly -----------------------------------------------


def test_replay_returns_the_range_after_until_on_the_channels(prefix: str) -> None:
    """The backend replays (after, until] on the channels, page after page; None: its start."""
    with redis_broadcaster(prefix) as a, redis_broadcaster(prefix) as listener:
        listener.subscribe("x", "y", queue_size=3000)
        events = [a.publish("n", n, channel="xy"[n % 2]) for n in range(2100)]
        backend = RedisBackend(REDIS_URL, prefix=prefix)
        assert "not started" in repr(backend)
        backend.start(lambda event: None, lambda: None)
        assert "started" in repr(backend)
        # Newer than what this process delivered: the broadcaster waits for it. The
        # backend tells what comes after it; a made-up id that is newer is no such id.
        ahead = backend.replay(events[8].id, events[7].id, frozenset({"x"}))
        assert isinstance(ahead, Ahead)
        assert ahead.follows(events[9].id)
        assert not ahead.follows(events[8].id)
        assert backend.replay("99999999999999-0", events[7].id, frozenset({"x"})) is None
        backend.listen()
        assert "listening" in repr(backend)
        try:
            replayed = backend.replay(events[2].id, events[2050].id, frozenset({"x"}))
            assert replayed == [e for e in events[3:2051] if e.channel == "x"]
            assert backend.replay(events[2].id, None, frozenset({"x", "y"})) == events[3:]
            assert isinstance(backend.replay(events[8].id, events[7].id, frozenset()), Ahead)
            with pytest.raises(RuntimeError, match="starts once"):
                backend.start(lambda event: None, lambda: None)
            with pytest.raises(RuntimeError, match="listens once"):
                backend.listen()
        finally:
            backend.close()
        deadline = time.monotonic() + 10
        while listener.stats().delivered < 2100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listener.stats().delivered == 2100
        assert "closed" in repr(backend)
        draft = Draft("n", "default", "1", b"event: n\ndata: 1\n\n")
        with pytest.raises(BackendUnavailableError, match="closed"):
            backend.publish(draft)


def test_close_works_before_start_and_from_the_reader_thread(prefix: str) -> None:
    """A backend closes whether it never started or is closed by its own reader thread."""
    RedisBackend(REDIS_URL, prefix=prefix).close()
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    closed = threading.Event()

    def deliver(event: Event) -> None:
        backend.close()
        closed.set()

    with pytest.raises(RuntimeError, match="after start"):
        backend.listen()
    backend.start(deliver, lambda: None)
    backend.listen()
    thread = reader_thread(backend)
    backend.publish(Draft("n", "default", "1", b"event: n\ndata: 1\n\n"))
    assert closed.wait(10)
    thread.join(5)
    assert not thread.is_alive()
    wait_for_no_connections(backend)


def test_sync_close_closes_the_client_of_an_idle_loop(prefix: str) -> None:
    """close() runs an idle event loop to stop its reader and close the client it made."""
    loop = asyncio.new_event_loop()
    try:
        backend = RedisBackend(REDIS_URL, prefix=prefix)
        b = Broadcaster(backend=backend)
        loop.run_until_complete(b.asubscribe())
        loop.run_until_complete(b.apublish("n", 1))
        b.close()
        wait_for_no_connections(backend)
    finally:
        loop.close()


def test_a_reader_stops_quietly_when_its_broadcaster_is_closed(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A deliver raising BroadcasterClosedError (close() under way) ends the reader quietly."""

    def deliver(event: Event) -> None:
        raise BroadcasterClosedError("the broadcaster was closed")

    backend = RedisBackend(REDIS_URL, prefix=prefix)
    backend.start(deliver, lambda: None)
    backend.listen()
    thread = reader_thread(backend)
    try:
        backend.publish(Draft("n", "default", "1", b"event: n\ndata: 1\n\n"))
        thread.join(10)
        assert not thread.is_alive()
    finally:
        backend.close()
    assert "failed" not in caplog.text


def test_a_failing_deliver_is_logged_and_delivery_goes_on(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When deliver raises for one event, the reader logs it and delivers the next one."""
    delivered: list[Event] = []
    both = threading.Event()

    def deliver(event: Event) -> None:
        delivered.append(event)
        if len(delivered) == 1:
            raise RuntimeError("a bug in deliver")
        both.set()

    backend = RedisBackend(REDIS_URL, prefix=prefix)
    backend.start(deliver, lambda: None)
    backend.listen()
    try:
        draft = Draft("n", "default", "1", b"event: n\ndata: 1\n\n")
        published = [backend.publish(draft), backend.publish(draft)]
        assert both.wait(10)
        assert delivered == published
    finally:
        backend.close()
    assert f"delivering event {published[0].id} failed" in caplog.text


def test_a_reader_error_is_logged_and_retried(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis error other than a lost connection (a key of the wrong type) is logged, retried."""
    with redis_broadcaster(prefix) as b, redis.Redis.from_url(REDIS_URL) as client:
        reader = Reader(b.subscribe())
        client.set(prefix + "events", "not a stream")
        deadline = time.monotonic() + 10
        while "failed; retrying" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "WRONGTYPE" in caplog.text
        client.delete(prefix + "events")
        event = b.publish("n", "after the repair")
        assert seen(reader.events(1)) == expected([event], "default")


def test_sync_close_closes_the_client_of_a_loop_in_another_thread(prefix: str) -> None:
    """close() from a thread stops the reader and closes the client of a loop running elsewhere."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        backend = RedisBackend(REDIS_URL, prefix=prefix)
        b = Broadcaster(backend=backend)
        asyncio.run_coroutine_threadsafe(b.asubscribe(), loop).result(10)
        asyncio.run_coroutine_threadsafe(b.apublish("n", 1), loop).result(10)
        assert named_connections(backend) == 2
        b.close()
        wait_for_no_connections(backend)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_sync_close_inside_the_loop_closes_its_client_soon(prefix: str) -> None:
    """close() called from a coroutine schedules the stopping of that loop's reader and client."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    b = Broadcaster(backend=backend)
    await b.asubscribe()
    await b.apublish("n", 1)
    b.close()
    await asyncio.to_thread(wait_for_no_connections, backend)
    draft = Draft("n", "default", "1", b"event: n\ndata: 1\n\n")
    with pytest.raises(BackendUnavailableError, match="closed"):
        await backend.apublish(draft)


def test_an_entry_ssecast_did_not_write_is_skipped_not_fatal(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign entry in the stream is logged and skipped; the reader and replay go on."""
    with redis_broadcaster(prefix) as b, redis.Redis.from_url(REDIS_URL) as client:
        reader = Reader(b.subscribe())
        first = b.publish("t", 1)
        client.xadd(prefix + "events", {"something": "else"})
        second = b.publish("t", 2)
        assert seen(reader.events(2)) == expected([first, second], "default")
        assert "not an ssecast event" in caplog.text
        with redis_broadcaster(prefix) as fresh:  # its ring is empty: replay reads Redis
            resumed = Reader(fresh.subscribe(last_event_id=first.id))
            assert seen(resumed.events(1)) == expected([second], "default")


def test_a_refused_command_is_backend_unavailable(prefix: str) -> None:
    """Redis refusing the write (here, a key of the wrong type) means nothing was published."""
    with redis_broadcaster(prefix) as b, redis.Redis.from_url(REDIS_URL) as client:
        b.publish("t", 0)  # started
        client.delete(prefix + "events")
        client.set(prefix + "events", "not a stream")
        with pytest.raises(BackendUnavailableError, match="refused the command"):
            b.publish("t", 1)


PAUSED_WORKER = textwrap.dedent(
    """
    import json, sys
    from sse_parser import parse
    from ssecast import Broadcaster
    from ssecast.redis import RedisBackend

    url, prefix = sys.argv[1:]
    b = Broadcaster(backend=RedisBackend(url, prefix=prefix, maxlen=50), heartbeat=0.2)
    sub = b.subscribe(queue_size=5000)
    print("ready", flush=True)
    stream, printed = b"", 0
    for chunk in sub:
        stream += chunk
        events = parse(stream).events
        for event in events[printed:]:
            print(json.dumps([event.type, event.last_event_id, event.data]), flush=True)
        printed = len(events)
    """
)


def test_a_worker_paused_while_the_stream_is_trimmed_tells_its_clients(prefix: str) -> None:
    """SIGSTOP a worker while 1,000 events go by with maxlen=50: its client gets a gap."""
    argv = [PYTHON, "-c", PAUSED_WORKER, REDIS_URL, prefix]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *PYTHONPATH])}
    with (
        subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=TESTS) as worker,
        redis_broadcaster(prefix, maxlen=50) as publisher,
    ):
        assert worker.stdout is not None
        try:
            assert worker.stdout.readline() == "ready\n"
            first = publisher.publish("n", 0)
            assert json.loads(worker.stdout.readline()) == ["n", first.id, "0"]
            worker.send_signal(signal.SIGSTOP)
            sent = [publisher.publish("n", n) for n in range(1, 1001)]
            worker.send_signal(signal.SIGCONT)
            got: list[list[str]] = []
            while not got or got[-1][1] != sent[-1].id:
                got.append(json.loads(worker.stdout.readline()))
        finally:
            worker.kill()
    types = [event_type for event_type, _, _ in got]
    assert types.count(GAP_EVENT_TYPE) == 1
    hole = types.index(GAP_EVENT_TYPE)
    before, after = got[:hole], got[hole + 1 :]
    assert before == [["n", e.id, e.data] for e in sent[: len(before)]]
    assert after == [["n", e.id, e.data] for e in sent[len(sent) - len(after) :]]
    assert len(before) + len(after) < len(sent)


def test_close_during_a_listen_to_a_silent_redis_ends_that_subscribe_at_once() -> None:
    """close() while the first subscribe waits for a Redis that never answers: both return."""
    with socket.socket() as hole:  # accepts connections (the kernel does), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
        b = Broadcaster(backend=RedisBackend(url, prefix="silent:"))
        raised: list[BaseException] = []

        def subscribe() -> None:
            try:
                b.subscribe()
            except BaseException as error:
                raised.append(error)

        thread = threading.Thread(target=subscribe, daemon=True)
        thread.start()
        time.sleep(0.2)  # waiting in listen() for Redis's answer (5 s before a timeout)
        b.close()
        thread.join(2.5)  # half the socket timeout: only a prompt end gets here
        assert not thread.is_alive()
        assert [type(error) for error in raised] == [BroadcasterClosedError]


def test_a_redis_that_refuses_info_still_serves(prefix: str) -> None:
    """A user without INFO (an ACL, a managed Redis) publishes and reads; restarts go unseen."""
    user = f"ssecast-test-{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(REDIS_URL) as admin:
        admin.acl_setuser(
            user, enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all", "-info"]
        )
        try:
            url = f"redis://{user}@127.0.0.1:6379/0"
            with redis_broadcaster(prefix, url=url) as b, redis_broadcaster(prefix) as full:
                reader = Reader(b.subscribe())
                # Entries written without the server's run_id are compared with nothing:
                # publishers with and without INFO taking turns mark no restart.
                events = [(b, full)[n % 2].publish("n", n) for n in range(6)]
                assert seen(reader.events(6)) == expected(events, "default")
        finally:
            admin.acl_deluser(user)


def test_close_as_listen_connects_leaves_no_reader(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close() that lands just after listen() found its place in the stream: no reader runs."""
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    b = Broadcaster(backend=backend)
    real_locate = ssecast._redis_reader.locate

    def locate_then_close(client: redis.Redis, key: str) -> Position:
        found = real_locate(client, key)
        b.close()
        return found

    monkeypatch.setattr(ssecast.redis, "locate", locate_then_close)
    with pytest.raises(BroadcasterClosedError):
        b.subscribe()
    assert not [t for t in threading.enumerate() if t.name == f"ssecast-redis-reader {backend.key}"]
    wait_for_no_connections(backend)


def test_replay_gives_a_gap_where_the_numbering_of_the_stream_breaks(prefix: str) -> None:
    """Entries renumbered (a stream reset another program wrote into): no replay across them."""
    with redis_broadcaster(prefix, history=1) as b, redis.Redis.from_url(REDIS_URL) as admin:
        first = b.publish("n", 1)
        b.publish("n", 2)
        body = b"event: n\ndata: 3\n\n"
        admin.xadd(
            prefix + "events",
            {"seq": "40", "type": "n", "channel": "default", "data": "3", "body": body},
        )
        newest = b.publish("n", 4)
        with redis_broadcaster(prefix) as fresh:
            got = Reader(fresh.subscribe(last_event_id=first.id)).events(1)
            assert (got[0].type, got[0].last_event_id) == (GAP_EVENT_TYPE, "")
            resumed = Reader(fresh.subscribe(last_event_id=newest.id))
            later = b.publish("n", 5)
            assert seen(resumed.events(1)) == expected([later], "default")


def test_a_stream_deleted_under_a_connected_reader_gives_a_gap(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DEL of the stream while a worker reads it: the numbering begins again, and it says so."""
    with redis_broadcaster(prefix) as b, redis.Redis.from_url(REDIS_URL) as admin:
        reader = Reader(b.subscribe())
        before = [b.publish("n", n) for n in range(3)]
        reader.until(before[-1])
        admin.delete(prefix + "events")
        after = b.publish("n", "after")
        got = reader.until(after)[3:]
        assert [(event.type, event.data) for event in got] == [
            (GAP_EVENT_TYPE, "{}"),
            ("n", '"after"'),
        ]
    assert "numbering began again" in caplog.text
