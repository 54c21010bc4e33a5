"""Prometheus metrics: queue state read at scrape time, broker counters, HTTP serving.

The modules, lowest first; each imports only modules listed before it
(tests/test_metrics.py checks that, and that none of them reaches a broker):

* ``_specs``: the declaration of every metric (:data:`METRICS`), the one
  source of truth for the code and for the table in docs/metrics.md.
* ``_events``: :class:`PrometheusEvents`, the broker and rebalancer counters,
  and the registry that serves them (multiprocess mode included).
* ``_reader``: :class:`QueueStateReader`, one asyncio read of every shard
  stream per scrape, giving a :class:`QueueSnapshot`.
* ``_collector``: :class:`QueueCollector`, which prometheus_client calls from
  its HTTP thread and which hands the read to the reader's event loop.
* ``_exporter``: the ``/metrics`` servers (standalone exporter, in-worker
  server) and :func:`scrape_once`.

Everything outside this folder imports from here, never from the modules,
so they can be rearranged without touching their users.
"""

from ._collector import QueueCollector
from ._events import (
    MULTIPROC_ENV,
    PrometheusEvents,
    dead_letter_reason,
    default_events,
    metrics_registry,
)
from ._exporter import (
    DEFAULT_EXPORTER_PORT,
    BasicAuth,
    MetricsServer,
    TLSFiles,
    run_exporter,
    scrape_once,
    start_metrics_server,
)
from ._reader import QueueSnapshot, QueueStateReader
from ._specs import METRIC_PREFIX, METRICS, reference_table

__all__ = [
    "DEFAULT_EXPORTER_PORT",
    "METRICS",
    "METRIC_PREFIX",
    "MULTIPROC_ENV",
    "BasicAuth",
    "MetricsServer",
    "PrometheusEvents",
    "QueueCollector",
    "QueueSnapshot",
    "QueueStateReader",
    "TLSFiles",
    "dead_letter_reason",
    "default_events",
    "metrics_registry",
    "reference_table",
    "run_exporter",
    "scrape_once",
    "start_metrics_server",
]
