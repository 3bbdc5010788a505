"""Health checks and outage logs: a Redis the test stops and starts, PostgreSQL, every framework."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask
import psycopg
import pytest
from django.conf import settings
from django.test import RequestFactory
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Route

import ssecast.django
import ssecast.flask
from backends import POSTGRES_DSN, postgres_dsn
from proxy import Proxy
from servers import Server, free_port, running
from ssecast import BackendUnavailableError, Broadcaster, BroadcasterClosedError
from ssecast.asgi import HealthCheck, Message, Scope
from ssecast.postgres import PostgresBackend
from ssecast.redis import RedisBackend
from ssecast.testing import stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PASSWORD = "s3cret-pass"
# Ten times the longest a check may take (Redis: 2 s to connect, 5 s for the answer).
WITHIN = 70.0

Answer = tuple[int, str, str | None]
"""A health endpoint's status, body and Retry-After."""


@contextlib.contextmanager
def own_redis(port: int, directory: Path) -> Iterator[Server]:
    """A redis-server of this test's own, with a password and no persistence."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(directory), "--requirepass", PASSWORD]
    with running(argv, port=port) as server:
        yield server


def redis_broadcaster(port: int) -> Broadcaster:
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    return Broadcaster(backend=RedisBackend(url, prefix=f"ssecast-test:{uuid.uuid4().hex}:"))


def asgi_getter(app: Callable[..., Any], path: str) -> Callable[[], Answer]:
    def get() -> Answer:
        with stream(app, path, timeout=WITHIN) as response:
            return response.status, response.read().decode(), response.headers.get("retry-after")

    return get


def health_endpoint(framework: str, broadcaster: Broadcaster) -> Callable[[], Answer]:
    """GET the health endpoint of an app of ``framework`` serving ``broadcaster``."""
    if framework == "starlette":
        return asgi_getter(
            Starlette(routes=[Route("/health", HealthCheck(broadcaster))]), "/health"
        )
    if framework == "fastapi":
        app = FastAPI()
        app.mount("/health", HealthCheck(broadcaster))
        return asgi_getter(app, "/health/")
    if framework == "flask":
        flask_app = flask.Flask(__name__)
        flask_app.add_url_rule("/health", view_func=lambda: ssecast.flask.health(broadcaster))
        return asgi_getter(flask_app, "/health")
    if not settings.configured:
        settings.configure()

    def django_get() -> Answer:
        response = ssecast.django.health(RequestFactory().get("/health"), broadcaster)
        return response.status_code, response.content.decode(), response.get("Retry-After")

    return django_get


def until_ok(get: Callable[[], Answer]) -> Answer:
    """Ask again until the answer is 200 (a restarted server may still be starting)."""
    deadline = time.monotonic() + WITHIN
    answer = get()
    while answer[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        answer = get()
    return answer


@pytest.mark.parametrize("framework", ["starlette", "fastapi", "flask", "django"])
def test_health_follows_redis_down_and_back(framework: str, tmp_path: Path) -> None:
    """200 while Redis runs, 503 with Retry-After and no address while stopped, 200 again."""
    port = free_port()
    with own_redis(port, tmp_path) as server, redis_broadcaster(port) as b:
        get = health_endpoint(framework, b)
        assert get() == (200, "ok\n", None)
        server.stop()
        status, body, retry_after = get()
        assert (status, retry_after) == (503, "5")
        assert body == "the event backend is unavailable; retry later\n"
        with own_redis(port, tmp_path):
            assert until_ok(get) == (200, "ok\n", None)


def test_health_of_a_closed_broadcaster_is_503_and_only_get_is_answered() -> None:
    """A closed broadcaster is not ready; a POST gets 405; a lifespan is not served."""
    b = Broadcaster()
    check = HealthCheck(b)
    with stream(check, "/health") as response:
        assert response.status == 200
    b.close()
    with stream(check, "/health") as response:
        assert response.status == 503
        assert response.headers["retry-after"] == "5"
        assert "closed" in response.read().decode()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request"}

    async def call(scope: Scope) -> None:
        await check(scope, receive, send)

    asyncio.run(call({"type": "http", "method": "POST", "headers": []}))
    assert sent[0]["status"] == 405
    with pytest.raises(ValueError, match="serves HTTP"):
        asyncio.run(call({"type": "lifespan"}))


def test_postgres_check_passes_on_the_test_database_and_fails_fast_without_one() -> None:
    """SELECT 1 succeeds on the running database; a port nobody listens on raises quickly."""
    table = f"ssecast_test_{uuid.uuid4().hex[:16]}"
    with Broadcaster(backend=PostgresBackend(POSTGRES_DSN, table=table)) as up:
        up.check()
        assert up.stats().backend_up
    down = PostgresBackend(postgres_dsn(free_port()), table=table)
    with Broadcaster(backend=down) as b:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="PostgreSQL is unreachable"):
            b.check()
        assert time.monotonic() - started < 20  # 10x the connect timeout
        assert not b.stats().backend_up
        get = health_endpoint("flask", b)
        status, body, retry_after = get()
    assert (status, retry_after) == (503, "5")
    assert "127.0.0.1" not in body


async def test_acheck_raises_what_check_raises() -> None:
    """acheck() runs the check off the loop, with the same outcome."""
    b = Broadcaster(backend=RedisBackend(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(BackendUnavailableError):
        await b.acheck()
    await b.aclose()
    with pytest.raises(BroadcasterClosedError):
        await b.acheck()


# -- outage logs -------------------------------------------------------------------------


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "ssecast" and record.levelno >= logging.INFO
    ]


def test_a_redis_outage_logs_one_warning_and_one_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many failed publishes and checks give one WARNING, without the password; then one INFO."""
    caplog.set_level(logging.INFO, logger="ssecast")
    port = free_port()
    with own_redis(port, tmp_path) as server, redis_broadcaster(port) as b:
        b.publish("n", 1)
        b.check()
        server.stop()
        for _ in range(20):
            with pytest.raises(BackendUnavailableError):
                b.publish("n", 2)
            with pytest.raises(BackendUnavailableError):
                b.check()
        assert not b.stats().backend_up
        with own_redis(port, tmp_path):
            assert until_ok(health_endpoint("flask", b))[0] == 200
            for n in range(20):
                b.publish("n", n)
        assert b.stats().backend_up
    lines = outage_lines(caplog)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert "is unavailable: could not publish" in lines[0][1]
    assert "Connection refused" in lines[0][1]
    assert "available again" in lines[1][1]
    assert PASSWORD not in caplog.text


