"""The PostgreSQL backend: broadcasters on one table act as one, resume anywhere, outlive PG."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest

import ssecast._postgres_connections
import ssecast._postgres_reader
import ssecast.postgres
from backends import POSTGRES_DSN, postgres_connections, postgres_dsn
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
)
from ssecast._postgres_table import Newest, Page
from ssecast.postgres import PostgresBackend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PYTHONPATH = list(filter(None, [os.environ.get("PYTHONPATH")]))
DRAFT = Draft("n", "default", "1", b"event: n\ndata: 1\n\n")


@pytest.fixture
def table() -> Iterator[str]:
    """A table name no other test uses; the table is dropped afterwards."""
    name = f"ssecast_test_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def pg_broadcaster(
    table: str, *, dsn: str = POSTGRES_DSN, maxlen: int = 10_000, **options: Any
) -> Broadcaster:
    """A broadcaster on a PostgresBackend, with a short heartbeat so reads never hang."""
    options.setdefault("heartbeat", 0.1)
    return Broadcaster(backend=PostgresBackend(dsn, table=table, maxlen=maxlen), **options)


def admin_execute(query: str, *params: object, dsn: str = POSTGRES_DSN) -> list[Any]:
    """Run one statement as the test's own user; return its rows, if any."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        cursor = admin.execute(query, params or None)
        return cursor.fetchall() if cursor.description else []


def seen(events: list[ParsedEvent]) -> list[tuple[str, str, str]]:
    return [(e.last_event_id, e.type, e.data) for e in events]


def expected(events: list[Event], *channels: str) -> list[tuple[str, str, str]]:
    return [(e.id, e.type, e.data) for e in events if e.channel in channels]


def number(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


def wait_for_a_lock_wait(application_name: str) -> None:
    """Wait until a connection of ``application_name`` waits for a lock (the test holds it)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 20
    while admin_execute(query, application_name) != [(1,)]:
        assert time.monotonic() < deadline, "nothing waits for the lock"
        time.sleep(0.02)


def lock_key(backend: PostgresBackend) -> int:
    """The key of the publishers' advisory lock that ``backend`` takes."""
    with backend._connections.borrow() as conn:
        return backend._table._names(conn).lock_key


def listener_thread(table: str) -> threading.Thread:
    [thread] = [t for t in threading.enumerate() if t.name == f"ssecast-postgres-listener {table}"]
    return thread


@contextlib.contextmanager
def listener_held(backend: PostgresBackend, table: str) -> Iterator[None]:
    """Hold the listener of ``backend`` in its next read until the block ends."""
    reading = threading.Event()
    release = threading.Event()
    real = backend._table.read

    def held(conn: psycopg.Connection[Any], first: int, last: int, limit: int) -> Page:
        if threading.current_thread() is listener_thread(table):
            reading.set()
            release.wait(30)
        return real(conn, first, last, limit)

    backend._table.read = held  # type: ignore[method-assign]
    try:
        assert reading.wait(20)  # the listener reads at least every second
        yield
    finally:
        backend._table.read = real  # type: ignore[method-assign]
        release.set()


# -- a private cluster, which the tests may stop ----------------------------------


class Cluster:
    """A PostgreSQL cluster of the test's own, in a temporary directory, on a free port."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="ssecast-pg-"))
        self.port = free_port()
        self.dsn = postgres_dsn(self.port).replace("dbname=test", "dbname=postgres")
        # initdb and postgres refuse to run as root: as root, they run as postgres.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            os.chown(self.directory, account.pw_uid, account.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                "initdb",
                "-D",
                str(self.directory / "data"),
                "-U",
                "root",
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
            ],
            user=self.user,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        """Start the server and wait until it takes connections."""
        with (self.directory / "log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "postgres",
                    "-D",
                    str(self.directory / "data"),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.directory),
                    "-c",
                    "listen_addresses=127.0.0.1",
                ],
                user=self.user,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, (self.directory / "log").read_text()
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop it at once, as a crash would (SIGQUIT: no checkpoint; recovery at start)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Stop every process of the server (SIGSTOP) for the block, then let them go on.

        The host's kernel still acknowledges what is sent to them, as it does for a
        server that is swapping or stuck on a disk: TCP sees nothing wrong.
        """
        assert self.process is not None
        postmaster = self.process.pid
        os.kill(postmaster, signal.SIGSTOP)  # first, so that it starts no process meanwhile
        children = [pid for pid in children_of(postmaster)]
        for pid in children:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            os.kill(postmaster, signal.SIGCONT)


def children_of(parent: int) -> list[int]:
    """The ids of the processes whose parent is ``parent``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name, in parentheses, may hold spaces: the fields follow it.
            _, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == parent:
                found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A running private cluster, shared by this module's tests that stop and start it."""
    made = Cluster()
    try:
        made.start()
        yield made
    finally:
        made.remove()


def publish_when_back(broadcaster: Broadcaster, data: object, within: float = 30.0) -> Event:
    """Publish once the restarted server takes connections."""
    deadline = time.monotonic() + within
    while True:
        try:
            return broadcaster.publish("n", data)
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- many broadcasters as one -----------------------------------------------------

PUBLISHER = textwrap.dedent(
    """
    import json, sys
    from ssecast import Broadcaster
    from ssecast.postgres import PostgresBackend

    dsn, table, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Broadcaster(backend=PostgresBackend(dsn, table=table)) as b:
        for n in range(count):
            event = b.publish("note", f"line {n}\\nsecond line é", channel="notes", raw=True)
            print(json.dumps([event.id, event.frame.decode()]), flush=True)
    """
)


def run_publisher(table: str, count: int) -> list[tuple[str, bytes]]:
    """Publish ``count`` events from another process; return their ids and frames."""
    result = subprocess.run(
        [PYTHON, "-c", PUBLISHER, POSTGRES_DSN, table, str(count)],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
    )
    return [(i, frame.encode()) for i, frame in map(json.loads, result.stdout.splitlines())]


def test_two_broadcasters_in_two_processes_act_as_one(table: str) -> None:
    """Another process and this one publish at once: both broadcasters' subscribers get it all.

    Every subscriber receives the same frames, byte for byte as each publish returned
    them, in id order, once.
    """
    with pg_broadcaster(table) as a, pg_broadcaster(table) as b:
        readers = [Client(a.subscribe("notes", queue_size=1000)), Client(b.subscribe("notes"))]
        mine: list[Event] = []
        here = threading.Thread(
            target=lambda: mine.extend(a.publish("note", n, channel="notes") for n in range(30))
        )
        here.start()
        theirs = run_publisher(table, 30)
        here.join(60)
        frames = sorted(
            [(number(e.id), e.frame) for e in mine]
            + [(number(event_id), frame) for event_id, frame in theirs]
        )
        wanted = b"".join(frame for _, frame in frames)
        for reader in readers:
            reader.events(60)
            assert reader.stream.replace(b":\n\n", b"") == wanted


def test_resume_on_another_process_gets_exactly_the_missed_events(table: str) -> None:
    """A client that saw an event published by another process resumes here with the rest."""
    with pg_broadcaster(table, history=1) as b:
        b.subscribe("notes")  # this process serves streams: it listens
        published = run_publisher(table, 10)
        # A fresh process: its ring is empty, so the table is read.
        with pg_broadcaster(table) as fresh:
            resumed = Client(fresh.subscribe("notes", last_event_id=published[3][0]))
            marker = b.publish("note", "live", channel="notes")
            got = resumed.until(marker)
    assert [e.last_event_id for e in got] == [i for i, _ in published[4:]] + [marker.id]
    assert (
        resumed.stream.replace(b":\n\n", b"")
        == b"".join(frame for _, frame in published[4:]) + marker.frame
    )


def test_payloads_of_60_kib_arrive_whole_live_and_replayed(table: str) -> None:
    """NOTIFY carries only the id: a 60 KiB payload (NOTIFY takes under 8,000 bytes) works."""
    big = "é" * (30 * 1024)  # 60 KiB of UTF-8
    with pg_broadcaster(table) as a, pg_broadcaster(table) as b:
        live = Client(b.subscribe())
        first = a.publish("big", big)
        events = [a.publish("big", big + str(n)) for n in range(3)]
        assert [e.data for e in live.events(4)] == [json.dumps(big, ensure_ascii=False)] + [
            json.dumps(big + str(n), ensure_ascii=False) for n in range(3)
        ]
        with pg_broadcaster(table) as fresh:
            replayed = Client(fresh.subscribe(last_event_id=first.id)).events(3)
    assert seen(replayed) == expected(events, "default")


# -- out-of-order commits ---------------------------------------------------------


def test_a_publish_waits_for_the_one_before_it_to_commit_so_no_row_is_skipped(
    table: str,
) -> None:
    """An id is drawn only once the previous publish committed: rows commit in id order.

    Here the test plays a publisher whose transaction is slow to commit: it holds the
    publishers' lock and writes a row. A publish meanwhile waits, and the listener, which
    reads after the last id it delivered, gets the slow row and then the other, in order.
    """
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with Broadcaster(backend=backend, heartbeat=0.1) as b:
        reader = Client(b.subscribe())
        first = b.publish("n", 0)
        reader.events(1)
        slow = psycopg.connect(POSTGRES_DSN)
        try:
            slow.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(backend),))
            slow.execute(
                f"INSERT INTO {table} (token, seq, type, channel, data, body)"
                f" SELECT token, seq + 1, 'n', 'default', 'slow', %s FROM {table}"
                " ORDER BY id DESC LIMIT 1",
                (b"event: n\ndata: slow\n\n",),
            )
            later: list[Event] = []
            publisher = threading.Thread(target=lambda: later.append(b.publish("n", "later")))
            publisher.start()
            wait_for_a_lock_wait(backend.application_name)  # for the slow transaction
            assert not later
            slow.commit()
        finally:
            slow.close()
        publisher.join(20)
        got = reader.until(later[0])
    assert [e.data for e in got] == ["0", "slow", '"later"']
    ids = [number(e.last_event_id) for e in got]
    assert ids == sorted(ids)
    assert number(first.id) < ids[1] < number(later[0].id)


