"""Prometheus metrics: queue state read at scrape time, and broker counters.

Two independent parts, both declared in :data:`METRICS` (the single source
of truth that ``docs/metrics.md`` is checked against):

* :class:`QueueStateReader` and :class:`QueueCollector` read the state of
  every shard stream when Prometheus scrapes: length, lag, pending entries,
  the idle time of the oldest pending entry, consumers, plan epoch and how
  the shards sit on the masters. Nothing is cached between scrapes.
  prometheus_client calls ``collect()`` synchronously from an HTTP thread
  while our client is asyncio, so the collector submits the read to the
  exporter's event loop (``asyncio.run_coroutine_threadsafe``) and waits a
  bounded time; on a timeout or an error it reports what it could read and
  counts ``taskiq_redis_cluster_scrape_errors_total{reason}``.
* :class:`PrometheusEvents` is the :class:`~taskiq_redis_cluster._events.BrokerEvents`
  implementation: published/acked/reclaimed/... counters, plus the
  rebalancer's metrics. In ``taskiq worker --workers N`` each worker is a
  process, so the counters use prometheus_client's multiprocess mode when
  ``PROMETHEUS_MULTIPROC_DIR`` is set (see docs/metrics.md).

No metric is registered on prometheus_client's global ``REGISTRY`` and
nothing is created at import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import Counter as _Tally
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import PlanError
from .._events import BrokerEvents
from .._keys import DEFAULT_PREFIX, ShardKeys
from .._planner import ShardPlan, balance
from .._planstore import PlanStore
from .._retry import error_kind
from .._topology import Topology, read_topology

logger = logging.getLogger("taskiq_redis_cluster.metrics")

#: Prefix of every metric name.
METRIC_PREFIX = "taskiq_redis_cluster_"

#: Environment variable of prometheus_client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["exporter", "broker", "rebalancer"]


@dataclass(frozen=True)
class MetricSpec:
    """Declaration of one metric: what the code exposes and the docs list.

    :param name: exposed name; counters end in ``_total``.
    :param kind: ``counter``, ``gauge`` or ``histogram``.
    :param labels: label names, in order.
    :param help: one-line meaning (also the HELP text).
    :param source: ``exporter`` (read at scrape time by :class:`QueueCollector`),
        ``broker`` or ``rebalancer`` (counted by :class:`PrometheusEvents`).
    :param merge: exporter gauges only: how two samples with the same labels
        combine (``sum`` or ``max``); happens when two draining shards share an index.
    :param multiprocess_mode: gauges of :class:`PrometheusEvents` only.
    :param optional: only exposed when an option turns it on.
    """

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    source: Source
    merge: Literal["sum", "max"] = "sum"
    multiprocess_mode: str = ""
    optional: bool = False

    @property
    def family(self) -> str:
        """Family name as prometheus_client's parser returns it (no ``_total``)."""
        if self.kind == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name


_STREAM = ("queue", "shard", "state")
_GROUP = ("queue", "shard", "state", "group")
_P = METRIC_PREFIX

