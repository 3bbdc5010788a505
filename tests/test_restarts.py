"""EventSource clients outlive refusals and outages: npm's ``eventsource`` and Chromium's.

A browser's EventSource gives up for good on any status but 200, so a server that is full,
closing or without its backend answers an EventSource with a 200 stream that sets its
``retry:`` delay and says why (``ssecast.unavailable``). These tests run each adapter on a
real server with real clients and check that no client stays closed: refused at
``max_subscribers``, every client streams within seconds of the slot freeing; with Redis
stopped while clients connect, every client resumes once it is back, with no event lost.

Times: a refusal asks for a 2-6 s delay, so a client is back within about 6 s of the room
freeing (the slowest seen here, on 2 loaded cores, is printed); ``HANG`` (60 s) only
catches a client that never comes back.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser import chromium
from listeners import (
    Record,
    browser_listen,
    browser_records,
    by_client,
    npm_listeners,
    report,
    wait_until,
)
from servers import PYTHON, Server, free_port, running
from ssecast import BackendUnavailableError, Broadcaster
from ssecast.redis import RedisBackend

pytestmark = pytest.mark.slow

TYPES = ("tick", "ssecast.unavailable", "ssecast.gap")
NPM_CLIENTS = 2
BROWSER_CLIENTS = 1
CLIENTS = NPM_CLIENTS + BROWSER_CLIENTS


@dataclass(frozen=True)
class Adapter:
    """How to run one adapter's test app, and reach its stream and controls."""

    argv: Callable[[int], list[str]]
    env: dict[str, str]
    events: str
    stats: str
    publish: Callable[[httpx.Client], list[str]]


def _publish_asgi(http: httpx.Client) -> list[str]:
    ids: list[str] = http.post("/control/publish", params={"channel": "prices"}).json()
    return ids


def _publish_wsgi(http: httpx.Client) -> list[str]:
    body = {"events": [{"type": "tick", "channel": "prices", "data": {}}]}
    ids: list[str] = http.post("/publish", json=body).json()["ids"]
    return ids


def _uvicorn(app: str) -> Callable[[int], list[str]]:
    return lambda port: [
        *(PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
        *("--lifespan", "on", "--timeout-graceful-shutdown", "5", "--no-access-log"),
    ]


ADAPTERS = {
    "asgi": Adapter(
        _uvicorn("apps.asgi_app:app"), {}, "/events/?channel=prices", "/control/stats",
        _publish_asgi,
    ),
    "flask": Adapter(
        lambda port: [
            *(PYTHON, "-m", "gunicorn", "-c", "apps/flask_gunicorn_conf.py"),
            *("-b", f"127.0.0.1:{port}", "apps.flask_app:app"),
        ],
        {},
        "/prices",
        "/stats",
        _publish_wsgi,
    ),
    "django": Adapter(
        _uvicorn("apps.django_project.asgi:application"),
        {"DJANGO_SETTINGS_MODULE": "apps.django_project.settings"},
        "/prices",
        "/stats",
        _publish_wsgi,
    ),
}  # fmt: skip


def kinds(records: list[Record], kind: str) -> list[Record]:
    return [record for record in records if record["kind"] == kind]


def every_client(records: list[Record], clients: int, test: Callable[[list[Record]], Any]) -> bool:
    """Whether each of ``clients`` clients' records pass ``test``."""
    grouped = by_client(records)
    return len(grouped) == clients and all(test(mine) for mine in grouped.values())


def never_gave_up(records: list[Record]) -> None:
    closed = [record for record in records if record["state"] == 2]
    assert closed == [], "an EventSource gave up for good"


@pytest.mark.parametrize("name", ADAPTERS)
def test_clients_refused_at_the_limit_stream_once_room_frees_up(
    name: str, node_modules: Path
) -> None:
    """Refused at max_subscribers, npm's and Chromium's EventSources stream within seconds."""
    adapter = ADAPTERS[name]
    port = free_port()
    env = {**adapter.env, "SSECAST_TEST_MAX_SUBSCRIBERS": str(CLIENTS)}
    with (
        running(adapter.argv(port), port=port, env=env) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
        contextlib.ExitStack() as holders,
    ):
        for _ in range(CLIENTS):
            assert holders.enter_context(http.stream("GET", adapter.events)).status_code == 200
        url = server.url + adapter.events
        with npm_listeners(node_modules, url, NPM_CLIENTS, TYPES) as npm, chromium() as browser:
            browser.get(server.url + adapter.stats)  # a page of the server's origin
            browser_listen(browser, adapter.events, BROWSER_CLIENTS, TYPES)

            def seen() -> list[Record]:
                return [
                    *npm.records(),
                    *({**r, "client": r["client"] + NPM_CLIENTS} for r in browser_records(browser)),
                ]

            told = wait_until(
                lambda: every_client(seen(), CLIENTS, lambda r: kinds(r, "ssecast.unavailable")),
                "every client told it was refused",
            )
            assert told
            for record in kinds(seen(), "ssecast.unavailable"):
                assert json.loads(record["data"]) == {"reason": "too_many_subscribers"}
            assert http.get(adapter.stats).json()["refused"] >= CLIENTS

            holders.close()
            freed = time.time()
            # A WSGI server notices a holder has gone at its next heartbeat: until every
            # client is back, each poll publishes another event.
            wait_until(
                lambda: adapter.publish(http) and every_client(seen(), CLIENTS, ticks),
                "every client receiving events again",
            )
            records = seen()
        never_gave_up(records)
        back = [
            kinds(mine, "open")[-1]["ms"] / 1000 - freed for mine in by_client(records).values()
        ]
        report(f"refused at the limit, {name}", CLIENTS, 1, back)


def redis_server_argv(port: int, directory: Path) -> list[str]:
    """A throwaway redis-server that keeps its data across a restart (append-only file)."""
    return [
        *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)),
    ]


