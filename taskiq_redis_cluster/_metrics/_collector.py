"""The synchronous collector that prometheus_client calls at each scrape.

prometheus_client calls ``collect()`` from an HTTP thread while our client
is asyncio, so the collector submits the read to the exporter's event loop
(``asyncio.run_coroutine_threadsafe``) and waits a bounded time; on a
timeout or an error it reports what it could read and counts
``taskiq_redis_cluster_scrape_errors_total{reason}``.

Scrapes that arrive while a read is in flight wait for that read instead of
starting their own (single flight): two Prometheus servers, a dashboard and
a curl at the same moment cost the cluster one read, not four. With
``min_interval`` a finished read is also served again until it is that many
seconds old, which bounds the cluster load whatever the scrape rate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable, Iterable

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from .._errors import InvalidOptionError
from ._reader import QueueSnapshot, QueueStateReader, error_reason
from ._specs import METRICS, empty_family

logger = logging.getLogger(__name__)


class QueueCollector(Collector):
    """A prometheus_client collector that reads the queue state at each scrape.

    ``collect()`` runs in prometheus_client's HTTP thread; it submits
    ``reader.read()`` to ``loop`` (which must be running in another thread)
    and waits at most ``reader.timeout`` plus a second. Concurrent scrapes
    share one read. Register it on your own registry::

        registry = CollectorRegistry()
        registry.register(QueueCollector(reader, loop))

    :param reader: the asyncio reader (its client belongs to ``loop``).
    :param loop: the event loop that runs the reader.
    :param min_interval: seconds a finished read is served again before the
        next scrape reads the cluster anew; 0 reads at every scrape that
        does not overlap a read in flight.
    :ivar reads: cluster reads started so far (each one a full
        :meth:`QueueStateReader.read`), for tests and benches.
    :raises InvalidOptionError: if ``min_interval`` is negative.
    """

    def __init__(
        self,
        reader: QueueStateReader,
        loop: asyncio.AbstractEventLoop,
        *,
        min_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not min_interval >= 0:
            raise InvalidOptionError(option="min_interval", reason="must be >= 0 seconds")
        self.reader = reader
        self.loop = loop
        self.min_interval = min_interval
        self.reads = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: concurrent.futures.Future[QueueSnapshot] | None = None
        self._waiting = 0
        # (finished at, snapshot) of the last read that returned.
        self._last: tuple[float, QueueSnapshot] | None = None
        # Cumulative, so that rate() works; "timeout" is seeded so a series
        # exists before the first failure. Counted once per read, not per
        # scrape that shared it.
        self._error_totals: _Tally[str] = _Tally({"timeout": 0})

    @property
    def waiting(self) -> int:
        """Scrapes waiting for the read in flight right now."""
        with self._lock:
            return self._waiting

    def describe(self) -> Iterable[Metric]:
        """The families collect() yields, without samples (no I/O)."""
        return [empty_family(s) for s in METRICS if s.source == "exporter" and not s.optional]

    def collect(self) -> Iterable[Metric]:
        """Yield the metric families of a fresh (or shared) read."""
        snapshot = self.snapshot()
        with self._lock:
            totals = dict(self._error_totals)
        return snapshot.families(totals)

    def snapshot(self) -> QueueSnapshot:
        """The queue state: joins the read in flight or starts one (bounded wait)."""
        started = time.perf_counter()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            # Blocking here would deadlock the loop that must do the read.
            logger.error("QueueCollector.collect() was called on its own event loop")
            return QueueSnapshot(errors=["same_loop"])
        with self._lock:
            if (
                self._last is not None
                and self.min_interval > 0
                and self._clock() - self._last[0] < self.min_interval
            ):
                return self._last[1]
            future = self._in_flight
            if future is None:
                future = asyncio.run_coroutine_threadsafe(self._read(), self.loop)
                self._in_flight = future
                self.reads += 1
            self._waiting += 1
        try:
            return future.result(timeout=self.reader.timeout + 1.0)
        except (TimeoutError, concurrent.futures.CancelledError):
            reason = "timeout"
        except Exception as exc:
            logger.warning("Queue-state read failed: %r", exc)
            reason = error_reason(exc)
        finally:
            with self._lock:
                self._waiting -= 1
        self._give_up(future, reason)
        return QueueSnapshot(errors=[reason], duration=time.perf_counter() - started)

    async def _read(self) -> QueueSnapshot:
        snapshot = await self.reader.read()
        with self._lock:
            self._last = (self._clock(), snapshot)
            self._error_totals.update(snapshot.errors)
            self._in_flight = None
        return snapshot

    def _give_up(self, future: concurrent.futures.Future[QueueSnapshot], reason: str) -> None:
        """Forget a read that hung or failed, counting it once."""
        with self._lock:
            if self._in_flight is not future:
                return  # another waiter of the same read already did
            self._in_flight = None
            self._error_totals[reason] += 1
        # A hung read must not hold the next scrape hostage: the next one
        # starts afresh, and this one stops taking the loop's time.
        future.cancel()


def families_of(snapshot: QueueSnapshot) -> Collector:
    """A collector that yields a fixed snapshot (one-off rendering, benches)."""

    class _Fixed(Collector):
        def collect(self) -> Iterable[Metric]:
            return snapshot.families()

    return _Fixed()
