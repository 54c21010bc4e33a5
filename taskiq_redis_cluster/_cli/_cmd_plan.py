"""``taskiq-redis-cluster plan``: inspect and create shard plans.

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
from urllib.parse import urlsplit

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import ClusterError
from .._keys import DEFAULT_PREFIX
from .._planning import PlanStore, QueueSpec, Shard, ShardPlan, Topology, balance, read_topology
from .._redis import connect, redact_url

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
        p.add_argument("--url", required=True, help="cluster URL, e.g. redis://127.0.0.1:7000")
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
    return _run(run_show(args.url, args.queue, prefix=args.prefix, as_json=args.json), args.url)


def _handle_create(args: argparse.Namespace) -> int:
    return _run(run_create(args.url, args.queue, args.shards, prefix=args.prefix), args.url)


def _handle_list(args: argparse.Namespace) -> int:
    return _run(run_list(args.url, prefix=args.prefix), args.url)


def _run(coro: Coroutine[Any, Any, int], url: str) -> int:
    try:
        return asyncio.run(coro)
    except (ClusterError, RedisError, OSError) as exc:  # run_* report most errors themselves
        _fail(exc, url)
        return EXIT_ERROR


def _fail(exc: BaseException, url: str, err: TextIO | None = None) -> None:
    """Print ``exc`` as one line on stderr, with the URL's password removed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, redact_url(url))
    if password:
        text = text.replace(password, "***")
    print(f"error: {text}", file=err or sys.stderr)


async def _with_client(url: str, body: Callable[[RedisCluster], Awaitable[int]]) -> int:
    client = await connect(url)
    try:
        return await body(client)
    finally:
        await client.aclose()


async def run_show(
    url: str,
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

    try:
        return await _with_client(url, body)
    except (ClusterError, RedisError, OSError) as exc:
        _fail(exc, url, err)
        return EXIT_ERROR


async def run_create(
    url: str,
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
        _fail(exc, url, err)
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

    try:
        return await _with_client(url, body)
    except (ClusterError, RedisError, OSError) as exc:
        _fail(exc, url, err)
        return EXIT_ERROR


async def run_list(
    url: str, *, prefix: str = DEFAULT_PREFIX, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Body of ``plan list``."""
    out = out or sys.stdout

    async def body(client: RedisCluster) -> int:
        for name in await PlanStore(client, prefix=prefix).list_queues():
            print(name, file=out)
        return EXIT_OK

    try:
        return await _with_client(url, body)
    except (ClusterError, RedisError, OSError) as exc:
        _fail(exc, url, err or sys.stderr)
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
