"""Prometheus metrics for a broadcaster, read from its `stats()` at each scrape.

Install it with `pip install 'ssecast[prometheus]'`, then register a
[`Collector`][ssecast.prometheus.Collector] on a registry:

```python
from prometheus_client import REGISTRY

from ssecast import Broadcaster
from ssecast.prometheus import Collector

broadcaster = Broadcaster()
REGISTRY.register(Collector(broadcaster))
```

Nothing is counted for the metrics: a scrape reads the broadcaster's own counters with
one [`stats`][ssecast.Broadcaster.stats] call, so between scrapes they cost nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as error:  # pragma: no cover - tested in a subprocess without the package
    if error.name != "prometheus_client" and not (error.name or "").startswith(
        "prometheus_client."
    ):
        raise
    raise ImportError(
        "ssecast.prometheus needs the prometheus-client package; install it with: "
        "pip install 'ssecast[prometheus]'"
    ) from error

from ssecast._broadcaster import Broadcaster
from ssecast._exceptions import ConfigurationError
from ssecast._metrics import METRICS

__all__ = ["Collector"]

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class Collector:
    """A Prometheus collector of one broadcaster's metrics; register it on a registry.

    Each scrape reads [`Broadcaster.stats`][ssecast.Broadcaster.stats] once and gives
    `ssecast_subscribers` (gauge), `ssecast_published_total`, `ssecast_delivered_total`,
    `ssecast_evicted_total`, `ssecast_rejected_total`, `ssecast_revoked_total`,
    `ssecast_expired_total` (counters) and `ssecast_backend_up` (gauge: 1, or 0 when the
    backend's last call to its store failed; see [`Stats.backend_up`][ssecast.Stats]).
    A scrape does no I/O.

    :param broadcaster: the broadcaster whose counters are read.
    :param labels: added to every sample, such as `{"broadcaster": "prices"}`: several
        collectors with different labels share one registry.
    :raises ConfigurationError: a label name is not a Prometheus label name, or a value
        is not a `str`.
    """

    def __init__(
        self, broadcaster: Broadcaster, *, labels: Mapping[str, str] | None = None
    ) -> None:
        self._broadcaster = broadcaster
        self._labels = dict(labels or {})
        for name, value in self._labels.items():
            if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name) or name[:2] == "__":
                raise ConfigurationError(f"{name!r} is not a Prometheus label name")
            if not isinstance(value, str):
                raise ConfigurationError(f"label {name!r} must be a str, got {value!r}")

    def describe(self) -> list[Metric]:
        """Return no metric, so that the registry takes several collectors.

        A registry refuses a collector that describes a metric name another one has
        described already, whatever its labels; by describing none, collectors with
        different labels all register, on the default registry too (which would
        otherwise collect to learn the names).
        """
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the metrics, from one [`stats`][ssecast.Broadcaster.stats] call."""
        stats = self._broadcaster.stats()
        names, values = list(self._labels), list(self._labels.values())
        for metric in METRICS:
            kind = CounterMetricFamily if metric.counter else GaugeMetricFamily
            family = kind(metric.name, metric.help, labels=names)
            family.add_metric(values, metric.value(stats))
            yield family
