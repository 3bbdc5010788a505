"""ssecast.prometheus: a real registry, scraped over HTTP and parsed as Prometheus would."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from servers import free_port
from ssecast import BackendUnavailableError, Broadcaster, ConfigurationError, PublishError, Stats
from ssecast.prometheus import Collector
from ssecast.redis import RedisBackend

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parsed(exposition: str) -> Samples:
    """Every sample of a text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def expected(stats: Stats, **labels: str) -> Samples:
    """The samples a collector with ``labels`` gives for ``stats``."""
    key = frozenset(labels.items())
    return {
        ("ssecast_subscribers", key): stats.subscribers,
        ("ssecast_published_total", key): stats.published,
        ("ssecast_delivered_total", key): stats.delivered,
        ("ssecast_evicted_total", key): stats.evicted,
        ("ssecast_rejected_total", key): stats.rejected,
        ("ssecast_revoked_total", key): stats.revoked,
        ("ssecast_expired_total", key): stats.expired,
        ("ssecast_refused_total", key): stats.refused,
        ("ssecast_backend_up", key): int(stats.backend_up),
    }


@contextlib.contextmanager
def serving(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` over HTTP, as an app does for Prometheus; yield its URL."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def busy(broadcaster: Broadcaster) -> None:
    """Give every counter but revoked and expired something to count."""
    broadcaster.subscribe()
    broadcaster.subscribe(queue_size=1)  # evicted by the second event
    for n in range(3):
        broadcaster.publish("n", n)
    with pytest.raises(PublishError):
        broadcaster.publish("n", math.nan)


def test_a_scrape_over_http_gives_every_metric_with_its_labels() -> None:
    """An HTTP scrape, parsed by prometheus_client's own parser, shows stats() exactly."""
    registry = CollectorRegistry()
    with Broadcaster() as b:
        registry.register(Collector(b, labels={"app": "prices"}))
        busy(b)
        with serving(registry) as url:
            response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        stats = b.stats()
    assert stats.published == 3
    assert stats.delivered == 4
    assert stats.evicted == 1
    assert stats.rejected == 1
    assert parsed(response.text) == expected(stats, app="prices")


def test_every_scrape_reads_the_counters_then() -> None:
    """Values are read at scrape time: a second scrape shows what happened in between."""
    registry = CollectorRegistry()
    with Broadcaster() as b:
        registry.register(Collector(b))
        first = parsed(generate_latest(registry).decode())
        b.publish("n", 1)
        second = parsed(generate_latest(registry).decode())
    assert first[("ssecast_published_total", frozenset())] == 0
    assert second[("ssecast_published_total", frozenset())] == 1


def test_collectors_with_different_labels_share_the_default_registry() -> None:
    """Two broadcasters, told apart by a label, both register on REGISTRY and both show."""
    with Broadcaster() as a, Broadcaster() as b:
        collectors = [Collector(a, labels={"stream": "a"}), Collector(b, labels={"stream": "b"})]
        for collector in collectors:
            REGISTRY.register(collector)
        try:
            a.publish("n", 1)
            busy(b)
            samples = parsed(generate_latest(REGISTRY).decode())
        finally:
            for collector in collectors:
                REGISTRY.unregister(collector)
        assert expected(a.stats(), stream="a").items() <= samples.items()
        assert expected(b.stats(), stream="b").items() <= samples.items()


def test_backend_up_is_zero_once_the_backend_failed() -> None:
    """A broadcaster whose Redis is unreachable scrapes as down, without a scrape waiting."""
    registry = CollectorRegistry()
    url = f"redis://127.0.0.1:{free_port()}/0"
    with Broadcaster(backend=RedisBackend(url, prefix="ssecast-test-prometheus:")) as b:
        registry.register(Collector(b))
        assert parsed(generate_latest(registry).decode())[("ssecast_backend_up", frozenset())] == 1
        with pytest.raises(BackendUnavailableError):
            b.publish("n", 1)
        assert parsed(generate_latest(registry).decode())[("ssecast_backend_up", frozenset())] == 0


@pytest.mark.parametrize(
    "labels",
    [{"bad-name": "x"}, {"__reserved": "x"}, {"1st": "x"}, {"ok": 1}],
    ids=["dash", "reserved", "digit", "not-str"],
)
def test_labels_prometheus_would_refuse_are_refused_at_once(labels: dict[str, str]) -> None:
    """A label name or value that would break the exposition raises ConfigurationError."""
    with Broadcaster() as b, pytest.raises(ConfigurationError):
        Collector(b, labels=labels)


def test_import_without_prometheus_client_names_the_extra() -> None:
    """Without prometheus-client, importing ssecast.prometheus says which extra to install."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # what Python does when it is not installed
        try:
            import ssecast.prometheus
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'ssecast[prometheus]'" in result.stdout
