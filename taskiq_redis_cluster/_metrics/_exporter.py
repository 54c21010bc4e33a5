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
import base64
import binascii
import hmac
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app, start_http_server
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

#: The paths served; any other answers 404.
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class TLSFiles:
    """TLS for the metrics server, as prometheus_client's server takes it.

    :param certfile: the server certificate (PEM).
    :param keyfile: its private key (PEM).
    :param client_cafile: when set, scrapers must present a certificate
        signed by this CA (mutual TLS).
    """

    certfile: str
    keyfile: str
    client_cafile: str | None = None


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth for ``/metrics`` (``/healthz`` stays open for probes).

    prometheus_client's server has no basic auth of its own, so the check is
    a thin WSGI layer in front of its app. The password never shows in
    ``repr``.
    """

    username: str
    password: str = field(repr=False)

    def allows(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials."""
        if not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both compared in constant time, and both always compared, so the
        # answer's timing tells nothing about which part was wrong.
        user_ok = hmac.compare_digest(user, self.username.encode())
        password_ok = hmac.compare_digest(password, self.password.encode())
        return bool(sep) and user_ok and password_ok


def _routed(metrics: _App, auth: BasicAuth | None) -> _App:
    """prometheus_client's app on ``/metrics`` only, a cheap ``/healthz``, 404 elsewhere.

    prometheus_client serves its metrics on every path (for backwards
    compatibility); a scraper pointed at a wrong path should get an error,
    not a page that looks right.
    """

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == HEALTH_PATH:
            # No cluster read: a liveness probe must not load Redis, and
            # must not fail because Redis is slow.
            if method not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
                return [b""]
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n" if method == "GET" else b""]
        if path != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found; metrics are at {METRICS_PATH}\n".encode()]
        if auth is not None and not auth.allows(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [
                    ("WWW-Authenticate", 'Basic realm="taskiq-redis-cluster"'),
                    ("Content-Type", "text/plain; charset=utf-8"),
                ],
            )
            return [b"unauthorized\n"]
        return metrics(environ, start_response)

    return app


class MetricsServer:
    """prometheus_client's HTTP server for one registry, in a daemon thread.

    ``/metrics`` serves the registry, ``/healthz`` answers 200 without
    touching it, any other path 404. TLS (and mutual TLS) are
    prometheus_client's own options; basic auth guards ``/metrics``.

    :ivar host: the address it listens on.
    :ivar port: the bound port (useful after asking for port 0).
    :raises OSError: if the port cannot be bound.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        port: int,
        host: str = "127.0.0.1",
        tls: TLSFiles | None = None,
        auth: BasicAuth | None = None,
    ) -> None:
        # The server starts serving the registry it is given at once; an
        # empty one stands in for the microseconds until the routed app is
        # installed, so no request can see metrics on a wrong path or
        # without credentials.
        self._httpd, self._thread = start_http_server(
            port,
            addr=host,
            registry=CollectorRegistry(),
            certfile=tls.certfile if tls else None,
            keyfile=tls.keyfile if tls else None,
            client_cafile=tls.client_cafile if tls else None,
            client_auth_required=bool(tls and tls.client_cafile),
        )
        self._httpd.set_app(_routed(make_wsgi_app(registry), auth))
        self._thread.name = f"tqrc-metrics-{self._httpd.server_address[1]}"
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self.scheme = "https" if tls else "http"
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def url(self) -> str:
        """``http(s)://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{METRICS_PATH}"

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        with self._close_lock:
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
    reader: QueueStateReader,
    loop: asyncio.AbstractEventLoop,
    *,
    multiprocess: bool = True,
    min_interval: float = 0.0,
) -> CollectorRegistry:
    """A registry with the queue collector, plus the multiprocess counters.

    The counters are added when ``multiprocess`` and ``PROMETHEUS_MULTIPROC_DIR``
    is set (workers on this host write there).
    """
    registry = CollectorRegistry()
    registry.register(QueueCollector(reader, loop, min_interval=min_interval))
    path = multiprocess_dir()
    if multiprocess and path is not None:
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


def _client_options(timeout: float, password: str | None = None) -> ConnectionOptions:
    # A scrape must answer within its timeout even if a node hangs.
    return ConnectionOptions(
        max_connections=16,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 5.0),
        retries=1,
        password=password,
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
    password: str | None = None,
    min_interval: float = 0.0,
    tls: TLSFiles | None = None,
    auth: BasicAuth | None = None,
) -> None:
    """Serve queue metrics until ``stop`` is set (or the task is cancelled).

    :param queues: queues to report; ``None`` = every queue with a plan,
        looked up at each scrape.
    :param timeout: seconds one scrape may spend reading Redis.
    :param on_ready: called with the server once it listens.
    :param password: the cluster password, passed to redis-py as a keyword
        (keeps it out of the URL).
    :param min_interval: seconds a read is served again to later scrapes
        (concurrent scrapes always share one read).
    :param tls: serve HTTPS with these files.
    :param auth: require basic auth on ``/metrics``.
    :raises ConnectError, NotAClusterError: if the cluster cannot be reached.
    :raises OSError: if the port cannot be bound.
    """
    client = await connect(url, _client_options(timeout, password))
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
        registry = exporter_registry(reader, asyncio.get_running_loop(), min_interval=min_interval)
        server = MetricsServer(registry, port=port, host=host, tls=tls, auth=auth)
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
