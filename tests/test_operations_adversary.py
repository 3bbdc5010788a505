"""An adversary's tests of issue 11: revocation, keys, the per-key limit and lifetimes.

Each test is an attack a demanding user would try: an order sent by a process that never
listens, resumes across and from the control message's own id, disconnects racing with
subscribes and expiries from many threads, and per-request `key`/`lifetime` callables
that return what they should not, served by real servers (uvicorn and werkzeug, run in
threads of the test) to a real client (httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import flask
import httpx
import psycopg
import pytest
import redis
import uvicorn
from werkzeug.serving import make_server

import ssecast.flask
from backends import POSTGRES_DSN, REDIS_URL, RedisHarness
from servers import PYTHON, free_port
from ssecast import Broadcaster, CloseReason, Subscription, TooManySubscribersError
from ssecast.asgi import EventStream
from ssecast.postgres import PostgresBackend
from ssecast.redis import RedisBackend

HANG = 30.0
"""Seconds after which a wait counts as hung; what the tests wait for takes milliseconds."""


def wait_for(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds; fail if it does not within HANG."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, "hung"
        time.sleep(0.01)


def read_until(sub: Subscription, marker: bytes) -> bytes:
    """Read ``sub`` in this thread until ``marker`` arrived; return what was read."""
    body = b""
    deadline = time.monotonic() + HANG
    for chunk in sub:
        body += chunk
        if marker in body:
            return body
        assert time.monotonic() < deadline, body
    raise AssertionError(f"the subscription ended before {marker!r}: {body!r}")


# -- an order through a shared backend --------------------------------------------------------


@contextlib.contextmanager
def shared_store(kind: str) -> Iterator[Callable[[], Broadcaster]]:
    """Yield a maker of broadcasters on one new Redis stream or PostgreSQL table."""
    name = uuid.uuid4().hex[:16]
    made: list[Broadcaster] = []

    def make() -> Broadcaster:
        backend: RedisBackend | PostgresBackend
        if kind == "redis":
            backend = RedisBackend(REDIS_URL, prefix=f"ssecast-adv-{name}:")
        else:
            backend = PostgresBackend(POSTGRES_DSN, table=f"ssecast_adv_{name}")
        made.append(Broadcaster(backend=backend, heartbeat=0.2))
        return made[-1]

    try:
        yield make
    finally:
        for broadcaster in made:
            broadcaster.close()
        if kind == "redis":
            with redis.Redis.from_url(REDIS_URL) as admin:
                admin.delete(f"ssecast-adv-{name}:events")
        else:
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
                admin.execute(f"DROP TABLE IF EXISTS ssecast_adv_{name}")


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_publish_only_process_s_disconnect_reaches_the_serving_ones_and_no_client(
    kind: str,
) -> None:
    """A process that never listens (a management command) revokes alice everywhere.

    Bob's stream, live and resumed across the order, never shows it; stats() agree.
    """
    with shared_store(kind) as make:
        serving, command = make(), make()
        alice = serving.subscribe("room", key="alice")
        bob = serving.subscribe("room", key="bob")
        before = command.publish("t", "before", channel="room")
        assert command.disconnect(key="alice") == 0  # none in this process
        after = command.publish("t", "after", channel="room")
        live = read_until(bob, after.id.encode())
        assert alice.close_reason is CloseReason.REVOKED  # the order came before "after"
        assert b"ssecast." not in live
        assert bob.close_reason is None
        with serving.subscribe("room", last_event_id=before.id) as resumed:
            assert resumed.read_nowait() == after.frame
        stats = serving.stats()
        assert (stats.revoked, stats.subscribers) == (1, 1)
        assert command.stats().revoked == 0


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_resume_from_the_control_message_s_own_id_shows_no_order_and_hangs_not(
    kind: str,
) -> None:
    """Last-Event-ID set to the order's id (read from the store) replays what came after it.

    Resumed while the order is the newest thing delivered, the stream shows neither the
    order nor a gap, and goes on live with the next event.
    """
    with shared_store(kind) as make:
        serving = make()
        bob = serving.subscribe("room", key="bob")
        serving.publish("t", "before", channel="room")
        serving.disconnect(key="alice")
        order_id = newest_order_id(serving)
        with serving.subscribe("room", last_event_id=order_id) as at_the_order:
            assert b"ssecast." not in at_the_order.read_nowait()
            after = serving.publish("t", "after", channel="room")
            assert read_until(at_the_order, after.id.encode()).endswith(after.frame)
            assert b"ssecast." not in at_the_order.read_nowait()
        read_until(bob, after.id.encode())
        with serving.subscribe("room", last_event_id=order_id) as resumed:
            assert resumed.read_nowait() == after.frame


def newest_order_id(broadcaster: Broadcaster) -> str:
    """The id of the newest control message in a store made by `shared_store`."""
    backend = broadcaster._backend
    if isinstance(backend, RedisBackend):
        with redis.Redis.from_url(REDIS_URL) as admin:
            ((entry_id, fields),) = admin.xrevrange(backend.key, count=1)
        assert fields[b"channel"] == b"ssecast.control", fields
        return str(entry_id.decode())
    assert isinstance(backend, PostgresBackend)
    table = backend.application_name.removeprefix("ssecast ")
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        row = admin.execute(
            f"SELECT token, id FROM {table} WHERE channel = 'ssecast.control'"
            " ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    return f"{row[0]}-{row[1]}"


# -- racing threads, the per-key limit, lifetimes ------------------------------------------


def test_disconnects_racing_with_subscribes_and_expiries_leave_every_count_right() -> None:
    """Threads subscribe as alice (limit 2, short lifetimes) while another revokes her.

    Every subscription ends one way, counted once; nothing stays taken; alice gets her
    two slots back, and a third is refused.
    """
    with Broadcaster(max_subscribers_per_key=2, heartbeat=None) as broadcaster:
        subs: list[Subscription] = []
        refused = [0]
        revoked = [0]
        stop = threading.Event()
        lock = threading.Lock()

        def subscriber(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(150):
                try:
                    sub = broadcaster.subscribe(
                        "room", key="alice", lifetime=rng.choice([0.001, 5])
                    )
                except TooManySubscribersError as error:
                    with lock:
                        refused[0] += error.key == "alice"
                    continue
                with lock:
                    subs.append(sub)
                if rng.random() < 0.3:
                    sub.close()
                elif rng.random() < 0.5:
                    for _ in sub:  # reads until revoked or expired
                        pass

        def revoker() -> None:
            while not stop.is_set():
                count = broadcaster.disconnect(key="alice")
                with lock:
                    revoked[0] += count
                time.sleep(0.0005)

        threads = [threading.Thread(target=subscriber, args=(seed,)) for seed in range(4)]
        revoking = threading.Thread(target=revoker)
        revoking.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
            assert not thread.is_alive()
        stop.set()
        revoking.join(HANG)
        revoked[0] += broadcaster.disconnect(key="alice")
        assert all(sub.closed for sub in subs)
        reasons = [sub.close_reason for sub in subs]
        stats = broadcaster.stats()
        assert stats.revoked == revoked[0] == reasons.count(CloseReason.REVOKED)
        assert stats.expired == reasons.count(CloseReason.EXPIRED)
        assert stats.subscribers == 0
        assert stats.refused == refused[0]
        # alice may come back up to her limit, and no further.
        again = [broadcaster.subscribe("room", key="alice") for _ in range(2)]
        with pytest.raises(TooManySubscribersError):
            broadcaster.subscribe("room", key="alice")
        for sub in again:
            sub.close()
        assert broadcaster.stats().subscribers == 0


# -- per-request callables that return what they should not ------------------------------------


@contextlib.contextmanager
def uvicorn_serving(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn in a thread of this process; yield its URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(HANG)


@contextlib.contextmanager
def werkzeug_serving(app: flask.Flask) -> Iterator[str]:
    """Serve the Flask ``app`` with werkzeug's threaded server in a thread; yield its URL."""
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(HANG)


