"""The PostgreSQL backend under attack: what a demanding user does to it in production.

Each test names a way a deployment can treat the backend (a database in another encoding,
a table swapped for a copy, an id sequence with a cache, a client forging ids, a worker
stopped for a while, processes racing to create the table, a fork, psycopg's pure
implementation, a lock held elsewhere...) and checks the promise a user relies on: every
acknowledged event arrives, in order, once, in every serving process; an id that cannot
be resumed gives a gap, never someone else's events; failures are typed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from backends import POSTGRES_DSN, postgres_connections, postgres_dsn
from proxy import proxy_to
from reading import Client, assert_told_of_every_hole
from servers import PYTHON, TESTS, free_port, running
from sse_parser import parse
from ssecast import (
    GAP_EVENT_TYPE,
    BackendUnavailableError,
    Broadcaster,
    BroadcasterClosedError,
    CloseReason,
    Event,
)
from ssecast._postgres_connections import MAX_IDLE
from ssecast.postgres import PostgresBackend
from test_postgres import (
    Cluster,
    StreamClient,
    admin_execute,
    expected,
    number,
    pg_broadcaster,
    seen,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def table() -> Iterator[str]:
    """A table name no other test uses; it, and any table named after it, dropped afterwards."""
    name = f"ssecast_test_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        for suffix in ("", "_old", "_copy"):
            admin.execute(f"DROP TABLE IF EXISTS {name}{suffix}")


def run_script(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a Python process of its own, with the tests folder importable."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        cwd=TESTS,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- databases in another encoding ---------------------------------------------------


@pytest.fixture(scope="module")
def encoded_cluster() -> Iterator[Cluster]:
    """A private cluster holding a SQL_ASCII and a LATIN1 database.

    SQL_ASCII is what `initdb` gives in the C locale (a container without LANG); LATIN1
    is what older European installations run.
    """
    made = Cluster()
    try:
        made.start()
        for name, encoding in (("ascii", "SQL_ASCII"), ("latin", "LATIN1")):
            admin_execute(
                f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
                " TEMPLATE template0",
                dsn=made.dsn,
            )
        yield made
    finally:
        made.remove()


def test_a_sql_ascii_database_carries_events_live_and_replayed(
    table: str, encoded_cluster: Cluster
) -> None:
    """In a SQL_ASCII database the backend works as in a UTF-8 one, channels and all.

    (psycopg reads text as bytes there unless the connection asks for UTF-8: the table
    looked like someone else's, and channels would never match a subscriber's.)
    """
    dsn = encoded_cluster.dsn.replace("dbname=postgres", "dbname=ascii")
    with pg_broadcaster(table, dsn=dsn, history=1) as a, pg_broadcaster(table, dsn=dsn) as b:
        reader = Client(b.subscribe("notes-é"))
        events = [a.publish("note", f"café ✓ {n}", channel="notes-é") for n in range(3)]
        assert seen(reader.until(events[-1])) == expected(events, "notes-é")
        with pg_broadcaster(table, dsn=dsn) as fresh:
            resumed = Client(fresh.subscribe("notes-é", last_event_id=events[0].id))
            assert seen(resumed.events(2)) == expected(events[1:], "notes-é")


def test_a_channel_a_latin1_database_cannot_hold_is_refused_with_a_typed_error(
    table: str, encoded_cluster: Cluster
) -> None:
    """A channel LATIN1 cannot encode raises BackendUnavailableError; the next publish works."""
    dsn = encoded_cluster.dsn.replace("dbname=postgres", "dbname=latin")
    with pg_broadcaster(table, dsn=dsn) as b:
        reader = Client(b.subscribe("café", "fête-🎉"))
        with pytest.raises(BackendUnavailableError, match="refused"):
            b.publish("note", 1, channel="fête-🎉")
        event = b.publish("note", "ok", channel="café")
        assert seen(reader.until(event)) == expected([event], "café")


# -- the table swapped for a copy (a dump restored, a rebuild) -------------------------


def swap_in_a_copy(table: str) -> None:
    """Replace ``table`` by a copy with the same rows and ids, as a restored dump would."""
    with psycopg.connect(POSTGRES_DSN) as admin:
        copy = f"{table}_copy"
        admin.execute(f"CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)")
        admin.execute(f"INSERT INTO {copy} OVERRIDING SYSTEM VALUE SELECT * FROM {table}")
        admin.execute(
            f"SELECT setval(pg_get_serial_sequence('{copy}', 'id'), (SELECT max(id) FROM {copy}))"
        )
        admin.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
        admin.execute(f"ALTER TABLE {copy} RENAME TO {table}")


def test_a_table_swapped_for_a_copy_with_the_same_ids_delivers_nothing_twice(
    table: str,
) -> None:
    """A copy of the table (same rows, ids and tokens) swapped in: the stream goes on, once.

    A dump restored on a new server is such a copy; the documentation says its ids stay
    good: for resuming clients, and for the listeners that served them.
    """
    with pg_broadcaster(table, history=1) as b:
        reader = Client(b.subscribe())
        before = [b.publish("n", n) for n in range(5)]
        reader.until(before[-1])
        swap_in_a_copy(table)
        after = b.publish("n", "after")
        with pg_broadcaster(table) as fresh:
            resumed = Client(fresh.subscribe(last_event_id=before[1].id))
            assert seen(resumed.events(4)) == expected([*before[2:], after], "default")
        got = reader.until(after)
    assert seen(got) == expected([*before, after], "default")


# -- the DSN's own connect_timeout --------------------------------------------------


def test_the_dsns_own_connect_timeout_is_honoured(table: str) -> None:
    """A DSN that allows 30 s to connect reaches a server that takes 3 s to answer."""
    with proxy_to(5432) as proxy:
        dsn = postgres_dsn(proxy.port) + " connect_timeout=30"
        with pg_broadcaster(table, dsn=dsn) as b:
            outcome: list[object] = []

            def publish() -> None:
                try:
                    outcome.append(b.publish("n", 1))
                except BackendUnavailableError as error:
                    outcome.append(error)

            with proxy.paused():  # a slow network, or a server slow to accept
                thread = threading.Thread(target=publish)
                thread.start()
                deadline = time.monotonic() + 20
                while proxy.connections == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                time.sleep(3)
            thread.join(40)
    assert isinstance(outcome[0], Event), outcome


# -- a serving process stopped while the table is trimmed ---------------------------

SERVING = """
    import json, sys
    from ssecast import Broadcaster
    from ssecast.postgres import PostgresBackend

    dsn, table = sys.argv[1], sys.argv[2]
    backend = PostgresBackend(dsn, table=table, maxlen=20)
    with Broadcaster(backend=backend, heartbeat=0.2) as b:
        stream = b""
        sub = b.subscribe(queue_size=1000)  # listening from here on
        print(json.dumps("ready"), flush=True)
        for chunk in sub:
            if chunk != b":\\n\\n":
                print(json.dumps(chunk.decode()), flush=True)
            stream += chunk
            if b'"last"' in stream:
                break
