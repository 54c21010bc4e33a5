"""The faults: what each scenario does to workers, nodes, slots or the rebalancer.

Each fault is an ``async`` function of a :class:`ScenarioContext`; it marks
when the fault starts (:meth:`ScenarioContext.fault`) and when it is lifted
or the cluster recovered (:meth:`ScenarioContext.recovered`), and records
what it saw in notes, or a failed check in violations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import RedisCluster

from taskiq_redis_cluster._keys import slot_of
from taskiq_redis_cluster.testing import DevCluster, NodeStatus

from .config import POLL, ChaosConfig
from .ledger import read_executions
from .probes import pending_entries, queue_depth
from .processes import WorkerPool, run_process
from .producer import Kick

logger = logging.getLogger(__name__)


@dataclass
class ScenarioContext:
    """What a scenario's ``inject`` function works with."""

    cluster: DevCluster
    pool: WorkerPool
    admin: RedisCluster
    config: ChaosConfig
    queue: str
    url: str
    #: Stream keys of the queue (one per shard; one for taskiq-redis).
    stream_keys: list[str]
    #: The stream the fault is aimed at (its master, its slot, ...).
    target_key: str
    workdir: Path
    fault_start: float | None = None
    fault_end: float | None = None
    destroyed_before: float | None = None
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    #: Kicks that finished so far (the producer appends as it goes).
    kicks: list[Kick] = field(default_factory=list)

    def fault(self, what: str) -> None:
        """Mark the start of the fault."""
        self.fault_start = time.time()
        logger.info("Fault: %s", what)
        self.notes.append(what)

    def recovered(self, what: str = "") -> None:
        """Mark the end of the fault (it is lifted, or the cluster recovered)."""
        self.fault_end = time.time()
        if what:
            logger.info("Recovered: %s", what)
            self.notes.append(what)

    @property
    def node_timeout(self) -> float:
        """The cluster's node timeout in seconds."""
        return self.cluster.node_timeout_ms / 1000


Inject = Callable[[ScenarioContext], Awaitable[None]]


async def worker_kill(ctx: ScenarioContext) -> None:
    in_flight = await pending_entries(ctx.admin, ctx.stream_keys)
    ctx.fault(f"SIGKILL worker w0 ({in_flight} entries pending over all workers)")
    ctx.pool.kill(0)
    await asyncio.sleep(0.5)
    index = ctx.pool.start()
    ctx.recovered(f"replacement worker w{index} started")
    await ctx.pool.wait_ready([index], 60)


async def worker_stop(ctx: ScenarioContext) -> None:
    pause = ctx.config.idle_timeout / 1000 + 2.0
    ctx.fault(f"SIGSTOP worker w0 for {pause:.1f}s (> idle_timeout)")
    ctx.pool.pause(0)
    try:
        await asyncio.sleep(pause)
    finally:
        ctx.pool.resume(0)
    ctx.recovered("SIGCONT worker w0")


async def failover(ctx: ScenarioContext) -> None:
    master = await ctx.cluster.master_of_key(ctx.target_key)
    replica = await ctx.cluster.replica_of(master)
    ctx.fault(f"CLUSTER FAILOVER: {replica.port} takes over from {master.port}")
    await ctx.cluster.failover(replica)
    ctx.recovered(f"{replica.port} is master")


async def _wait_new_master(ctx: ScenarioContext, old_port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL) + 2):
        with contextlib.suppress(Exception):
            node = await ctx.cluster.master_of_key(ctx.target_key)
            if node.port != old_port:
                return node.port
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL)
    raise TimeoutError(f"no replica took over from {old_port} within {timeout:.0f}s")


async def master_kill(ctx: ScenarioContext) -> None:
    master = await ctx.cluster.master_of_key(ctx.target_key)
    ctx.fault(f"SIGKILL master {master.port}")
    await ctx.cluster.kill_node(master)
    new = await _wait_new_master(ctx, master.port, 20 * ctx.node_timeout + 20)
    ctx.recovered(f"replica {new} promoted")
    await ctx.cluster.restart_node(master.port)
    ctx.notes.append(f"{master.port} restarted (now a replica)")