def test_a_notification_taken_in_during_a_read_is_not_left_waiting(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event committed while the listener reads, too late for that read, comes at once.

    Its notification arrives with the read's results, so psycopg queues it and the socket
    shows nothing more: the listener must look at that queue before it waits, or the event
    would wait for the next poll (made a minute long here, so that it would hang).
    """
    monkeypatch.setattr(ssecast._postgres_reader, "BLOCK_SECONDS", 60.0)
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with Broadcaster(backend=backend, heartbeat=0.1) as b, pg_broadcaster(table) as other:
        reader = Client(b.subscribe())
        first = other.publish("n", "first")
        reader.until(first)
        real_read = backend._table.read
        late: list[Event] = []

        def read_then_publish(conn: Any, *args: Any) -> Any:
            page = real_read(conn, *args)
            if not late:  # committed after the read's snapshot; notified during a query
                late.append(other.publish("n", "late"))
                conn.execute("SELECT 1")
            return page

        monkeypatch.setattr(backend._table, "read", read_then_publish)
        other.publish("n", "wake up")  # the listener reads, and the late one is published
        started = time.monotonic()
        got = reader.events(3)
        assert time.monotonic() - started < 10
    assert [e.data for e in got[1:]] == ['"wake up"', '"late"']


# -- connections ------------------------------------------------------------------


@pytest.mark.parametrize("subscribers", [1, 500])
def test_a_serving_process_holds_one_listening_connection_whatever_its_clients(
    table: str, subscribers: int
) -> None:
    """One subscriber or 500: one listener and one publishing connection, by application_name."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    assert backend.application_name.startswith("ssecast")
    with Broadcaster(backend=backend, heartbeat=0.1) as b:
        readers = [Client(b.subscribe()) for _ in range(subscribers)]
        event = b.publish("n", 1)
        for reader in readers:
            assert seen(reader.events(1)) == expected([event], "default")
        assert postgres_connections(backend.application_name) == 2  # listener, publisher
        assert listener_thread(table).is_alive()
    assert postgres_connections(backend.application_name) == 0


def test_a_process_that_only_publishes_holds_one_connection_and_never_listens(
    table: str,
) -> None:
    """publish() alone starts no listener; subscribing later does, and resumes from the table."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with Broadcaster(backend=backend, heartbeat=0.1) as b:
        events = [b.publish("n", n) for n in range(3)]
        assert postgres_connections(backend.application_name) == 1
        assert not [t for t in threading.enumerate() if t.name.startswith("ssecast-postgres")]
        assert "started" in repr(backend)
        resumed = Client(b.subscribe(last_event_id=events[0].id))
        assert seen(resumed.events(2)) == expected(events[1:], "default")
        assert "listening" in repr(backend)
    assert "closed" in repr(backend)


# -- faults -----------------------------------------------------------------------


def publish_while(
    broadcaster: Broadcaster, disrupt: Callable[[], object]
) -> tuple[list[Event], list[int]]:
    """Publish 0, 1, 2... from a thread while ``disrupt`` runs thrice, 0.3 s apart.

    Return the events acknowledged, and the numbers whose publish raised (not
    acknowledged: each may or may not arrive).
    """
    acked: list[Event] = []
    refused: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        for n in range(3000):
            if stop.is_set():
                return
            try:
                acked.append(broadcaster.publish("n", n))
            except BackendUnavailableError:
                refused.append(n)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            disrupt()
        time.sleep(0.3)
    finally:
        stop.set()
        publisher.join(60)
    return acked, refused


def test_terminated_connections_mid_stream_lose_no_acknowledged_event(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend on every ssecast connection, thrice, while a thread publishes.

    Both subscribers (on two broadcasters) get every acknowledged event, in order, once,
    with no gap: the listener reconnects and reads what it missed from the table.
    """
    caplog.set_level(logging.INFO, logger="ssecast")
    with pg_broadcaster(table) as a, pg_broadcaster(table) as b:
        readers = [Client(a.subscribe(queue_size=5000)), Client(b.subscribe(queue_size=5000))]
        acked, refused = publish_while(
            a,
            lambda: admin_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                a._backend.application_name,  # type: ignore[attr-defined]
            ),
        )
        marker = a.publish("n", "marker")
        for reader in readers:
            got = reader.until(marker)
            assert GAP_EVENT_TYPE not in [e.type for e in got]
            numbers = [json.loads(e.data) for e in got[:-1]]
            assert numbers == sorted(set(numbers))  # in order, once
            acked_numbers = [json.loads(e.data) for e in acked]
            assert set(acked_numbers) <= set(numbers)
            assert set(numbers) - set(acked_numbers) <= set(refused)
            assert reader.sub.close_reason is None
    assert "is unavailable" in caplog.text
    assert "available again" in caplog.text


