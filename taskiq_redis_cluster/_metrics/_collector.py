"""The synchronous collector that prometheus_client calls at each scrape.

prometheus_client calls ``collect()`` from an HTTP thread while our client
is asyncio, so the collector submits the read to the exporter's event loop
(``asyncio.run_coroutine_threadsafe``) and waits a bounded time; on a
timeout or an error it reports what it could read and counts
``taskiq_redis_cluster_scrape_errors_total{reason}``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter as _Tally
from collections.abc import Iterable

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ._reader import QueueSnapshot, QueueStateReader, error_reason
from ._specs import METRICS, empty_family

logger = logging.getLogger(__name__)


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
        return [empty_family(s) for s in METRICS if s.source == "exporter" and not s.optional]

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
            reason = error_reason(exc)
        return QueueSnapshot(errors=[reason], duration=time.perf_counter() - started)


def families_of(snapshot: QueueSnapshot) -> Collector:
    """A collector that yields a fixed snapshot (one-off rendering, benches)."""

    class _Fixed(Collector):
        def collect(self) -> Iterable[Metric]:
            return snapshot.families()

    return _Fixed()
