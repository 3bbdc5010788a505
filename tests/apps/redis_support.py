"""What the Redis end-to-end apps share: a broadcaster on the Redis backend the test names."""

from __future__ import annotations

import os

from ssecast import Broadcaster
from ssecast.redis import RedisBackend


def broadcaster_from_env() -> Broadcaster:
    """A broadcaster on ``SSECAST_TEST_REDIS_URL`` with key prefix ``SSECAST_TEST_REDIS_PREFIX``."""
    backend = RedisBackend(
        os.environ["SSECAST_TEST_REDIS_URL"], prefix=os.environ["SSECAST_TEST_REDIS_PREFIX"]
    )
    return Broadcaster(backend=backend, heartbeat=1.0)
