"""Prometheus metrics: queue state read at scrape time, broker counters, HTTP serving.

Everything outside this folder imports from here, never from the modules
below, so they can be rearranged without touching their users.
"""

from ._exporter import (
    DEFAULT_EXPORTER_PORT,
    MetricsServer,
    run_exporter,
    scrape_once,
    start_metrics_server,
)
from ._reader import (
    METRIC_PREFIX,
    METRICS,
    MULTIPROC_ENV,
    PrometheusEvents,
    QueueCollector,
    QueueSnapshot,
    QueueStateReader,
    dead_letter_reason,
    default_events,
    metrics_registry,
    reference_table,
)

__all__ = [
    "DEFAULT_EXPORTER_PORT",
    "METRICS",
    "METRIC_PREFIX",
    "MULTIPROC_ENV",
    "MetricsServer",
    "PrometheusEvents",
    "QueueCollector",
    "QueueSnapshot",
    "QueueStateReader",
    "dead_letter_reason",
    "default_events",
    "metrics_registry",
    "reference_table",
    "run_exporter",
    "scrape_once",
    "start_metrics_server",
]
