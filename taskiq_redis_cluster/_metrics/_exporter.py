"""Serving the metrics over HTTP.

* :func:`run_exporter`: the standalone exporter behind ``taskiq-redis-cluster
  exporter``. It owns an asyncio loop (the caller's) with one cluster
  client; prometheus_client's HTTP threads hand each scrape to that loop
  (see :class:`~taskiq_redis_cluster._metrics._collector.QueueCollector`). With
  ``PROMETHEUS_MULTIPROC_DIR`` set it also serves the broker counters that
  worker processes on the same host wrote there.
* :func:`start_metrics_server`: for use inside a worker process (for example
  from a taskiq ``WORKER_STARTUP`` handler); serves the broker counters only.
* :func:`scrape_once`: one read rendered as exposition text, for benches
  and tests.

Servers bind to ``127.0.0.1`` unless told otherwise: metrics name queues and
hosts, which is not for every network.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from socketserver import ThreadingMixIn
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import RedisCluster

from .._keys import DEFAULT_PREFIX
from .._redis import ConnectionOptions, connect, redact_url
from ._collector import QueueCollector, families_of
from ._events import metrics_registry, multiprocess_dir
from ._reader import QueueStateReader

logger = logging.getLogger(__name__)

#: Default port of the standalone exporter.
DEFAULT_EXPORTER_PORT = 9808


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # wsgiref writes every request to stderr; keep it at debug level.
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("metrics request from %s: %s", self.address_string(), format % args)


class MetricsServer:
    """A ``/metrics`` HTTP server running in a daemon thread.

    :ivar host: the address it listens on.
    :ivar port: the bound port (useful after asking for port 0).
    """

    def __init__(self, registry: CollectorRegistry, *, port: int, host: str = "127.0.0.1") -> None:
        server_class = _Server6 if ":" in host else _Server
        self._httpd = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"tqrc-metrics-{self.port}", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int,
    *,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    if_port_in_use: Literal["raise", "skip"] = "raise",
) -> MetricsServer | None:
    """Serve the broker counters on ``http://host:port/metrics`` from this process.

    For worker processes, e.g.::

        @broker.on_event(TaskiqEvents.WORKER_STARTUP)
        async def metrics(state: TaskiqState) -> None:
            start_metrics_server(9809, if_port_in_use="skip")

    :param registry: what to serve; default :func:`metrics_registry`, which
        sums every process's files when ``PROMETHEUS_MULTIPROC_DIR`` is set.
    :param if_port_in_use: ``"skip"`` returns ``None`` when the port is
        taken, which is what the other workers of ``--workers N`` want in
        multiprocess mode: one of them serves the sum for all.
    :raises OSError: if the port is in use and ``if_port_in_use="raise"``.
    """
    try:
        server = MetricsServer(registry or metrics_registry(), port=port, host=host)
    except OSError as exc:
        if if_port_in_use == "skip":
            logger.info("Metrics port %s:%d not available (%s); not serving here", host, port, exc)
            return None
        raise
    logger.info("Serving broker metrics on %s", server.url)
    return server


def exporter_registry(
    reader: QueueStateReader, loop: asyncio.AbstractEventLoop, *, multiprocess: bool = True
) -> CollectorRegistry:
    """A registry with the queue collector, plus the multiprocess counters.

    The counters are added when ``multiprocess`` and ``PROMETHEUS_MULTIPROC_DIR``
    is set (workers on this host write there).
    """
    registry = CollectorRegistry()
    registry.register(QueueCollector(reader, loop))
    path = multiprocess_dir()
    if multiprocess and path is not None:
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


def _client_options(timeout: float) -> ConnectionOptions:
    # A scrape must answer within its timeout even if a node hangs.
    return ConnectionOptions(
        max_connections=16,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 5.0),
        retries=1,
    )


async def run_exporter(
    url: str,
    *,
    queues: Sequence[str] | None = None,
    port: int = DEFAULT_EXPORTER_PORT,
    host: str = "127.0.0.1",
    prefix: str = DEFAULT_PREFIX,
    groups: Sequence[str] | None = None,
    timeout: float = 5.0,
    per_consumer: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[MetricsServer], None] | None = None,
) -> None:
    """Serve queue metrics until ``stop`` is set (or the task is cancelled).

    :param queues: queues to report; ``None`` = every queue with a plan,
        looked up at each scrape.
    :param timeout: seconds one scrape may spend reading Redis.
    :param on_ready: called with the server once it listens.
    :raises ConnectError, NotAClusterError: if the cluster cannot be reached.
    :raises OSError: if the port cannot be bound.
    """
    client = await connect(url, _client_options(timeout))
    server: MetricsServer | None = None
    try:
        reader = QueueStateReader(
            client,
            queues=queues,
            prefix=prefix,
            groups=groups,
            timeout=timeout,
            per_consumer=per_consumer,
        )
        registry = exporter_registry(reader, asyncio.get_running_loop())
        server = MetricsServer(registry, port=port, host=host)
        logger.info(
            "Exporting metrics of %s (queues: %s) on %s",
            redact_url(url),
            ", ".join(queues) if queues else "all with a plan",
            server.url,
        )
        if on_ready is not None:
            on_ready(server)
        await (stop or asyncio.Event()).wait()
    finally:
        if server is not None:
            # Closing waits for the HTTP thread, which may be waiting on
            # this loop: run it in a thread so the loop keeps going.
            await asyncio.to_thread(server.close)
        await client.aclose()


async def scrape_once(
    target: RedisCluster | str,
    queues: Sequence[str] | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    groups: Sequence[str] | None = None,
    timeout: float = 5.0,
    per_consumer: bool = False,
) -> tuple[str, float]:
    """Read the queue state once and render it as Prometheus text.

    :param target: a cluster client (not closed) or a URL (connected and
        closed here).
    :returns: the exposition text and the seconds the read took.
    """
    if isinstance(target, str):
        client = await connect(target, _client_options(timeout))
        try:
            return await scrape_once(
                client,
                queues,
                prefix=prefix,
                groups=groups,
                timeout=timeout,
                per_consumer=per_consumer,
            )
        finally:
            await client.aclose()
    reader = QueueStateReader(
        target,
        queues=queues,
        prefix=prefix,
        groups=groups,
        timeout=timeout,
        per_consumer=per_consumer,
    )
    snapshot = await reader.read()
    registry = CollectorRegistry()
    registry.register(families_of(snapshot))
    return generate_latest(registry).decode(), snapshot.duration
