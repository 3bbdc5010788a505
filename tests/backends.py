"""The backends the contract suite (test_backend_contract.py) runs against, one harness each.

A harness makes backends on one store (the memory backend's store is its process; the
Redis backend's is a stream on the test Redis; the PostgreSQL backend's, a table in the
test database), and says what the store can do. A new backend joins the suite by adding a
harness here.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import redis

from proxy import proxy_to
from ssecast import Backend, Broadcaster, MemoryBackend
from ssecast.postgres import PostgresBackend
from ssecast.redis import RedisBackend

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "host=127.0.0.1 port=5432 dbname=test user=root"
"""The test database: trust authentication on loopback, as Debian's cluster is set up."""


class Harness:
    """Makes broadcasters on one store, and says what that store can do."""

    name = "abstract"
    shares_events = False
    """Backends on the store deliver each other's events: processes act as one."""
    keeps_history = False
    """The store replays ids older than a broadcaster's ring."""

    def backend(self, *, maxlen: int = 10_000) -> Backend:
        """Return a new backend on this store; ``maxlen`` bounds the history it keeps."""
        raise NotImplementedError

    def broadcaster(self, *, maxlen: int = 10_000, **options: Any) -> Broadcaster:
        """Return a broadcaster on a new backend, with a short heartbeat (no read hangs)."""
        options.setdefault("heartbeat", 0.2)
        return Broadcaster(backend=self.backend(maxlen=maxlen), **options)

    def argv(self) -> list[str]:
        """Arguments that make ``forked.py`` build the same backend in another process."""
        raise NotImplementedError

    def connections(self) -> int:
        """The connections this store holds for the backends of the test."""
        return 0

    def lagging(self, **options: Any) -> AbstractContextManager[tuple[Broadcaster, Any]]:
        """Yield a broadcaster whose reader can be held up, and the context that holds it."""
        raise NotImplementedError

    def silent(self) -> AbstractContextManager[Broadcaster]:
        """Yield a broadcaster whose store accepts connections and never answers."""
        raise NotImplementedError

    def close(self) -> None:
        """Remove what the test left in the store."""


class MemoryHarness(Harness):
    name = "memory"

    def backend(self, *, maxlen: int = 10_000) -> Backend:
        return MemoryBackend()

    def argv(self) -> list[str]:
        return ["memory"]


class RedisHarness(Harness):
    name = "redis"
    shares_events = True
    keeps_history = True

    def __init__(self) -> None:
        self.prefix = f"ssecast-test:{uuid.uuid4().hex}:"

    def backend(self, *, maxlen: int = 10_000, url: str = REDIS_URL) -> RedisBackend:
        return RedisBackend(url, prefix=self.prefix, maxlen=maxlen)

    def argv(self) -> list[str]:
        return ["redis", REDIS_URL, self.prefix]

    def connections(self) -> int:
        name = self.backend().client_name
        with redis.Redis.from_url(REDIS_URL) as admin:
            return sum(1 for client in admin.client_list() if client["name"] == name)

    @contextmanager
    def lagging(self, **options: Any) -> Iterator[tuple[Broadcaster, Any]]:
        with proxy_to(6379) as proxy:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            options.setdefault("heartbeat", 0.2)
            maxlen = options.pop("maxlen", 10_000)
            with Broadcaster(backend=self.backend(maxlen=maxlen, url=url), **options) as b:
                yield b, proxy.paused

    @contextmanager
    def silent(self) -> Iterator[Broadcaster]:
        # A listening socket that never accepts: the kernel completes every handshake,
        # then nobody reads or answers, like a Redis frozen by a slow command or a SIGSTOP.
        with socket.socket() as hole:
            hole.bind(("127.0.0.1", 0))
            hole.listen(128)
            url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
            with Broadcaster(backend=self.backend(url=url), heartbeat=0.2) as b:
                yield b

    def close(self) -> None:
        with redis.Redis.from_url(REDIS_URL) as admin:
            admin.delete(self.prefix + "events")


def postgres_dsn(port: int) -> str:
    """The test database's DSN, with another port (a proxy's, a private cluster's)."""
    return POSTGRES_DSN.replace("port=5432", f"port={port}")


def postgres_connections(application_name: str, dsn: str = POSTGRES_DSN) -> int:
    """How many connections carry ``application_name``, once that number holds still.

    A server process ends a moment after its client closed the connection, so one read
    right after a close may still count it.
    """
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    with psycopg.connect(dsn, autocommit=True) as admin:
        counts = [-1]
        for _ in range(100):
            row = admin.execute(query, (application_name,)).fetchone()
            assert row is not None
            counts.append(row[0])
            if counts[-1] == counts[-2]:
                break
            time.sleep(0.05)
        return counts[-1]


class PostgresHarness(Harness):
    name = "postgres"
    shares_events = True
    keeps_history = True

    def __init__(self) -> None:
        self.table = f"ssecast_test_{uuid.uuid4().hex[:16]}"

    def backend(self, *, maxlen: int = 10_000, dsn: str = POSTGRES_DSN) -> PostgresBackend:
        return PostgresBackend(dsn, table=self.table, maxlen=maxlen)

    def argv(self) -> list[str]:
        return ["postgres", POSTGRES_DSN, self.table]

    def connections(self) -> int:
        return postgres_connections(self.backend().application_name)

    @contextmanager
    def lagging(self, **options: Any) -> Iterator[tuple[Broadcaster, Any]]:
        with proxy_to(5432) as proxy:
            options.setdefault("heartbeat", 0.2)
            maxlen = options.pop("maxlen", 10_000)
            backend = self.backend(maxlen=maxlen, dsn=postgres_dsn(proxy.port))
            with Broadcaster(backend=backend, **options) as b:
                yield b, proxy.paused

    @contextmanager
    def silent(self) -> Iterator[Broadcaster]:
        with socket.socket() as hole:  # accepts connections (the kernel does), never answers
            hole.bind(("127.0.0.1", 0))
            hole.listen(128)
            dsn = postgres_dsn(hole.getsockname()[1])
            with Broadcaster(backend=self.backend(dsn=dsn), heartbeat=0.2) as b:
                yield b

    def close(self) -> None:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {self.table}")


HARNESSES = {"memory": MemoryHarness, "postgres": PostgresHarness, "redis": RedisHarness}
