"""``taskiq-redis-cluster exporter``: a Prometheus exporter of queue state.

``exporter [--url URL] [--password-file PATH] [--queue NAME ...] [--port 9808]
[--host 127.0.0.1] [--prefix P] [--group G ...] [--timeout S] [--per-consumer]
[--min-interval S] [--web-cert-file F --web-key-file F [--web-client-ca-file F]]
[--basic-auth-user U --basic-auth-password-file F]``

Serves ``/metrics``: per shard and consumer group the stream length, lag,
pending entries and the idle time of the oldest pending entry, read from
the cluster at each scrape; per queue the plan epoch and balance; per
master the shard count and health. ``/healthz`` answers 200 without reading
the cluster; any other path 404. Scrapes that arrive together share one
read, and ``--min-interval`` serves a read again until it is that old. With
``PROMETHEUS_MULTIPROC_DIR`` set, the broker counters written there by
worker processes on this host are served too. The URL comes from ``--url``
or ``$TQRC_URL``, the password from ``--password-file`` or
``$TQRC_PASSWORD_FILE``. Runs until SIGINT/SIGTERM; exit status 2 when the
cluster cannot be reached, an option is unusable or the port is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from .._errors import ClusterError
from .._keys import DEFAULT_PREFIX
from .._metrics import DEFAULT_EXPORTER_PORT, BasicAuth, MetricsServer, TLSFiles, run_exporter
from ._common import (
    Target,
    TargetError,
    add_connection_arguments,
    print_error,
    read_password_file,
    resolve_target,
)

EXIT_ERROR = 2


def register(subparsers: Any) -> None:
    """Add the ``exporter`` command."""
    parser = subparsers.add_parser(
        "exporter",
        help="serve Prometheus metrics of the queues",
        description=(
            "Serve Prometheus metrics (/metrics) read from the cluster at each scrape: "
            "stream length, lag, pending entries and their age per shard and group, "
            "plan epoch and balance per queue, shards and health per master."
        ),
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--queue",
        action="append",
        help="queue to report (repeatable; default: every queue with a plan)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_EXPORTER_PORT,
        help=f"HTTP port (default {DEFAULT_EXPORTER_PORT})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})"
    )
    parser.add_argument(
        "--group", action="append", help="consumer group to report (repeatable; default: all)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds one scrape may spend reading Redis (default 5)",
    )
    parser.add_argument(
        "--per-consumer",
        action="store_true",
        help="also report pending entries and idle time per consumer (one series each)",
    )
    parser.add_argument(
        "--min-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="serve the last cluster read again to scrapes within S seconds of it "
        "(default 0: every scrape reads, but concurrent scrapes always share one read)",
    )
    web = parser.add_argument_group("serving (prometheus_client's server)")
    web.add_argument(
        "--web-cert-file", type=Path, metavar="PATH", help="serve HTTPS with this certificate"
    )
    web.add_argument(
        "--web-key-file", type=Path, metavar="PATH", help="private key of --web-cert-file"
    )
    web.add_argument(
        "--web-client-ca-file",
        type=Path,
        metavar="PATH",
        help="require scrapers to present a certificate signed by this CA (mutual TLS)",
    )
    web.add_argument("--basic-auth-user", metavar="USER", help="require basic auth on /metrics")
    web.add_argument(
        "--basic-auth-password-file",
        type=Path,
        metavar="PATH",
        help="the basic auth password (a trailing newline is ignored)",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("error: --timeout must be > 0", file=sys.stderr)
        return EXIT_ERROR
    if not args.min_interval >= 0:
        print("error: --min-interval must be >= 0", file=sys.stderr)
        return EXIT_ERROR
    try:
        target = resolve_target(args)
        tls = _tls(args)
        auth = _auth(args)
    except TargetError as exc:
        print_error(exc, None)
        return EXIT_ERROR
    try:
        asyncio.run(_main(args, target, tls, auth))
    except (ClusterError, RedisError, OSError) as exc:
        print_error(exc, target)
        return EXIT_ERROR
    return 0


def _tls(args: argparse.Namespace) -> TLSFiles | None:
    cert, key, ca = args.web_cert_file, args.web_key_file, args.web_client_ca_file
    if cert is None and key is None:
        if ca is not None:
            raise TargetError("--web-client-ca-file needs --web-cert-file and --web-key-file")
        return None
    if cert is None or key is None:
        raise TargetError("TLS needs both --web-cert-file and --web-key-file")
    return TLSFiles(certfile=str(cert), keyfile=str(key), client_cafile=str(ca) if ca else None)


def _auth(args: argparse.Namespace) -> BasicAuth | None:
    user, path = args.basic_auth_user, args.basic_auth_password_file
    if user is None and path is None:
        return None
    if user is None or path is None:
        raise TargetError("basic auth needs both --basic-auth-user and --basic-auth-password-file")
    return BasicAuth(username=user, password=read_password_file(path))


async def _main(
    args: argparse.Namespace, target: Target, tls: TLSFiles | None, auth: BasicAuth | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(server: MetricsServer) -> None:
        print(f"serving {server.url}", flush=True)

    await run_exporter(
        target.url,
        password=target.password,
        min_interval=args.min_interval,
        tls=tls,
        auth=auth,
        queues=args.queue,
        port=args.port,
        host=args.host,
        prefix=args.prefix,
        groups=args.group,
        timeout=args.timeout,
        per_consumer=args.per_consumer,
        stop=stop,
        on_ready=ready,
    )