"""


def test_a_stopped_serving_process_that_fell_behind_retention_gives_a_gap(table: str) -> None:
    """SIGSTOP a worker, publish five times maxlen, SIGCONT: its client is told of the hole."""
    with pg_broadcaster(table, maxlen=20) as publisher:
        publisher.publish("n", "table made")
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        worker = subprocess.Popen(
            [PYTHON, "-c", textwrap.dedent(SERVING), POSTGRES_DSN, table],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        try:
            assert worker.stdout is not None
            assert json.loads(worker.stdout.readline()) == "ready"
            stream = ""
            first = publisher.publish("n", "first")
            while first.id not in stream:
                stream += json.loads(worker.stdout.readline())
            worker.send_signal(signal.SIGSTOP)
            try:
                sent = [first] + [publisher.publish("n", n) for n in range(100)]
            finally:
                worker.send_signal(signal.SIGCONT)
            sent.append(publisher.publish("n", "last"))
            output, _ = worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    stream += "".join(json.loads(line) for line in output.splitlines())
    got = parse(stream.encode()).events
    assert [e.type for e in got].count(GAP_EVENT_TYPE) == 1
    assert_told_of_every_hole(got, sent)
    assert got[-1].data == '"last"'


# -- ids forged by clients ----------------------------------------------------------


def test_forged_last_event_ids_get_a_gap_never_other_events(table: str) -> None:
    """Malformed, foreign, trimmed, out-of-range ids: a gap first, then only live events."""
    with pg_broadcaster(table, maxlen=5) as b, pg_broadcaster(f"{table}_copy") as other:
        events = [b.publish("n", n) for n in range(20)]
        foreign = [other.publish("n", n) for n in range(20)]
        token = events[0].id.split("-")[0]
        trimmed = events[2].id
        assert not admin_execute(f"SELECT 1 FROM {table} WHERE id = %s", number(trimmed))
        forged = [
            "-1", "0", "abc", "' OR 1=1; --", "x" * 10_000, f"{token}-0", f"{token}--3",
            f"{token}-1e3", f"{token}-{2**63 - 1}", f"{token}-{2**63}", f"{token}-{10**40}",
            f"{token.upper()}-18", f"{token}-18 ", f" {token}-18", f"{token}-١٨",
            f"{token}-\uff11\uff18", f"{token}-18\x00", foreign[17].id, trimmed,
        ]  # fmt: skip
        with pg_broadcaster(table, history=1) as fresh:
            subs = [Client(fresh.subscribe(last_event_id=forged_id)) for forged_id in forged]
            marker = b.publish("n", "marker")
            for forged_id, sub in zip(forged, subs, strict=True):
                got = sub.until(marker)
                assert [e.type for e in got] == [GAP_EVENT_TYPE, "n"], forged_id
            exact = Client(fresh.subscribe(last_event_id=events[17].id))
            assert seen(exact.events(3)) == expected([*events[18:], marker], "default")


# -- processes racing to create the table ------------------------------------------

CREATOR = """
    import json, sys, time
    from ssecast import Broadcaster
    from ssecast.postgres import PostgresBackend

    dsn, table, at, listen = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    with Broadcaster(backend=PostgresBackend(dsn, table=table)) as b:
        time.sleep(max(0.0, at - time.time()))
        if listen == "1":
            b.subscribe()
        print(json.dumps([b.publish("n", n).id for n in range(10)]))