#: Every metric of the package. docs/metrics.md is tested against this.
METRICS: tuple[MetricSpec, ...] = (
    # ------------------------------------------------ exporter: per shard stream
    MetricSpec(
        f"{_P}stream_length", "gauge", _STREAM, "Entries in the shard stream (XLEN).", "exporter"
    ),
    MetricSpec(
        f"{_P}stream_entries_added_total",
        "counter",
        _STREAM,
        "Entries ever added to the shard stream (XINFO STREAM entries-added).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}dead_letter_length",
        "gauge",
        _STREAM,
        "Entries in the shard's dead-letter stream (XLEN).",
        "exporter",
    ),
    # ------------------------------------------------ exporter: per shard and group
    MetricSpec(
        f"{_P}group_lag",
        "gauge",
        _GROUP,
        "Entries not yet delivered to the group (XINFO GROUPS lag); "
        "absent while Redis cannot tell (see group_lag_unknown).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}group_lag_unknown",
        "gauge",
        _GROUP,
        "1 when Redis reports the group's lag as null (after XDEL or trimming "
        "past the group), else 0.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}group_lag_seconds",
        "gauge",
        _GROUP,
        "Age of the oldest entry not yet delivered to the group (now minus the "
        "time in its id); 0 when every entry was delivered.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}group_pending",
        "gauge",
        _GROUP,
        "Delivered but unacknowledged entries (XPENDING count).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}group_oldest_pending_idle_seconds",
        "gauge",
        _GROUP,
        "Idle time of the oldest (smallest id) pending entry: time since it was "
        "last delivered or claimed; 0 when nothing is pending.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}group_oldest_pending_deliveries",
        "gauge",
        _GROUP,
        "Delivery count of the oldest pending entry; 0 when nothing is pending.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}group_consumers",
        "gauge",
        _GROUP,
        "Consumers known to the group (XINFO GROUPS consumers).",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}group_undelivered_trimmed",
        "gauge",
        _GROUP,
        "1 when entries the group had not yet received were trimmed or deleted "
        "(lost tasks), else 0.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}consumer_pending",
        "gauge",
        (*_GROUP, "consumer"),
        "Pending entries per consumer (only with per-consumer metrics on).",
        "exporter",
        optional=True,
    ),
    MetricSpec(
        f"{_P}consumer_idle_seconds",
        "gauge",
        (*_GROUP, "consumer"),
        "Seconds since the consumer's last attempted read (only with per-consumer metrics on).",
        "exporter",
        merge="max",
        optional=True,
    ),
    # ------------------------------------------------ exporter: plans and masters
    MetricSpec(
        f"{_P}plan_epoch", "gauge", ("queue",), "Epoch of the queue's stored plan.", "exporter"
    ),
    MetricSpec(
        f"{_P}plan_shards",
        "gauge",
        ("queue", "state"),
        "Shards in the plan: active, or draining after a move.",
        "exporter",
    ),
    MetricSpec(
        f"{_P}plan_imbalance",
        "gauge",
        ("queue",),
        "Most active shards on one slot-serving master divided by the mean (1.0 is even).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}plan_misplaced_shards",
        "gauge",
        ("queue",),
        "Active shards whose slot is now served by another master than planned.",
        "exporter",
    ),
    MetricSpec(
        f"{_P}plan_orphaned_shards",
        "gauge",
        ("queue",),
        "Active shards whose slot no master serves.",
        "exporter",
    ),
    MetricSpec(
        f"{_P}master_shards",
        "gauge",
        ("queue", "master", "state"),
        "Shards whose slot the master (host:port) serves now.",
        "exporter",
    ),
    MetricSpec(
        f"{_P}master_up",
        "gauge",
        ("master",),
        "1 when the master (host:port) is healthy in the cluster's view, else 0.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}scrape_duration_seconds",
        "gauge",
        (),
        "Seconds the last queue-state read took.",
        "exporter",
    ),
    MetricSpec(
        f"{_P}scrape_errors_total",
        "counter",
        ("reason",),
        "Queue-state reads that failed in part, by reason (timeout, topology, "
        "plan, no_plan, or a Redis error kind).",
        "exporter",
    ),
    # ------------------------------------------------ broker counters
    MetricSpec(f"{_P}published_total", "counter", ("queue",), "Tasks enqueued.", "broker"),
    MetricSpec(
        f"{_P}publish_errors_total",
        "counter",
        ("queue", "reason"),
        "Kicks that failed, by error kind.",
        "broker",
    ),
    MetricSpec(f"{_P}acked_total", "counter", ("queue",), "Deliveries acknowledged.", "broker"),
    MetricSpec(
        f"{_P}reclaimed_total",
        "counter",
        ("queue",),
        "Entries of crashed or stuck consumers taken over (XAUTOCLAIM).",
        "broker",
    ),
    MetricSpec(
        f"{_P}dead_lettered_total",
        "counter",
        ("queue", "reason"),
        "Entries moved to the dead-letter stream (max_deliveries, unknown_task, "
        "malformed, deleted, other).",
        "broker",
    ),
    MetricSpec(
        f"{_P}nogroup_recoveries_total",
        "counter",
        ("queue",),
        "Lost consumer groups recreated at id 0 (NOGROUP/UNBLOCKED).",
        "broker",
    ),
    MetricSpec(
        f"{_P}retries_total",
        "counter",
        ("kind",),
        "Redis operations retried or redirected, by error kind.",
        "broker",
    ),
    # ------------------------------------------------ rebalancer
    MetricSpec(
        f"{_P}rebalance_moves_total",
        "counter",
        ("queue", "result"),
        "Shard moves of the rebalancer, by result (done, reverted, skipped).",
        "rebalancer",
    ),
    MetricSpec(
        f"{_P}rebalance_duration_seconds",
        "histogram",
        (),
        "Duration of rebalance runs (one apply() over its queues).",
        "rebalancer",
    ),
    MetricSpec(
        f"{_P}rebalance_in_progress",
        "gauge",
        (),
        "1 while a rebalance runs in some process, else 0.",
        "rebalancer",
        multiprocess_mode="livemax",
    ),
    MetricSpec(
        f"{_P}last_successful_rebalance_timestamp_seconds",
        "gauge",
        ("queue",),
        "Unix time a rebalance of the queue last completed (balanced, or moves done).",
        "rebalancer",
        multiprocess_mode="max",
    ),
)