async def master_stop(ctx: ScenarioContext) -> None:
    master = await ctx.cluster.master_of_key(ctx.target_key)
    ctx.fault(f"SIGSTOP master {master.port} (> node timeout)")
    await ctx.cluster.pause_node(master)
    try:
        new = await _wait_new_master(ctx, master.port, 20 * ctx.node_timeout + 20)
        ctx.notes.append(f"replica {new} promoted")
        await asyncio.sleep(1.0)
    finally:
        await ctx.cluster.resume_node(master)
    ctx.recovered(f"SIGCONT {master.port}")


async def stream_del(ctx: ScenarioContext) -> None:
    ctx.fault(f"DEL {ctx.target_key}")
    await ctx.admin.delete(ctx.target_key)
    # Kicks that started before this moment may have been deleted with the
    # stream: they are "destroyed", not lost.
    ctx.destroyed_before = time.time()
    ctx.recovered()


async def slot_migrate(ctx: ScenarioContext) -> None:
    slot = slot_of(ctx.target_key)
    master = await ctx.cluster.master_of_key(ctx.target_key)
    other = next(m for m in await ctx.cluster.masters() if m.port != master.port)
    ctx.fault(f"MIGRATE slot {slot} from {master.port} to {other.port}")
    await ctx.cluster.migrate_slot(slot, other)
    ctx.recovered(f"slot {slot} owned by {other.port}")