ODD_LIFETIMES = [0, -1, math.nan, math.inf, True, 1e300, "5"]


@pytest.mark.parametrize("lifetime", ODD_LIFETIMES, ids=repr)
def test_an_odd_lifetime_from_the_callable_is_a_clean_500_on_uvicorn(lifetime: Any) -> None:
    """EventStream(lifetime=callable) returning a non-positive, odd or huge number: a 500."""
    with Broadcaster() as broadcaster:
        app = EventStream(broadcaster, lifetime=lambda scope: lifetime)
        with uvicorn_serving(app) as url:
            response = httpx.get(f"{url}/", timeout=HANG)
        assert response.status_code == 500
        assert broadcaster.stats().subscribers == 0


@pytest.mark.parametrize("lifetime", ODD_LIFETIMES, ids=repr)
def test_an_odd_lifetime_from_the_callable_is_a_clean_500_on_werkzeug(lifetime: Any) -> None:
    """ssecast.flask.stream(lifetime=callable) returning an odd value: a 500, never a stream."""
    app = flask.Flask(__name__)
    with Broadcaster() as broadcaster:
        app.add_url_rule(
            "/events",
            view_func=lambda: ssecast.flask.stream(broadcaster, lifetime=lambda request: lifetime),
        )
        with werkzeug_serving(app) as url:
            response = httpx.get(f"{url}/events", timeout=HANG)
        assert response.status_code == 500
        assert broadcaster.stats().subscribers == 0


