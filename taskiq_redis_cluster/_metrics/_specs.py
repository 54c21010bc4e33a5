"""The declaration of every metric: the single source of truth.

:data:`METRICS` lists what the code exposes; ``docs/metrics.md`` holds
:func:`reference_table` and a test fails when the two differ. The counters
(:mod:`._events`) and the scrape-time families (:mod:`._reader`) are both
built from these specs, so neither can expose a name the docs do not list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: Prefix of every metric name.
METRIC_PREFIX = "taskiq_redis_cluster_"

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
_LANE = (*_GROUP, "lane")
_P = METRIC_PREFIX

#: Every metric of the package. docs/metrics.md is tested against this.
METRICS: tuple[MetricSpec, ...] = (
    # ------------------------------------------------ exporter: per shard stream
    MetricSpec(
        f"{_P}stream_length",
        "gauge",
        _STREAM,
        "Entries in the shard's streams, its priority lanes included (XLEN, summed).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}stream_entries_added_total",
        "counter",
        _STREAM,
        "Entries ever added to the shard's streams, its priority lanes included "
        "(XINFO STREAM entries-added, summed).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}dead_letter_length",
        "gauge",
        _STREAM,
        "Entries in the shard's dead-letter stream (XLEN).",
        "exporter",
    ),
    MetricSpec(
        f"{_P}delayed",
        "gauge",
        _STREAM,
        "Tasks kicked with a delay label that are not due yet, held in the shard's "
        "delayed set (ZCARD).",
        "exporter",
    ),
    # ------------------------------------------------ exporter: per shard and group
    MetricSpec(
        f"{_P}group_lag",
        "gauge",
        _GROUP,
        "Entries not yet delivered to the group (XINFO GROUPS lag), summed over the "
        "shard's priority lanes; absent when Redis can tell no lane's lag, else the sum "
        "of the lanes whose lag it can tell (see group_lag_unknown).",
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
        "time in its id), the oldest over the shard's priority lanes; 0 when every "
        "entry was delivered.",
        "exporter",
        merge="max",
    ),
    MetricSpec(
        f"{_P}group_pending",
        "gauge",
        _GROUP,
        "Delivered but unacknowledged entries (XPENDING count), summed over the "
        "shard's priority lanes.",
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
        "Consumers known to the group (XINFO GROUPS consumers; the most of one of "
        "the shard's priority lanes).",
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
    # ------------------------------------------------ exporter: per priority lane
    MetricSpec(
        f"{_P}lane_backlog",
        "gauge",
        _LANE,
        "Entries of one priority lane of the shard (lane 0: the shard's stream) the "
        "group has not acknowledged: undelivered (lag) plus pending; absent while "
        "Redis cannot tell the lane's lag.",
        "exporter",
    ),
    MetricSpec(
        f"{_P}lane_lag_seconds",
        "gauge",
        _LANE,
        "Age of the oldest entry of the priority lane not yet delivered to the group; "
        "0 when every entry was delivered.",
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
        f"{_P}workers",
        "gauge",
        ("queue",),
        "Workers listening to the queue: its worker set, where a killed worker counts "
        "until worker_ttl after its last heartbeat (0 with shard_assignment=False).",
        "exporter",
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
    MetricSpec(
        f"{_P}kicks_rerouted_total",
        "counter",
        ("queue",),
        "Kicks without a routing key moved off a shard whose master was failing.",
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
        f"{_P}rebalance_copied_entries_total",
        "counter",
        ("queue",),
        "Entries the rebalancer copied from a moving shard (its backlog before the "
        "switch, and what is left after it) to the shard that takes its index.",
        "rebalancer",
    ),
    MetricSpec(
        f"{_P}rebalance_swept_entries_total",
        "counter",
        ("queue",),
        "Entries the rebalancer moved out of retired shards, where a producer with a "
        "stale plan wrote them after the move.",
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


def empty_family(spec: MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    """The family ``spec`` declares, without samples (the exporter fills it)."""
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    raise ValueError(f"{spec.name}: the exporter only builds counters and gauges")
