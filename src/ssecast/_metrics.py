"""The metrics a broadcaster exposes, as the Prometheus and OpenTelemetry adapters name them."""

from __future__ import annotations

from typing import NamedTuple

from ssecast._broadcaster import Stats

__all__ = ["METRICS", "MetricSpec"]


class MetricSpec(NamedTuple):
    """One metric: its name, its help text, its kind, and the `Stats` field it shows."""

    name: str
    help: str
    counter: bool
    """A counter (it only grows), else a gauge."""
    field: str

    def value(self, stats: Stats) -> int:
        """Return this metric's value in `stats` (a bool as 1 or 0)."""
        return int(getattr(stats, self.field))


METRICS = (
    MetricSpec("ssecast_subscribers", "Subscriptions open now.", False, "subscribers"),
    MetricSpec("ssecast_published_total", "Events accepted by publish.", True, "published"),
    MetricSpec(
        "ssecast_delivered_total",
        "Event frames handed to subscribers: one per event per subscriber.",
        True,
        "delivered",
    ),
    MetricSpec(
        "ssecast_evicted_total",
        "Subscriptions ended because they fell more than queue_size frames behind.",
        True,
        "evicted",
    ),
    MetricSpec("ssecast_rejected_total", "Publishes refused by validation.", True, "rejected"),
    MetricSpec(
        "ssecast_revoked_total", "Subscriptions ended by Broadcaster.disconnect.", True, "revoked"
    ),
    MetricSpec(
        "ssecast_expired_total", "Streams ended because their lifetime ran out.", True, "expired"
    ),
    MetricSpec(
        "ssecast_refused_total",
        "Subscriptions refused for a while: a limit, the backend down, a shutdown.",
        True,
        "refused",
    ),
    MetricSpec(
        "ssecast_backend_up",
        "1 when the backend's store answered its last call, else 0.",
        False,
        "backend_up",
    ),
)
"""Every metric, in the order they are exposed."""