class User:
    """What an app's key callable might hand back by mistake: its user object, not an id."""

    def __repr__(self) -> str:
        return "<User alice@example.com password-hash=pbkdf2$secret>"


@pytest.mark.parametrize("key", [42, User()], ids=["int", "object"])
def test_a_key_callable_returning_a_non_str_is_the_app_s_500_on_uvicorn(key: Any) -> None:
    """The app's bug (a user id as an int, a user object) is a 500: nothing told to the client."""
    with Broadcaster() as broadcaster:
        app = EventStream(broadcaster, key=lambda scope: key)
        with uvicorn_serving(app) as url:
            response = httpx.get(f"{url}/", timeout=HANG)
        assert response.status_code == 500
        assert b"alice" not in response.content


@pytest.mark.parametrize("key", [42, User()], ids=["int", "object"])
def test_a_key_callable_returning_a_non_str_is_the_app_s_500_on_werkzeug(key: Any) -> None:
    """As with uvicorn: not a 400 that blames the client and shows it the value."""
    app = flask.Flask(__name__)
    with Broadcaster() as broadcaster:
        app.add_url_rule(
            "/events",
            view_func=lambda: ssecast.flask.stream(broadcaster, key=lambda request: key),
        )
        with werkzeug_serving(app) as url:
            response = httpx.get(f"{url}/events", timeout=HANG)
        assert b"alice" not in response.content, response.content
        assert response.status_code == 500


# -- a disconnect while a resume is being read from the store -----------------------------------


def test_a_resume_mid_replay_is_ended_by_a_disconnect_of_its_key_meanwhile() -> None:
    """Alice resumes from an old id on a worker whose store is slow; she is revoked meanwhile.

    Her other stream ends; the one whose replay was being read must not come out alive.
    """
    harness = RedisHarness()
    try:
        with (
            harness.lagging(history=1) as (slow, held_up),
            harness.broadcaster() as fast,
        ):
            probe = slow.subscribe("room")  # listening
            old = fast.publish("t", "old", channel="room")
            newest = [fast.publish("t", n, channel="room") for n in range(3)][-1]
            read_until(probe, newest.id.encode())  # "old" fell out of the ring of one
            canary = slow.subscribe("room", key="alice")
            resumed: list[Subscription] = []
            with held_up():
                resuming = threading.Thread(
                    target=lambda: resumed.append(
                        slow.subscribe("room", key="alice", last_event_id=old.id)
                    )
                )
                resuming.start()
                revoking = threading.Thread(target=lambda: slow.disconnect(key="alice"))
                revoking.start()
                wait_for(lambda: canary.close_reason is CloseReason.REVOKED)
            resuming.join(HANG)
            revoking.join(HANG)
            assert len(resumed) == 1
            assert resumed[0].close_reason is CloseReason.REVOKED
    finally:
        harness.close()


# -- a worker forked after the broadcaster was used ---------------------------------------------