SPECS_BY_NAME: Mapping[str, MetricSpec] = {spec.name: spec for spec in METRICS}

#: Buckets of the rebalance duration histogram, in seconds.
REBALANCE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def reference_table() -> str:
    """The Markdown reference table of :data:`METRICS` (kept in docs/metrics.md)."""
    rows = ["| Name | Type | Labels | Source | Meaning |", "|---|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        rows.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.source} | {spec.help} |")
    return "\n".join(rows)


# ==========================================================================
# Broker and rebalancer counters
# ==========================================================================

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
        self.acked = self._counter("acked_total")
        self.reclaimed = self._counter("reclaimed_total")
        self.dead_lettered = self._counter("dead_lettered_total")
        self.nogroup_recoveries = self._counter("nogroup_recoveries_total")
        self.retries = self._counter("retries_total")
        self.rebalance_moves = self._counter("rebalance_moves_total")
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
        :func:`~taskiq_redis_cluster._exporter.start_metrics_server`. Pass
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

    def rebalance_event(self, event: Any) -> None:
        """``on_event`` callback for ``Rebalancer``: counts moves and completed queues.

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


# ==========================================================================
# Queue state read at scrape time
# ==========================================================================

_K = TypeVar("_K", bound=Hashable)
_T = TypeVar("_T")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse_id(value: Any) -> tuple[int, int] | None:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``; None if not an id."""
    if value is None:
        return None
    ms, sep, seq = _text(value).partition("-")
    try:
        return int(ms), int(seq) if sep else 0
    except ValueError:
        return None


def _get(mapping: Mapping[Any, Any], name: str) -> Any:
    """Field of a redis-py reply dict, whether its keys are str or bytes."""
    if name in mapping:
        return mapping[name]
    return mapping.get(name.encode())


@dataclass(frozen=True)
class _ShardRef:
    queue: str
    index: int
    state: str  # "active" or "draining"
    keys: ShardKeys

    @property
    def stream_labels(self) -> tuple[str, str, str]:
        return (self.queue, str(self.index), self.state)


@dataclass(frozen=True)
class _StreamFacts:
    """What XINFO STREAM tells about one shard stream."""

    length: int
    removed: int | None  # entries-added - length: trimmed or deleted entries
    first: tuple[int, int] | None
    last_generated: tuple[int, int]
    max_deleted: tuple[int, int]

    def lost_before(self, last_delivered: tuple[int, int], entries_read: int | None) -> bool:
        """Whether an entry was removed before a group at ``last_delivered`` got it.

        XDEL raises ``max-deleted-entry-id``; trimming does not, but it
        removes from the head, so it lost undelivered entries when the group
        is behind the first entry and has read fewer entries than were
        removed (or the stream is empty while the group missed entries).
        """
        if self.max_deleted > last_delivered:
            return True
        if last_delivered >= self.last_generated:
            return False
        if self.length == 0 or self.first is None:
            return True
        if last_delivered < self.first and entries_read is not None and self.removed is not None:
            return entries_read < self.removed
        return False


@dataclass
class _GroupState:
    """What round 1 learned about one group of one shard."""

    shard: _ShardRef
    name: str
    pending: int
    consumers: int
    last_delivered: tuple[int, int]
    lag: int | None
    deleted_past_delivery: bool
    caught_up: bool  # last-delivered-id >= last-generated-id

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (*self.shard.stream_labels, self.name)