@contextlib.contextmanager
def redis_server(port: int, directory: Path) -> Iterator[Server]:
    with running(redis_server_argv(port, directory), port=port) as server:
        redis_ready(port)
        yield server


def redis_ready(port: int) -> None:
    import redis

    client = redis.Redis(port=port)
    try:
        wait_until(lambda: _pings(client), "redis answers")
    finally:
        client.close()


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_clients_connecting_while_redis_is_down_resume_once_it_is_back(
    node_modules: Path, tmp_path: Path
) -> None:
    """Redis stopped, clients resuming get retry streams; back, each resumes, nothing lost."""
    redis_port, app_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {"SSECAST_TEST_REDIS_URL": redis_url, "SSECAST_TEST_REDIS_PREFIX": "restarts:"}
    argv = [
        *(PYTHON, "-m", "uvicorn", "apps.redis_asgi_app:app", "--host", "127.0.0.1"),
        *("--port", str(app_port), "--timeout-graceful-shutdown", "1", "--no-access-log"),
    ]
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(redis_server(redis_port, tmp_path))
        server = stack.enter_context(running(argv, port=app_port, env=env))
        publisher = stack.enter_context(
            Broadcaster(backend=RedisBackend(redis_url, prefix="restarts:"))
        )
        before = [publisher.publish("tick", n, channel="prices").id for n in range(4)]
        database.stop()  # the app has not listened yet: resuming needs Redis

        path = f"/events?channel=prices&lastEventId={before[0]}"
        npm = stack.enter_context(npm_listeners(node_modules, server.url + path, 2, TYPES))
        browser = stack.enter_context(chromium())
        browser.get(f"{server.url}/nowhere")  # a page of the server's origin
        browser_listen(browser, path, 1, TYPES)

        def seen() -> list[Record]:
            shifted = ({**r, "client": r["client"] + 2} for r in browser_records(browser))
            return [*npm.records(), *shifted]

        wait_until(
            lambda: every_client(seen(), 3, lambda r: kinds(r, "ssecast.unavailable")),
            "every client told Redis is unavailable",
        )
        for record in kinds(seen(), "ssecast.unavailable"):
            assert json.loads(record["data"]) == {"reason": "backend_unavailable"}

        stack.enter_context(redis_server(redis_port, tmp_path))
        restarted = time.time()
        wait_until(
            lambda: every_client(seen(), 3, lambda r: ticks(r) == before[1:]),
            "every client received the events after its resume point",
        )
        # The first publish after a restart also marks a possible gap in the stream (Redis
        # may have lost its last writes), which reaches every client as ssecast.gap.
        after = [publish(publisher, n) for n in range(4, 8)]
        wait_until(
            lambda: every_client(seen(), 3, lambda r: ticks(r) == before[1:] + after),
            "every client received the events published once Redis was back",
        )
        records = seen()
    never_gave_up(records)
    back = [kinds(mine, "tick")[0]["ms"] / 1000 - restarted for mine in by_client(records).values()]
    report("Redis down while connecting", 3, 1, back)


def publish(publisher: Broadcaster, n: int) -> str:
    """Publish ``n``; a pooled connection from before the restart fails once (scaling.md)."""
    try:
        return publisher.publish("tick", n, channel="prices").id
    except BackendUnavailableError:
        return publisher.publish("tick", n, channel="prices").id


def ticks(records: list[Record]) -> list[str]:
    return [record["id"] for record in kinds(records, "tick")]