async def majority_down(ctx: ScenarioContext) -> None:
    masters = await ctx.cluster.masters()
    first = await ctx.cluster.master_of_key(ctx.target_key)
    victims = [first] + [m for m in masters if m.port != first.port]
    victims = victims[: len(masters) // 2 + 1]
    pause = 3 * ctx.node_timeout + 2.0
    ports = [v.port for v in victims]
    ctx.fault(f"SIGSTOP masters {ports} for {pause:.1f}s (majority down)")
    try:
        for v in victims:
            await ctx.cluster.pause_node(v)
        await asyncio.sleep(pause)
    finally:
        for v in victims:
            await ctx.cluster.resume_node(v)
    ctx.recovered(f"SIGCONT {ports}")


#: Seconds a SIGTERMed worker may take to stop: taskiq waits for its
#: in-flight tasks (no limit by default; ours last at most a few seconds),
#: then gives the broker's shutdown 5 s.
_STOP_BOUND = 45.0


async def _backlog(ctx: ScenarioContext) -> tuple[int, int, int]:
    """``(not run, queued, pending)``: acked kicks so far that have not run
    yet, and the queue's state in Redis."""
    acked = {k.task_id for k in list(ctx.kicks) if k.outcome == "acked"}
    ran = {e.task_id for e in read_executions(ctx.workdir)}
    queued, pending = await queue_depth(ctx.admin, ctx.config.broker, ctx.stream_keys)
    return len(acked - ran), queued, pending


def _tracebacks(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").count("Traceback")
    return 0


async def rolling_restart(ctx: ScenarioContext) -> None:
    """SIGTERM each worker in turn, start its replacement, wait until it is up."""
    pool = ctx.pool
    originals = list(range(len(pool.labels)))
    ctx.fault(f"rolling restart of {len(originals)} workers under a backlog")
    for index in originals:
        label = pool.labels[index]
        backlog, queued, pending = await _backlog(ctx)
        if backlog == 0:
            # Nothing to hand back: the restart would prove nothing.
            ctx.violations.append(
                f"no backlog when {label} got SIGTERM (raise the task count or the rate)"
            )
        child = pool.child_pid(index)
        began = time.time()
        code = await pool.terminate(index, _STOP_BOUND)
        stopped = time.time() - began
        finished = sum(1 for e in read_executions(ctx.workdir) if e.pid == child and e.at >= began)
        if code is None:
            ctx.violations.append(f"{label} did not stop within {_STOP_BOUND:.0f}s of SIGTERM")
        elif code != 0:
            ctx.violations.append(f"{label} exited with code {code} after SIGTERM")
        errors = _tracebacks(pool.directory / f"worker-{label}.log")
        replacement = pool.start()
        await pool.wait_ready([replacement], 90)
        ctx.notes.append(
            f"{label}: SIGTERM with {backlog} acked tasks not run yet ({queued} queued, "
            f"{pending} pending in Redis); {finished} finished after it; exit {code} after "
            f"{stopped:.1f}s{f'; {errors} tracebacks in its log' if errors else ''}; "
            f"{pool.labels[replacement]} up after {time.time() - began:.1f}s"
        )
    ctx.recovered(f"all {len(originals)} workers restarted")


def _owner(statuses: Sequence[NodeStatus], slot: int) -> NodeStatus | None:
    for s in statuses:
        if s.role == "master" and s.up and any(lo <= slot <= hi for lo, hi in s.slots):
            return s
    return None


async def _reshard_under_load(ctx: ScenarioContext) -> None:
    """``redis-cli --cluster reshard`` of the fewest slots that move a shard."""
    statuses = await ctx.cluster.status()
    best: tuple[int, NodeStatus, int] | None = None
    for key in ctx.stream_keys:
        slot = slot_of(key)
        owner = _owner(statuses, slot)
        if owner is None:
            continue
        # redis-cli takes the source's lowest slots first.
        offset = sum(min(hi, slot) - lo + 1 for lo, hi in owner.slots if lo <= slot)
        if best is None or offset < best[0]:
            best = (offset, owner, slot)
    if best is None:
        raise RuntimeError("no master owns the queue's streams")
    count, source, slot = best
    target = next(
        s for s in statuses if s.role == "master" and s.up and s.slots and s.port != source.port
    )
    ctx.fault(
        f"redis-cli --cluster reshard: {count} slots (up to {slot}) {source.port} -> {target.port}"
    )
    rc = await run_process(
        [
            "redis-cli",
            "--cluster",
            "reshard",
            f"{ctx.cluster.host}:{source.port}",
            "--cluster-from",
            str(source.node_id),
            "--cluster-to",
            str(target.node_id),
            "--cluster-slots",
            str(count),
            "--cluster-yes",
        ],
        timeout=240,
        log_path=ctx.workdir / "reshard.log",
    )
    if rc != 0:
        ctx.violations.append(f"redis-cli reshard exited with {rc} (see reshard.log)")


def _rebalance_command(ctx: ScenarioContext, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "taskiq_redis_cluster._cli._main", "rebalance", "apply",
        "--url", ctx.url, "--queue", ctx.queue, *extra,
    ]  # fmt: skip


async def _rebalance(ctx: ScenarioContext, timeout: float = 120.0) -> None:
    # A killed rebalancer may leave a lease behind; retry until it expires.
    deadline = time.monotonic() + timeout
    rc: int | None = None
    for attempt in range(1, 31):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        rc = await run_process(
            _rebalance_command(ctx), timeout=left, log_path=ctx.workdir / "rebalance.log"
        )
        if rc == 0:
            ctx.notes.append(f"rebalance apply ok (attempt {attempt})")
            return
        await asyncio.sleep(2.0)
    ctx.violations.append(f"rebalance apply did not succeed (last exit {rc}; see rebalance.log)")


async def reshard(ctx: ScenarioContext) -> None:
    await _reshard_under_load(ctx)
    if ctx.config.broker == "ours":
        await _rebalance(ctx)
    ctx.recovered("reshard (and rebalance) done")


async def rebalancer_kill(ctx: ScenarioContext) -> None:
    await _reshard_under_load(ctx)
    log_path = ctx.workdir / "rebalance.log"
    log_path.write_bytes(b"")

    def mid_move() -> bool:
        # The rebalancer logs "switched to <new tag>" once producers write to
        # the new shard while the old one still drains: the middle of a move.
        with contextlib.suppress(OSError):
            return b"switched to" in log_path.read_bytes()
        return False

    began = time.monotonic()
    rc = await run_process(
        # A short lease, so the rerun does not wait 30 s for the dead one's.
        _rebalance_command(ctx, "--lease-ttl", "10"),
        timeout=60,
        kill_after=10.0,
        kill_when=mid_move,
        log_path=log_path,
    )
    waited = time.monotonic() - began
    if rc is not None:
        ctx.notes.append(f"rebalancer finished before the kill (exit {rc})")
    else:
        where = "mid-move (after a switch)" if mid_move() else "before any switch"
        ctx.notes.append(f"rebalancer SIGKILLed {where}, {waited:.1f}s after its start")
    await _rebalance(ctx)
    ctx.recovered("rebalance completed after the kill")
