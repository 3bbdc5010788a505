"""ssecast.otel: observable instruments, collected by the real OpenTelemetry SDK."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from ssecast import Broadcaster, PublishError, Stats
from ssecast.otel import instrument

NAMES = {
    "ssecast_subscribers": "subscribers",
    "ssecast_published_total": "published",
    "ssecast_delivered_total": "delivered",
    "ssecast_evicted_total": "evicted",
    "ssecast_rejected_total": "rejected",
    "ssecast_revoked_total": "revoked",
    "ssecast_expired_total": "expired",
    "ssecast_refused_total": "refused",
    "ssecast_backend_up": "backend_up",
}


def collected(reader: InMemoryMetricReader) -> dict[str, float]:
    """One collection: each metric's single data point, by name."""
    data = reader.get_metrics_data()
    assert data is not None
    values: dict[str, float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                (point,) = metric.data.data_points
                assert isinstance(point, NumberDataPoint)
                values[metric.name] = point.value
    return values


def as_metrics(stats: Stats) -> dict[str, float]:
    return {name: int(getattr(stats, field)) for name, field in NAMES.items()}


class CountingBroadcaster(Broadcaster):
    """A broadcaster that counts its stats() calls."""

    reads = 0

    def stats(self) -> Stats:
        self.reads += 1
        return super().stats()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def test_each_collection_reports_the_stats_of_then(reader: InMemoryMetricReader) -> None:
    """Every instrument reports its counter, and a later collection what happened since."""
    provider = MeterProvider(metric_readers=[reader])
    with Broadcaster() as b:
        instrument(b, meter=provider.get_meter("test"))
        assert collected(reader) == as_metrics(b.stats())
        b.subscribe()
        b.publish("n", 1)
        with pytest.raises(PublishError):
            b.publish("n", math.nan)
        second = collected(reader)
        assert second == as_metrics(b.stats())
    assert second["ssecast_published_total"] == 1
    assert second["ssecast_delivered_total"] == 1
    assert second["ssecast_rejected_total"] == 1
    assert second["ssecast_subscribers"] == 1
    assert second["ssecast_backend_up"] == 1
    provider.shutdown()


def test_a_collection_reads_stats_once(reader: InMemoryMetricReader) -> None:
    """The eight instruments of one collection share one stats() call."""
    provider = MeterProvider(metric_readers=[reader])
    with CountingBroadcaster() as b:
        instrument(b, meter=provider.get_meter("test"))
        before = b.reads
        for _ in range(3):
            collected(reader)
        assert b.reads - before == 3
    provider.shutdown()


def test_without_a_meter_it_uses_the_global_provider_s_ssecast_meter() -> None:
    """By default the instruments go to the meter named ssecast of the global provider."""
    script = textwrap.dedent(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from ssecast import Broadcaster
        from ssecast.otel import instrument

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        broadcaster = Broadcaster()
        instrument(broadcaster)
        broadcaster.publish("n", 1)
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    print(scope.scope.name, metric.name, metric.data.data_points[0].value)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "ssecast ssecast_published_total 1" in result.stdout.splitlines()
    assert len(result.stdout.splitlines()) == len(NAMES)


def test_import_without_opentelemetry_names_the_extra() -> None:
    """Without opentelemetry-api, importing ssecast.otel says which extra to install."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # what Python does when it is not installed
        try:
            import ssecast.otel
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'ssecast[otel]'" in result.stdout
