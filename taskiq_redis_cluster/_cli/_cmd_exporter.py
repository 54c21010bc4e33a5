"""``taskiq-redis-cluster exporter``: a Prometheus exporter of queue state.

``exporter --url URL [--queue NAME ...] [--port 9808] [--host 127.0.0.1]
[--prefix P] [--group G ...] [--timeout S] [--per-consumer]``

Serves ``/metrics``: per shard and consumer group the stream length, lag,
pending entries and the idle time of the oldest pending entry, read from
the cluster at each scrape; per queue the plan epoch and balance; per
master the shard count and health. With ``PROMETHEUS_MULTIPROC_DIR`` set, the
broker counters written there by worker processes on this host are served
too. Runs until SIGINT/SIGTERM; exit status 2 when the cluster cannot be
reached or the port is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from redis.exceptions import RedisError

from .._errors import ClusterError
from .._keys import DEFAULT_PREFIX
from .._metrics import DEFAULT_EXPORTER_PORT, MetricsServer, run_exporter
from .._redis import redact_url

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
    parser.add_argument("--url", required=True, help="cluster URL, e.g. redis://127.0.0.1:7000")
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
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("error: --timeout must be > 0", file=sys.stderr)
        return EXIT_ERROR
    try:
        asyncio.run(_main(args))
    except (ClusterError, RedisError, OSError) as exc:
        _fail(exc, args.url)
        return EXIT_ERROR
    return 0


def _fail(exc: BaseException, url: str) -> None:
    """Print ``exc`` as one line on stderr, without the URL's password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {text.replace(url, redact_url(url))}", file=sys.stderr)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(server: MetricsServer) -> None:
        print(f"serving {server.url}", flush=True)

    await run_exporter(
        args.url,
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
