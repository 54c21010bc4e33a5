"""``taskiq-redis-cluster plan``: inspect and create shard plans.

Every subcommand takes the URL from ``--url`` or ``$TQRC_URL`` and the
password from ``--password-file`` or ``$TQRC_PASSWORD_FILE`` (see
``_common``).

``plan show --url URL --queue NAME [--queue NAME ...] [--json] [--prefix P]``
    One row per shard (index, tag, slot, planned master, actual master now,
    OK/MISPLACED/ORPHANED), the draining shards, shards per master and the
    imbalance (max / mean shards per slot-serving master).

    Exit status: 0 when every queue is balanced (no shard misplaced or
    orphaned, and shard counts per master differ by at most one); 1 when a
    shard is misplaced or orphaned or the spread is above one shard; 2 on an
    error, including a queue without a plan.

``plan create --url URL --queue NAME --shards N [--prefix P]``
    Create the plan if the queue has none (prints the stored plan either way).

``plan list --url URL [--prefix P]``
    Names of the queues that have a plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TextIO

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import ClusterError
from .._keys import DEFAULT_PREFIX
from .._planning import PlanStore, QueueSpec, Shard, ShardPlan, Topology, balance, read_topology
from .._redis import connect
from ._common import Target, TargetError, add_connection_arguments, print_error, resolve_target

EXIT_OK = 0
EXIT_UNBALANCED = 1
EXIT_ERROR = 2


def register(subparsers: Any) -> None:
    """Add the ``plan`` command and its subcommands."""
    parser = subparsers.add_parser(
        "plan",
        help="inspect or create shard plans",
        description="Inspect or create the shard plans of queues.",
    )
    sub = parser.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_connection_arguments(p)
        p.add_argument(
            "--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})"
        )

    show = sub.add_parser(
        "show",
        help="show where each shard lives and how balanced the queue is",
        description=(
            "Show each shard's tag, slot, planned and actual master. Exit 0 if "
            "balanced, 1 if a shard is misplaced/orphaned or masters differ by "
            "more than one shard, 2 on error."
        ),
    )
    common(show)
    show.add_argument("--queue", action="append", required=True, help="queue name (repeatable)")
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    show.set_defaults(handler=_handle_show)

    create = sub.add_parser("create", help="create a queue's plan if it has none")
    common(create)
    create.add_argument("--queue", required=True, help="queue name")
    create.add_argument("--shards", type=int, required=True, help="number of shards, 1..16384")
    create.set_defaults(handler=_handle_create)

    listing = sub.add_parser("list", help="list the queues that have a plan")
    common(listing)
    listing.set_defaults(handler=_handle_list)


# --------------------------------------------------------------------------
# Handlers (sync wrappers for the dispatcher) and their async bodies
# --------------------------------------------------------------------------


def _handle_show(args: argparse.Namespace) -> int:
    return _run(args, lambda t: run_show(t, args.queue, prefix=args.prefix, as_json=args.json))


def _handle_create(args: argparse.Namespace) -> int:
    return _run(args, lambda t: run_create(t, args.queue, args.shards, prefix=args.prefix))


def _handle_list(args: argparse.Namespace) -> int:
    return _run(args, lambda t: run_list(t, prefix=args.prefix))


def _run(args: argparse.Namespace, make: Callable[[Target], Coroutine[Any, Any, int]]) -> int:
    try:
        target = resolve_target(args)
    except TargetError as exc:
        print_error(exc, None)
        return EXIT_ERROR
    try:
        return asyncio.run(make(target))
    except (ClusterError, RedisError, OSError) as exc:  # run_* report most errors themselves
        print_error(exc, target)
        return EXIT_ERROR


def _target(target: Target | str) -> Target:
    return target if isinstance(target, Target) else Target(target)


async def _with_client(target: Target, body: Callable[[RedisCluster], Awaitable[int]]) -> int:
    client = await connect(target.url, target.options())
    try:
        return await body(client)
    finally:
        await client.aclose()


async def run_show(
    url: Target | str,
    queues: list[str],
    *,
    prefix: str = DEFAULT_PREFIX,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Body of ``plan show``; returns the exit status (see the module doc).

    Errors are printed as one line on ``err`` (not raised), so tests can call
    this inside a running event loop.
    """
    out = out or sys.stdout
    err = err or sys.stderr

    async def body(client: RedisCluster) -> int:
        store = PlanStore(client, prefix=prefix)
        topology = await read_topology(client)
        status = EXIT_OK
        reports: list[dict[str, Any]] = []
        for queue in queues:
            plan = await store.load(queue)
            if plan is None:
                print(f"error: no plan is stored for queue {queue!r}", file=err)
                status = EXIT_ERROR
                continue
            report = describe(plan, topology)
            reports.append(report)
            if not report["balanced"] and status == EXIT_OK:
                status = EXIT_UNBALANCED
            if not as_json:
                _print_report(report, out)
        if as_json:
            doc = {
                "uncovered_slots": [list(r) for r in topology.uncovered_slots],
                "migrating_slots": [
                    {"slot": m.slot, "source": m.source, "target": m.target}
                    for m in topology.migrating_slots
                ],
                "queues": reports,
            }
            print(json.dumps(doc, indent=2), file=out)
        elif topology.uncovered_slots or topology.migrating:
            _print_cluster_notes(topology, out)
        return status

    target = _target(url)
    try:
        return await _with_client(target, body)
    except (ClusterError, RedisError, OSError) as exc:
        print_error(exc, target, err)
        return EXIT_ERROR