def test_unreachable_database_raises_backend_unavailable(table: str) -> None:
    """With nothing listening, publish and subscribe raise BackendUnavailableError quickly."""
    with pg_broadcaster(table, dsn=postgres_dsn(free_port())) as b:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="PostgreSQL is unreachable"):
            b.publish("n", 1)
        with pytest.raises(BackendUnavailableError):
            b.subscribe()
        assert time.monotonic() - started < 20  # 10x the connect timeout
        assert b.stats().published == 0


@pytest.mark.parametrize("adapter", ["asgi", "flask"])
def test_adapters_answer_503_with_retry_after_while_the_database_is_unreachable(
    table: str, adapter: str
) -> None:
    """A client asking for a stream while the database is down is told to retry later."""
    import flask

    import ssecast.flask
    from ssecast.asgi import EventStream
    from ssecast.testing import stream

    port = free_port()
    with pg_broadcaster(table, dsn=postgres_dsn(port)) as b:
        app: Any
        if adapter == "asgi":
            app = EventStream(b)
        else:
            app = flask.Flask(__name__)
            app.add_url_rule("/", view_func=lambda: ssecast.flask.stream(b))
        with stream(app, headers={"Accept": "*/*"}, timeout=30) as response:
            assert response.status == 503
            assert response.headers["retry-after"] == "5"
            body = response.read().decode()
    assert "unavailable" in body
    assert str(port) not in body
    assert "127.0.0.1" not in body