class _Samples:
    """Samples of one scrape, keyed by metric and labels, merged per spec."""

    def __init__(self) -> None:
        self._values: dict[str, dict[tuple[str, ...], float]] = {}

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        spec = SPECS_BY_NAME[name]
        key = tuple(labels)
        assert len(key) == len(spec.labels), name
        bucket = self._values.setdefault(name, {})
        if key in bucket:
            old = bucket[key]
            bucket[key] = max(old, value) if spec.merge == "max" else old + value
        else:
            bucket[key] = float(value)

    def value(self, name: str, labels: Sequence[str]) -> float | None:
        """One sample's value (tests and tools)."""
        return self._values.get(name, {}).get(tuple(labels))

    def items(self, name: str) -> list[tuple[tuple[str, ...], float]]:
        return sorted(self._values.get(name, {}).items(), key=lambda kv: _natural(kv[0]))


def _natural(labels: tuple[str, ...]) -> tuple[tuple[int, int, str], ...]:
    """Sort key that puts shard "2" before shard "10"."""
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in labels)


def _empty_family(spec: MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    raise ValueError(f"{spec.name}: the exporter only builds counters and gauges")


@dataclass
class QueueSnapshot:
    """The result of one queue-state read.

    :ivar samples: every sample read (see :data:`METRICS`, source ``exporter``).
    :ivar errors: one reason per failed part (``timeout``, ``topology``, ...).
    :ivar duration: seconds the read took.
    """

    samples: _Samples = field(default_factory=_Samples)
    errors: list[str] = field(default_factory=list)
    duration: float = 0.0

    def families(self, error_totals: Mapping[str, float] | None = None) -> list[Metric]:
        """Metric families of this snapshot, in :data:`METRICS` order.

        :param error_totals: cumulative scrape errors to report; default is
            this snapshot's errors alone.
        """
        totals = _Tally(self.errors) if error_totals is None else error_totals
        result: list[Metric] = []
        for spec in METRICS:
            if spec.source != "exporter":
                continue
            family = _empty_family(spec)
            if spec.name == f"{_P}scrape_duration_seconds":
                family.add_metric([], self.duration)
            elif spec.name == f"{_P}scrape_errors_total":
                for reason, count in sorted(totals.items()):
                    family.add_metric([reason], count)
            else:
                items = self.samples.items(spec.name)
                if not items and spec.optional:
                    continue
                for labels, value in items:
                    family.add_metric(list(labels), value)
            result.append(family)
        return result


class QueueStateReader:
    """Reads the state of queues' shard streams (asyncio; one call per scrape).

    Each read loads the plans and the topology, then sends per master one
    pipeline of ``XINFO STREAM``/``XINFO GROUPS``/``XLEN`` for all its
    shards, then one pipeline of ``XPENDING - + 1`` (oldest pending entry)
    and ``XRANGE (last-delivered-id + COUNT 1`` (oldest undelivered entry)
    where needed. Masters are read concurrently and independently: a dead
    master costs only its own shards.

    :param client: an initialized cluster client (not owned, not closed).
    :param queues: queues to read; ``None`` = every queue with a plan, looked
        up at each read (``PlanStore.list_queues``).
    :param prefix: key prefix of the deployment.
    :param groups: consumer groups to report; ``None`` = every group found.
    :param timeout: seconds a whole read may take; what is unfinished then
        is reported as a ``timeout`` error.
    :param per_consumer: also report per-consumer pending/idle (a label per
        consumer name, so off by default).
    :param clock: wall clock in seconds (entry ids hold the server's ms time).
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        queues: Sequence[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        groups: Sequence[str] | None = None,
        timeout: float = 5.0,
        per_consumer: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.client = client
        self.queues = tuple(queues) if queues else None
        self.prefix = prefix
        self.groups = frozenset(groups) if groups else None
        self.timeout = timeout
        self.per_consumer = per_consumer
        self._clock = clock
        self._store = PlanStore(client, prefix=prefix)
        # Only a fallback for a plan read that fails; never used otherwise.
        self._last_plans: dict[str, ShardPlan] = {}

    async def read(self) -> QueueSnapshot:
        """Read everything once; never raises for Redis trouble (see ``errors``)."""
        started = time.perf_counter()
        snap = QueueSnapshot()
        try:
            await self._read(snap, asyncio.get_running_loop().time())
        except Exception as exc:  # a scrape must answer; the reason is counted
            logger.warning("Reading the queue state failed: %r", exc)
            snap.errors.append(_reason(exc))
        snap.duration = time.perf_counter() - started
        return snap

    async def _read(self, snap: QueueSnapshot, start: float) -> None:
        # Each phase gets a share of the time, so a master that hangs in
        # one phase does not starve the reads of the healthy masters.
        deadline = start + self.timeout
        plans_deadline = start + self.timeout * 0.4
        streams_deadline = start + self.timeout * 0.75
        # The topology is only needed for the per-master metrics: read it
        # alongside everything else.
        topology_task = asyncio.ensure_future(read_topology(self.client))
        try:
            plans = await self._read_plans(snap, plans_deadline)
            shards: list[_ShardRef] = []
            for plan in plans:
                snap.samples.add(f"{_P}plan_epoch", [plan.queue], plan.epoch)
                snap.samples.add(f"{_P}plan_shards", [plan.queue, "active"], len(plan.shards))
                snap.samples.add(f"{_P}plan_shards", [plan.queue, "draining"], len(plan.draining))
                shards += [
                    _ShardRef(plan.queue, s.index, "active", s.keys(self.prefix))
                    for s in plan.shards
                ]
                shards += [
                    _ShardRef(plan.queue, s.index, "draining", s.keys(self.prefix))
                    for s in plan.draining
                ]
            groups = await self._round_streams(snap, shards, streams_deadline)
            await self._round_groups(snap, groups, deadline)
        finally:
            done, errors = await _bounded({"": topology_task}, deadline)
        if errors:
            snap.errors.append("topology")
        else:
            self._topology_samples(snap.samples, done[""], plans)

    async def _read_plans(self, snap: QueueSnapshot, deadline: float) -> list[ShardPlan]:
        queues: Sequence[str] | None = self.queues
        if queues is None:
            listed, failed = await _bounded({0: self._store.list_queues()}, deadline)
            snap.errors.extend(failed.values())
            queues = listed.get(0, [])
        jobs = {q: self._store.load(q) for q in queues}
        done, errors = await _bounded(jobs, deadline)
        snap.errors.extend(errors.values())
        plans: list[ShardPlan] = []
        for queue in queues:
            if queue not in done:
                # The plan's master is slow or down: the shards on the other
                # masters are still worth reporting, with the last plan seen.
                cached = self._last_plans.get(queue)
                if cached is not None:
                    plans.append(cached)
                continue
            plan = done[queue]
            if plan is None:
                snap.errors.append("no_plan")
                self._last_plans.pop(queue, None)
                logger.debug("Queue %s has no plan; nothing to report", queue)
            else:
                self._last_plans[queue] = plan
                plans.append(plan)
        return plans

    # ----------------------------------------------------------- topology
    @staticmethod
    def _topology_samples(samples: _Samples, topology: Topology, plans: list[ShardPlan]) -> None:
        for master in topology.masters:
            samples.add(f"{_P}master_up", [str(master.address)], 1 if master.healthy else 0)
        serving = topology.slot_masters
        for plan in plans:
            for state, shard_list in (("active", plan.shards), ("draining", plan.draining)):
                counts = dict.fromkeys((str(m.address) for m in serving), 0)
                for shard in shard_list:
                    owner = topology.owner_of(shard.slot)
                    if owner is not None:
                        name = str(owner.address)
                        counts[name] = counts.get(name, 0) + 1
                for name, count in counts.items():
                    samples.add(f"{_P}master_shards", [plan.queue, name, state], count)
            if serving:
                report = balance(plan, topology)
                samples.add(f"{_P}plan_imbalance", [plan.queue], report.imbalance)
                samples.add(f"{_P}plan_misplaced_shards", [plan.queue], len(report.misplaced))
                samples.add(f"{_P}plan_orphaned_shards", [plan.queue], len(report.orphaned))

    # -------------------------------------------------------- round one
    async def _round_streams(
        self, snap: QueueSnapshot, shards: list[_ShardRef], deadline: float
    ) -> list[_GroupState]:
        """XINFO STREAM, XINFO GROUPS and the dead-letter XLEN of every shard."""
        commands: list[tuple[_ShardRef, _Command]] = []
        for ref in shards:
            stream, dead = ref.keys.stream, ref.keys.dead
            commands.append((ref, _Command(stream, "xinfo_stream", (stream,))))
            commands.append((ref, _Command(stream, "xinfo_groups", (stream,))))
            commands.append((ref, _Command(dead, "xlen", (dead,))))
        replies, reasons = await self._pipelined([c for _, c in commands], deadline)
        snap.errors.extend(reasons)
        states: list[_GroupState] = []
        for i in range(0, len(commands), 3):
            ref = commands[i][0]
            info, groups, dead = replies[i], replies[i + 1], replies[i + 2]
            if isinstance(dead, int):
                snap.samples.add(f"{_P}dead_letter_length", ref.stream_labels, dead)
            if _missing_key(info):
                # The stream does not exist yet (nothing kicked, no reader).
                snap.samples.add(f"{_P}stream_length", ref.stream_labels, 0)
                continue
            if not isinstance(info, Mapping) or not isinstance(groups, list):
                continue  # failed; the reason is already in snap.errors
            states += self._stream_samples(snap.samples, ref, info, groups)
        return states

    def _stream_samples(
        self, samples: _Samples, ref: _ShardRef, info: Mapping[Any, Any], groups: list[Any]
    ) -> list[_GroupState]:
        labels = ref.stream_labels
        length = int(_get(info, "length") or 0)
        samples.add(f"{_P}stream_length", labels, length)
        added = _get(info, "entries-added")
        if added is not None:
            samples.add(f"{_P}stream_entries_added_total", labels, int(added))
        stream = _StreamFacts(
            length=length,
            removed=None if added is None else int(added) - length,
            first=_first_id(_get(info, "first-entry")),
            last_generated=_parse_id(_get(info, "last-generated-id")) or (0, 0),
            max_deleted=_parse_id(_get(info, "max-deleted-entry-id")) or (0, 0),
        )
        states: list[_GroupState] = []
        for raw in groups:
            group = _as_map(raw)
            name = _text(_get(group, "name"))
            if self.groups is not None and name not in self.groups:
                continue
            lag = _get(group, "lag")
            read = _get(group, "entries-read")
            last = _parse_id(_get(group, "last-delivered-id")) or (0, 0)
            state = _GroupState(
                shard=ref,
                name=name,
                pending=int(_get(group, "pending") or 0),
                consumers=int(_get(group, "consumers") or 0),
                last_delivered=last,
                lag=None if lag is None else int(lag),
                deleted_past_delivery=stream.lost_before(last, None if read is None else int(read)),
                caught_up=last >= stream.last_generated,
            )
            glabels = state.labels
            samples.add(f"{_P}group_pending", glabels, state.pending)
            samples.add(f"{_P}group_consumers", glabels, state.consumers)
            samples.add(f"{_P}group_lag_unknown", glabels, 1 if state.lag is None else 0)
            if state.lag is not None:
                samples.add(f"{_P}group_lag", glabels, state.lag)
            samples.add(
                f"{_P}group_undelivered_trimmed", glabels, 1 if state.deleted_past_delivery else 0
            )
            states.append(state)
        return states

    # -------------------------------------------------------- round two
    async def _round_groups(
        self, snap: QueueSnapshot, groups: list[_GroupState], deadline: float
    ) -> None:
        """Oldest pending entry, oldest undelivered entry (and consumers) per group."""
        commands: list[tuple[_GroupState, str, _Command]] = []
        for g in groups:
            stream = g.shard.keys.stream
            if g.pending > 0:
                commands.append(
                    (
                        g,
                        "pending",
                        _Command(
                            stream,
                            "xpending_range",
                            (stream, g.name),
                            {"min": "-", "max": "+", "count": 1},
                        ),
                    )
                )
            else:
                snap.samples.add(f"{_P}group_oldest_pending_idle_seconds", g.labels, 0)
                snap.samples.add(f"{_P}group_oldest_pending_deliveries", g.labels, 0)
            if g.caught_up or g.lag == 0:
                snap.samples.add(f"{_P}group_lag_seconds", g.labels, 0)
            else:
                start = "({}-{}".format(*g.last_delivered)
                commands.append(
                    (
                        g,
                        "undelivered",
                        _Command(
                            stream, "xrange", (stream,), {"min": start, "max": "+", "count": 1}
                        ),
                    )
                )
            if self.per_consumer:
                commands.append(
                    (g, "consumers", _Command(stream, "xinfo_consumers", (stream, g.name)))
                )
        if not commands:
            return
        replies, reasons = await self._pipelined([cmd for _, _, cmd in commands], deadline)
        snap.errors.extend(reasons)
        now_ms = self._clock() * 1000
        for (g, what, _), reply in zip(commands, replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            if what == "pending":
                idle, deliveries = _oldest_pending(reply)
                snap.samples.add(f"{_P}group_oldest_pending_idle_seconds", g.labels, idle / 1000)
                snap.samples.add(f"{_P}group_oldest_pending_deliveries", g.labels, deliveries)
            elif what == "undelivered":
                first = _parse_id(reply[0][0]) if reply else None
                age = 0.0 if first is None else max(0.0, (now_ms - first[0]) / 1000)
                snap.samples.add(f"{_P}group_lag_seconds", g.labels, age)
            else:
                for consumer in reply or ():
                    row = _as_map(consumer)
                    clabels = [*g.labels, _text(_get(row, "name"))]
                    snap.samples.add(
                        f"{_P}consumer_pending", clabels, int(_get(row, "pending") or 0)
                    )
                    snap.samples.add(
                        f"{_P}consumer_idle_seconds", clabels, int(_get(row, "idle") or 0) / 1000
                    )

    # ------------------------------------------------------------ plumbing
    async def _pipelined(
        self, commands: list[_Command], deadline: float
    ) -> tuple[list[Any], list[str]]:
        """Run ``commands``, one pipeline per master, concurrently.

        :returns: one reply per command (an exception where it failed) and
            the reasons of failed groups (one per failed master pipeline).
        """
        by_node: dict[str, list[int]] = {}
        for i, command in enumerate(commands):
            try:
                found = self.client.get_node_from_key(command.key)
            except Exception:  # slot not covered right now: redis-py retries it
                found = None
            node = found.name if found is not None else "?"
            by_node.setdefault(node, []).append(i)
        jobs = {
            node: self._run_pipeline([commands[i] for i in idx]) for node, idx in by_node.items()
        }
        done, errors = await _bounded(jobs, deadline)
        replies: list[Any] = [None] * len(commands)
        for node, idx in by_node.items():
            node_replies = done.get(node)
            failure = _ReadFailed(errors.get(node, "unknown"))
            for pos, i in enumerate(idx):
                replies[i] = failure if node_replies is None else node_replies[pos]
        reasons = list(errors.values())
        # Single commands that failed inside a pipeline (other than a missing
        # key, which just means an empty shard) count once per kind.
        inner = {
            _reason(r)
            for r in replies
            if isinstance(r, BaseException)
            and not isinstance(r, _ReadFailed)
            and not _missing_key(r)
        }
        return replies, reasons + sorted(inner)

    async def _run_pipeline(self, commands: list[_Command]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            # redis-py's named methods, not execute_command: only they get
            # the reply parsers (XPENDING's depends on the call's options).
            getattr(pipe, command.method)(*command.args, **command.kwargs)
        result: list[Any] = await pipe.execute(raise_on_error=False)
        return result


@dataclass(frozen=True)
class _Command:
    """One pipelined call: the key that routes it, a redis-py method, arguments."""

    key: str
    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class _ReadFailed(Exception):
    """Stand-in reply for commands whose whole pipeline failed."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PlanError):
        return "plan"
    return error_kind(exc)


def _as_map(value: Any) -> Mapping[Any, Any]:
    """A reply row as a mapping (redis-py gives dicts; a flat list also works)."""
    if isinstance(value, Mapping):
        return value
    items = list(value)
    return dict(zip(items[::2], items[1::2], strict=True))


def _first_id(entry: Any) -> tuple[int, int] | None:
    """Id of XINFO STREAM's ``first-entry`` (``(id, fields)`` or None)."""
    if not entry:
        return None
    return _parse_id(entry[0])


def _missing_key(reply: Any) -> bool:
    return isinstance(reply, RedisError) and "no such key" in str(reply).lower()


def _oldest_pending(reply: Any) -> tuple[float, int]:
    """(idle ms, deliveries) from an ``XPENDING key group - + 1`` reply."""
    if not reply:
        return 0.0, 0
    row = reply[0]
    if isinstance(row, Mapping):
        return float(_get(row, "time_since_delivered") or 0), int(_get(row, "times_delivered") or 0)
    return float(row[2]), int(row[3])


async def _bounded(
    jobs: Mapping[_K, Awaitable[_T]], deadline: float
) -> tuple[dict[_K, _T], dict[_K, str]]:
    """Run ``jobs`` concurrently until ``deadline`` (loop time).

    :returns: results of the jobs that finished, and an error reason for
        each one that raised or was still running at the deadline
        (``timeout``; it is cancelled).
    """
    if not jobs:
        return {}, {}
    tasks = {key: asyncio.ensure_future(job) for key, job in jobs.items()}
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining > 0:
        await asyncio.wait(tasks.values(), timeout=remaining)
    done: dict[_K, _T] = {}
    errors: dict[_K, str] = {}
    for key, task in tasks.items():
        if not task.done():
            task.cancel()
            errors[key] = "timeout"
        elif task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            logger.debug("Scrape part %r failed: %r", key, exc)
            errors[key] = _reason(exc)
        else:
            done[key] = task.result()
    cancelled = [t for t in tasks.values() if t.cancelled() or not t.done()]
    if cancelled:
        # Let cancellations run their cleanup (connections are released).
        await asyncio.wait(cancelled, timeout=1.0)
    return done, errors


# ==========================================================================
# The synchronous collector prometheus_client calls
# ==========================================================================


class QueueCollector(Collector):
    """A prometheus_client collector that reads the queue state at each scrape.

    ``collect()`` runs in prometheus_client's HTTP thread; it submits
    ``reader.read()`` to ``loop`` (which must be running in another thread)
    and waits at most ``reader.timeout`` plus a second. Register it on your
    own registry::

        registry = CollectorRegistry()
        registry.register(QueueCollector(reader, loop))

    :param reader: the asyncio reader (its client belongs to ``loop``).
    :param loop: the event loop that runs the reader.
    """

    def __init__(self, reader: QueueStateReader, loop: asyncio.AbstractEventLoop) -> None:
        self.reader = reader
        self.loop = loop
        self._lock = threading.Lock()
        # Cumulative, so that rate() works; "timeout" is seeded so a series
        # exists before the first failure.
        self._error_totals: _Tally[str] = _Tally({"timeout": 0})

    def describe(self) -> Iterable[Metric]:
        """The families collect() yields, without samples (no I/O)."""
        return [_empty_family(s) for s in METRICS if s.source == "exporter" and not s.optional]

    def collect(self) -> Iterable[Metric]:
        """Read the queue state now and yield its metric families."""
        snapshot = self.snapshot()
        with self._lock:
            self._error_totals.update(snapshot.errors)
            totals = dict(self._error_totals)
        return snapshot.families(totals)

    def snapshot(self) -> QueueSnapshot:
        """Run one read on the loop and wait for it (bounded)."""
        started = time.perf_counter()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            # Blocking here would deadlock the loop that must do the read.
            logger.error("QueueCollector.collect() was called on its own event loop")
            return QueueSnapshot(errors=["same_loop"])
        future = asyncio.run_coroutine_threadsafe(self.reader.read(), self.loop)
        try:
            snapshot: QueueSnapshot = future.result(timeout=self.reader.timeout + 1.0)
            return snapshot
        except TimeoutError:
            future.cancel()
            reason = "timeout"
        except Exception as exc:
            logger.warning("Queue-state read failed: %r", exc)
            reason = _reason(exc)
        return QueueSnapshot(errors=[reason], duration=time.perf_counter() - started)


def families_of(snapshot: QueueSnapshot) -> Collector:
    """A collector that yields a fixed snapshot (one-off rendering, benches)."""

    class _Fixed(Collector):
        def collect(self) -> Iterable[Metric]:
            return snapshot.families()

    return _Fixed()
