"""Broker and rebalancer counters: the Prometheus :class:`BrokerEvents`.

:class:`PrometheusEvents` counts published/acked/reclaimed/... events and
the rebalancer's moves, copied and swept entries, and runs. In ``taskiq
worker --workers N`` each worker is a process, so the counters use
prometheus_client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is
set (see docs/metrics.md). Nothing is registered on prometheus_client's
global ``REGISTRY``, and the metric objects are built on first use, never
at import.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from .._events import BrokerEvents
from ._specs import METRIC_PREFIX, REBALANCE_BUCKETS, SPECS_BY_NAME

#: Environment variable of prometheus_client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LABEL_VALUE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _label(value: str) -> str:
    """A short, fixed-vocabulary label value (guards label cardinality)."""
    text = value.strip().lower().replace(" ", "_").replace("-", "_")
    return text if _LABEL_VALUE.match(text) else "other"


def dead_letter_reason(reason: str) -> str:
    """Map a broker's free-text dead-letter reason to a small fixed label set.

    The broker's reasons contain task names and numbers; as labels they would
    create a series per task name.
    """
    text = reason.strip().lower()
    if text.startswith("max deliveries"):
        return "max_deliveries"
    if text.startswith("unknown task"):
        return "unknown_task"
    if text.startswith(("not a taskiq message", "missing 'data'", "missing")):
        return "malformed"
    if text.startswith("entry deleted"):
        return "deleted"
    return "other"


class _BrokerMetrics:
    """The metric objects of :class:`PrometheusEvents`, built from :data:`METRICS`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.published = self._counter("published_total")
        self.publish_errors = self._counter("publish_errors_total")
        self.kicks_rerouted = self._counter("kicks_rerouted_total")
        self.acked = self._counter("acked_total")
        self.reclaimed = self._counter("reclaimed_total")
        self.dead_lettered = self._counter("dead_lettered_total")
        self.nogroup_recoveries = self._counter("nogroup_recoveries_total")
        self.retries = self._counter("retries_total")
        self.rebalance_moves = self._counter("rebalance_moves_total")
        self.rebalance_copied = self._counter("rebalance_copied_entries_total")
        self.rebalance_swept = self._counter("rebalance_swept_entries_total")
        spec = SPECS_BY_NAME[METRIC_PREFIX + "rebalance_duration_seconds"]
        self.rebalance_duration = Histogram(
            spec.name, spec.help, spec.labels, registry=registry, buckets=REBALANCE_BUCKETS
        )
        self.rebalance_in_progress = self._gauge("rebalance_in_progress")
        self.last_rebalance = self._gauge("last_successful_rebalance_timestamp_seconds")

    def _counter(self, short: str) -> Counter:
        spec = SPECS_BY_NAME[METRIC_PREFIX + short]
        assert spec.kind == "counter", spec.name
        assert spec.source != "exporter", spec.name
        return Counter(spec.name, spec.help, spec.labels, registry=self.registry)

    def _gauge(self, short: str) -> Gauge:
        spec = SPECS_BY_NAME[METRIC_PREFIX + short]
        assert spec.kind == "gauge", spec.name
        assert spec.source != "exporter", spec.name
        return Gauge(
            spec.name,
            spec.help,
            spec.labels,
            registry=self.registry,
            multiprocess_mode=spec.multiprocess_mode or "all",  # type: ignore[arg-type]
        )