def test_a_server_restart_mid_stream_loses_no_acknowledged_event(
    table: str, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The private cluster crashes and restarts: subscribers stay, and get every event.

    While it is down, publish raises; what was published before and after arrives, in
    order, once, and with no gap: a committed row survives the crash.
    """
    caplog.set_level(logging.INFO, logger="ssecast")
    with contextlib.ExitStack() as stack:
        publisher = stack.enter_context(pg_broadcaster(table, dsn=cluster.dsn))
        elsewhere = stack.enter_context(pg_broadcaster(table, dsn=cluster.dsn, history=1))
        readers = [Client(publisher.subscribe()), Client(elsewhere.subscribe())]
        acked = [publisher.publish("n", n) for n in range(10)]
        for reader in readers:
            reader.until(acked[-1])
        cluster.stop()
        with pytest.raises(BackendUnavailableError):
            publisher.publish("n", "refused")
        with pytest.raises(BackendUnavailableError):
            elsewhere.subscribe(last_event_id=acked[0].id)  # resuming needs the table
        for reader in readers:
            assert next(reader.sub) == b":\n\n"  # still connected, kept alive meanwhile
        cluster.start()
        acked += [publish_when_back(publisher, n) for n in range(10, 20)]
        for reader in readers:
            got = reader.until(acked[-1])
            assert seen(got) == expected(acked, "default")
            assert reader.sub.close_reason is None
    assert "is unavailable" in caplog.text
    assert "available again" in caplog.text


async def test_apublish_during_an_outage_raises(table: str, cluster: Cluster) -> None:
    """An apublish while the server is down raises BackendUnavailableError; before, it works."""
    async with pg_broadcaster(table, dsn=cluster.dsn) as b:
        await b.apublish("n", 1)
        cluster.stop()
        try:
            with pytest.raises(BackendUnavailableError):
                await b.apublish("n", 2)
        finally:
            cluster.start()


def test_a_listener_held_up_while_its_rows_are_trimmed_reports_a_gap(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows the listener had yet to read are trimmed: a gap, then what is left, in order."""
    backend = PostgresBackend(POSTGRES_DSN, table=table, maxlen=20)
    with (
        Broadcaster(backend=backend, heartbeat=0.1) as slow,
        pg_broadcaster(table, maxlen=20) as publisher,
    ):
        delivered = threading.Event()
        release = threading.Event()
        reader = Client(slow.subscribe(queue_size=1000))
        first = publisher.publish("n", 0)
        reader.until(first)
        real = backend._table.read

        def held(conn: psycopg.Connection[Any], first: int, last: int, limit: int) -> Page:
            delivered.set()  # the listener's thread is starved for a while
            release.wait(20)
            return real(conn, first, last, limit)

        backend._table.read = held  # type: ignore[method-assign]
        assert delivered.wait(20)  # the listener reads at least every second
        sent = [publisher.publish("n", n) for n in range(1, 101)]
        release.set()
        got = reader.until(sent[-1])[1:]
    types = [e.type for e in got]
    assert types.count(GAP_EVENT_TYPE) == 1
    assert_told_of_every_hole(got, sent)
    assert "trimmed from the table" in caplog.text


def test_a_user_who_may_only_write_the_table_publishes_and_listens(table: str) -> None:
    """Without CREATE on the schema, a user granted the table (made beforehand) uses it."""
    role = f"ssecast_test_{uuid.uuid4().hex[:8]}"
    with pg_broadcaster(table) as owner:
        first = owner.publish("n", 0)  # the table exists now, with its token
    admin_execute(f"CREATE ROLE {role} LOGIN")
    try:
        admin_execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
        admin_execute(f"GRANT SELECT, INSERT, DELETE ON {table} TO {role}")
        dsn = POSTGRES_DSN.replace("user=root", f"user={role}")
        with pg_broadcaster(table, dsn=dsn) as b:
            reader = Client(b.subscribe(last_event_id=first.id))
            event = b.publish("n", 1)
            assert seen(reader.events(1)) == expected([event], "default")
    finally:
        admin_execute(f"DROP OWNED BY {role}")
        admin_execute(f"DROP ROLE {role}")


# -- the table, replaced or altered -----------------------------------------------


def test_a_table_dropped_and_created_again_gives_a_gap_and_foreign_ids(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DROP TABLE under a listener: the next publish recreates it; old ids resume with a gap."""
    with pg_broadcaster(table, history=1) as b:
        reader = Client(b.subscribe())
        before = [b.publish("n", n) for n in range(3)]
        reader.until(before[-1])
        admin_execute(f"DROP TABLE {table}")
        after = [b.publish("n", "after"), b.publish("n", "again")]
        assert number(after[0].id) == 1  # a new table: its ids begin again, with a new token
        got = reader.until(after[-1])[3:]
        assert [e.type for e in got] == [GAP_EVENT_TYPE, "n", "n"]
        with pg_broadcaster(table) as fresh:
            (gap, *_) = Client(fresh.subscribe(last_event_id=before[1].id)).events(1)
            assert gap.type == GAP_EVENT_TYPE
    assert "dropped and created again" in caplog.text


def token(event_id: str) -> str:
    return event_id.rsplit("-", 1)[0]


@pytest.mark.parametrize(
    "emptying", ["DELETE FROM {}", "TRUNCATE {}", "TRUNCATE {} RESTART IDENTITY"]
)
def test_a_table_emptied_under_an_idle_listener_begins_a_new_generation(
    table: str, emptying: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The table emptied, its ids restarted or not: a gap, the new events; old ids are foreign."""
    with pg_broadcaster(table, history=1) as b:
        reader = Client(b.subscribe())
        before = [b.publish("n", n) for n in range(3)]
        reader.until(before[-1])
        admin_execute(emptying.format(table))
        after = [b.publish("n", "after"), b.publish("n", "again")]
        assert token(after[0].id) != token(before[0].id)
        got = reader.until(after[-1])[3:]
        assert [(e.type, e.data) for e in got] == [
            (GAP_EVENT_TYPE, "{}"),
            ("n", '"after"'),
            ("n", '"again"'),
        ]
        with pg_broadcaster(table) as fresh:
            (gap, *_) = Client(fresh.subscribe(last_event_id=before[1].id)).events(1)
            assert gap.type == GAP_EVENT_TYPE
    assert "the table was emptied" in caplog.text


def test_newest_rows_deleted_under_a_listener_give_a_gap(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DELETE the newest rows while a worker reads: their numbers come again, and it says so."""
    with pg_broadcaster(table) as b:
        reader = Client(b.subscribe())
        before = [b.publish("n", n) for n in range(3)]
        reader.until(before[-1])
        admin_execute(f"DELETE FROM {table} WHERE id > %s", number(before[0].id))
        after = b.publish("n", "after")
        assert token(after.id) == token(before[0].id)  # rows remain: the same generation
        got = reader.until(after)[3:]
        assert [(e.type, e.data) for e in got] == [(GAP_EVENT_TYPE, "{}"), ("n", '"after"')]
    assert "numbering began again" in caplog.text


# -- the Backend contract, directly -----------------------------------------------


def test_replay_returns_the_range_after_until_on_the_channels(table: str) -> None:
    """The backend replays (after, until] on the channels, page after page; None: its start."""
    with pg_broadcaster(table) as a, pg_broadcaster(table) as listener:
        listener.subscribe("x", "y", queue_size=3000)
        events = [a.publish("n", n, channel="xy"[n % 2]) for n in range(2100)]
        backend = PostgresBackend(POSTGRES_DSN, table=table)
        assert "not started" in repr(backend)
        backend.start(lambda event: None, lambda: None)
        ahead = backend.replay(events[8].id, events[7].id, frozenset({"x"}))
        assert isinstance(ahead, Ahead)
        assert ahead.follows(events[9].id)
        assert not ahead.follows(events[8].id)
        assert not ahead.follows("not an id")
        token = events[0].id.split("-")[0]
        assert backend.replay(f"{token}-999999999", events[7].id, frozenset({"x"})) is None
        assert backend.replay(events[2].id, "elsewhere-1", frozenset({"x"})) is None
        assert backend.replay(events[2].id, None, frozenset({"x"})) is None  # not listening
        backend.listen()
        try:
            replayed = backend.replay(events[2].id, events[2050].id, frozenset({"x"}))
            assert replayed == [e for e in events[3:2051] if e.channel == "x"]
            assert backend.replay(events[2].id, None, frozenset({"x", "y"})) == events[3:]
            with pytest.raises(RuntimeError, match="starts once"):
                backend.start(lambda event: None, lambda: None)
            with pytest.raises(RuntimeError, match="listens once"):
                backend.listen()
            # A hole in the numbering (rows another program deleted): no replay across it.
            admin_execute(f"DELETE FROM {table} WHERE id = %s", number(events[5].id))
            assert backend.replay(events[2].id, events[9].id, frozenset({"x"})) is None
            assert backend.replay(events[5].id, events[9].id, frozenset({"x"})) is None
        finally:
            backend.close()
        with pytest.raises(BackendUnavailableError, match="closed"):
            backend.publish(DRAFT)


def test_close_works_before_start_and_from_the_listener_thread(table: str) -> None:
    """A backend closes whether it never started or is closed by its own listener thread."""
    PostgresBackend(POSTGRES_DSN, table=table).close()
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    closed = threading.Event()

    def deliver(event: Event) -> None:
        backend.close()
        closed.set()

    with pytest.raises(RuntimeError, match="after start"):
        backend.listen()
    backend.start(deliver, lambda: None)
    backend.listen()
    thread = listener_thread(table)
    backend.publish(DRAFT)
    assert closed.wait(10)
    thread.join(5)
    assert not thread.is_alive()
    assert postgres_connections(backend.application_name) == 0


def test_a_listener_stops_quietly_when_its_broadcaster_is_closed(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A deliver raising BroadcasterClosedError (close() under way) ends the listener quietly."""

    def deliver(event: Event) -> None:
        raise BroadcasterClosedError("the broadcaster was closed")

    backend = PostgresBackend(POSTGRES_DSN, table=table)
    backend.start(deliver, lambda: None)
    backend.listen()
    thread = listener_thread(table)
    try:
        backend.publish(DRAFT)
        thread.join(10)
        assert not thread.is_alive()
    finally:
        backend.close()
    assert "failed" not in caplog.text


def test_a_failing_deliver_is_logged_and_delivery_goes_on(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When deliver raises for one event, the listener logs it and delivers the next one."""
    delivered: list[Event] = []
    both = threading.Event()

    def deliver(event: Event) -> None:
        delivered.append(event)
        if len(delivered) == 1:
            raise RuntimeError("a bug in deliver")
        both.set()

    backend = PostgresBackend(POSTGRES_DSN, table=table)
    backend.start(deliver, lambda: None)
    backend.listen()
    try:
        published = [backend.publish(DRAFT), backend.publish(DRAFT)]
        assert both.wait(10)
        assert delivered == published
    finally:
        backend.close()
    assert f"delivering event {published[0].id} failed" in caplog.text


def test_a_listener_error_is_logged_and_retried(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused read (a column dropped, say) is logged with a traceback and retried."""
    with pg_broadcaster(table) as b:
        reader = Client(b.subscribe())
        first = b.publish("n", 0)
        reader.until(first)
        admin_execute(f"ALTER TABLE {table} RENAME COLUMN body TO other")
        deadline = time.monotonic() + 10
        while "failed; retrying" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "failed; retrying" in caplog.text
        with pytest.raises(BackendUnavailableError, match="refused"):
            b.publish("n", "refused")
        admin_execute(f"ALTER TABLE {table} RENAME COLUMN other TO body")
        event = b.publish("n", "after the repair")
        assert seen(reader.until(event)[1:]) == expected([event], "default")


def test_close_as_listen_connects_leaves_no_listener(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close() that lands just after listen() found the newest row: no listener runs."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    b = Broadcaster(backend=backend)
    real_newest = backend._table.newest

    def newest_then_close(conn: Any) -> Newest:
        found = real_newest(conn)
        b.close()
        return found

    monkeypatch.setattr(backend._table, "newest", newest_then_close)
    with pytest.raises(BroadcasterClosedError):
        b.subscribe()
    assert not [t for t in threading.enumerate() if t.name.startswith("ssecast-postgres")]
    assert postgres_connections(backend.application_name) == 0


def test_a_failed_listen_closes_its_connection_and_may_be_retried(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LISTEN refused once: subscribe raises, leaves no connection, and works the next time."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with Broadcaster(backend=backend, heartbeat=0.1) as b:
        real_listen = backend._table.listen
        monkeypatch.setattr(backend._table, "listen", lambda conn: conn.execute("LISTEN a b c"))
        with pytest.raises(BackendUnavailableError, match="could not start listening"):
            b.subscribe()
        assert postgres_connections(backend.application_name) == 0
        monkeypatch.setattr(backend._table, "listen", real_listen)
        reader = Client(b.subscribe())
        event = b.publish("n", 1)
        assert seen(reader.events(1)) == expected([event], "default")


def test_a_listener_that_cannot_reconnect_keeps_trying(
    table: str, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """While the server stays down, reconnecting fails again and again, quietly; then it works.

    A broadcaster closed meanwhile stops its listener at once.
    """
    caplog.set_level(logging.DEBUG, logger="ssecast")
    with pg_broadcaster(table, dsn=cluster.dsn) as b:
        reader = Client(b.subscribe())
        other = pg_broadcaster(table, dsn=cluster.dsn)
        other.subscribe()
        cluster.stop()
        deadline = time.monotonic() + 20
        while "attempt 3 failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "attempt 3 failed" in caplog.text
        started = time.monotonic()
        other.close()
        assert time.monotonic() - started < 5
        cluster.start()
        event = publish_when_back(b, "back")
        assert seen(reader.until(event)) == expected([event], "default")


def test_close_waits_for_a_publish_in_flight_then_closes_its_connection(table: str) -> None:
    """A publish under way when close() is called completes; then no connection is left."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    b = Broadcaster(backend=backend)
    b.publish("n", 0)  # the table exists
    published: list[Event] = []
    with psycopg.connect(POSTGRES_DSN) as blocker:
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(backend),))
        publisher = threading.Thread(target=lambda: published.append(b.publish("n", 1)))
        publisher.start()
        wait_for_a_lock_wait(backend.application_name)  # the publish waits for the lock
        closer = threading.Thread(target=b.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive()  # close() waits for the publish
        blocker.rollback()
    publisher.join(10)
    closer.join(10)
    assert [event.data for event in published] == ["1"]
    assert postgres_connections(backend.application_name) == 0


# -- many processes: three workers, a publisher process, 300 clients -------------

E2E_PUBLISHER = textwrap.dedent(
    """
    import json, sys
    import psycopg
    from ssecast import Broadcaster
    from ssecast.postgres import PostgresBackend

    dsn, table, first, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    backend = PostgresBackend(dsn, table=table)
    with Broadcaster(backend=backend) as b:
        for n in range(first, stop):
            event = b.publish("tick", {"n": n}, channel="xy"[n % 2])
            print(json.dumps([event.type, event.id, event.channel, event.data]), flush=True)
        with psycopg.connect(dsn) as admin:
            (count,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (backend.application_name,),
            ).fetchone()
        print(json.dumps(count), flush=True)
    """
)


async def publish_from_another_process(table: str, numbers: range) -> list[Event]:
    """Run the publisher process for ``numbers``; return the events it published.

    Before it exits, it counts the connections on the table: the workers' and its own.
    """
    publisher = await asyncio.create_subprocess_exec(
        PYTHON, "-c", E2E_PUBLISHER, POSTGRES_DSN, table, str(numbers.start), str(numbers.stop),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(publisher.communicate(), 60)
    assert publisher.returncode == 0
    *lines, connections = output.splitlines()
    published = [printed_event(line) for line in lines]
    assert len(published) == len(numbers)
    # One listener per worker (3) and one publishing connection: no listener here.
    assert json.loads(connections) == 4
    return published


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


async def test_three_workers_bring_a_publisher_process_to_300_clients(table: str) -> None:
    """Two uvicorn and one gunicorn-Flask worker deliver every event, in order, to 300 clients.

    A client that leaves one worker resumes on another with exactly what it missed.
    """
    env = {"SSECAST_TEST_POSTGRES_DSN": POSTGRES_DSN, "SSECAST_TEST_POSTGRES_TABLE": table}
    ports = [free_port() for _ in range(3)]
    argvs = [
        [PYTHON, "-m", "uvicorn", "apps.postgres_asgi_app:app", "--host", "127.0.0.1",
         "--port", str(ports[0]), "--log-level", "warning", "--timeout-graceful-shutdown", "1"],
        [PYTHON, "-m", "uvicorn", "apps.postgres_asgi_app:app", "--host", "127.0.0.1",
         "--port", str(ports[1]), "--log-level", "warning", "--timeout-graceful-shutdown", "1"],
        [PYTHON, "-m", "gunicorn", "apps.postgres_flask_app:app", "--bind",
         f"127.0.0.1:{ports[2]}", "--workers", "1", "--log-level", "warning",
         "--worker-class", "gthread", "--threads", "160", "--graceful-timeout", "1"],
    ]  # fmt: skip
    count = 40
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(running(argv, port=port, env=env))
            for argv, port in zip(argvs, ports, strict=True)
        ]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
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
                async with asyncio.timeout(60):
                    for client in [*clients, leaving]:
                        await client.opened.wait()
                published = await publish_from_another_process(table, range(count // 2))
                saw = await asyncio.wait_for(left, 60)  # it leaves before the second half
                published += await publish_from_another_process(table, range(count // 2, count))
                async with asyncio.timeout(120):
                    received = [await task for task in tasks]
            for client, events in zip(clients, received, strict=True):
                assert seen(events) == expected(published, *client.channels)
            # One listening connection per worker process, whatever the number of clients.
            application_name = PostgresBackend(POSTGRES_DSN, table=table).application_name
            assert postgres_connections(application_name) == 3

            assert seen(saw) == expected(published[: len(saw)], "x", "y")
            async with pg_broadcaster(table) as local:
                returning = StreamClient(http, f"{servers[2].url}/events", ("x", "y"))
                since = saw[-1].last_event_id
                resumed = asyncio.create_task(returning.listen(count - len(saw) + 1, since))
                await asyncio.wait_for(returning.opened.wait(), 60)
                marker = await local.apublish("tick", "marker", channel="y")
                got = await asyncio.wait_for(resumed, 60)
            missed = expected(published[len(saw) :], "x", "y")
            assert seen(got) == [*missed, (marker.id, marker.type, marker.data)]


# -- configuration and packaging --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options"),
    [
        ((b"host=127.0.0.1",), {}),
        (("host=127.0.0.1 nonsense",), {}),
        ((POSTGRES_DSN,), {"maxlen": 0}),
        ((POSTGRES_DSN,), {"maxlen": True}),
        ((POSTGRES_DSN,), {"table": None}),
        ((POSTGRES_DSN,), {"table": "drop table x; --"}),
        ((POSTGRES_DSN,), {"table": "x" * 56}),
    ],
)
def test_bad_arguments_raise_configuration_error(
    args: tuple[Any, ...], options: dict[str, Any]
) -> None:
    """A DSN libpq cannot parse, a maxlen below 1, or a table that is no plain name: refused."""
    with pytest.raises(ConfigurationError):
        PostgresBackend(*args, **options)


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=TESTS,
    )
    return result.stdout


def test_from_django_uses_the_settings_of_a_database_alias(table: str) -> None:
    """from_django() connects where Django's DATABASES alias says, with its OPTIONS."""
    out = run_python(
        f"""
        import django
        from django.conf import settings
        settings.configure(DATABASES={{
            "default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            "events": {{
                "ENGINE": "django.db.backends.postgresql", "NAME": "test", "USER": "root",
                "HOST": "127.0.0.1", "PORT": 5432, "PASSWORD": "",
                "OPTIONS": {{"sslmode": "disable", "isolation_level": 1}},
            }},
            "broken": {{
                "ENGINE": "django.db.backends.postgresql", "NAME": "test",
                "OPTIONS": {{"no_such_option": 1}},
            }},
        }})
        django.setup()
        from ssecast import Broadcaster, ConfigurationError
        from ssecast.postgres import PostgresBackend

        backend = PostgresBackend.from_django("events", table={table!r}, maxlen=5)
        with Broadcaster(backend=backend) as b:
            print(b.publish("n", 1).id.endswith("-1"))
        for alias in ("default", "missing", "broken"):
            try:
                PostgresBackend.from_django(alias)
            except ConfigurationError as error:
                print(type(error).__name__, alias)
        """
    )
    assert out.split("\n") == [
        "True",
        "ConfigurationError default",
        "ConfigurationError missing",
        "ConfigurationError broken",
        "",
    ]


def test_import_without_psycopg_names_the_extra() -> None:
    """Without the psycopg package, importing ssecast.postgres says which extra to install."""
    out = run_python(
        """
        import sys
        sys.modules["psycopg"] = None  # what Python does when psycopg is not installed
        try:
            import ssecast.postgres
        except ImportError as error:
            print(error)
        """
    )
    assert "pip install 'ssecast[postgres]'" in out


def test_the_module_says_what_it_needs() -> None:
    """The public module is the backend, and its connections are named for pg_stat_activity."""
    assert ssecast.postgres.__all__ == ["PostgresBackend"]
    backend = PostgresBackend(POSTGRES_DSN, table="public.events")
    assert backend.application_name == "ssecast public.events"
    backend.close()


def test_a_held_resume_is_let_in_when_the_table_begins_a_new_generation(table: str) -> None:
    """A client held for an id not delivered yet gets a gap, then the new generation's events."""
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with (
        Broadcaster(backend=backend, heartbeat=0.1) as slow,
        pg_broadcaster(table) as publisher,
    ):
        watcher = Client(slow.subscribe())
        first = publisher.publish("n", 0)
        watcher.until(first)
        with listener_held(backend, table):  # the listener lags behind the publisher
            awaited = publisher.publish("n", 1)
            resumed = Client(slow.subscribe(last_event_id=awaited.id))  # held: not delivered
            admin_execute(f"TRUNCATE {table} RESTART IDENTITY")
            after = publisher.publish("n", "after")
            assert token(after.id) != token(awaited.id)
        got = resumed.until(after)
    assert got[0].type == GAP_EVENT_TYPE
    assert got[-1].data == '"after"'


def test_concurrent_publishes_number_rows_without_repeats_under_a_stricter_default_isolation(
    table: str,
) -> None:
    """A role whose transactions default to repeatable read still numbers every row once."""
    role = f"ssecast_test_{uuid.uuid4().hex[:8]}"
    with pg_broadcaster(table) as owner:
        owner.publish("n", 0)  # the table exists now, with its token
    admin_execute(f"CREATE ROLE {role} LOGIN")
    try:
        admin_execute(f"ALTER ROLE {role} SET default_transaction_isolation = 'repeatable read'")
        admin_execute(f"GRANT SELECT, INSERT, DELETE ON {table} TO {role}")
        dsn = POSTGRES_DSN.replace("user=root", f"user={role}")
        with pg_broadcaster(table, dsn=dsn) as b:

            def publish_many() -> None:
                for n in range(150):
                    b.publish("n", n)

            threads = [threading.Thread(target=publish_many) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        [(rows, numbers)] = admin_execute(f"SELECT count(*), count(DISTINCT seq) FROM {table}")
        assert (rows, numbers) == (301, 301)
    finally:
        admin_execute(f"DROP OWNED BY {role}")
        admin_execute(f"DROP ROLE {role}")


def test_a_listener_whose_connection_has_a_descriptor_above_1024_waits_without_failing(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener on a descriptor of 1024 or more waits for events and never reconnects."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("the hard limit on open files is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    filler: list[socket.socket] = []
    try:
        while not filler or filler[-1].fileno() < 1100:
            filler.append(socket.socket())
        with pg_broadcaster(table) as b:
            reader = Client(b.subscribe())
            time.sleep(1.5)  # the listener waits for a notification at least once
            event = b.publish("n", 1)
            assert seen(reader.until(event)) == expected([event], "default")
    finally:
        for sock in filler:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "reconnect" not in caplog.text
    assert "failed" not in caplog.text


def test_raw_data_holding_nul_is_published_live_and_replayed(table: str) -> None:
    """Raw data holding NUL reaches live and resuming subscribers, as on the other backends."""
    with pg_broadcaster(table, history=1) as b:
        reader = Client(b.subscribe())
        first = b.publish("n", "before")
        event = b.publish("msg", "a\x00b", raw=True)
        last = b.publish("n", "after")
        assert event.data == "a\x00b"
        live = reader.until(last)
        with pg_broadcaster(table) as fresh:
            replayed = Client(fresh.subscribe(last_event_id=first.id)).events(2)
    assert seen(live[1:]) == seen(replayed) == expected([event, last], "default")


def test_a_refused_statement_is_reported_as_refused_not_unreachable(table: str) -> None:
    """A statement PostgreSQL refuses raises an error saying it refused it, with its reason."""
    with pg_broadcaster(table) as b:
        b.publish("n", 0)
        admin_execute(f"ALTER TABLE {table} RENAME COLUMN body TO other")
        with pytest.raises(BackendUnavailableError, match="refused the statement") as raised:
            b.publish("n", 1)
        assert "unreachable" not in str(raised.value)
        assert "UndefinedColumn" in str(raised.value)


def test_listening_on_a_table_that_is_not_ssecasts_fails_without_writing_to_it(
    table: str,
) -> None:
    """An existing table without ssecast's columns is refused clearly and its comment kept."""
    admin_execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, name text)")
    admin_execute(f"COMMENT ON TABLE {table} IS 'the application''s own'")
    with pg_broadcaster(table) as b:
        with pytest.raises(BackendUnavailableError, match="not ssecast's"):
            b.subscribe()
        with pytest.raises(BackendUnavailableError, match="ssecast's"):
            b.publish("n", 0)
    [(comment,)] = admin_execute(f"SELECT obj_description('{table}'::regclass)")
    assert comment == "the application's own"


def test_a_publish_waiting_for_a_lock_held_elsewhere_fails_within_the_lock_timeout(
    table: str,
) -> None:
    """Another session holding the publishers' lock makes publish fail in bounded time, not hang."""
    dsn = POSTGRES_DSN + " options='-c work_mem=8MB'"  # the DSN's own options are kept
    backend = PostgresBackend(dsn, table=table)
    with Broadcaster(backend=backend) as b:
        b.publish("n", 0)  # the table exists
        with psycopg.connect(POSTGRES_DSN) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(backend),))
            began = time.monotonic()
            with pytest.raises(BackendUnavailableError, match="LockNotAvailable"):
                b.publish("n", 1)
            assert time.monotonic() - began < 50  # 10 x the 5 s lock_timeout
            holder.commit()
        assert b.publish("n", 2).data == "2"
        with backend._connections.borrow() as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)


def test_backends_spelling_the_table_differently_take_turns_and_lose_no_row(table: str) -> None:
    """Publishers on `t` and `public.t` share one lock: every row is delivered, none in a gap."""
    with pg_broadcaster(table) as a, pg_broadcaster(f"public.{table}") as qualified:
        reader = Client(a.subscribe(queue_size=2000))
        first = a.publish("n", "first")
        reader.until(first)

        def publish_many(b: Broadcaster) -> None:
            for n in range(500):
                b.publish("n", n)

        threads = [threading.Thread(target=publish_many, args=(b,)) for b in (a, qualified)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        last = a.publish("n", "last")
        got = reader.until(last)
    assert GAP_EVENT_TYPE not in [e.type for e in got]
    assert len(got) == 1002
    [(rows, numbers)] = admin_execute(f"SELECT count(*), count(DISTINCT seq) FROM {table}")
    assert (rows, numbers) == (1002, 1002)


# -- ids restarted ------------------------------------------------------------------


def test_ids_restarted_past_the_listeners_last_one_before_it_reads_are_all_delivered(
    table: str,
) -> None:
    """TRUNCATE ... RESTART IDENTITY, then more events than the listener had read, at once.

    The new ids pass the last one it delivered before it reads again: it still reads the
    new generation from its first event, after a gap, and skips none.
    """
    backend = PostgresBackend(POSTGRES_DSN, table=table)
    with (
        Broadcaster(backend=backend, heartbeat=0.1) as slow,
        pg_broadcaster(table) as publisher,
    ):
        reader = Client(slow.subscribe(queue_size=1000))
        before = [publisher.publish("n", n) for n in range(5)]
        reader.until(before[-1])
        with listener_held(backend, table):
            admin_execute(f"TRUNCATE {table} RESTART IDENTITY")
            after = [publisher.publish("n", n) for n in range(8)]
        assert number(after[-1].id) > number(before[-1].id)
        got = reader.until(after[-1])[5:]
    assert [e.type for e in got] == [GAP_EVENT_TYPE] + ["n"] * 8
    assert seen(got[1:]) == expected(after, "default")


def test_ids_restarted_while_events_flow_are_never_skipped_silently(table: str) -> None:
    """TRUNCATE ... RESTART IDENTITY thrice while a thread publishes: every hole has a gap.

    Events published and truncated before a listener read them are lost to it (they were
    deleted), but never silently; every other event arrives, in order, once.
    """
    with pg_broadcaster(table) as a, pg_broadcaster(table) as b:
        readers = [Client(a.subscribe(queue_size=5000)), Client(b.subscribe(queue_size=5000))]
        first = a.publish("n", "first")
        for reader in readers:  # each listener read the first generation
            reader.until(first)
        acked, refused = publish_while(
            a, lambda: admin_execute(f"TRUNCATE {table} RESTART IDENTITY")
        )
        assert refused == []
        acked.insert(0, first)
        marker = a.publish("n", "marker")
        assert len({token(e.id) for e in acked}) >= 2  # ids restarted under the publisher
        for reader in readers:
            got = reader.until(marker)
            assert GAP_EVENT_TYPE in [e.type for e in got]
            assert_told_of_every_hole(got, [*acked, marker])
            assert reader.sub.close_reason is None


def test_an_id_from_before_ids_restarted_resumes_with_a_gap_not_the_new_events(
    table: str,
) -> None:
    """An id of the old generation, whose number the new events passed, replays nothing."""
    with pg_broadcaster(table, history=1) as b:
        b.subscribe()
        before = [b.publish("n", n) for n in range(3)]
        admin_execute(f"TRUNCATE {table} RESTART IDENTITY")
        after = [b.publish("n", n) for n in range(10)]
        assert number(after[-1].id) > number(before[1].id)
        backend = b._backend
        assert isinstance(backend, PostgresBackend)
        assert backend.replay(before[1].id, after[-1].id, frozenset({"default"})) is None
        assert backend.replay(before[1].id, None, frozenset({"default"})) is None
        assert backend.replay(before[1].id, before[2].id, frozenset({"default"})) is None
        with pg_broadcaster(table) as fresh:
            resumed = Client(fresh.subscribe(last_event_id=before[1].id))
            marker = b.publish("n", "marker")
            got = resumed.until(marker)
    assert [e.type for e in got] == [GAP_EVENT_TYPE, "n"]
    assert seen(got[1:]) == expected([marker], "default")


@pytest.mark.parametrize("trimmed", [False, True])
def test_an_identity_set_back_under_its_rows_is_moved_past_them(table: str, trimmed: bool) -> None:
    """ALTER ... RESTART with rows left: the next ids still come after them, with no gap.

    With its first rows kept, the restarted id is taken already; with them trimmed, it is
    free but below the newest row, where no listener would read it.
    """
    maxlen = 5 if trimmed else 10_000
    with pg_broadcaster(table, maxlen=maxlen, history=1) as b:
        reader = Client(b.subscribe())
        before = [b.publish("n", n) for n in range(20)]
        reader.until(before[-1])
        admin_execute(f"ALTER TABLE {table} ALTER COLUMN id RESTART")
        after = [b.publish("n", "after"), b.publish("n", "again")]
        assert [number(e.id) for e in after] == [21, 22]
        assert token(after[0].id) == token(before[0].id)
        got = reader.until(after[-1])[20:]
        assert seen(got) == expected(after, "default")
        with pg_broadcaster(table) as fresh:
            replayed = Client(fresh.subscribe(last_event_id=before[-2].id)).events(3)
    assert seen(replayed) == expected(before[-1:] + after, "default")


# -- a server that stops answering, a restarted one, and the table's spellings ------


@pytest.mark.timeout(300)
def test_a_frozen_server_fails_publishes_in_bounded_time_and_loses_nothing_acknowledged(
    table: str, cluster: Cluster
) -> None:
    """Every server process stopped (SIGSTOP) while its host still acknowledges the data.

    publish and apublish raise BackendUnavailableError after ANSWER_TIMEOUT, not never
    (tcp_user_timeout and keepalives see nothing wrong), and the event loop runs on
    meanwhile; once the server goes on, every acknowledged event arrives, in order, once.
    """
    bound = ssecast._postgres_connections.ANSWER_TIMEOUT
    with contextlib.ExitStack() as stack:
        publisher = stack.enter_context(pg_broadcaster(table, dsn=cluster.dsn))
        elsewhere = stack.enter_context(pg_broadcaster(table, dsn=cluster.dsn))
        readers = [Client(publisher.subscribe()), Client(elsewhere.subscribe())]
        acked = [publisher.publish("n", n) for n in range(5)]
        for reader in readers:
            reader.until(acked[-1])
        connections = publisher._backend._connections  # type: ignore[attr-defined]
        with connections.borrow(), connections.borrow():
            pass  # two connections in the pool, for the two publishes below
        failed: list[BackendUnavailableError] = []

        def publish() -> None:
            try:
                publisher.publish("n", "frozen")
            except BackendUnavailableError as error:
                failed.append(error)

        async def apublish_while_the_loop_ticks() -> int:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.1)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            try:
                with pytest.raises(BackendUnavailableError, match="did not answer"):
                    await asyncio.wait_for(publisher.apublish("n", "frozen"), 10 * bound)
            finally:
                ticker.cancel()
            return ticks

        with cluster.frozen():
            began = time.monotonic()
            thread = threading.Thread(target=publish)
            thread.start()
            ticks = asyncio.run(apublish_while_the_loop_ticks())
            thread.join(10 * bound)
            waited = time.monotonic() - began
        assert [type(error) for error in failed] == [BackendUnavailableError]
        assert "did not answer" in str(failed[0])
        assert bound <= waited < 10 * bound
        assert ticks >= bound  # a tick every 0.1 s, on a loaded machine at least 1 in 10
        acked += [publish_when_back(publisher, n) for n in range(5, 10)]
        for reader in readers:
            got = reader.until(acked[-1])
            assert seen([e for e in got if e.data != '"frozen"']) == expected(acked, "default")
            assert reader.sub.close_reason is None


def test_after_a_server_restart_each_stale_pooled_connection_fails_one_publish(
    table: str, cluster: Cluster
) -> None:
    """As docs/scaling.md says: each idle pooled connection fails one publish, then it works."""
    backend = PostgresBackend(cluster.dsn, table=table)
    with Broadcaster(backend=backend) as b:
        with backend._connections.borrow(), backend._connections.borrow():
            pass  # two connections in the pool, idle
        b.publish("n", 0)
        cluster.stop()
        cluster.start()
        for _ in range(2):
            with pytest.raises(BackendUnavailableError, match="unreachable"):
                b.publish("n", "stale")
        assert b.publish("n", 1).data == "1"


def test_backends_naming_one_table_through_search_path_share_its_lock_and_notifications(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`s.t`, and `t` under `search_path=s`, are one table: one lock, one NOTIFY channel.

    The listener waits a minute between reads here, so an event whose notification went
    to another channel would not come in time; `t` in `public` is another table.
    """
    monkeypatch.setattr(ssecast._postgres_reader, "BLOCK_SECONDS", 60.0)
    schema = f"ssecast_test_{uuid.uuid4().hex[:8]}"
    admin_execute(f"CREATE SCHEMA {schema}")
    try:
        qualified = PostgresBackend(POSTGRES_DSN, table=f"{schema}.{table}")
        dsn = f"{POSTGRES_DSN} options='-c search_path={schema}'"
        with (
            Broadcaster(backend=qualified, heartbeat=0.1) as a,
            pg_broadcaster(table, dsn=dsn) as b,
            pg_broadcaster(table) as public,
        ):
            reader = Client(a.subscribe())
            public_reader = Client(public.subscribe())
            events = [b.publish("n", "under search_path"), a.publish("n", "qualified")]
            elsewhere = public.publish("n", "public")
            events.append(b.publish("n", "again"))
            assert seen(reader.until(events[-1])) == expected(events, "default")
            assert seen(public_reader.until(elsewhere)) == expected([elsewhere], "default")
            others = [b._backend, public._backend]
            assert all(isinstance(other, PostgresBackend) for other in others)
            keys = [lock_key(cast(PostgresBackend, other)) for other in others]
            assert lock_key(qualified) == keys[0] != keys[1]
        [(rows,)] = admin_execute(f"SELECT count(*) FROM {schema}.{table}")
        assert rows == 3
    finally:
        admin_execute(f"DROP SCHEMA {schema} CASCADE")