def test_a_redis_outage_seen_by_a_subscribing_process_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader's retries add no outage line: one 'unavailable', one 'available again'."""
    caplog.set_level(logging.INFO, logger="ssecast")
    port = free_port()
    with own_redis(port, tmp_path) as server, redis_broadcaster(port) as b:
        sub = b.subscribe()
        server.stop()
        with pytest.raises(BackendUnavailableError):
            b.publish("n", 1)
        time.sleep(3)  # the reader retries, with backoff, meanwhile
        with own_redis(port, tmp_path):
            event = until_published(b)
            deadline = time.monotonic() + WITHIN
            while event.frame not in sub.read_nowait() and time.monotonic() < deadline:
                time.sleep(0.05)  # the reader is back too
            b.close()  # before this server stops, which would be another outage
    messages = [message for _, message in outage_lines(caplog)]
    assert sum("is unavailable" in message for message in messages) == 1
    assert sum("available again" in message for message in messages) == 1


def until_published(b: Broadcaster) -> ssecast.Event:
    deadline = time.monotonic() + WITHIN
    while True:
        try:
            return b.publish("n", "back")
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_postgres_outage_logs_one_warning_and_one_info(caplog: pytest.LogCaptureFixture) -> None:
    """The path to PostgreSQL is cut, then back: one WARNING, one INFO, however many calls."""
    caplog.set_level(logging.INFO, logger="ssecast")
    table = f"ssecast_test_{uuid.uuid4().hex[:16]}"
    first = Proxy(5432)
    port = first.port
    b = Broadcaster(backend=PostgresBackend(postgres_dsn(port), table=table))
    try:
        with first:
            b.publish("n", 1)
        # Nothing listens on the port any more, and the pooled connection was cut.
        for _ in range(10):
            with pytest.raises(BackendUnavailableError):
                b.publish("n", 2)
            with pytest.raises(BackendUnavailableError):
                b.check()
        assert not b.stats().backend_up
        second = Proxy(5432)
        second.port = port
        with second:
            until_published(b)
            b.check()
            assert b.stats().backend_up
    finally:
        b.close()
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {table}")
    lines = outage_lines(caplog)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert "PostgreSQL" in lines[0][1]
