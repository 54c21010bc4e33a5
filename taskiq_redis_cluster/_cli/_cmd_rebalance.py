"""``taskiq-redis-cluster rebalance``: keep shards balanced through resharding.

``rebalance plan --url URL [--queue NAME ...] [--json]``
    Dry run: the moves that would restore the balance and a before/after
    shards-per-master table. Nothing is written.

``rebalance apply --url URL [--queue NAME ...] [--timeout S] [--max-moves-at-once N] ...``
    Finish unfinished moves, then move shards until every queue is balanced.
    The rebalancer copies the waiting entries of a moving shard itself
    (``--max-entries-per-second``), so no worker needs to run. A plan change
    counts only once a replica of the plan key's master has it; on a cluster
    without replicas pass ``--no-replica-check``.
    A progress line on a terminal, plain log lines otherwise (both on
    stderr); the summary goes to stdout (JSON with ``--json``).

``rebalance watch --url URL [--poll-interval S] [--settle-polls N] [--once] [--max-runtime S]``
    Poll the topology; once slot migrations have settled (no slot migrating
    and the same slot ownership for ``--settle-polls`` polls) rebalance every
    queue that needs it. Every poll also sweeps retired shards: entries a
    stale producer wrote to a removed tag are moved to the live shard.
    Runs until interrupted, ``--once`` or ``--max-runtime``.

``rebalance verify --url URL [--queue NAME ...] [--json]``
    Check that every shard is on its planned master, nothing is draining or
    half-moved and masters differ by at most one shard.

Without ``--queue`` every queue that has a plan is handled. The URL comes
from ``--url`` or ``$TQRC_URL``, the password from ``--password-file`` or
``$TQRC_PASSWORD_FILE`` (see ``_common``).

Exit status: 0 ok / balanced; 1 imbalance found (``plan``), verification
failed, or the rebalance did not reach balance; 2 usage or connection error
(also a queue without a plan, or a plan change no replica confirmed: it is in
force on the master, and a rerun confirms it before going on); 3 another
rebalancer holds the lease; 4 a move was aborted (timeout) and reverted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import (
    ClusterError,
    PlanNotReplicatedError,
    RebalanceAbortedError,
    RebalanceError,
    RebalanceLockedError,
)
from .._keys import DEFAULT_PREFIX
from .._planning import PlanStore, Topology, read_topology
from .._rebalance import (
    RebalanceEvent,
    RebalanceEventKind,
    RebalanceOptions,
    RebalancePreview,
    Rebalancer,
    RebalanceStatus,
)
from .._redis import connect
from ._common import TargetError, add_connection_arguments, print_error, resolve_target

EXIT_OK = 0
EXIT_UNBALANCED = 1
EXIT_ERROR = 2
EXIT_LOCKED = 3
EXIT_ABORTED = 4


def register(subparsers: Any) -> None:
    """Add the ``rebalance`` command and its subcommands."""
    parser = subparsers.add_parser(
        "rebalance",
        help="move shards back into balance after resharding",
        description=(
            "Detect and repair shard imbalance. Exit status: 0 ok, 1 imbalance found or "
            "verify failed, 2 usage/connection error, 3 another rebalancer holds the lease, "
            "4 a move was aborted (timeout)."
        ),
    )
    sub = parser.add_subparsers(dest="rebalance_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_connection_arguments(p)
        p.add_argument(
            "--queue",
            action="append",
            help="queue name (repeatable; default: every queue that has a plan)",
        )
        p.add_argument(
            "--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    def tuning(p: argparse.ArgumentParser) -> None:
        d = RebalanceOptions()
        p.add_argument(
            "--timeout",
            type=float,
            default=d.move_timeout,
            metavar="S",
            help=f"seconds a move may go without progress (entries held by live consumers "
            f"that never acknowledge) before it is reverted (default {d.move_timeout:.0f})",
        )
        p.add_argument(
            "--max-moves-at-once",
            type=int,
            default=d.max_moves_at_once,
            metavar="N",
            help=f"moves of one queue in flight at once (default {d.max_moves_at_once})",
        )
        p.add_argument(
            "--max-entries-per-second",
            type=float,
            default=d.max_entries_per_second,
            metavar="R",
            help="cap on entries (tasks and dead letters) the rebalancer copies per second "
            f"(default {d.max_entries_per_second:.0f})",
        )
        p.add_argument(
            "--settle-window",
            type=float,
            default=None,
            metavar="S",
            help="seconds after a plan change until every producer follows it "
            "(default 2 x --plan-poll-interval + 1; at least --plan-poll-interval)",
        )
        p.add_argument(
            "--idle-timeout",
            type=float,
            default=d.idle_timeout,
            metavar="S",
            help="seconds after which an entry pending on any consumer of a moving shard is "
            f"copied; use your brokers' idle_timeout / 1000 (default {d.idle_timeout:.0f})",
        )
        p.add_argument(
            "--consumer-timeout",
            type=float,
            default=d.consumer_timeout,
            metavar="S",
            help="a consumer that has not read a moving shard for this long counts as dead "
            f"and its pending entries are copied (default {d.consumer_timeout:.0f})",
        )
        p.add_argument(
            "--plan-poll-interval",
            type=float,
            default=d.plan_poll_interval,
            metavar="S",
            help="the largest plan_poll_interval of your producers and consumers "
            f"(default {d.plan_poll_interval})",
        )
        p.add_argument(
            "--lease-ttl",
            type=float,
            default=d.lease_ttl,
            metavar="S",
            help=f"lifetime of the rebalance lease without renewal (default {d.lease_ttl:.0f})",
        )
        p.add_argument(
            "--lock-wait",
            type=float,
            default=0.0,
            metavar="S",
            help="seconds to wait for another rebalancer's lease (default 0: exit 3 at once)",
        )
        p.add_argument(
            "--no-replica-check",
            action="store_true",
            help="for a cluster without replicas only: a plan change counts once the plan "
            "key's master has it (default: a replica must confirm it, so that a failover "
            "cannot undo it)",
        )

    plan = sub.add_parser("plan", help="dry run: show the moves that would restore balance")
    common(plan)
    plan.set_defaults(handler=_handle_plan)

    apply = sub.add_parser("apply", help="move shards until every queue is balanced")
    common(apply)
    tuning(apply)
    apply.set_defaults(handler=_handle_apply)

    watch = sub.add_parser("watch", help="rebalance whenever the topology settles unbalanced")
    common(watch)
    tuning(watch)
    watch.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between topology polls (default 5)",
    )
    watch.add_argument(
        "--settle-polls",
        type=int,
        default=3,
        metavar="N",
        help="polls with unchanged slot ownership and no migration before acting (default 3)",
    )
    watch.add_argument("--once", action="store_true", help="stop after the first settled check")
    watch.add_argument(
        "--max-runtime", type=float, default=None, metavar="S", help="stop after S seconds"
    )
    watch.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the rebalancer's Prometheus counters on this port while watching",
    )
    watch.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)"
    )
    watch.set_defaults(handler=_handle_watch)

    verify = sub.add_parser("verify", help="exit 0 only if every queue is balanced and settled")
    common(verify)
    verify.set_defaults(handler=_handle_verify)


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> RebalanceOptions:
    return RebalanceOptions(
        plan_poll_interval=args.plan_poll_interval,
        move_timeout=args.timeout,
        max_moves_at_once=args.max_moves_at_once,
        max_entries_per_second=args.max_entries_per_second,
        settle_window=args.settle_window,
        idle_timeout=args.idle_timeout,
        consumer_timeout=args.consumer_timeout,
        lease_ttl=args.lease_ttl,
        lock_wait=args.lock_wait,
        check_interval=min(1.0, max(0.1, args.plan_poll_interval / 2)),
    )


def _quiet_library_logs(args: argparse.Namespace) -> None:
    # The progress display reports every step; the library's INFO lines
    # would repeat it (and break a terminal progress line).
    if not getattr(args, "verbose", False):
        logging.getLogger("taskiq_redis_cluster").setLevel(logging.WARNING)


def _run(args: argparse.Namespace, body: Callable[[RedisCluster], Awaitable[int]]) -> int:
    """Connect, run ``body`` and map errors to exit codes (module doc)."""
    try:
        target = resolve_target(args)
    except TargetError as exc:
        print_error(exc, None)
        return EXIT_ERROR

    async def main() -> int:
        client = await connect(target.url, target.options())
        try:
            return await body(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except PlanNotReplicatedError as exc:
        print_error(exc, target)
        if exc.replicas == 0:
            hint = (
                "the plan key's master has no replica attached. If the cluster has no "
                "replicas, rerun with --no-replica-check; otherwise wait until the replica "
                "is back and rerun"
            )
        else:
            hint = (
                "no replica confirmed the plan change in time. Rerun once the replicas "
                "caught up: the rebalancer confirms the stored plan before it goes on"
            )
        print(f"hint: {hint}", file=sys.stderr)
        return EXIT_ERROR
    except RebalanceLockedError as exc:
        print_error(exc, target)
        print(
            "hint: wait for the other rebalancer to finish (or for its lease to expire "
            "if it was killed), or pass --lock-wait",
            file=sys.stderr,
        )
        return EXIT_LOCKED
    except RebalanceAbortedError as exc:
        print_error(exc, target)
        return EXIT_ABORTED
    except RebalanceError as exc:
        print_error(exc, target)
        return EXIT_UNBALANCED
    except (ClusterError, RedisError, OSError) as exc:
        print_error(exc, target)
        return EXIT_ERROR


async def _queues(rebalancer: Rebalancer, args: argparse.Namespace) -> list[str]:
    return list(args.queue) if args.queue else await rebalancer.queues()


def _handle_plan(args: argparse.Namespace) -> int:
    async def body(client: RedisCluster) -> int:
        rebalancer = Rebalancer(client, prefix=args.prefix)
        topology = await read_topology(client)
        previews = [await rebalancer.preview(q, topology) for q in await _queues(rebalancer, args)]
        if args.json:
            doc = {"migrating": topology.migrating, "queues": [p.to_dict() for p in previews]}
            print(json.dumps(doc, indent=2))
        else:
            for preview in previews:
                _print_preview(preview, topology, sys.stdout)
            if topology.migrating:
                print("note: slot migrations are in progress; apply waits for them to finish")
            if not previews:
                print("no queue has a plan")
        return EXIT_UNBALANCED if any(p.needed for p in previews) else EXIT_OK

    return _run(args, body)


def _handle_verify(args: argparse.Namespace) -> int:
    async def body(client: RedisCluster) -> int:
        rebalancer = Rebalancer(client, prefix=args.prefix)
        topology = await read_topology(client)
        statuses = [await rebalancer.status(q, topology) for q in await _queues(rebalancer, args)]
        _print_statuses(statuses, args.json, sys.stdout)
        return EXIT_OK if all(s.ok for s in statuses) else EXIT_UNBALANCED

    return _run(args, body)


def _rebalancer(
    client: RedisCluster, args: argparse.Namespace, progress: _Progress
) -> tuple[Rebalancer, Any]:
    """A Rebalancer reporting to ``progress`` and to the Prometheus counters.

    The counters reach Prometheus from this process only with
    ``PROMETHEUS_MULTIPROC_DIR`` set (see docs/metrics.md), or through
    ``watch --metrics-port``.
    """
    from .._metrics import default_events

    events = default_events()

    def on_event(event: RebalanceEvent) -> None:
        progress(event)
        events.rebalance_event(event)

    rebalancer = Rebalancer(
        client,
        prefix=args.prefix,
        options=_options(args),
        on_event=on_event,
        run_hook=events.track_rebalance,
        store=PlanStore(
            client, prefix=args.prefix, require_replica=not getattr(args, "no_replica_check", False)
        ),
    )
    return rebalancer, events


def _handle_apply(args: argparse.Namespace) -> int:
    _quiet_library_logs(args)
    progress = _Progress(sys.stderr)

    async def body(client: RedisCluster) -> int:
        rebalancer, _ = _rebalancer(client, args, progress)
        queues = await _queues(rebalancer, args)
        try:
            results = await rebalancer.apply(queues)
        finally:
            progress.close()
        topology = await read_topology(client)
        statuses = [await rebalancer.status(q, topology) for q in queues]
        if args.json:
            doc = {
                "queues": [r.to_dict() for r in results],
                "verify": [s.to_dict() for s in statuses],
            }
            print(json.dumps(doc, indent=2))
        else:
            for r in results:
                extra = f", resumed {r.resumed}" if r.resumed else ""
                extra += ", relabelled" if r.relabelled else ""
                extra += f", swept {r.swept} stranded" if r.swept else ""
                print(f"queue {r.queue}: {r.moves} move(s){extra}, epoch {r.epoch}")
            _print_statuses(statuses, False, sys.stdout)
        return EXIT_OK if all(s.ok for s in statuses) else EXIT_UNBALANCED

    return _run(args, body)


def _handle_watch(args: argparse.Namespace) -> int:
    _quiet_library_logs(args)
    progress = _Progress(sys.stderr)

    async def body(client: RedisCluster) -> int:
        rebalancer, events = _rebalancer(client, args, progress)
        server = None
        if args.metrics_port is not None:
            from .._metrics import metrics_registry, start_metrics_server

            server = start_metrics_server(
                args.metrics_port, host=args.metrics_host, registry=metrics_registry(events)
            )
        try:
            runs = await rebalancer.watch(
                args.queue or None,
                poll_interval=args.poll_interval,
                settle_polls=args.settle_polls,
                once=args.once,
                max_runtime=args.max_runtime,
            )
        finally:
            progress.close()
            if server is not None:
                server.close()
        if args.json:
            print(json.dumps({"rebalances": runs}))
        else:
            print(f"watch finished: {runs} rebalance run(s)")
        return EXIT_OK

    return _run(args, body)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _addr(topology: Topology, node_id: str) -> str:
    master = topology.master_by_id(node_id)
    return str(master.address) if master is not None else f"{node_id[:8]} (gone)"


def _table(rows: Sequence[Sequence[str]], out: TextIO, indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        print(indent + cells.rstrip(), file=out)


def _imbalance(counts: dict[str, int]) -> float:
    if not counts:
        return 1.0
    mean = sum(counts.values()) / len(counts)
    return max(counts.values()) / mean if mean else 1.0


def _print_preview(preview: RebalancePreview, topology: Topology, out: TextIO) -> None:
    moves = preview.moves
    print(f"queue {preview.queue}  epoch {preview.plan.epoch}: {len(moves)} move(s)", file=out)
    if preview.unfinished:
        print("  unfinished work (apply completes it first):", file=out)
        for rec in preview.unfinished:
            print(f"    shard {rec.index}: {rec.state.value}, draining {rec.draining}", file=out)
    if moves:
        rows = [["index", "from", "to"]] + [
            [
                str(m.index),
                f"{m.old.tag} @ {_addr(topology, m.old.master)}",
                f"{m.new.tag} @ {_addr(topology, m.new.master)}",
            ]
            for m in moves
        ]
        _table(rows, out)
    elif preview.replan.relabelled:
        print("  no move; master ids are refreshed (failover)", file=out)
    print("shards per master:", file=out)
    masters = sorted(set(preview.before) | set(preview.after))
    _table(
        [["master", "node id", "before", "after"]]
        + [
            [
                _addr(topology, m),
                m[:12],
                str(preview.before.get(m, 0)),
                str(preview.after.get(m, 0)),
            ]
            for m in masters
        ],
        out,
    )
    print(
        f"imbalance {_imbalance(dict(preview.before)):.2f} -> "
        f"{_imbalance(dict(preview.after)):.2f} (max/mean)",
        file=out,
    )
    print(file=out)


def _print_statuses(statuses: list[RebalanceStatus], as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps({"queues": [s.to_dict() for s in statuses]}, indent=2), file=out)
        return
    for s in statuses:
        head = (
            f"queue {s.queue}: epoch {s.plan.epoch}, spread {s.report.spread}, "
            f"imbalance {s.report.imbalance:.2f}"
        )
        if s.ok:
            print(f"{head}: OK", file=out)
            continue
        problems = []
        if s.report.misplaced:
            problems.append(f"{len(s.report.misplaced)} misplaced")
        if s.report.orphaned:
            problems.append(f"{len(s.report.orphaned)} orphaned")
        if s.report.spread > 1:
            problems.append("spread above 1")
        if s.plan.draining:
            problems.append(f"draining {', '.join(d.tag for d in s.plan.draining)}")
        if s.unfinished:
            problems.append(f"{len(s.unfinished)} unfinished move(s)")
        print(f"{head}: NOT OK ({'; '.join(problems)})", file=out)


class _Progress:
    """Renders RebalanceEvents: a redrawn line on a TTY, log lines otherwise."""

    _WAITING_EVERY = 5.0

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._status = ""
        self._last_wait: dict[tuple[str, int | None], float] = {}

    def __call__(self, event: RebalanceEvent) -> None:
        line = self._describe(event)
        if event.kind is RebalanceEventKind.WAITING:
            if self._tty:
                self._draw(self._bar(event) + " " + line)
                return
            key = (event.queue, event.index)
            now = time.monotonic()
            if now - self._last_wait.get(key, float("-inf")) < self._WAITING_EVERY:
                return
            self._last_wait[key] = now
        self._print(line)

    def _bar(self, event: RebalanceEvent) -> str:
        total = max(event.total, 1)
        filled = int(20 * min(event.done, total) / total)
        return f"[{'#' * filled}{'.' * (20 - filled)}] {event.done}/{event.total}"

    @staticmethod
    def _describe(event: RebalanceEvent) -> str:
        where = f"queue {event.queue}"
        if event.index is not None:
            where += f" shard {event.index}"
        kind = event.kind
        if kind is RebalanceEventKind.WAITING:
            return (
                f"{where}: draining {event.draining_tag} "
                f"(undelivered {event.undelivered}, pending {event.pending})"
            )
        if kind is RebalanceEventKind.PLANNED:
            return f"{where}: planned {event.old_tag} -> {event.new_tag}"
        if kind is RebalanceEventKind.SWITCHED:
            return f"{where}: switched to {event.new_tag} (epoch {event.epoch})"
        if kind is RebalanceEventKind.COPIED:
            return f"{where}: copied {event.done} entries from {event.draining_tag}"
        if kind is RebalanceEventKind.SWEPT:
            return (
                f"{where}: swept {event.done} stranded entries {event.old_tag} -> {event.new_tag}"
            )
        if kind is RebalanceEventKind.QUEUE_DONE:
            return f"{where}: done, {event.done} move(s), epoch {event.epoch}"
        if kind is RebalanceEventKind.UNCONFIRMED:
            return (
                f"{where}: plan epoch {event.epoch} is not confirmed by a replica yet "
                f"({event.message}); repeating the change ({event.done}/{event.total})"
            )
        if kind is RebalanceEventKind.RELABELLED:
            return f"{where}: master ids refreshed (epoch {event.epoch})"
        detail = f" ({event.message})" if event.message else ""
        epoch = f" (epoch {event.epoch})" if event.epoch is not None else ""
        return f"{where}: {kind.value}{epoch}{detail}"

    def _draw(self, text: str) -> None:
        self._status = text
        self._out.write("\r\033[K" + text)
        self._out.flush()

    def _print(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self._tty:
            self._out.write("\r\033[K")
        self._out.write(f"{stamp} {text}\n")
        if self._tty and self._status:
            self._out.write(self._status)
        self._out.flush()

    def close(self) -> None:
        """End the progress line."""
        if self._tty and self._status:
            self._out.write("\r\033[K")
            self._out.flush()
            self._status = ""
