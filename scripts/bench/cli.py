"""``scripts/bench.py``: our brokers against taskiq-redis's, side by side.

``bench.py [-v] [--quick] [--url URL] [--rounds N] [--scale F] [--brokers K,K]
[--phases P,P] [--scale-workers W,W] [--json FILE]``
    Starts a local 3-master, 3-replica cluster on free ports (or uses
    ``--url``), runs every figure for ClusterStreamBroker,
    ClusterListQueueBroker and taskiq-redis's RedisStreamClusterBroker and
    ListQueueClusterBroker, prints a table with the ours/theirs ratios and
    the targets, and writes the full report as JSON with ``--json``.

    Phases (``--phases``, default ``brokers``): ``brokers`` is the run
    above; ``scale`` runs the stream pair with W worker processes each
    (W = 1,4,16,32; quick 1,2; ``--scale-workers`` sets them and, without
    ``--phases``, selects the scale phase alone): idle Redis CPU, Redis CPU
    per task at 1,000 tasks/s, latency at 200 tasks/s. A full scale phase
    takes about as long as a full ``brokers`` phase, so a plain run leaves
    it out: ``--phases brokers,scale`` does both.

    Exit status: 0 when the run completed (targets missed or not), 1 with
    ``--check-targets`` when a target was missed, 2 when the run failed.
    ``python -m bench`` (from ``scripts/``) is the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from taskiq_redis_cluster._errors import ClusterError

from .config import BROKERS, PHASES, BenchConfig
from .harness import BenchError, run_bench
from .report import format_report

EXIT_OK = 0
EXIT_MISSED = 1
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scripts/bench.py``."""
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description=(
            "Side-by-side benchmark of ClusterStreamBroker/ClusterListQueueBroker and "
            "taskiq-redis's RedisStreamClusterBroker/ListQueueClusterBroker on one cluster. "
            "Every figure is the median of --rounds rounds."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each phase (debug)")
    parser.add_argument(
        "--quick", action="store_true", help="CI mode: fewer tasks and rounds (under 2 minutes)"
    )
    parser.add_argument(
        "--url", help="use this cluster instead of starting a local one (keys are cleaned up)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per figure (default 5; quick 3)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every task count and the latency duration (e.g. 0.2 for smoke tests; "
        "the scale phase's idle window stays)",
    )
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help=f"comma-separated subset of {','.join(BROKERS)}",
    )
    parser.add_argument(
        "--phases",
        default=None,
        help=f"comma-separated subset of {','.join(PHASES)} (default: brokers; the scale "
        "phase is a run of its own, about as long as a full brokers phase)",
    )
    parser.add_argument(
        "--scale-workers",
        default=None,
        metavar="W,W",
        help="worker process counts of the scale phase (default 1,4,16,32; quick 1,2); "
        "alone, selects --phases scale",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--check-targets", action="store_true", help="exit 1 when a target was missed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C, so the cluster is torn down.
    raise KeyboardInterrupt


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The run's :class:`BenchConfig`; ``--scale-workers`` alone selects the scale phase.

    :raises ValueError: an unknown broker or phase, a bad worker count.
    """
    phases = _split(args.phases)
    if not phases:
        phases = ["scale"] if args.scale_workers is not None else ["brokers"]
    return BenchConfig.make(
        quick=args.quick,
        rounds=args.rounds,
        scale=args.scale,
        url=args.url,
        brokers=_split(args.brokers),
        phases=phases,
        scale_workers=[int(w) for w in _split(args.scale_workers)] or None,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = asyncio.run(run_bench(cfg))
    except (BenchError, ClusterError, OSError) as exc:
        text = " ".join(str(exc).split())
        print(f"bench.py: error: {text}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    missed = [t for t in report["targets"] if t["met"] is False]
    if args.check_targets and missed:
        return EXIT_MISSED
    return EXIT_OK
