"""OpenTelemetry metrics for a broadcaster, observed from its `stats()` at each collection.

Install it with `pip install 'ssecast[otel]'` (the API only: the app picks its SDK and
exporter), then instrument a broadcaster once:

```python
from ssecast import Broadcaster
from ssecast.otel import instrument

broadcaster = Broadcaster()
instrument(broadcaster)
```

Nothing is counted for the metrics: each collection reads the broadcaster's own counters
with one [`stats`][ssecast.Broadcaster.stats] call, so between collections they cost
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
except ImportError as error:  # pragma: no cover - tested in a subprocess without the package
    if error.name != "opentelemetry" and not (error.name or "").startswith("opentelemetry."):
        raise
    raise ImportError(
        "ssecast.otel needs the opentelemetry-api package; install it with: "
        "pip install 'ssecast[otel]'"
    ) from error

import ssecast
from ssecast._broadcaster import Broadcaster, Stats
from ssecast._metrics import METRICS, MetricSpec

__all__ = ["instrument"]


def instrument(broadcaster: Broadcaster, *, meter: Meter | None = None) -> None:
    """Register observable instruments that report `broadcaster`'s metrics.

    They carry the names of the Prometheus metrics: `ssecast_subscribers` and
    `ssecast_backend_up` (gauges), `ssecast_published_total`, `ssecast_delivered_total`,
    `ssecast_evicted_total`, `ssecast_rejected_total`, `ssecast_revoked_total` and
    `ssecast_expired_total` (counters). A collection reads
    [`Broadcaster.stats`][ssecast.Broadcaster.stats] once for all of them, and does no I/O.

    :param broadcaster: the broadcaster whose counters are read.
    :param meter: where to register them; by default the global meter provider's meter
        named `ssecast`.
    """
    if meter is None:
        meter = metrics.get_meter("ssecast", ssecast.__version__)
    snapshot = _Snapshot(broadcaster)
    for spec in METRICS:
        callbacks = [snapshot.callback(spec)]
        if spec.counter:
            meter.create_observable_counter(spec.name, callbacks, description=spec.help)
        else:
            meter.create_observable_gauge(spec.name, callbacks, description=spec.help)


class _Snapshot:
    """One `stats()` read shared by the instruments' callbacks of one collection.

    A callback whose metric was read from the current snapshot already belongs to the
    next collection, and takes a new one; so each collection reads `stats()` once, in
    whatever order the SDK calls the callbacks. Two collections at once may read it twice,
    which only costs a read: every value still comes from a real `stats()`.
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self._broadcaster = broadcaster
        self._stats = broadcaster.stats()
        self._unread: set[str] = set()

    def callback(self, spec: MetricSpec) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """Return the callback that observes `spec`."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(spec.value(self._read(spec.name)))]

        return observe

    def _read(self, name: str) -> Stats:
        if name not in self._unread:
            self._stats = self._broadcaster.stats()
            self._unread = {spec.name for spec in METRICS}
        self._unread.discard(name)
        return self._stats