"""


def test_processes_that_create_the_table_at_once_agree_on_one_table(table: str) -> None:
    """Four processes publish (two subscribe first) on a missing table at the same moment."""
    at = time.time() + 4  # every process has imported ssecast by then
    processes = [
        subprocess.Popen(
            [PYTHON, "-c", textwrap.dedent(CREATOR), POSTGRES_DSN, table, str(at), str(k % 2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, outputs
    ids = [i for out, _ in outputs for i in json.loads(out)]
    assert len({i.split("-")[0] for i in ids}) == 1
    assert len(set(ids)) == 40
    [(rows, numbers, top)] = admin_execute(
        f"SELECT count(*), count(DISTINCT seq), max(seq) FROM {table}"
    )
    assert (rows, numbers, top) == (40, 40, 40)


# -- many threads and event loops at once; close() in the middle ----------------------


def test_threads_and_event_loops_publishing_at_once_all_see_one_order(table: str) -> None:
    """Two loops (apublish, asubscribe) and two threads (publish, subscribe) on one backend."""
    with pg_broadcaster(table) as b:
        b.publish("n", "table made")
        ready = threading.Barrier(4, timeout=30)
        streams: list[list[str]] = []
        errors: list[BaseException] = []
        total = 4 * 25

        async def loop_side(k: int) -> None:
            sub = await b.asubscribe(queue_size=1000)
            await asyncio.to_thread(ready.wait)
            for n in range(25):
                await b.apublish("n", f"loop {k} {n}")
            stream = b""
            async with asyncio.timeout(60):
                async for chunk in sub:
                    stream += chunk
                    if len(parse(stream).events) >= total:
                        break
            streams.append([e.last_event_id for e in parse(stream).events])

        def thread_side(k: int) -> None:
            sub = Client(b.subscribe(queue_size=1000))
            ready.wait()
            for n in range(25):
                b.publish("n", f"thread {k} {n}")
            streams.append([e.last_event_id for e in sub.events(total, timeout=60)])

        def run(target: Any, *args: Any) -> None:
            try:
                target(*args)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=run, args=(asyncio.run, loop_side(k))) for k in (0, 1)]
        threads += [threading.Thread(target=run, args=(thread_side, k)) for k in (2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not errors
        assert len(streams) == 4
        assert all(stream == streams[0] for stream in streams)
        assert len(set(streams[0])) == total
        assert [number(i) for i in streams[0]] == sorted(number(i) for i in streams[0])


def test_close_while_threads_and_a_loop_publish_ends_cleanly(table: str) -> None:
    """close() amid publishes: each returns or raises a closed/unavailable error; nothing left."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    b = Broadcaster(backend=backend, heartbeat=0.1)
    reader = Client(b.subscribe())
    b.publish("n", "table made")
    unexpected: list[BaseException] = []
    published = threading.Semaphore(0)

    def publish_many() -> None:
        for n in range(300):
            try:
                b.publish("n", n)
            except (BroadcasterClosedError, BackendUnavailableError):
                return
            except BaseException as error:
                unexpected.append(error)
                return
            published.release()

    async def apublish_many() -> None:
        for n in range(300):
            try:
                await b.apublish("n", n)
            except (BroadcasterClosedError, BackendUnavailableError):
                return
            except BaseException as error:
                unexpected.append(error)
                return
            published.release()

    threads = [threading.Thread(target=publish_many) for _ in range(2)]
    threads.append(threading.Thread(target=asyncio.run, args=(apublish_many(),)))
    for thread in threads:
        thread.start()
    for _ in range(30):
        assert published.acquire(timeout=30)
    b.close()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert not unexpected
    list(reader.sub)  # what was delivered before the close, then the end
    assert reader.sub.close_reason is CloseReason.SHUTDOWN
    assert not [t for t in threading.enumerate() if t.name.startswith("ssecast-postgres")]
    assert postgres_connections(backend.application_name) == 0


