"""``scripts/chaos.py``: run the fault-injection suite.

Starts a throwaway local cluster on free ports, runs the chosen scenarios
(see scripts/chaos/harness.py) with real ``taskiq worker`` processes against each
chosen broker, prints a table and optionally writes JSON. Exit code 0 when
every scenario that ran met its acceptance checks, 1 otherwise, 2 on bad
arguments. ``python -m chaos`` (from ``scripts/``) is the same command.

An option left out takes the scenario's own default where it has one
(rolling-restart: 15000 tasks at 1000/s, and more while the restarts
last; 3 workers, tasks of 0.2-0.5 s, idle_timeout 600 s), else the value
shown in its help.

With the stream broker (``ours``) the producer mixes kinds of kick: plain,
with a ``priority`` label (the lanes above 0), with a short ``delay``
(0.2-1.5 s) and with both; the report counts each kind apart, and no verdict
is taken before the last delayed task is due. ``--no-mix`` kicks plain
tasks only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from taskiq_redis_cluster._errors import ClusterError

from .config import BROKERS, ChaosConfig
from .harness import chaos_cluster, run_suite
from .report import ScenarioResult, format_table, write_json
from .scenarios import CI_SCENARIOS, SCENARIOS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser``."""
    names = ", ".join(SCENARIOS)
    parser.add_argument(
        "--scenario", action="append", default=[], metavar="NAME",
        help=f"scenario to run (repeatable): {names}",
    )  # fmt: skip
    parser.add_argument("--all", action="store_true", help="run every scenario")
    parser.add_argument(
        "--ci", action="store_true", help=f"run the CI subset: {', '.join(CI_SCENARIOS)}"
    )
    # Defaults are None: a scenario may then use its own (ChaosConfig.given).
    parser.add_argument("--tasks", type=int, help="tasks per scenario (400)")
    parser.add_argument("--rate", type=float, help="kicks per second (50)")
    parser.add_argument("--workers", type=int, help="worker processes (3)")
    parser.add_argument(
        "--wait-replicas",
        type=int,
        help="producer wait_replicas (0; master-kill-wait1 always uses 1)",
    )
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        action="append",
        default=[],
        help="broker under test, repeatable (ours = ClusterStreamBroker, the default; "
        "ours-list = ClusterListQueueBroker, which runs rolling-restart only)",
    )
    parser.add_argument(
        "--idle-timeout", type=int, metavar="MS", help="idle_timeout of the workers (2000)"
    )
    parser.add_argument(
        "--xread-block", type=int, metavar="MS", help="xread_block of the workers (500)"
    )
    parser.add_argument("--task-sleep", type=float, help="seconds each task sleeps (0.2)")
    parser.add_argument(
        "--task-sleep-max",
        type=float,
        help="if set, tasks sleep between --task-sleep and this many seconds",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds to wait for acked tasks after the fault",
    )
    parser.add_argument(
        "--no-mix",
        dest="mix",
        action="store_false",
        default=None,
        help="ours: kick plain tasks only (default: a mix with priority and delay labels)",
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
    options = ("tasks", "rate", "workers", "wait_replicas", "idle_timeout", "xread_block",
               "task_sleep", "task_sleep_max", "drain_timeout", "mix")  # fmt: skip
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    brokers = list(dict.fromkeys(args.broker)) or ["ours"]
    try:
        configs = [ChaosConfig.given(**given, broker=broker) for broker in brokers]
    except ClusterError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tqrc-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)

    def progress(result: ScenarioResult) -> None:
        print(
            format_table([result]).splitlines()[-1]
            if result.reason or result.violations
            else f"{result.name}: {result.status} ({result.duration_s}s)",
            file=sys.stderr,
        )

    async def every_broker() -> list[ScenarioResult]:
        # One cluster for all brokers; run_suite heals it between scenarios.
        async with chaos_cluster(workdir / "cluster") as cluster:
            results: list[ScenarioResult] = []
            for config in configs:
                results += await run_suite(
                    names, config, workdir, cluster=cluster, on_result=progress
                )
            return results

    try:
        results = asyncio.run(every_broker())
    except ClusterError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(results))
    if args.json is not None:
        write_json(args.json, results, configs[0])
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scripts/chaos.py``."""
    parser = argparse.ArgumentParser(
        prog="chaos.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/chaos.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
