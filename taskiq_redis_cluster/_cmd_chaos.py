"""``taskiq-redis-cluster chaos``: run the fault-injection suite.

Starts a throwaway local cluster on free ports, runs the chosen scenarios
(see :mod:`taskiq_redis_cluster._chaos`) with real ``taskiq worker``
processes, prints a table and optionally writes JSON. Exit code 0 when
every scenario that ran met its acceptance checks, 1 otherwise, 2 on bad
arguments. ``scripts/chaos.py`` is the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._chaos import (
    BROKERS,
    CI_SCENARIOS,
    SCENARIOS,
    ChaosConfig,
    ScenarioResult,
    format_table,
    run_suite,
    write_json,
)
from ._errors import ClusterError


def register(subparsers: Any) -> None:
    """Add the ``chaos`` command."""
    parser = subparsers.add_parser(
        "chaos",
        help="run fault-injection scenarios against a throwaway local cluster",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``scripts/chaos.py`` and the subcommand."""
    names = ", ".join(SCENARIOS)
    parser.add_argument(
        "--scenario", action="append", default=[], metavar="NAME",
        help=f"scenario to run (repeatable): {names}",
    )  # fmt: skip
    parser.add_argument("--all", action="store_true", help="run every scenario")
    parser.add_argument(
        "--ci", action="store_true", help=f"run the CI subset: {', '.join(CI_SCENARIOS)}"
    )
    parser.add_argument("--tasks", type=int, default=400, help="tasks per scenario (400)")
    parser.add_argument("--rate", type=float, default=50.0, help="kicks per second (50)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument(
        "--wait-replicas",
        type=int,
        default=0,
        help="producer wait_replicas (0; master-kill-wait1 always uses 1)",
    )
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="ours",
        help="broker under test (ours = ClusterStreamBroker)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=int,
        default=2000,
        metavar="MS",
        help="idle_timeout of the workers (2000)",
    )
    parser.add_argument(
        "--xread-block",
        type=int,
        default=500,
        metavar="MS",
        help="xread_block of the workers (500)",
    )
    parser.add_argument(
        "--task-sleep", type=float, default=0.2, help="seconds each task sleeps (0.2)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to wait for acked tasks after the fault",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write a JSON report")
    parser.add_argument(
        "--workdir", type=Path, help="keep cluster data, worker logs and ledgers here"
    )


def _names(args: argparse.Namespace) -> list[str]:
    if args.all:
        return list(SCENARIOS)
    names = list(args.scenario)
    if args.ci:
        names += [n for n in CI_SCENARIOS if n not in names]
    return names


def run(args: argparse.Namespace) -> int:
    """Handler: run the suite, print the table, write JSON; the exit code."""
    names = _names(args)
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        problem = f"unknown scenario(s) {unknown}" if unknown else "no scenario chosen"
        print(
            f"chaos: error: {problem}; use --all, --ci or --scenario NAME ({', '.join(SCENARIOS)})",
            file=sys.stderr,
        )
        return 2
    try:
        config = ChaosConfig(
            tasks=args.tasks,
            rate=args.rate,
            workers=args.workers,
            broker=args.broker,
            wait_replicas=args.wait_replicas,
            idle_timeout=args.idle_timeout,
            xread_block=args.xread_block,
            task_sleep=args.task_sleep,
            drain_timeout=args.drain_timeout,
        )
    except ClusterError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tqrc-chaos-"))

    def progress(result: ScenarioResult) -> None:
        print(
            format_table([result]).splitlines()[-1]
            if result.reason or result.violations
            else f"{result.name}: {result.status} ({result.duration_s}s)",
            file=sys.stderr,
        )

    try:
        results = asyncio.run(run_suite(names, config, workdir, on_result=progress))
    except ClusterError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(results))
    if args.json is not None:
        write_json(args.json, results, config)
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/chaos.py``."""
    import logging

    parser = argparse.ArgumentParser(prog="chaos.py", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