# -- a fork whose child exits normally (a recycled gunicorn worker) -------------------

FORKING = """
    import json, os, sys
    from ssecast import Broadcaster
    from ssecast.postgres import PostgresBackend
    from reading import Client

    dsn, table = sys.argv[1], sys.argv[2]
    b = Broadcaster(backend=PostgresBackend(dsn, table=table), heartbeat=0.2)
    before = b.publish("n", "parent before")  # the pool holds a connection at the fork
    reader = Client(b.subscribe())  # and the listener runs
    pid = os.fork()
    if pid == 0:
        child = Client(b.subscribe())
        mine = b.publish("n", "child")
        child.until(mine)
        sys.exit(0)  # a normal exit: finalizers run, the parent's copies among them
    _, status = os.waitpid(pid, 0)
    after = b.publish("n", "parent after")  # on the connection made before the fork
    got = reader.until(after)
    b.close()
    print(json.dumps({"status": status, "data": [e.data for e in got]}))
"""


def test_a_forked_child_that_exits_normally_leaves_the_parents_connections_working(
    table: str,
) -> None:
    """A worker forked after use exits through the interpreter: the parent goes on unharmed."""
    out = json.loads(run_script(FORKING, POSTGRES_DSN, table))
    assert out == {"status": 0, "data": ['"child"', '"parent after"']}


# -- psycopg's pure-Python implementation -------------------------------------------