FORKED_WORKER = """
import json, os, sys, time
from ssecast import Broadcaster, CloseReason
from ssecast.redis import RedisBackend

broadcaster = Broadcaster(backend=RedisBackend(sys.argv[1], prefix=sys.argv[2]), heartbeat=0.2)
alice = broadcaster.subscribe("room", key="alice")  # the parent serves before it forks
bob = broadcaster.subscribe("room", key="bob")
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the worker: its own alice stream, then it revokes her everywhere
    mine = broadcaster.subscribe("room", key="alice")
    ended = broadcaster.disconnect(key="alice")
    os.write(write, json.dumps([ended, mine.close_reason, broadcaster.stats().revoked]).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(read, 4096))
marker = broadcaster.publish("t", "after", channel="room")
deadline = time.monotonic() + 30
seen = b""
for chunk in bob:
    seen += chunk
    if marker.id.encode() in seen or time.monotonic() > deadline:
        break
print(json.dumps({
    "child": child,
    "alice": alice.close_reason,
    "bob": bob.close_reason,
    "bob_saw_order": b"ssecast." in seen,
    "revoked": broadcaster.stats().revoked,
    "subscribers": broadcaster.stats().subscribers,
}))
broadcaster.close()
"""


def test_a_worker_forked_after_use_revokes_in_its_parent_and_counts_only_its_own() -> None:
    """The child's disconnect ends its own stream (1) and, through Redis, the parent's."""
    harness = RedisHarness()
    try:
        done = subprocess.run(
            [PYTHON, "-c", FORKED_WORKER, REDIS_URL, harness.prefix],
            capture_output=True,
            timeout=HANG * 2,
            check=True,
        )
    finally:
        harness.close()
    seen = json.loads(done.stdout)
    assert seen == {
        "child": [1, "revoked", 1],
        "alice": "revoked",
        "bob": None,
        "bob_saw_order": False,
        "revoked": 1,
        "subscribers": 1,
    }


# -- a key taken from the client's own request ---------------------------------------------------


def query_user(scope: Any) -> str | None:
    """The key an app takes from the query (``?user=``), as the client sent it."""
    values = parse_qs(scope["query_string"].decode("latin-1")).get("user")
    return values[-1] if values else None


def test_a_bad_key_from_the_client_s_query_is_a_400_on_uvicorn_as_on_werkzeug() -> None:
    """A line break in the client's own ``?user=``: 400 on every adapter, not a 500 on ASGI."""
    with Broadcaster() as broadcaster:
        app = EventStream(broadcaster, key=query_user)
        with uvicorn_serving(app) as url:
            response = httpx.get(f"{url}/", params={"user": "a\nb"}, timeout=HANG)
        flask_app = flask.Flask(__name__)
        flask_app.add_url_rule(
            "/events",
            view_func=lambda: ssecast.flask.stream(
                broadcaster, key=lambda request: request.args.get("user")
            ),
        )
        with werkzeug_serving(flask_app) as url:
            flask_response = httpx.get(f"{url}/events", params={"user": "a\nb"}, timeout=HANG)
        assert flask_response.status_code == 400
        assert response.status_code == 400
        assert broadcaster.stats().subscribers == 0


# -- the reserved prefix from clients ------------------------------------------------------------


def test_a_client_asking_for_the_control_channel_gets_a_400_and_no_subscription() -> None:
    """``?channel=ssecast.control`` (with and without authorize): 400 on uvicorn and werkzeug."""
    with Broadcaster() as broadcaster:

        def channels(scope: Any) -> list[str]:
            return parse_qs(scope["query_string"].decode("latin-1"))["channel"]

        statuses = []
        for authorize in (None, lambda scope, names: True):
            app = EventStream(broadcaster, channels, authorize=authorize)
            with uvicorn_serving(app) as url:
                response = httpx.get(url, params={"channel": "ssecast.control"}, timeout=HANG)
                statuses.append(response.status_code)
        flask_app = flask.Flask(__name__)
        flask_app.add_url_rule(
            "/events",
            view_func=lambda: ssecast.flask.stream(broadcaster, flask.request.args["channel"]),
        )
        with werkzeug_serving(flask_app) as url:
            response = httpx.get(f"{url}/events", params={"channel": "ssecast.x"}, timeout=HANG)
            statuses.append(response.status_code)
        assert statuses == [400, 400, 400]
        assert broadcaster.stats().subscribers == 0


# -- disconnect from where a user would call it ---------------------------------------------------


