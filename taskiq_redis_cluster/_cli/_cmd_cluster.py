"""``taskiq-redis-cluster cluster up|down|status``: a local dev cluster.

``up`` starts ``redis-server`` processes on loopback, forms the cluster,
prints its URL on stdout and exits, leaving the nodes running (with
``--password-file`` the printed URL has no password: pass the same file to
the other commands);  ``down`` stops
exactly those nodes (found through the pid files in ``--dir``); ``status``
prints one line per node. Errors print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from .._errors import ClusterError, DevClusterError
from .._redis import redact_url
from ..testing import DevCluster, TLSConfig, format_slots, stop_directory
from ._common import TargetError, add_password_file_argument, password_from

_DEFAULT_DIR = ".taskiq-redis-cluster"


def register(subparsers: Any) -> None:
    """Add the ``cluster`` command and its ``up``/``down``/``status`` subcommands."""
    parser = subparsers.add_parser(
        "cluster",
        help="start, stop or inspect a local Redis Cluster for development",
        description="A local Redis Cluster made of redis-server processes on loopback.",
    )
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    up = sub.add_parser("up", help="start the nodes and form the cluster")
    _common(up, base_port_default=7000)
    up.add_argument("--masters", type=int, default=3, help="number of masters (default 3)")
    up.add_argument("--replicas", type=int, default=1, help="replicas per master (default 1)")
    up.add_argument(
        "--node-timeout", type=int, default=1500, metavar="MS", help="cluster-node-timeout"
    )
    up.add_argument(
        "--password",
        help="require this password (also used by replication); visible in the process "
        "list, prefer --password-file",
    )
    add_password_file_argument(up, what="the password to require (also used by replication)")
    up.add_argument("--username", help="create this ACL user (needs --password)")
    up.add_argument("--tls-cert-file", type=Path, help="serve TLS with this certificate")
    up.add_argument("--tls-key-file", type=Path, help="private key of --tls-cert-file")
    up.add_argument("--tls-ca-cert-file", type=Path, help="CA certificate for TLS")
    up.add_argument("--redis-server", default="redis-server", help="redis-server executable")
    up.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the cluster to form"
    )
    up.set_defaults(handler=_up)

    down = sub.add_parser("down", help="stop the nodes started by `up`")
    _common(down, base_port_default=None)
    down.set_defaults(handler=_down)

    status = sub.add_parser("status", help="print every node's role, slots and state")
    _common(status, base_port_default=None)
    status.set_defaults(handler=_status)


def _common(parser: argparse.ArgumentParser, base_port_default: int | None) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(_DEFAULT_DIR),
        help=f"directory for node data, logs and pid files (default ./{_DEFAULT_DIR})",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=base_port_default,
        help="port of the first node; node i uses base+i"
        + (f" (default {base_port_default})" if base_port_default else ""),
    )


def _fail(exc: BaseException) -> int:
    # One line, whatever the message contains.
    text = " ".join(str(exc).split())
    print(f"taskiq-redis-cluster cluster: error: {text}", file=sys.stderr)
    return 1


def _up(args: argparse.Namespace) -> int:
    tls_parts = (args.tls_cert_file, args.tls_key_file, args.tls_ca_cert_file)
    if any(tls_parts) and not all(tls_parts):
        return _fail(ValueError("TLS needs --tls-cert-file, --tls-key-file and --tls-ca-cert-file"))
    tls = (
        TLSConfig(
            cert_file=args.tls_cert_file.absolute(),
            key_file=args.tls_key_file.absolute(),
            ca_cert_file=args.tls_ca_cert_file.absolute(),
        )
        if all(tls_parts)
        else None
    )
    try:
        from_file = password_from(args)
    except TargetError as exc:
        return _fail(exc)
    if from_file is not None and args.password is not None:
        return _fail(ValueError("give --password or --password-file, not both"))
    password = from_file if from_file is not None else args.password
    try:
        cluster = DevCluster(
            masters=args.masters,
            replicas=args.replicas,
            base_port=args.base_port,
            node_timeout_ms=args.node_timeout,
            directory=args.dir,
            username=args.username,
            password=password,
            tls=tls,
            redis_server=args.redis_server,
            form_timeout=args.timeout,
        )
        asyncio.run(cluster.start())
    except ClusterError as exc:
        return _fail(exc)
    cluster.detach()  # the nodes outlive this command
    # A password given on the command line is the user's own and already
    # public, so the URL is printed in full on stdout (only the stderr note
    # is redacted); one read from a file stays out of the output.
    print(_without_password(cluster.url) if from_file is not None else cluster.url)
    print(
        f"cluster ready: {len(cluster.ports)} nodes, {redact_url(cluster.url)}; "
        f"stop it with: taskiq-redis-cluster cluster down --dir {args.dir}",
        file=sys.stderr,
    )
    return 0


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    netloc = f"{user}{parts.hostname}:{parts.port}"
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _load(args: argparse.Namespace) -> DevCluster:
    cluster = DevCluster.from_directory(args.dir)
    if args.base_port is not None and args.base_port != cluster.base_port:
        raise DevClusterError(
            message=f"{args.dir} holds a cluster on base port {cluster.base_port}, "
            f"not {args.base_port}"
        )
    return cluster


def _down(args: argparse.Namespace) -> int:
    try:
        if DevCluster.state_file(args.dir).exists():
            ports: list[int] | None = _load(args).ports
        else:
            # No state file (e.g. `up` was killed): fall back to pid files.
            ports = None
        stopped = stop_directory(args.dir, ports)
    except ClusterError as exc:
        return _fail(exc)
    if stopped:
        print(f"stopped {len(stopped)} node(s): {', '.join(map(str, stopped))}")
    else:
        print(f"no running node found in {args.dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        cluster = _load(args)
        statuses = asyncio.run(cluster.status())
    except ClusterError as exc:
        return _fail(exc)
    for s in statuses:
        print(
            f"{s.address:<21} {s.node_id or '-':<40} {s.role:<7} "
            f"master={s.master_address or '-':<21} slots={format_slots(s.slots):<12} "
            f"{'up' if s.up else 'down'}"
        )
    return 0 if all(s.up for s in statuses) else 1