PURE = """
    import json, sys
    import psycopg
    from ssecast import Broadcaster
    from ssecast.postgres import PostgresBackend
    from reading import Client

    dsn, table = sys.argv[1], sys.argv[2]
    with Broadcaster(backend=PostgresBackend(dsn, table=table), heartbeat=0.2) as a:
        with Broadcaster(backend=PostgresBackend(dsn, table=table), heartbeat=0.2) as b:
            reader = Client(b.subscribe())
            events = [a.publish("n", "é" * 30_000), a.publish("n", "a\\x00b", raw=True)]
            got = reader.until(events[-1])
        with Broadcaster(backend=PostgresBackend(dsn, table=table), heartbeat=0.2) as c:
            replayed = Client(c.subscribe(last_event_id=events[0].id)).events(1)
    print(json.dumps({
        "impl": psycopg.pq.__impl__,
        "live": [e.data for e in got] == [e.data for e in events],
        "replayed": [e.data for e in replayed] == [events[1].data],
    }))
"""


def test_psycopgs_pure_python_implementation_carries_events() -> None:
    """With PSYCOPG_IMPL=python (no binary wheel), big and NUL-holding events go through."""
    table = f"ssecast_test_{uuid.uuid4().hex[:16]}"
    try:
        out = json.loads(run_script(PURE, POSTGRES_DSN, table, env={"PSYCOPG_IMPL": "python"}))
    finally:
        admin_execute(f"DROP TABLE IF EXISTS {table}")
    assert out == {"impl": "python", "live": True, "replayed": True}


# -- a lock held on the table by another session ------------------------------------


async def test_a_table_locked_elsewhere_fails_publishes_in_bounded_time_and_loses_nothing(
    table: str,
) -> None:
    """ACCESS EXCLUSIVE held past lock_timeout: apublish raises, the loop stays free, no loss."""
    async with pg_broadcaster(table, history=1) as b:
        sub = await b.asubscribe(queue_size=1000)
        acked = [await b.apublish("n", n) for n in range(3)]
        ticks: list[float] = [time.monotonic()]
        stop = asyncio.Event()

        async def tick() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
                ticks.append(time.monotonic())

        ticker = asyncio.create_task(tick())
        locker = await psycopg.AsyncConnection.connect(POSTGRES_DSN)
        try:
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                await b.apublish("n", "refused")
            assert time.monotonic() - began < 50  # 10 x the 5 s lock_timeout
        finally:
            await locker.rollback()
            await locker.close()
        stop.set()
        await ticker
        assert max(later - earlier for earlier, later in itertools.pairwise(ticks)) < 2.0
        acked += [await b.apublish("n", n) for n in range(3, 6)]
        stream = b""
        async with asyncio.timeout(60):
            async for chunk in sub:
                stream += chunk
                if acked[-1].id.encode() in stream:
                    break
    got = parse(stream).events
    assert seen(got) == expected(acked, "default")


# -- many reconnects leak nothing ---------------------------------------------------