class RevokeOnEviction(logging.Handler):
    """A logging handler that revokes a user when ssecast logs an eviction (an app's alarm)."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        super().__init__()
        self.broadcaster = broadcaster
        self.ended: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "evicted" in record.getMessage():
            self.ended.append(self.broadcaster.disconnect(key="mallory"))


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_logging_handler_may_disconnect_without_a_deadlock(kind: str) -> None:
    """The handler runs in publish's thread (memory) or the Redis reader's; neither hangs."""
    logger = logging.getLogger("ssecast")
    with contextlib.ExitStack() as stack:
        if kind == "memory":
            broadcaster = stack.enter_context(Broadcaster(heartbeat=None))
            publisher = broadcaster
        else:
            make = stack.enter_context(shared_store("redis"))
            broadcaster, publisher = make(), make()
        handler = RevokeOnEviction(broadcaster)
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        stack.callback(logger.setLevel, level)
        stack.callback(logger.removeHandler, handler)
        slow = broadcaster.subscribe("room", queue_size=1)
        mallory = broadcaster.subscribe("room", key="mallory")
        done = threading.Event()

        def publish() -> None:
            for n in range(3):
                publisher.publish("t", n, channel="room")
            done.set()

        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        assert done.wait(HANG), "publish hung"
        wait_for(lambda: slow.close_reason is CloseReason.EVICTED)
        wait_for(lambda: bool(handler.ended))
        assert handler.ended == [1]
        assert mallory.close_reason is CloseReason.REVOKED


async def test_adisconnect_from_another_loop_ends_a_task_reading_on_this_one() -> None:
    """A task awaits its subscription on this loop; another thread's loop revokes it."""
    with Broadcaster(heartbeat=None) as broadcaster:
        sub = await broadcaster.asubscribe("room", key="alice")

        async def read_all() -> list[bytes]:
            return [chunk async for chunk in sub]

        reader = asyncio.get_running_loop().create_task(read_all())
        await asyncio.sleep(0.05)  # the reader is waiting
        ended = await asyncio.to_thread(asyncio.run, broadcaster.adisconnect(key="alice"))
        async with asyncio.timeout(HANG):
            assert await reader == []
        assert ended == 1
        assert sub.close_reason is CloseReason.REVOKED
        assert broadcaster.stats().subscribers == 0


# -- the per-key limit over a real server, with lifetimes and revocations -----------------------


def test_a_user_at_her_limit_is_429_until_her_stream_expires_or_is_revoked() -> None:
    """On werkzeug with a limit of 1, alice's slot comes back at expiry and at revocation.

    Meanwhile a second stream is a 429 (a retry stream for an EventSource).
    """
    app = flask.Flask(__name__)
    with Broadcaster(max_subscribers_per_key=1, heartbeat=0.2) as broadcaster:
        lifetimes = {"short": 0.5, "long": 60.0}
        app.add_url_rule(
            "/events",
            view_func=lambda: ssecast.flask.stream(
                broadcaster,
                key="alice",
                lifetime=lambda request: lifetimes[request.args["life"]],
            ),
        )
        with werkzeug_serving(app) as url, httpx.Client(timeout=HANG) as client:
            with client.stream("GET", f"{url}/events", params={"life": "short"}) as first:
                assert first.status_code == 200
                plain = client.get(f"{url}/events", params={"life": "long"})
                browser = client.get(
                    f"{url}/events",
                    params={"life": "long"},
                    headers={"Accept": "text/event-stream"},
                )
                assert (plain.status_code, plain.headers["Retry-After"]) == (429, "5")
                assert browser.status_code == 200
                assert b"retry:" in browser.content
                assert b"ssecast.unavailable" in browser.content
                first.read()  # returns when its lifetime has ended the response
            wait_for(lambda: broadcaster.stats().subscribers == 0)
            with client.stream("GET", f"{url}/events", params={"life": "long"}) as second:
                assert second.status_code == 200
                wait_for(lambda: broadcaster.stats().subscribers == 1)
                assert broadcaster.disconnect(key="alice") == 1
                second.read()  # the revoked response ends
            with client.stream("GET", f"{url}/events", params={"life": "long"}) as third:
                assert third.status_code == 200
                assert broadcaster.disconnect(key="alice") == 1
                third.read()
        stats = broadcaster.stats()
        assert (stats.expired, stats.revoked, stats.subscribers) == (1, 2, 0)
        assert stats.refused == 2
