"""What the PostgreSQL end-to-end apps share: a broadcaster on the table the test names."""

from __future__ import annotations

import os

from ssecast import Broadcaster
from ssecast.postgres import PostgresBackend


def broadcaster_from_env() -> Broadcaster:
    """A broadcaster on `SSECAST_TEST_POSTGRES_DSN`, table `SSECAST_TEST_POSTGRES_TABLE`."""
    backend = PostgresBackend(
        os.environ["SSECAST_TEST_POSTGRES_DSN"], table=os.environ["SSECAST_TEST_POSTGRES_TABLE"]
    )
    return Broadcaster(backend=backend, heartbeat=1.0)