def test_a_listener_terminated_again_and_again_holds_one_connection(table: str) -> None:
    """pg_terminate_backend eight times: every event arrives once, and one listener remains."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with Broadcaster(backend=backend, heartbeat=0.1) as b:
        reader = Client(b.subscribe(queue_size=1000))
        acked: list[Event] = []
        for n in range(8):
            admin_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                backend.application_name,
            )
            deadline = time.monotonic() + 30
            while True:  # the pooled connection was terminated too: it fails once
                try:
                    acked.append(b.publish("n", n))
                    break
                except BackendUnavailableError:
                    assert time.monotonic() < deadline
            reader.until(acked[-1])
        got = reader.until(acked[-1])
        assert GAP_EVENT_TYPE not in [e.type for e in got]
        ids = [number(e.last_event_id) for e in got]
        assert ids == sorted(set(ids))  # in order, once
        # A publish whose reply was lost to the termination may have been written too.
        assert {event.id for event in acked} <= {e.last_event_id for e in got}
        assert postgres_connections(backend.application_name) == 2  # listener, publisher


# -- gunicorn --preload: workers forked from a master that used the backend -----------


async def test_gunicorn_preload_workers_forked_after_a_publish_deliver_everything(
    table: str,
) -> None:
    """Two workers forked after the master published: 20 clients get every event, once.

    Each worker holds at most one listening connection, whatever its clients; the master
    keeps the one it published on.
    """
    env = {"SSECAST_TEST_POSTGRES_DSN": POSTGRES_DSN, "SSECAST_TEST_POSTGRES_TABLE": table}
    port = free_port()
    argv = [
        PYTHON, "-m", "gunicorn", "apps.postgres_preload_app:app", "--preload",
        "--bind", f"127.0.0.1:{port}", "--workers", "2", "--worker-class", "gthread",
        "--threads", "40", "--log-level", "warning", "--graceful-timeout", "1",
    ]  # fmt: skip
    # Each stream holds a thread, and either worker may accept every client: 40 threads each.
    with running(argv, port=port, env=env) as server:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            clients = [StreamClient(http, f"{server.url}/events", ("default",)) for _ in range(20)]
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(client.listen(10)) for client in clients]
                async with asyncio.timeout(60):
                    for client in clients:
                        await client.opened.wait()
                # The master's pooled connection, and one listener per worker with clients.
                held = postgres_connections(f"ssecast {table}")
                async with pg_broadcaster(table) as publisher:
                    published = [await publisher.apublish("n", n) for n in range(10)]
                async with asyncio.timeout(60):
                    received = [await task for task in tasks]
    assert 2 <= held <= 3
    for events in received:
        assert seen(events) == expected(published, "default")


# -- a crowd of resumes at once --------------------------------------------------------


def test_a_burst_of_concurrent_resumes_leaves_no_crowd_of_idle_connections(table: str) -> None:
    """Twenty clients resuming at once from the table: afterwards, a few connections remain."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with Broadcaster(backend=backend, history=1, heartbeat=0.1) as b:
        events = [b.publish("n", n) for n in range(5)]
        b.subscribe()  # serving: the listener's connection
        resumed: list[list[str]] = []

        def resume() -> None:
            client = Client(b.subscribe(last_event_id=events[0].id))
            resumed.append([e.data for e in client.events(4)])

        with psycopg.connect(POSTGRES_DSN) as locker:
            # Every resume waits for this lock, so that all of them read at the same time.
            locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            threads = [threading.Thread(target=resume) for _ in range(20)]
            for thread in threads:
                thread.start()
            query = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'"
            )
            deadline = time.monotonic() + 20
            while admin_execute(query, backend.application_name)[0][0] < 20:
                assert time.monotonic() < deadline, "the resumes do not wait for the lock"
                time.sleep(0.02)
            locker.rollback()
        for thread in threads:
            thread.join(30)
        assert resumed == [["1", "2", "3", "4"]] * 20
        # The listener's, and the few idle ones the pool keeps.
        assert postgres_connections(backend.application_name) <= 1 + MAX_IDLE


# -- an id sequence tuned with CACHE --------------------------------------------------


def test_an_id_sequence_with_a_cache_still_delivers_in_publish_order(table: str) -> None:
    """Two processes' publishes alternate on a table whose id sequence caches 20 values.

    Each session draws ids from a block of its own (a common tuning for insert-heavy
    tables), so ids would stop following commit order; they must not reach a client so.
    """
    with pg_broadcaster(table) as a:
        a.publish("n", "table made")
        admin_execute(f"ALTER TABLE {table} ALTER COLUMN id SET CACHE 20")
        with pg_broadcaster(table) as b, pg_broadcaster(table) as listener:
            reader = Client(listener.subscribe())
            sent = [(a, b)[n % 2].publish("n", n) for n in range(6)]
            got = reader.until(sent[-1])
            assert seen(got) == expected(sent, "default")