class _Lazy:
    """A value built on first use, once per process, thread-safely."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._factory()
                value = self._value
        return value


# Built on first use, never at import: the metric objects behind every
# PrometheusEvents() without a registry. One set per process matters in
# multiprocess mode, where two objects for the same series would overwrite
# each other's value in the shared mmap file.
_SHARED_METRICS = _Lazy(lambda: _BrokerMetrics(CollectorRegistry()))


class PrometheusEvents(BrokerEvents):
    """Counts broker and rebalancer events as Prometheus metrics.

    Pass it to a broker: ``ClusterStreamBroker(url, events=PrometheusEvents())``.

    :param registry: where to register the metrics. ``None`` (the default)
        uses one private registry per process, shared by every
        ``PrometheusEvents()`` of the process (never prometheus_client's
        global ``REGISTRY``); serve it with :func:`metrics_registry` and
        :func:`~taskiq_redis_cluster._metrics._exporter.start_metrics_server`. Pass
        your own registry to keep separate counts (tests, embedding); in
        multiprocess mode use at most one such instance per process.

    With ``PROMETHEUS_MULTIPROC_DIR`` set before the process starts (before
    prometheus_client is first imported), values go to per-process files
    in that directory and :func:`metrics_registry` sums them over every
    worker process.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            self._m: _BrokerMetrics = _SHARED_METRICS.get()
        else:
            self._m = _BrokerMetrics(registry)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry holding this instance's metrics (this process only)."""
        return self._m.registry

    # ------------------------------------------------------------ broker
    def published(self, queue: str, shard: int, count: int = 1) -> None:
        self._m.published.labels(queue).inc(count)

    def publish_error(self, queue: str, reason: str) -> None:
        self._m.publish_errors.labels(queue, _label(reason)).inc()

    def rerouted(self, queue: str, shard: int) -> None:
        self._m.kicks_rerouted.labels(queue).inc()

    def acked(self, queue: str, shard: int, count: int = 1) -> None:
        self._m.acked.labels(queue).inc(count)

    def reclaimed(self, queue: str, shard: int, count: int = 1) -> None:
        self._m.reclaimed.labels(queue).inc(count)

    def dead_lettered(self, queue: str, shard: int, reason: str) -> None:
        self._m.dead_lettered.labels(queue, dead_letter_reason(reason)).inc()

    def nogroup_recovered(self, queue: str, shard: int) -> None:
        self._m.nogroup_recoveries.labels(queue).inc()

    def retried(self, kind: str) -> None:
        self._m.retries.labels(_label(kind)).inc()

    # -------------------------------------------------------- rebalancer
    def rebalance_moved(self, queue: str, result: str, count: int = 1) -> None:
        """``count`` shard moves of ``queue`` ended with ``result`` (``done``, ...)."""
        self._m.rebalance_moves.labels(queue, _label(result)).inc(count)

    def rebalance_queue_done(self, queue: str) -> None:
        """A rebalance of ``queue`` completed: it is balanced or its moves are done."""
        self._m.last_rebalance.labels(queue).set(time.time())

    def rebalance_copied(self, queue: str, count: int) -> None:
        """The rebalancer copied ``count`` entries of a moving shard of ``queue``."""
        self._m.rebalance_copied.labels(queue).inc(count)

    def rebalance_swept(self, queue: str, count: int) -> None:
        """The rebalancer moved ``count`` entries out of retired shards of ``queue``."""
        self._m.rebalance_swept.labels(queue).inc(count)

    def rebalance_event(self, event: Any) -> None:
        """``on_event`` callback for ``Rebalancer``: counts moves, copied and
        swept entries, and completed queues.

        Example::

            events = default_events()
            rebalancer = Rebalancer(client, on_event=events.rebalance_event)
            with events.track_rebalance():
                await rebalancer.apply()
        """
        kind = str(getattr(event.kind, "value", event.kind))
        result = _MOVE_RESULTS.get(kind)
        if result is not None:
            self.rebalance_moved(event.queue, result)
        elif kind == "queue_done":
            self.rebalance_queue_done(event.queue)
        elif kind == "copied":
            # ``done`` is the number of entries of that one copy pass.
            self.rebalance_copied(event.queue, max(0, int(event.done)))
        elif kind == "swept":
            self.rebalance_swept(event.queue, max(0, int(event.done)))

    @contextmanager
    def track_rebalance(self) -> Iterator[None]:
        """Around one rebalance run: the in-progress gauge and the duration."""
        start = time.monotonic()
        self._m.rebalance_in_progress.set(1)
        try:
            yield
        finally:
            self._m.rebalance_in_progress.set(0)
            self._m.rebalance_duration.observe(max(0.0, time.monotonic() - start))


#: Rebalancer event kinds that end a move, and their ``result`` label.
_MOVE_RESULTS = {"finalized": "done", "reverted": "reverted", "skipped": "skipped"}

_DEFAULT_EVENTS = _Lazy(PrometheusEvents)


def default_events() -> PrometheusEvents:
    """The process-wide :class:`PrometheusEvents`, created on first call."""
    events: PrometheusEvents = _DEFAULT_EVENTS.get()
    return events


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` if set and non-empty, else ``None``."""
    return os.environ.get(MULTIPROC_ENV) or None


def metrics_registry(events: PrometheusEvents | None = None) -> CollectorRegistry:
    """The registry to serve broker counters from.

    With ``PROMETHEUS_MULTIPROC_DIR`` set: a new registry whose
    ``MultiProcessCollector`` sums the files of every process (every worker
    of ``taskiq worker --workers N``). Otherwise: the registry of ``events``
    (default: :func:`default_events`).
    """
    path = multiprocess_dir()
    if path is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return registry
    return (events or default_events()).registry