async def run_create(
    url: Target | str,
    queue: str,
    shards: int,
    *,
    prefix: str = DEFAULT_PREFIX,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Body of ``plan create``: create the plan if absent, then show it."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        spec = QueueSpec(queue, shards)
    except ClusterError as exc:
        print_error(exc, _target(url), err)
        return EXIT_ERROR

    async def body(client: RedisCluster) -> int:
        store = PlanStore(client, prefix=prefix)
        topology = await read_topology(client)
        existed = await store.load(queue) is not None
        plan = await store.get_or_create(topology, spec)
        verb = "exists" if existed else "created"
        print(
            f"plan for queue {queue!r} {verb}: {len(plan.shards)} shards, epoch {plan.epoch}",
            file=out,
        )
        _print_report(describe(plan, topology), out)
        return EXIT_OK

    target = _target(url)
    try:
        return await _with_client(target, body)
    except (ClusterError, RedisError, OSError) as exc:
        print_error(exc, target, err)
        return EXIT_ERROR


async def run_list(
    url: Target | str,
    *,
    prefix: str = DEFAULT_PREFIX,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Body of ``plan list``."""
    out = out or sys.stdout

    async def body(client: RedisCluster) -> int:
        for name in await PlanStore(client, prefix=prefix).list_queues():
            print(name, file=out)
        return EXIT_OK

    target = _target(url)
    try:
        return await _with_client(target, body)
    except (ClusterError, RedisError, OSError) as exc:
        print_error(exc, target, err or sys.stderr)
        return EXIT_ERROR


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _addr(topology: Topology, node_id: str | None) -> str:
    if node_id is None:
        return "-"
    master = topology.master_by_id(node_id)
    return str(master.address) if master is not None else f"{node_id[:8]} (gone)"


def _shard_row(shard: Shard, topology: Topology) -> dict[str, Any]:
    owner = topology.owner_of(shard.slot)
    if owner is None:
        state = "ORPHANED"
    elif owner.node_id == shard.master:
        state = "OK"
    else:
        state = "MISPLACED"
    return {
        "index": shard.index,
        "tag": shard.tag,
        "slot": shard.slot,
        "planned_master": shard.master,
        "planned_address": _addr(topology, shard.master),
        "actual_master": owner.node_id if owner is not None else None,
        "actual_address": str(owner.address) if owner is not None else "-",
        "status": state,
    }


def describe(plan: ShardPlan, topology: Topology) -> dict[str, Any]:
    """JSON-able description of ``plan`` on ``topology`` (what ``show`` prints)."""
    report = balance(plan, topology)
    masters = [
        {
            "node_id": node_id,
            "address": _addr(topology, node_id),
            "slots": m.slot_count if (m := topology.master_by_id(node_id)) else 0,
            "shards": count,
        }
        for node_id, count in report.counts.items()
    ]
    return {
        "queue": plan.queue,
        "epoch": plan.epoch,
        "shards": [_shard_row(s, topology) for s in plan.shards],
        "draining": [_shard_row(s, topology) for s in plan.draining],
        "masters": masters,
        "imbalance": round(report.imbalance, 4),
        "spread": report.spread,
        "misplaced": list(report.misplaced),
        "orphaned": list(report.orphaned),
        "balanced": report.balanced,
    }


def _table(rows: list[list[str]], out: TextIO, indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _shard_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    header = ["index", "tag", "slot", "planned", "actual", "status"]
    body = [
        [
            str(r["index"]),
            r["tag"],
            str(r["slot"]),
            r["planned_address"],
            r["actual_address"],
            r["status"],
        ]
        for r in rows
    ]
    _table([header, *body], out)


def _print_report(report: dict[str, Any], out: TextIO) -> None:
    print(
        f"queue {report['queue']}  epoch {report['epoch']}  shards {len(report['shards'])}",
        file=out,
    )
    _shard_table(report["shards"], out)
    if report["draining"]:
        print(f"draining ({len(report['draining'])}):", file=out)
        _shard_table(report["draining"], out)
    print("shards per master:", file=out)
    _table(
        [["master", "node id", "slots", "shards"]]
        + [
            [m["address"], m["node_id"][:12], str(m["slots"]), str(m["shards"])]
            for m in report["masters"]
        ],
        out,
    )
    verdict = "balanced" if report["balanced"] else "NOT balanced"
    problems = []
    if report["misplaced"]:
        problems.append(f"{len(report['misplaced'])} misplaced")
    if report["orphaned"]:
        problems.append(f"{len(report['orphaned'])} orphaned")
    detail = f" ({', '.join(problems)})" if problems else ""
    print(
        f"imbalance {report['imbalance']:.2f} (max/mean), spread {report['spread']}: "
        f"{verdict}{detail}",
        file=out,
    )
    print(file=out)


def _print_cluster_notes(topology: Topology, out: TextIO) -> None:
    if topology.uncovered_slots:
        ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in topology.uncovered_slots)
        print(f"warning: slots served by no master: {ranges}", file=out)
    if topology.migrating:
        slots = ", ".join(str(m.slot) for m in topology.migrating_slots)
        print(f"note: slot migrations in progress: {slots}", file=out)
