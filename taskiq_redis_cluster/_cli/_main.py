"""The ``taskiq-redis-cluster`` console command.

Each subcommand lives in its own ``_cmd_<name>`` module that exposes
``register(subparsers)``; this module only wires them together, so adding a
subcommand never touches another one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

#: Subcommand modules, in the order ``--help`` lists them. The benchmark and
#: the fault-injection suite are dev tools that need dev dependencies: they
#: live in scripts/bench and scripts/chaos, not here.
_COMMAND_MODULES = (
    "cluster",
    "plan",
    "exporter",
    "rebalance",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="taskiq-redis-cluster",
        description="Tools for running taskiq on Redis Cluster.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"taskiq_redis_cluster._cli._cmd_{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
