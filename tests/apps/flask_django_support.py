"""What the Flask and Django test apps share: settings from the environment, publishing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ssecast import Broadcaster

TOKEN = "letmein"
"""The bearer token the apps' own authorization accepts."""


def broadcaster_from_env() -> Broadcaster:
    """Build the app's broadcaster from ``SSECAST_TEST_*`` variables the test sets."""
    env = os.environ
    heartbeat = float(env.get("SSECAST_TEST_HEARTBEAT", "0.5"))
    max_subscribers = env.get("SSECAST_TEST_MAX_SUBSCRIBERS")
    max_per_key = env.get("SSECAST_TEST_MAX_PER_KEY")
    return Broadcaster(
        heartbeat=heartbeat or None,
        history=int(env.get("SSECAST_TEST_HISTORY", "1024")),
        queue_size=int(env.get("SSECAST_TEST_QUEUE_SIZE", "256")),
        max_subscribers=int(max_subscribers) if max_subscribers else None,
        max_subscribers_per_key=int(max_per_key) if max_per_key else None,
    )


def lifetime(query: Mapping[str, str]) -> float | None:
    """The ``lifetime`` query parameter, in seconds."""
    value = query.get("lifetime")
    return float(value) if value else None


def publish_batch(broadcaster: Broadcaster, body: dict[str, Any]) -> list[str]:
    """Publish ``body["events"]``; each may be ``raw``, repeat (``count``) or be ``size`` bytes."""
    ids = []
    for item in body["events"]:
        data = "x" * item["size"] if "size" in item else item.get("data")
        for _ in range(item.get("count", 1)):
            event = broadcaster.publish(
                item["type"],
                data,
                channel=item.get("channel", "default"),
                raw=item.get("raw", False),
            )
            ids.append(event.id)
    return ids
