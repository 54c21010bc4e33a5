"""The rebalancer: journal reconciliation, and moves under load on a real cluster.

The cluster tests run a producer that kicks uniquely named tasks steadily and
consumers that record every execution, then compute ``lost = kicked -
executed`` (it must be empty) and print the longest gap between two task
completions while shards moved (the "stall").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import chaos, eventually, make_message, take, task_id_of
from redis.asyncio import RedisCluster
from taskiq import AckableMessage, BrokerMessage

from taskiq_redis_cluster import (
    ClusterStreamBroker,
    KickFailedError,
    KickOutcomeUnknownError,
    PlanStore,
    QueueSpec,
    RebalanceAbortedError,
    RebalanceLockedError,
    ShardPlan,
    balance,
    connect,
    read_topology,
)
from taskiq_redis_cluster._keys import (
    DEFAULT_PREFIX,
    ShardKeys,
    rebalance_journal_key,
    shard_tag,
    shard_tag_slots,
    slot_of,
)
from taskiq_redis_cluster._planning._planner import Shard
from taskiq_redis_cluster._planning._topology import Topology
from taskiq_redis_cluster._rebalance import (
    RebalanceEvent,
    RebalanceEventKind,
    RebalanceOptions,
    Rebalancer,
)
from taskiq_redis_cluster._rebalance._journal import Journal, MoveRecord, MoveState, reconcile
from taskiq_redis_cluster._rebalance._lease import RebalanceLease
from taskiq_redis_cluster.testing import DevCluster, find_free_base_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "rebalance.py"
POLL = 0.5


def _opts(**kw: Any) -> RebalanceOptions:
    values: dict[str, Any] = {
        "plan_poll_interval": POLL,
        "settle_margin": 0.5,
        "move_timeout": 60.0,
        "check_interval": 0.2,
        "lease_ttl": 5.0,
        "max_moves_at_once": 2,
    }
    values.update(kw)
    return RebalanceOptions(**values)


def _cli_args(url: str, queue: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        *extra[:1],
        "--url",
        url,
        "--queue",
        queue,
        *extra[1:],
    ]


def _tuning(timeout: float = 60.0) -> list[str]:
    return [
        "--plan-poll-interval",
        str(POLL),
        "--timeout",
        str(timeout),
        "--lease-ttl",
        "3",
        "--max-moves-at-once",
        "2",
    ]


# --------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------


def _shard(index: int, salt: int, master: str = "m1") -> Shard:
    tag = shard_tag("q", index, salt)
    from taskiq_redis_cluster._keys import tag_slot

    return Shard(index, tag, tag_slot(tag), master)


def _plan(epoch: int, shards: Iterable[Shard], draining: Iterable[Shard] = ()) -> ShardPlan:
    return ShardPlan("q", epoch, tuple(shards), tuple(draining))


def _rec(old: Shard, new: Shard, state: MoveState, **kw: Any) -> MoveRecord:
    return MoveRecord(index=old.index, old=old, new=new, state=state, draining=old.tag, **kw)


def test_move_record_json_round_trip() -> None:
    rec = _rec(
        _shard(0, 0), _shard(0, 5, "m2"), MoveState.SWITCHED, switched_epoch=3, switched_at=12.5
    )
    back = MoveRecord.from_json(rec.to_json())
    assert back == rec
    with pytest.raises(ValueError, match="lacks"):
        MoveRecord.from_json('{"index": 1}')


def test_reconcile_follows_the_plan_not_the_journal() -> None:
    a0, a1 = _shard(0, 0), _shard(1, 0)
    n0, n1 = _shard(0, 3, "m2"), _shard(1, 4, "m2")
    # Killed after the switch CAS, before the journal said "switched".
    plan = _plan(2, [n0, a1], [a0])
    active, dropped = reconcile(plan, [_rec(a0, n0, MoveState.PLANNED)])
    assert [(r.index, r.state) for r in active] == [(0, MoveState.SWITCHED)]
    assert active[0].switched_at is None
    assert not dropped
    # A planned move that never switched is forgotten (re-planned later).
    active, dropped = reconcile(_plan(1, [a0, a1]), [_rec(a0, n0, MoveState.PLANNED)])
    assert not active
    assert len(dropped) == 1
    # ... unless its pre-copy started: entries may sit in the new tag.
    active, dropped = reconcile(_plan(1, [a0, a1]), [_rec(a0, n0, MoveState.PLANNED, precopy=True)])
    assert [(r.state, r.precopy) for r in active] == [(MoveState.PLANNED, True)]
    assert not dropped
    # Switched and already out of the plan: only cleaning is left.
    active, _ = reconcile(_plan(3, [n0, a1]), [_rec(a0, n0, MoveState.PLANNED)])
    assert active[0].state is MoveState.FINALIZED
    # Killed after finalizing, before the journal said so.
    active, _ = reconcile(_plan(3, [n0, a1]), [_rec(a0, n0, MoveState.DRAINED)])
    assert active[0].state is MoveState.FINALIZED
    # Killed after a revert: the new tag is the one to drain now.
    active, _ = reconcile(_plan(3, [a0, a1], [n0]), [_rec(a0, n0, MoveState.SWITCHED)])
    assert active[0].reverted
    assert active[0].draining == n0.tag
    assert active[0].target_shard == a0
    # The draining tag became active again (someone else changed the plan):
    # the record is dropped, so the active shard is never deleted.
    rec = _rec(a1, n1, MoveState.FINALIZED)
    active, dropped = reconcile(_plan(4, [a0, a1]), [rec])
    assert not active
    assert dropped == [rec]
    # A draining shard without a journal entry becomes a drain-only record.
    active, _ = reconcile(_plan(5, [n0, a1], [a0]), [])
    assert [(r.kind, r.draining, r.new) for r in active] == [("drain", a0.tag, n0)]


def test_options_are_validated() -> None:
    from taskiq_redis_cluster import ConfigurationError, InvalidOptionError

    def refused(**kw: Any) -> InvalidOptionError:
        with pytest.raises(InvalidOptionError) as info:
            RebalanceOptions(**kw)
        assert isinstance(info.value, ConfigurationError)
        return info.value

    assert refused(max_moves_at_once=0).option == "max_moves_at_once"
    assert refused(plan_poll_interval=0).option == "plan_poll_interval"
    assert refused(move_timeout=float("nan")).option == "move_timeout"
    assert refused(lock_wait=-1).option == "lock_wait"
    assert refused(copy_batch=2.5).option == "copy_batch"
    assert "got 0" in refused(copy_batch=0).reason
    assert refused(lease_ttl=0.5).option == "lease_ttl"
    assert RebalanceOptions(plan_poll_interval=2, settle_margin=1).settle == 5
    # The settle window is configurable but never shorter than the brokers'
    # poll interval (a producer that has not polled yet still writes there).
    assert RebalanceOptions(plan_poll_interval=2, settle_window=2.5).settle == 2.5
    error = refused(plan_poll_interval=2, settle_window=1.0)
    assert error.option == "settle_window"
    assert "at least plan_poll_interval" in str(error)


async def test_watch_refuses_bad_poll_settings() -> None:
    from taskiq_redis_cluster import InvalidOptionError

    rebalancer = Rebalancer(None)  # type: ignore[arg-type]  # fails before any I/O
    with pytest.raises(InvalidOptionError) as info:
        await rebalancer.watch(poll_interval=0)
    assert info.value.option == "poll_interval"
    with pytest.raises(InvalidOptionError) as info:
        await rebalancer.watch(settle_polls=0)
    assert info.value.option == "settle_polls"


def test_rebalance_modules_import_only_downwards() -> None:
    # The rebalancer's seams, lowest first: each module may import only the
    # ones before it, so there is no import loop inside _rebalance/.
    import ast

    import taskiq_redis_cluster

    order = (
        "_journal",
        "_options",
        "_lease",
        "_markers",
        "_copy",
        "_writer",
        "_sweep",
        "_moves",
        "_rebalancer",
        "__init__",
    )
    folder = Path(taskiq_redis_cluster.__file__).parent / "_rebalance"
    assert {p.stem for p in folder.glob("*.py")} == set(order), "rank the new module here"
    wrong = []
    for rank, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 1
                and node.module
                and order.index(node.module) >= rank
            ):
                wrong.append(f"{name} imports {node.module}")
    assert wrong == []
    assert max(len((folder / f"{n}.py").read_text().splitlines()) for n in order) <= 600


# --------------------------------------------------------------------------
# Load harness
# --------------------------------------------------------------------------


class Load:
    """A steady producer and in-process consumers recording every execution."""

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        consumers: int = 2,
        rate: float = 40.0,
        max_seconds: float = 150.0,
    ) -> None:
        self.url = url
        self.queue = queue
        self.consumers = consumers
        self.rate = rate
        self.max_seconds = max_seconds
        self.kicked: set[str] = set()
        self.unknown: set[str] = set()
        self.failed = 0
        self.executed: Counter[str] = Counter()
        self.completions: list[float] = []
        self._brokers: list[ClusterStreamBroker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._producer: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _broker(self) -> ClusterStreamBroker:
        return ClusterStreamBroker(
            self.url,
            queue_name=self.queue,
            idle_timeout=1_500,
            xread_block=200,
            plan_poll_interval=POLL,
        )

    async def start(self, *, produce: bool = True) -> None:
        for _ in range(self.consumers):
            broker = self._broker()
            await broker.startup()
            self._brokers.append(broker)
            self._tasks.append(asyncio.create_task(self._consume(broker)))
        if produce:
            await self.start_producing()

    async def start_producing(self) -> None:
        broker = self._broker()
        await broker.startup()
        self._brokers.append(broker)
        self._producer = asyncio.create_task(self._produce(broker))

    async def _produce(self, broker: ClusterStreamBroker) -> None:
        deadline = time.monotonic() + self.max_seconds
        for i in range(int(self.max_seconds * self.rate)):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            task_id = f"{self.queue}-{i}"
            try:
                await broker.kick(make_message(task_id))
                self.kicked.add(task_id)
            except KickOutcomeUnknownError:
                self.unknown.add(task_id)
            except KickFailedError:
                self.failed += 1
            await asyncio.sleep(1 / self.rate)

    async def _consume(self, broker: ClusterStreamBroker) -> None:
        async for msg in broker.listen():
            assert isinstance(msg, AckableMessage)
            self.executed[task_id_of(msg.data)] += 1
            self.completions.append(time.time())
            await msg.ack()  # type: ignore[misc]

    async def stop_producing(self) -> None:
        self._stop.set()
        if self._producer is not None:
            await self._producer

    async def wait_all_executed(self, timeout: float = 40.0) -> set[str]:
        """What was kicked and not executed, once nothing is or after ``timeout``."""
        with contextlib.suppress(AssertionError):  # the callers report what is missing
            await eventually(lambda: self.kicked <= set(self.executed), "all executed", timeout,
                             interval=0.2)
        return self.kicked - set(self.executed)

    async def stop(self) -> None:
        self._stop.set()
        for task in [*self._tasks, *([self._producer] if self._producer else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._producer is not None:
            await asyncio.gather(self._producer, return_exceptions=True)
        for broker in self._brokers:
            await broker.shutdown()

    def stall(self, start: float, end: float) -> float:
        return _max_gap(self.completions, start, end)


def _max_gap(times: Iterable[float], start: float, end: float) -> float:
    window = sorted(t for t in times if start <= t <= end)
    points = [start, *window, end]
    return max(b - a for a, b in itertools.pairwise(points))


@contextlib.asynccontextmanager
async def _load(url: str, queue: str, **kw: Any) -> AsyncIterator[Load]:
    load = Load(url, queue, **kw)
    try:
        await load.start()
        yield load
    finally:
        await load.stop()


async def _weighted_plan(client: RedisCluster, queue: str, shards: int = 6) -> ShardPlan:
    """A plan crowding most shards onto one master (spread 3 for 6 shards)."""
    topology = await read_topology(client)
    heavy = topology.slot_masters[0].node_id
    spec = QueueSpec(queue, shards, weights={heavy: 4.0})
    plan = await PlanStore(client).get_or_create(topology, spec)
    assert balance(plan, topology).spread >= 2
    return plan


async def _purge(client: RedisCluster, queue: str) -> None:
    """Remove a test queue's plan, journal and every shard key it used."""
    store = PlanStore(client)
    plan = await store.load(queue)
    tags = {s.tag for s in plan.all_shards()} if plan is not None else set()
    for rec in await Journal(client, DEFAULT_PREFIX, queue).records():
        tags |= {rec.old.tag, rec.new.tag}
    for tag in tags:
        keys = ShardKeys(DEFAULT_PREFIX, tag)
        await client.delete(keys.dead, keys.list, keys.delayed, *keys.lanes())
    await client.delete(rebalance_journal_key(DEFAULT_PREFIX, queue))
    await store.delete(queue)


@pytest.fixture
async def queue(cluster_client: RedisCluster, unique_name: str) -> AsyncIterator[str]:
    """A unique queue name whose plan and keys are removed after the test."""
    try:
        yield unique_name
    finally:
        await _purge(cluster_client, unique_name)


async def _journal_states(client: RedisCluster, queue: str) -> list[str]:
    return [r.state.value for r in await Journal(client, DEFAULT_PREFIX, queue).records()]


async def _status_ok(client: RedisCluster, queue: str) -> tuple[bool, dict[str, int]]:
    status = await Rebalancer(client).status(queue)
    return status.ok, dict(status.report.counts)


async def _run_cli(*args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _old_keys_gone(client: RedisCluster, tags: Iterable[str]) -> bool:
    for tag in tags:
        keys = ShardKeys(DEFAULT_PREFIX, tag)
        if await client.exists(keys.dead, keys.list, *keys.lanes()):
            return False
    return True


# --------------------------------------------------------------------------
# Cluster tests (shared session cluster)
# --------------------------------------------------------------------------


@pytest.mark.cluster
async def test_plan_and_verify_commands_report_imbalance(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    await _weighted_plan(cluster_client, queue)
    code, out, _ = await _run_cli(*_cli_args(cluster_url, queue, "plan"), "--json")
    assert code == 1, out
    doc = json.loads(out)["queues"][0]
    assert doc["needed"]
    assert len(doc["moves"]) == 2
    assert sorted(doc["before"].values()) == [1, 1, 4]
    assert sorted(doc["after"].values()) == [2, 2, 2]
    code, out, _ = await _run_cli(*_cli_args(cluster_url, queue, "plan"))
    assert code == 1
    assert "2 move(s)" in out
    assert "before" in out
    code, out, _ = await _run_cli(*_cli_args(cluster_url, queue, "verify"))
    assert code == 1
    assert "NOT OK" in out
    code, _, err = await _run_cli(*_cli_args(cluster_url, "no-such-queue", "verify"))
    assert code == 2
    assert "no-such-queue" in err


@pytest.mark.cluster
@chaos(timeout=120)
async def test_kill_9_mid_move_then_rerun_completes_without_loss(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    await _weighted_plan(cluster_client, queue)
    async with _load(cluster_url, queue) as load:
        await asyncio.sleep(1.0)
        proc = await asyncio.create_subprocess_exec(
            *_cli_args(cluster_url, queue, "apply"),
            *_tuning(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async def switched() -> bool:
                assert proc.returncode is None, "the rebalancer ended before switching"
                return "switched" in await _journal_states(cluster_client, queue)

            await eventually(switched, "a move in state 'switched'", 30)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        plan = await PlanStore(cluster_client).load(queue)
        assert plan is not None
        assert plan.draining, "a move must be half done"
        # The dead rebalancer's lease blocks for its TTL; --lock-wait rides it out.
        code, out, err = await _run_cli(
            *_cli_args(cluster_url, queue, "apply"), *_tuning(), "--lock-wait", "10"
        )
        assert code == 0, out + err
        code, out, err = await _run_cli(*_cli_args(cluster_url, queue, "verify"))
        assert code == 0, out + err
        await load.stop_producing()
        lost = await load.wait_all_executed()
    print(
        f"kill -9: kicked {len(load.kicked)}, lost {len(lost)}, "
        f"duplicates {sum(c - 1 for c in load.executed.values())}"
    )
    assert not lost
    final = await PlanStore(cluster_client).load(queue)
    assert final is not None
    assert not final.draining
    old_tags = set(plan.tags() + tuple(s.tag for s in plan.draining)) - set(final.tags())
    assert await _old_keys_gone(cluster_client, old_tags)


@pytest.mark.cluster
async def test_two_rebalancers_at_once_one_exits_with_3(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    await _weighted_plan(cluster_client, queue)
    async with _load(cluster_url, queue, rate=20.0) as load:
        args = [*_cli_args(cluster_url, queue, "apply"), *_tuning()]
        (c1, o1, e1), (c2, o2, e2) = await asyncio.gather(_run_cli(*args), _run_cli(*args))
        assert sorted([c1, c2]) == [0, 3], (o1, e1, o2, e2)
        loser_err = e1 if c1 == 3 else e2
        assert "holds the lease" in loser_err
        assert "only one may run at a time" in loser_err
        await load.stop_producing()
        assert not await load.wait_all_executed()
    ok, counts = await _status_ok(cluster_client, queue)
    assert ok, counts


@pytest.mark.cluster
async def test_lease_is_exclusive_and_released(cluster_client: RedisCluster) -> None:
    prefix = f"lease{time.monotonic_ns()}"
    first = RebalanceLease(cluster_client, prefix=prefix, ttl=5)
    async with first:
        first.check()
        with pytest.raises(RebalanceLockedError) as info:
            await RebalanceLease(cluster_client, prefix=prefix, ttl=5).acquire()
        assert first.token in str(info.value)
    # Released with compare-and-delete: the next one gets it at once.
    async with RebalanceLease(cluster_client, prefix=prefix, ttl=5) as second:
        second.check()


@pytest.mark.cluster
async def test_timeout_reverts_the_move_and_a_later_run_finishes(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    plan = await _weighted_plan(cluster_client, queue)
    # Every task is held by a live consumer that never acknowledges: the
    # rebalancer may not take them (only a dead consumer's entries are
    # copied), so nothing can drain.
    producer = ClusterStreamBroker(cluster_url, queue_name=queue, plan_poll_interval=POLL)
    await producer.startup()
    kicked = [f"{queue}-{i}" for i in range(60)]
    try:
        for task_id in kicked:
            await producer.kick(make_message(task_id))
    finally:
        await producer.shutdown()
    # The group exists on the old shards, as with real consumers, and the
    # consumer "holder" has read every entry.
    for shard in plan.shards:
        stream = ShardKeys(DEFAULT_PREFIX, shard.tag).stream
        with contextlib.suppress(Exception):
            await cluster_client.xgroup_create(stream, "taskiq", id="0", mkstream=True)
        await cluster_client.xreadgroup("taskiq", "holder", {stream: ">"})
    events: list[RebalanceEvent] = []
    rebalancer = Rebalancer(
        cluster_client, options=_opts(move_timeout=1.0, max_moves_at_once=1), on_event=events.append
    )
    with pytest.raises(RebalanceAbortedError, match="did not drain") as info:
        await rebalancer.apply([queue])
    assert "draining" in str(info.value)
    reverted = await PlanStore(cluster_client).load(queue)
    assert reverted is not None
    # The old plan is in force again; the new tag is draining.
    assert reverted.tags() == plan.tags()
    assert len(reverted.draining) == 1
    assert [e.kind for e in events].count(RebalanceEventKind.REVERTED) == 1
    states = await _journal_states(cluster_client, queue)
    assert states == ["switched"]
    # With consumers running, a rerun drains the new tag and then moves.
    from prometheus_client import CollectorRegistry

    from taskiq_redis_cluster._metrics import PrometheusEvents

    registry = CollectorRegistry()
    metrics = PrometheusEvents(registry)
    async with _load(cluster_url, queue, consumers=1) as load:
        await load.stop_producing()
        results = await Rebalancer(
            cluster_client,
            options=_opts(),
            on_event=metrics.rebalance_event,
            run_hook=metrics.track_rebalance,
        ).apply([queue])
        assert results[0].resumed == 1
        assert results[0].moves == 2
        executed = load.executed
        await eventually(lambda: set(kicked) <= set(executed), "every kick executed", 20,
                         interval=0.2)
        assert not set(kicked) - set(executed)
    ok, counts = await _status_ok(cluster_client, queue)
    assert ok, counts
    moves = "taskiq_redis_cluster_rebalance_moves_total"
    assert registry.get_sample_value(moves, {"queue": queue, "result": "done"}) == 2
    assert registry.get_sample_value("taskiq_redis_cluster_rebalance_in_progress") == 0


# --------------------------------------------------------------------------
# Worker subprocess + stall
# --------------------------------------------------------------------------

_WORKER_MODULE = """
import os
import time

from taskiq_redis_cluster import ClusterStreamBroker


broker = ClusterStreamBroker(
    os.environ["RBW_URL"], queue_name=os.environ["RBW_QUEUE"], plan_poll_interval=0.5,
    idle_timeout=2000, xread_block=200,
)
OUT = os.environ["RBW_OUT"]


@broker.task(task_name="rbw:record")
async def record(task_id: str) -> None:
    with open(OUT, "a") as fh:
        fh.write(f"{task_id} {time.time():.4f}\\n")
"""


def _spawn(
    args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process in its own session, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _record_message(task_id: str) -> BrokerMessage:
    return make_message(task_id, "rbw:record", args=[task_id])


def _read_records(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            rows.append((parts[0], float(parts[1])))
    return rows


@pytest.mark.cluster
async def test_real_worker_keeps_running_through_moves_stall_is_short(
    cluster_client: RedisCluster, cluster_url: str, queue: str, tmp_path: Path
) -> None:
    await _weighted_plan(cluster_client, queue)
    (tmp_path / "rbw_tasks.py").write_text(_WORKER_MODULE)
    out = tmp_path / "executed.txt"
    env = {
        **os.environ,
        "RBW_URL": cluster_url,
        "RBW_QUEUE": queue,
        "RBW_OUT": str(out),
        "PYTHONPATH": str(tmp_path),
    }
    worker = _spawn(
        [
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            "rbw_tasks:broker",
            "--workers",
            "1",
            "--shutdown-timeout",
            "5",
        ],
        tmp_path,
        tmp_path / "worker.log",
        env,
    )
    producer = ClusterStreamBroker(cluster_url, queue_name=queue, plan_poll_interval=POLL)
    await producer.startup()
    kicked: list[str] = []
    stop = asyncio.Event()

    async def produce() -> None:
        for i in range(6000):  # bounded: stop is set long before
            if stop.is_set():
                return
            task_id = f"w{i}"
            await producer.kick(_record_message(task_id))
            kicked.append(task_id)
            await asyncio.sleep(0.025)

    producing: asyncio.Task[None] | None = None
    try:
        await producer.kick(_record_message("warmup"))
        def consuming() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            return bool(_read_records(out))

        await eventually(consuming, "the worker consuming", 30, interval=0.1)
        producing = asyncio.create_task(produce())
        await asyncio.sleep(1.0)
        moves: list[float] = []

        def on_event(event: RebalanceEvent) -> None:
            if event.kind in (RebalanceEventKind.SWITCHED, RebalanceEventKind.CLEANED):
                moves.append(time.time())

        started = time.time()
        results = await Rebalancer(cluster_client, options=_opts(), on_event=on_event).apply(
            [queue]
        )
        ended = time.time()
        assert results[0].moves == 2
        await asyncio.sleep(1.0)
        stop.set()
        await producing
        with contextlib.suppress(AssertionError):  # what is lost is reported below
            await eventually(lambda: set(kicked) <= {r[0] for r in _read_records(out)},
                             "every kick recorded", 30, interval=0.2)
        records = _read_records(out)
        lost = set(kicked) - {r[0] for r in records}
        stall = _max_gap((t for _, t in records), started, ended)
        print(
            f"real worker: kicked {len(kicked)}, lost {len(lost)}, rebalance took "
            f"{ended - started:.1f}s, longest gap between completions {stall:.2f}s"
        )
        assert not lost
        assert stall < 10.0
        ok, counts = await _status_ok(cluster_client, queue)
        assert ok, counts
    finally:
        stop.set()
        if producing is not None:
            await asyncio.gather(producing, return_exceptions=True)
        await producer.shutdown()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(worker.wait, 15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            await asyncio.to_thread(worker.wait, 5)


# --------------------------------------------------------------------------
# Resharding the shared cluster (restored afterwards)
# --------------------------------------------------------------------------


async def _redis_cli(*args: str, timeout: float = 120.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    return text


async def _reshard(port: int, source: str, target: str, count: int) -> None:
    await _redis_cli(
        "--cluster",
        "reshard",
        f"127.0.0.1:{port}",
        "--cluster-from",
        source,
        "--cluster-to",
        target,
        "--cluster-slots",
        str(count),
        "--cluster-yes",
    )


def _plan_on(
    topology: Topology, queue: str, epoch: int, wanted: Sequence[tuple[str, frozenset[int] | None]]
) -> ShardPlan:
    """Shard i on master wanted[i][0], in the slot set wanted[i][1] if given."""
    owners = topology.slot_owners
    used: set[int] = set()
    shards = []
    for index, (master, allowed) in enumerate(wanted):
        for salt, slot in shard_tag_slots(queue, index, 0, 500_000):
            if owners[slot] == master and slot not in used and (allowed is None or slot in allowed):
                used.add(slot)
                shards.append(Shard(index, shard_tag(queue, index, salt), slot, master))
                break
        else:
            raise AssertionError(f"no tag for shard {index}")
    return ShardPlan(queue, epoch, tuple(shards))


@pytest.mark.cluster
async def test_reshard_a_third_then_apply_restores_balance_without_loss(
    healthy_cluster: DevCluster,
    cluster_client: RedisCluster,
    cluster_url: str,
    queue: str,
) -> None:
    topology = await read_topology(cluster_client)
    a = topology.owner_of(0)
    assert a is not None
    b = next(m for m in topology.slot_masters if m.node_id != a.node_id)
    c = next(m for m in topology.slot_masters if m.node_id not in (a.node_id, b.node_id))
    a_slots = [s for s in range(16384) if topology.slot_owners[s] == a.node_id]
    moved_count = len(a_slots) // 3
    # redis-cli reshard takes the source's lowest slots: put A's shards there,
    # so the reshard certainly carries them to B.
    low = frozenset(a_slots[:moved_count])
    wanted = [(a.node_id, low), (b.node_id, None), (c.node_id, None)] * 4
    store = PlanStore(cluster_client)
    await store.get_or_create(topology, QueueSpec(queue, 12))
    assert await store.compare_and_swap(_plan_on(topology, queue, 2, wanted), expected_epoch=1)
    port = a.address.port
    async with _load(cluster_url, queue) as load:
        await asyncio.sleep(1.0)
        try:
            await _reshard(port, a.node_id, b.node_id, moved_count)
            await healthy_cluster.wait_healthy()
            after = await read_topology(cluster_client)
            report = balance((await store.load(queue)) or _plan(1, []), after)
            assert sorted(report.counts.values()) == [0, 4, 8], report
            started = time.time()
            code, out, err = await _run_cli(*_cli_args(cluster_url, queue, "apply"), *_tuning())
            ended = time.time()
            assert code == 0, out + err
            ok, counts = await _status_ok(cluster_client, queue)
            assert ok, counts
            assert max(counts.values()) - min(counts.values()) <= 1, counts
            await load.stop_producing()
            lost = await load.wait_all_executed()
            print(
                f"reshard: kicked {len(load.kicked)}, lost {len(lost)}, moves took "
                f"{ended - started:.1f}s, longest gap between completions "
                f"{load.stall(started, ended):.2f}s"
            )
            assert not lost
            assert load.stall(started, ended) < 10.0
        finally:
            # Give the slots back so the session cluster stays as it was.
            now = await read_topology(cluster_client)
            back = [s for s in low if now.slot_owners[s] == b.node_id]
            if back:
                await _reshard(port, b.node_id, a.node_id, len(back))
            await healthy_cluster.wait_healthy()
            final = await read_topology(cluster_client)
            assert all(final.slot_owners[s] == a.node_id for s in low)


# --------------------------------------------------------------------------
# Adding a fourth master (a separate small cluster)
# --------------------------------------------------------------------------


@pytest.mark.cluster
async def test_fourth_master_gets_its_share_of_shards(tmp_path: Path, unique_name: str) -> None:
    base = find_free_base_port(4)
    extra_port = base + 3
    cluster = DevCluster(masters=3, replicas=0, base_port=base, directory=tmp_path / "c3")
    node_dir = tmp_path / "extra"
    node_dir.mkdir()
    (node_dir / "redis.conf").write_text(
        f"port {extra_port}\nbind 127.0.0.1\nprotected-mode no\ncluster-enabled yes\n"
        f"cluster-config-file nodes-{extra_port}.conf\ncluster-node-timeout 1500\n"
        f'dir {node_dir}\nappendonly no\nsave ""\n'
    )
    extra: subprocess.Popen[bytes] | None = None
    queue = unique_name
    await cluster.start()
    try:
        client = await connect(cluster.url)
        try:
            # A 12-shard plan (4 per master) and live traffic. redis-cli moves
            # each source's lowest slots; keeping the shards above them makes
            # the new master start empty, so our rebalancer has to move 3.
            topology = await read_topology(client)
            # This small cluster has no replicas to confirm plan changes.
            store = PlanStore(client, require_replica=False)
            await store.get_or_create(topology, QueueSpec(queue, 12))
            upper = {
                m.node_id: frozenset(
                    s for s in range(16384) if topology.slot_owners[s] == m.node_id
                )
                - frozenset(
                    sorted(s for s in range(16384) if topology.slot_owners[s] == m.node_id)[:2000]
                )
                for m in topology.slot_masters
            }
            wanted = [(m, upper[m]) for m in sorted(upper)] * 4
            assert await store.compare_and_swap(
                _plan_on(topology, queue, 2, wanted), expected_epoch=1
            )
            async with _load(cluster.url, queue, consumers=1, rate=25.0) as load:
                extra = _spawn(
                    ["redis-server", str(node_dir / "redis.conf")],
                    node_dir,
                    node_dir / "redis.log",
                )
                for _ in range(100):
                    try:
                        await _redis_cli("-p", str(extra_port), "ping", timeout=5)
                        break
                    except AssertionError:
                        await asyncio.sleep(0.1)
                await _redis_cli(
                    "--cluster", "add-node", f"127.0.0.1:{extra_port}", f"127.0.0.1:{base}"
                )
                # The new node must be known everywhere before redis-cli rebalances
                # (otherwise it sees nothing to do).
                ports = [base, base + 1, base + 2, extra_port]
                for _ in range(200):
                    views = [await _redis_cli("-p", str(p), "cluster", "nodes") for p in ports]
                    infos = [await _redis_cli("-p", str(p), "cluster", "info") for p in ports]
                    if all(v.count("master") == 4 and "handshake" not in v for v in views) and all(
                        "cluster_state:ok" in i for i in infos
                    ):
                        break
                    await asyncio.sleep(0.1)
                for attempt in range(20):
                    await _redis_cli(
                        "--cluster",
                        "rebalance",
                        f"127.0.0.1:{base}",
                        "--cluster-use-empty-masters",
                        timeout=180,
                    )
                    topology = await read_topology(client)
                    if len(topology.slot_masters) == 4 and not topology.migrating:
                        break
                    assert attempt < 19, "redis-cli did not give the new master slots"
                    await asyncio.sleep(0.5)
                new_id = next(m.node_id for m in topology.masters if m.address.port == extra_port)
                before = (await Rebalancer(client).status(queue, topology)).report.counts
                assert sorted(before.values()) == [0, 4, 4, 4]
                results = await Rebalancer(
                    client, options=_opts(max_moves_at_once=3), store=store
                ).apply([queue])
                assert results[0].moves == 3
                status = await Rebalancer(client).status(queue)
                assert status.ok, status.to_dict()
                assert sorted(status.report.counts.values()) == [3, 3, 3, 3]
                assert status.report.counts[new_id] == 3
                await load.stop_producing()
                lost = await load.wait_all_executed()
                print(f"4th master: kicked {len(load.kicked)}, lost {len(lost)}")
                assert not lost
        finally:
            await client.aclose()
    finally:
        try:
            if extra is not None:
                extra.terminate()
                try:
                    await asyncio.to_thread(extra.wait, 10)
                except subprocess.TimeoutExpired:
                    extra.kill()
                    await asyncio.to_thread(extra.wait, 5)
        finally:
            await cluster.stop()


@pytest.mark.cluster
async def test_journal_lives_next_to_the_plan(cluster_client: RedisCluster) -> None:
    from redis.crc import key_slot

    from taskiq_redis_cluster._keys import plan_key

    assert key_slot(rebalance_journal_key("p", "q").encode()) == key_slot(
        plan_key("p", "q").encode()
    )


@pytest.mark.cluster
async def test_watch_once_rebalances_and_moves_dead_letters(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    await _weighted_plan(cluster_client, queue)
    preview = await Rebalancer(cluster_client).preview(queue)
    move = preview.moves[0]
    old_dead = ShardKeys(DEFAULT_PREFIX, move.old.tag).dead
    for i in range(3):
        await cluster_client.xadd(old_dead, {b"reason": b"test", b"field:data": f"d{i}".encode()})
    async with _load(cluster_url, queue, consumers=1, rate=10.0) as load:
        code, out, err = await _run_cli(
            *_cli_args(cluster_url, queue, "watch"),
            *_tuning(),
            "--poll-interval",
            "0.2",
            "--settle-polls",
            "2",
            "--once",
            "--json",
        )
        assert code == 0, out + err
        assert json.loads(out) == {"rebalances": 1}
        ok, counts = await _status_ok(cluster_client, queue)
        assert ok, counts
        # The old shard's dead letters now sit in the dead stream of the shard
        # that holds the index, marked with where they came from.
        plan = await PlanStore(cluster_client).load(queue)
        assert plan is not None
        new_dead = ShardKeys(DEFAULT_PREFIX, plan.shards[move.index].tag).dead
        entries: list[Any] = await cluster_client.xrange(new_dead) or []
        assert [f[b"field:data"] for _, f in entries] == [b"d0", b"d1", b"d2"]
        assert all(f[b"moved_from"] == old_dead.encode() for _, f in entries)
        assert not await cluster_client.exists(old_dead)
        # A producer with a very stale plan recreates the removed shard: the
        # balanced queue needs no apply, yet watch sweeps the entry to the
        # live shard on its next pass, so the task still runs.
        old_stream = ShardKeys(DEFAULT_PREFIX, move.old.tag).stream
        await cluster_client.xadd(old_stream, {b"data": make_message("stranded-1").message})
        code, out, err = await _run_cli(
            *_cli_args(cluster_url, queue, "watch"),
            *_tuning(),
            "--poll-interval",
            "0.2",
            "--max-runtime",
            "1.5",
            "--json",
        )
        assert code == 0, out + err
        assert json.loads(out) == {"rebalances": 0}
        assert not await cluster_client.exists(old_stream)
        await eventually(lambda: load.executed["stranded-1"], "stranded-1 executed", 10,
                         interval=0.1)
        assert load.executed["stranded-1"] == 1
        # apply sweeps too, before it plans.
        await cluster_client.xadd(old_stream, {b"data": make_message("stranded-2").message})
        code, out, err = await _run_cli(*_cli_args(cluster_url, queue, "apply"), *_tuning())
        assert code == 0, out + err
        assert "0 move(s), swept 1 stranded" in out
        assert not await cluster_client.exists(old_stream)
        await eventually(lambda: load.executed["stranded-2"], "stranded-2 executed", 10,
                         interval=0.1)
        assert load.executed["stranded-2"] == 1
        await load.stop_producing()
        assert not await load.wait_all_executed()
    ok, counts = await _status_ok(cluster_client, queue)
    assert ok, counts


class _FakeTTY:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_line_on_a_terminal() -> None:
    from taskiq_redis_cluster._cli._cmd_rebalance import _Progress

    out = _FakeTTY()
    progress = _Progress(out)  # type: ignore[arg-type]
    progress(
        RebalanceEvent(RebalanceEventKind.SWITCHED, "q", 3, "q/3~0", "q/3~4", epoch=7, total=2)
    )
    progress(
        RebalanceEvent(
            RebalanceEventKind.WAITING,
            "q",
            3,
            "q/3~0",
            "q/3~4",
            "q/3~0",
            undelivered=5,
            pending=2,
            done=1,
            total=2,
        )
    )
    progress.close()
    assert "switched to q/3~4 (epoch 7)" in out.text
    assert "\r\x1b[K[##########..........] 1/2 queue q shard 3: draining q/3~0" in out.text
    assert out.text.endswith("\r\x1b[K")


# --------------------------------------------------------------------------
# Moves without workers: the rebalancer copies (issue 14 parts 1 and 2b)
# --------------------------------------------------------------------------


async def _kick_all(url: str, queue: str, task_ids: Sequence[str], **labels: Any) -> None:
    producer = ClusterStreamBroker(url, queue_name=queue, plan_poll_interval=POLL)
    await producer.startup()
    try:
        await asyncio.gather(*(producer.kick(make_message(t, **labels)) for t in task_ids))
    finally:
        await producer.shutdown()


async def _create_groups(client: RedisCluster, tags: Iterable[str], group: str = "taskiq") -> None:
    """What a worker leaves behind once stopped: the group on every shard stream."""
    for tag in tags:
        with contextlib.suppress(Exception):
            await client.xgroup_create(
                ShardKeys(DEFAULT_PREFIX, tag).stream, group, id="0", mkstream=True
            )


async def _drain_all(url: str, queue: str, want: int, timeout: float = 60.0) -> Counter[str]:
    """Start a consumer now and count every task id it gets until ``want`` distinct ones."""
    broker = ClusterStreamBroker(
        url, queue_name=queue, plan_poll_interval=POLL, xread_block=200, idle_timeout=60_000
    )
    await broker.startup()
    got: Counter[str] = Counter()
    gen = broker.listen()

    async def run() -> None:
        async for msg in gen:
            assert isinstance(msg, AckableMessage)
            got[task_id_of(msg.data)] += 1
            await msg.ack()  # type: ignore[misc]
            if len(got) >= want:
                return

    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run(), timeout)
    finally:
        await gen.aclose()
        await broker.shutdown()
    return got


@pytest.mark.cluster
async def test_move_without_workers_copies_the_backlog_in_order(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    plan = await _weighted_plan(cluster_client, queue)
    # One partition key: every task lands on one shard, which must move.
    preview = await Rebalancer(cluster_client).preview(queue)
    moving = {m.index for m in preview.moves}
    key = next(f"k{i}" for i in range(10_000) if slot_of(f"k{i}") % 6 in moving)
    kicked = [f"{queue}-{i:04d}" for i in range(300)]
    for chunk in range(0, len(kicked), 50):  # in order: one chunk after the other
        await _kick_all(cluster_url, queue, kicked[chunk : chunk + 50], partition_key=key)
    # Workers ran before (their groups exist) but none runs now.
    await _create_groups(cluster_client, plan.tags())
    events: list[RebalanceEvent] = []
    started = time.monotonic()
    results = await Rebalancer(cluster_client, options=_opts(), on_event=events.append).apply(
        [queue]
    )
    took = time.monotonic() - started
    assert results[0].moves == 2
    ok, counts = await _status_ok(cluster_client, queue)
    assert ok, counts
    copied = sum(e.done for e in events if e.kind is RebalanceEventKind.COPIED)
    assert copied >= 300
    # A consumer started afterwards gets everything, and one key's tasks in
    # the order they were kicked (the copy kept it).
    broker = ClusterStreamBroker(cluster_url, queue_name=queue, xread_block=200)
    await broker.startup()
    try:
        got = [task_id_of(m.data) for m in await take(broker, len(kicked), timeout=30)]
    finally:
        await broker.shutdown()
    print(f"no workers: 300 entries moved in {took:.1f}s (settle windows included)")
    assert sorted(got) == kicked
    chunks = [sorted(kicked[c : c + 50]) for c in range(0, 300, 50)]
    assert [sorted(got[c : c + 50]) for c in range(0, 300, 50)] == chunks


async def _lane_ids(client: RedisCluster, keys: ShardKeys, lanes: int) -> list[list[str]]:
    """Task ids in each lane stream of a shard, in stream order."""
    out: list[list[str]] = []
    for lane in range(lanes):
        rows: list[Any] = await client.xrange(keys.lane(lane)) or []
        out.append([task_id_of(fields[b"data"]) for _, fields in rows])
    return out


@pytest.mark.cluster
async def test_move_without_workers_keeps_every_entry_in_its_priority_lane(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    """Issue 16: lanes move like the shard's stream: same lane on the new tag,
    nothing lost, the old lane keys deleted, and a stale producer's priority
    kick (plan never re-polled) lands on the new tag's lane."""
    await _weighted_plan(cluster_client, queue)
    preview = await Rebalancer(cluster_client).preview(queue)
    moving = {m.index: m for m in preview.moves}
    key = next(f"k{i}" for i in range(10_000) if slot_of(f"k{i}") % 6 in moving)
    move = moving[slot_of(key) % 6]
    # Default options: 3 lanes, max_priority 9 -> 0: lane 0, 3: lane 1, 9: lane 2.
    wanted: list[list[str]] = [[], [], []]
    for lane, priority in ((0, None), (1, 3), (2, 9)):
        ids = [f"{queue}-l{lane}-{i:03d}" for i in range(40)]
        labels: dict[str, Any] = {"partition_key": key}
        if priority is not None:
            labels["priority"] = priority
        for chunk in range(0, len(ids), 20):  # in order: one chunk after the other
            await _kick_all(cluster_url, queue, ids[chunk : chunk + 20], **labels)
        wanted[lane] = ids
    # A delayed task bound for lane 2, not due for a minute: copied raw.
    await _kick_all(cluster_url, queue, [f"{queue}-later"], partition_key=key, priority=9,
                    delay=60)
    old = ShardKeys(DEFAULT_PREFIX, move.old.tag)
    got = await _lane_ids(cluster_client, old, 3)
    assert [sorted(ids) for ids in got] == wanted
    # A producer whose plan is frozen at the old epoch (it never polls again).
    stale = ClusterStreamBroker(cluster_url, queue_name=queue, plan_poll_interval=3600)
    await stale.startup()
    try:
        results = await Rebalancer(cluster_client, options=_opts()).apply([queue])
        assert results[0].moves == 2
        ok, counts = await _status_ok(cluster_client, queue)
        assert ok, counts
        plan = await PlanStore(cluster_client).load(queue)
        assert plan is not None
        new = ShardKeys(DEFAULT_PREFIX, plan.shards[move.index].tag)
        assert new.tag != old.tag
        # Every entry in the same lane on the new tag, each once.
        got = await _lane_ids(cluster_client, new, 3)
        assert [sorted(ids) for ids in got] == wanted
        assert [len(set(ids)) for ids in got] == [40, 40, 40]
        # The delayed member went along with its lane marker.
        members: list[bytes] = await cluster_client.zrange(new.delayed, 0, -1)
        assert len(members) == 1
        assert members[0].startswith(b"\0L2\0")
        # Every old stream is gone: lane kicks into them are refused (NOMKSTREAM).
        assert not await cluster_client.exists(*old.lanes(), old.delayed)
        await stale.kick(make_message(f"{queue}-stale", partition_key=key, priority=9))
        assert not await cluster_client.exists(*old.lanes())
        got = await _lane_ids(cluster_client, new, 3)
        assert got[2][-1] == f"{queue}-stale"
        assert sorted(got[2][:-1]) == wanted[2]
        # Something that still recreates an old lane (an old producer version):
        # the sweep moves it to the same lane of the live shard.
        await cluster_client.xadd(old.lane(1), {b"data": make_message(f"{queue}-swept").message})
        assert await Rebalancer(cluster_client, options=_opts()).sweep([queue]) == 1
        assert not await cluster_client.exists(*old.lanes())
        got = await _lane_ids(cluster_client, new, 3)
        assert got[1][-1] == f"{queue}-swept"
        # A delayed kick into the retired shard (the list broker's cannot be
        # fenced) leaves only its delayed set there: swept too.
        await cluster_client.zadd(old.delayed, {b"late-member": 1})
        assert await Rebalancer(cluster_client, options=_opts()).sweep([queue]) == 1
        assert not await cluster_client.exists(old.delayed)
        assert await cluster_client.zscore(new.delayed, b"late-member") == 1
        await cluster_client.zrem(new.delayed, b"late-member")
    finally:
        await stale.shutdown()
    # A worker started now gets all of it, lane by lane.
    drained = await _drain_all(cluster_url, queue, 122, timeout=30)
    assert set(drained) == {
        *(i for ids in wanted for i in ids), f"{queue}-stale", f"{queue}-swept"
    }


async def _stream_ids(client: RedisCluster, keys: ShardKeys) -> list[str]:
    rows: list[Any] = await client.xrange(keys.stream) or []
    return [task_id_of(fields[b"data"]) for _, fields in rows]


async def _pttl_at(client: RedisCluster, key: str) -> tuple[int, float]:
    """A key's PTTL, and the latest monotonic time (ms) it can have been read at."""
    pttl = int(await client.pttl(key))
    return pttl, time.monotonic() * 1000


@pytest.mark.cluster
async def test_move_takes_dedup_markers_along(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    """A key kicked before the move, or by a stale producer during it, stays
    held on the new tag by the same task id with no more than what was left
    of its TTL; the old markers go with the old shard."""
    await _weighted_plan(cluster_client, queue)
    preview = await Rebalancer(cluster_client).preview(queue)
    moving = {m.index: m for m in preview.moves}
    key = next(f"k{i}" for i in range(10_000) if slot_of(f"k{i}") % 6 in moving)
    move = moving[slot_of(key) % 6]
    old = ShardKeys(DEFAULT_PREFIX, move.old.tag)
    await _kick_all(cluster_url, queue, [f"{queue}-first"], partition_key=key, dedup_key="K",
                    dedup_ttl=600)
    # A short TTL: the copy must let it run out when the original would have.
    await _kick_all(cluster_url, queue, [f"{queue}-brief"], partition_key=key,
                    dedup_key="brief", dedup_ttl=2)
    brief_gone_at = time.monotonic() + 2.0
    ttl_before, read_by = await _pttl_at(cluster_client, old.dedup("K"))
    assert 0 < ttl_before <= 600_000
    # A producer whose plan is frozen at the old epoch kicks a new key while
    # the move runs, after the switch: its marker lands on the old tag.
    stale = ClusterStreamBroker(cluster_url, queue_name=queue, plan_poll_interval=3600)
    await stale.startup()
    stale_kicks: list[asyncio.Task[Any]] = []

    def on_event(event: RebalanceEvent) -> None:
        if event.kind is RebalanceEventKind.SWITCHED and event.index == move.index:
            stale_kicks.append(asyncio.get_running_loop().create_task(stale.kick(
                make_message(f"{queue}-stale", partition_key=key, dedup_key="S")
            )))

    fresh = ClusterStreamBroker(cluster_url, queue_name=queue, plan_poll_interval=POLL)
    try:
        results = await Rebalancer(cluster_client, options=_opts(), on_event=on_event).apply(
            [queue]
        )
        assert results[0].moves == 2
        assert len(stale_kicks) == 1
        await stale_kicks[0]
        plan = await PlanStore(cluster_client).load(queue)
        assert plan is not None
        new = ShardKeys(DEFAULT_PREFIX, plan.shards[move.index].tag)
        assert new.tag != old.tag
        # Same task ids; the TTL was not extended by the copy.
        assert await cluster_client.get(new.dedup("K")) == f"{queue}-first".encode()
        assert await cluster_client.get(new.dedup("S")) == f"{queue}-stale".encode()
        started = time.monotonic() * 1000
        ttl_after, _ = await _pttl_at(cluster_client, new.dedup("K"))
        assert ttl_after > 0
        assert started + ttl_after <= read_by + ttl_before + 1
        # The old markers went with the old shard's streams.
        assert not await cluster_client.exists(old.dedup("K"), old.dedup("S"), *old.lanes())
        # Kicks of the held keys after the move are duplicates: from a
        # producer on the new plan, and from the stale one (its kick into the
        # deleted stream is refused, it re-reads the plan and kicks again).
        await fresh.startup()
        assert await fresh.dedup_task_id("K", partition_key=key) == f"{queue}-first"
        assert await fresh.dedup_task_id("S", partition_key=key) == f"{queue}-stale"
        for task_id, dedup_key in ((f"{queue}-again", "K"), (f"{queue}-again-s", "S")):
            await fresh.kick(make_message(task_id, partition_key=key, dedup_key=dedup_key))
        await stale.kick(make_message(f"{queue}-stale-again", partition_key=key, dedup_key="K"))
        assert not await cluster_client.exists(*old.lanes())
        got = Counter(await _stream_ids(cluster_client, new))
        assert got == Counter([f"{queue}-first", f"{queue}-brief", f"{queue}-stale"])
        # The short marker runs out when its original would have: not revived,
        # not extended; the key can then be queued again.
        await asyncio.sleep(max(0.0, brief_gone_at - time.monotonic()) + 0.05)
        assert not await cluster_client.exists(new.dedup("brief"), old.dedup("brief"))
        assert await fresh.dedup_task_id("brief", partition_key=key) is None
        await fresh.kick(make_message(f"{queue}-brief-2", partition_key=key, dedup_key="brief"))
        assert (await _stream_ids(cluster_client, new))[-1] == f"{queue}-brief-2"
        await cluster_client.delete(new.dedup("K"), new.dedup("S"), new.dedup("brief"))
    finally:
        await fresh.shutdown()
        await stale.shutdown()


@pytest.mark.cluster
async def test_marker_copy_keeps_ttls_and_never_overwrites_or_revives(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    from taskiq_redis_cluster._rebalance._copy import ShardCopier

    src_tag, dst_tag = _tags(unique_name, 2)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    names = [f"k{i}" for i in range(20)] + ["odd{key}:*?", "forever", "gone"]
    copier = ShardCopier(cluster_client, DEFAULT_PREFIX, _opts(copy_batch=7))
    try:
        for i, name in enumerate(names[:21]):
            await cluster_client.set(src.dedup(name), f"t{i}", px=60_000 + i)
        await cluster_client.set(src.dedup("forever"), "t-forever")
        await cluster_client.set(src.dedup("gone"), "t-gone", px=100)
        # A key of the slot that is no marker; and a marker a producer on the
        # new plan set first.
        await cluster_client.zadd(src.delayed, {"x": 1})
        await cluster_client.set(dst.dedup("k0"), "fresh", px=5_000)
        await asyncio.sleep(0.3)  # "gone" expired (maybe not yet evicted)
        before = {name: await _pttl_at(cluster_client, src.dedup(name)) for name in names[:21]}
        assert await copier.copy_markers(src_tag, dst_tag) == 21  # all but k0 and gone
        for i, name in enumerate(names[:21]):
            started = time.monotonic() * 1000
            ttl, _ = await _pttl_at(cluster_client, dst.dedup(name))
            if name == "k0":
                assert await cluster_client.get(dst.dedup(name)) == b"fresh"
                assert ttl <= 5_000
                continue
            assert await cluster_client.get(dst.dedup(name)) == f"t{i}".encode()
            ttl_src, read_by = before[name]
            assert ttl > 0, name
            assert started + ttl <= read_by + ttl_src + 1, name
        assert await cluster_client.get(dst.dedup("forever")) == b"t-forever"
        assert await cluster_client.pttl(dst.dedup("forever")) == -1
        assert not await cluster_client.exists(dst.dedup("gone"), dst.delayed)
        # A rerun writes nothing; with delete the source markers go, the
        # rest of the slot stays.
        assert await copier.copy_markers(src_tag, dst_tag) == 0
        assert await cluster_client.exists(*(src.dedup(n) for n in names[:22])) == 22
        assert await copier.copy_markers(src_tag, dst_tag, delete=True) == 0
        assert not await cluster_client.exists(*(src.dedup(n) for n in names))
        assert await cluster_client.exists(src.delayed)
        assert await cluster_client.get(dst.dedup("k1")) == b"t1"
    finally:
        for keys in (src, dst):
            await cluster_client.delete(keys.delayed, *(keys.dedup(n) for n in names))


@pytest.mark.cluster
async def test_marker_listing_waits_while_the_slot_migrates(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    """GETKEYSINSLOT answers for part of a migrating slot without an error;
    the listing notices (ASK on its probe) and waits for a stable owner."""
    from taskiq_redis_cluster._rebalance._copy import ShardCopier

    src_tag, dst_tag = _tags(unique_name, 2)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    owner = cluster_client.get_node_from_key(src.stream)
    assert owner is not None
    other = next(n for n in cluster_client.get_primaries() if n.name != owner.name)
    other_id = await cluster_client.execute_command("CLUSTER MYID", target_nodes=other)
    copier = ShardCopier(cluster_client, DEFAULT_PREFIX, _opts())
    try:
        for i in range(5):
            await cluster_client.set(src.dedup(f"k{i}"), f"t{i}", px=60_000)
        await cluster_client.execute_command(
            "CLUSTER SETSLOT", src.slot, "MIGRATING", other_id, target_nodes=owner
        )
        started = time.monotonic()
        copy = asyncio.create_task(copier.copy_markers(src_tag, dst_tag))
        await asyncio.sleep(0.8)
        assert not copy.done()
        await cluster_client.execute_command(
            "CLUSTER SETSLOT", src.slot, "STABLE", target_nodes=owner
        )
        assert await asyncio.wait_for(copy, 10) == 5
        assert time.monotonic() - started >= 0.8
    finally:
        await cluster_client.execute_command(
            "CLUSTER SETSLOT", src.slot, "STABLE", target_nodes=owner
        )
        await cluster_client.delete(*(k.dedup(f"k{i}") for k in (src, dst) for i in range(5)))


def _tags(queue: str, n: int) -> list[str]:
    return [shard_tag(queue, i, 0) for i in range(n)]


@pytest.mark.cluster
async def test_copy_takes_each_entry_once_over_groups_and_ungrouped(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    src_tag, dst_tag, bare_tag, bare_dst = _tags(unique_name, 4)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    bare, bare_out = ShardKeys(DEFAULT_PREFIX, bare_tag), ShardKeys(DEFAULT_PREFIX, bare_dst)
    try:
        for i in range(100):
            await cluster_client.xadd(src.stream, {b"data": f"e{i}".encode()})
            await cluster_client.xadd(bare.stream, {b"data": f"b{i}".encode()})
        # Two groups at different positions: g2 has had the first 50 and
        # acknowledged 40 of them; a live consumer of g2 holds the other 10.
        await cluster_client.xgroup_create(src.stream, "g1", id="0")
        await cluster_client.xgroup_create(src.stream, "g2", id="0")
        read = await cluster_client.xreadgroup("g2", "live", {src.stream: ">"}, count=50)
        ids = [entry_id for entry_id, _ in read[0][1]]
        await cluster_client.xack(src.stream, "g2", *ids[:40])
        rebalancer = Rebalancer(cluster_client, options=_opts(copy_batch=30))
        copied = await rebalancer.copy_entries(src_tag, dst_tag)
        assert copied == 100
        out = [f[b"data"] for _, f in await cluster_client.xrange(dst.stream)]
        # Each entry once, in order: the groups were aligned, not copied apart.
        assert out == [f"e{i}".encode() for i in range(100)]
        state = await rebalancer.drain_state(src_tag)
        assert (state.undelivered, state.pending) == (0, 10)  # the live consumer's
        # A stream no consumer ever read (no group): copied and deleted.
        assert await rebalancer.copy_entries(bare_tag, bare_dst) == 100
        assert await cluster_client.xlen(bare.stream) == 0
        assert (await rebalancer.drain_state(bare_tag)).drained
        assert [f[b"data"] for _, f in await cluster_client.xrange(bare_out.stream)] == [
            f"b{i}".encode() for i in range(100)
        ]
    finally:
        for keys in (src, dst, bare, bare_out):
            await cluster_client.delete(keys.stream)


@pytest.mark.cluster
async def test_copy_takes_dead_consumers_entries_and_leaves_live_ones(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    src_tag, dst_tag = _tags(unique_name, 2)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    try:
        await cluster_client.xgroup_create(src.stream, "taskiq", id="0", mkstream=True)
        for i in range(21):
            await cluster_client.xadd(src.stream, {b"data": f"e{i}".encode()})
        await cluster_client.xreadgroup("taskiq", "dead", {src.stream: ">"}, count=10)
        await cluster_client.xreadgroup("taskiq", "live", {src.stream: ">"}, count=10)
        await asyncio.sleep(0.6)
        # "live" reads again, as a working broker reader does (Redis 7.0
        # counts a consumer's idle time from its last read that got entries;
        # 7.2+ from its last read attempt).
        await cluster_client.xreadgroup("taskiq", "live", {src.stream: ">"}, count=1)
        rebalancer = Rebalancer(cluster_client, options=_opts(consumer_timeout=0.5))
        assert await rebalancer.copy_entries(src_tag, dst_tag) == 10
        out = [f[b"data"] for _, f in await cluster_client.xrange(dst.stream)]
        assert out == [f"e{i}".encode() for i in range(10)]
        pending = await cluster_client.xpending(src.stream, "taskiq")
        assert pending["pending"] == 11
        assert {c["name"]: c["pending"] for c in pending["consumers"]} == {b"live": 11}
        # Once it has not been seen for long, its entries are taken too.
        await asyncio.sleep(0.6)
        assert await rebalancer.copy_entries(src_tag, dst_tag) == 11
        assert (await rebalancer.drain_state(src_tag)).drained
    finally:
        await cluster_client.delete(src.stream, dst.stream)


@pytest.mark.cluster
async def test_interrupted_copy_is_finished_by_the_rerun_from_the_movers_pending(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    from taskiq_redis_cluster._rebalance._copy import MOVER_CONSUMER

    src_tag, dst_tag = _tags(unique_name, 2)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    try:
        await cluster_client.xgroup_create(src.stream, "taskiq", id="0", mkstream=True)
        for i in range(50):
            await cluster_client.xadd(src.stream, {b"data": f"e{i}".encode()})
        # A mover killed after claiming 20 and copying none of them.
        await cluster_client.xreadgroup("taskiq", MOVER_CONSUMER, {src.stream: ">"}, count=20)
        rebalancer = Rebalancer(cluster_client, options=_opts(copy_batch=7))
        assert await rebalancer.copy_entries(src_tag, dst_tag) == 50
        out = [f[b"data"] for _, f in await cluster_client.xrange(dst.stream)]
        assert out == [f"e{i}".encode() for i in range(50)]
        assert (await rebalancer.drain_state(src_tag)).drained
    finally:
        await cluster_client.delete(src.stream, dst.stream)


@pytest.mark.cluster
async def test_list_copy_survives_concurrent_pops_and_keeps_order(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    from taskiq_redis_cluster._rebalance._copy import _LIST_TAKEN

    src_tag, dst_tag = _tags(unique_name, 2)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    try:
        for i in range(10):
            await cluster_client.lpush(src.list, f"m{i}")  # as the list broker kicks
        batch = await cluster_client.lrange(src.list, -4, -1)  # m3 m2 m1 m0
        # Meanwhile a consumer pops two and a producer pushes one.
        assert await cluster_client.rpop(src.list) == b"m0"
        assert await cluster_client.rpop(src.list) == b"m1"
        await cluster_client.lpush(src.list, "m10")
        assert await _LIST_TAKEN(cluster_client, keys=[src.list], args=batch) == 2
        assert await cluster_client.lrange(src.list, 0, -1) == [
            f"m{i}".encode() for i in range(10, 3, -1)
        ]
        # The whole copy lands behind what the new list already holds,
        # oldest first.
        await cluster_client.lpush(dst.list, "newer")
        rebalancer = Rebalancer(cluster_client, options=_opts(copy_batch=3))
        assert await rebalancer.copy_entries(src_tag, dst_tag) == 7
        assert not await cluster_client.exists(src.list)
        popped = [await cluster_client.rpop(dst.list) for _ in range(8)]
        assert popped == [b"newer"] + [f"m{i}".encode() for i in range(4, 11)]
    finally:
        await cluster_client.delete(src.list, dst.list)


@pytest.mark.cluster
async def test_list_queue_moves_without_workers(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    from taskiq_redis_cluster import ClusterListQueueBroker

    plan = await _weighted_plan(cluster_client, queue)
    preview = await Rebalancer(cluster_client).preview(queue)
    move = preview.moves[0]
    key = next(f"k{i}" for i in range(10_000) if slot_of(f"k{i}") % 6 == move.index)
    producer = ClusterListQueueBroker(cluster_url, queue_name=queue, plan_poll_interval=POLL)
    await producer.startup()
    kicked = [f"{queue}-{i:03d}" for i in range(150)]
    try:
        for task_id in kicked:  # one after the other: their order is known
            await producer.kick(make_message(task_id, partition_key=key))
        for i in range(60):
            await producer.kick(make_message(f"{queue}-rr{i}"))
        # A dedup key held before the move stays held after it.
        kicked.append(f"{queue}-dedup")
        await producer.kick(make_message(kicked[-1], partition_key=key, dedup_key="LK"))
    finally:
        await producer.shutdown()
    results = await Rebalancer(cluster_client, options=_opts()).apply([queue])
    assert results[0].moves == 2
    ok, counts = await _status_ok(cluster_client, queue)
    assert ok, counts
    final = await PlanStore(cluster_client).load(queue)
    assert final is not None
    assert await _old_keys_gone(cluster_client, set(plan.tags()) - set(final.tags()))
    old = ShardKeys(DEFAULT_PREFIX, move.old.tag)
    new = ShardKeys(DEFAULT_PREFIX, final.shards[move.index].tag)
    assert not await cluster_client.exists(old.dedup("LK"))
    producer = ClusterListQueueBroker(cluster_url, queue_name=queue, plan_poll_interval=POLL)
    await producer.startup()
    try:
        await producer.kick(make_message(f"{queue}-dedup-2", partition_key=key, dedup_key="LK"))
        assert await producer.dedup_task_id("LK", partition_key=key) == f"{queue}-dedup"
        # A list push is not fenced: what the kick script of a producer that
        # kept the old plan does (marker, then LPUSH) recreates the old list;
        # the sweep moves both to the live shard.
        await cluster_client.set(old.dedup("LS"), f"{queue}-stale", px=60_000)
        await cluster_client.lpush(old.list, make_message(f"{queue}-stale").message)
        assert await Rebalancer(cluster_client, options=_opts()).sweep([queue]) == 1
        assert not await cluster_client.exists(old.dedup("LS"), old.list)
        assert await producer.dedup_task_id("LS", partition_key=key) == f"{queue}-stale"
        await cluster_client.delete(new.dedup("LK"), new.dedup("LS"))
    finally:
        await producer.shutdown()
    kicked.append(f"{queue}-stale")
    # Oldest at the right end, where consumers pop: the kick order is kept.
    moved = ShardKeys(DEFAULT_PREFIX, final.shards[move.index].tag).list
    keyed = [task_id_of(m) for m in reversed(await cluster_client.lrange(moved, 0, -1))]
    assert [t for t in keyed if "-rr" not in t] == kicked
    total = 0
    for shard in final.shards:
        total += await cluster_client.llen(ShardKeys(DEFAULT_PREFIX, shard.tag).list)
    assert total == 212


async def _reshard_a_third(
    client: RedisCluster, queue: str
) -> tuple[int, str, str, frozenset[int]]:
    """A 12-shard plan with A's 4 shards in the third of A's slots that moves to B."""
    topology = await read_topology(client)
    a = topology.owner_of(0)
    assert a is not None
    b = next(m for m in topology.slot_masters if m.node_id != a.node_id)
    c = next(m for m in topology.slot_masters if m.node_id not in (a.node_id, b.node_id))
    a_slots = [s for s in range(16384) if topology.slot_owners[s] == a.node_id]
    low = frozenset(a_slots[: len(a_slots) // 3])
    wanted = [(a.node_id, low), (b.node_id, None), (c.node_id, None)] * 4
    store = PlanStore(client)
    await store.get_or_create(topology, QueueSpec(queue, 12))
    assert await store.compare_and_swap(_plan_on(topology, queue, 2, wanted), expected_epoch=1)
    return a.address.port, a.node_id, b.node_id, low


@pytest.mark.cluster
async def test_no_worker_2000_tasks_reshard_then_apply_finishes_fast(
    healthy_cluster: DevCluster,
    cluster_client: RedisCluster,
    cluster_url: str,
    queue: str,
) -> None:
    """Acceptance (issue 14.1): no worker, 2,000 queued, a third of a master resharded."""
    port, a_id, b_id, low = await _reshard_a_third(cluster_client, queue)
    plan = await PlanStore(cluster_client).load(queue)
    assert plan is not None
    kicked = [f"{queue}-{i}" for i in range(2000)]
    for chunk in range(0, len(kicked), 250):
        await _kick_all(cluster_url, queue, kicked[chunk : chunk + 250])
    await _create_groups(cluster_client, plan.tags())
    try:
        await _reshard(port, a_id, b_id, len(low))
        await healthy_cluster.wait_healthy()
        # A worker that died with entries in hand, on each shard that will move.
        preview = await Rebalancer(cluster_client).preview(queue)
        assert len(preview.moves) == 4
        for move in preview.moves:
            stream = ShardKeys(DEFAULT_PREFIX, move.old.tag).stream
            await cluster_client.xreadgroup("taskiq", "died", {stream: ">"}, count=10)
        started = time.monotonic()
        code, out, err = await _run_cli(
            *_cli_args(cluster_url, queue, "apply"),
            *_tuning(timeout=120),
            "--consumer-timeout",
            "1",
            "--max-entries-per-second",
            "5000",
            timeout=150,
        )
        took = time.monotonic() - started
        assert code == 0, out + err
        assert took < 120
        ok, counts = await _status_ok(cluster_client, queue)
        assert ok, counts
        assert max(counts.values()) - min(counts.values()) <= 1, counts
        got = await _drain_all(cluster_url, queue, len(kicked))
        lost = set(kicked) - set(got)
        print(
            f"no worker, 2000 queued: apply took {took:.1f}s (4 moves, 2 at once), "
            f"lost {len(lost)}, duplicates {sum(c - 1 for c in got.values())}"
        )
        assert not lost
    finally:
        now = await read_topology(cluster_client)
        back = [s for s in low if now.slot_owners[s] == b_id]
        if back:
            await _reshard(port, b_id, a_id, len(back))
        await healthy_cluster.wait_healthy()


@pytest.mark.cluster
@chaos(timeout=120)
async def test_kill_9_while_copying_then_rerun_loses_nothing(
    cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    plan = await _weighted_plan(cluster_client, queue)
    kicked = [f"{queue}-{i}" for i in range(2000)]
    for chunk in range(0, len(kicked), 250):
        await _kick_all(cluster_url, queue, kicked[chunk : chunk + 250])
    await _create_groups(cluster_client, plan.tags())
    preview = await Rebalancer(cluster_client).preview(queue)
    new_streams = [ShardKeys(DEFAULT_PREFIX, m.new.tag).stream for m in preview.moves]
    proc = await asyncio.create_subprocess_exec(
        *_cli_args(cluster_url, queue, "apply"),
        *_tuning(),
        "--max-entries-per-second",
        "400",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        # Kill once the copy is under way: entries in a new tag, some left.
        async def copying() -> bool:
            assert proc.returncode is None, "the rebalancer ended before copying"
            return any([await cluster_client.xlen(s) for s in new_streams])

        await eventually(copying, "copying started", 30, interval=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    records = await Journal(cluster_client, DEFAULT_PREFIX, queue).records()
    assert any(r.precopy for r in records)
    old_left = 0
    for m in preview.moves:
        old_left += (await Rebalancer(cluster_client).drain_state(m.old)).undelivered
    assert old_left > 0, "the kill must land while copying"
    code, out, err = await _run_cli(
        *_cli_args(cluster_url, queue, "apply"), *_tuning(), "--lock-wait", "10"
    )
    assert code == 0, out + err
    assert "resumed" in out
    code, out, err = await _run_cli(*_cli_args(cluster_url, queue, "verify"))
    assert code == 0, out + err
    got = await _drain_all(cluster_url, queue, len(kicked))
    lost = set(kicked) - set(got)
    duplicates = sum(c - 1 for c in got.values())
    print(f"kill -9 while copying: left {old_left} to copy, lost {len(lost)}, dups {duplicates}")
    assert not lost
    # At most the batch each interrupted copy had claimed but not acked.
    assert duplicates <= 2 * RebalanceOptions().copy_batch


async def test_copy_pace_is_shared_by_every_move_in_flight() -> None:
    from taskiq_redis_cluster._rebalance._copy import _Throttle

    throttle = _Throttle(2000.0)

    async def mover() -> None:
        for _ in range(5):
            await throttle(100)

    started = time.monotonic()
    await asyncio.gather(mover(), mover())
    # 1,000 entries at 2,000/s in total: half a second, not a quarter.
    assert time.monotonic() - started >= 0.45


@pytest.mark.cluster
async def test_reliable_list_consumers_dead_ones_are_copied_live_ones_waited_for(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    src_tag, dst_tag = _tags(unique_name, 2)
    src, dst = ShardKeys(DEFAULT_PREFIX, src_tag), ShardKeys(DEFAULT_PREFIX, dst_tag)
    keys = [src.list, dst.list, src.consumers, src.processing("dead"), src.processing("live")]
    keys += [src.heartbeat("live")]
    try:
        await cluster_client.lpush(src.list, "q0", "q1")
        # What the reliable list broker leaves: BLMOVE'd into processing
        # lists; only "live" still refreshes its heartbeat.
        await cluster_client.sadd(src.consumers, "dead", "live")
        await cluster_client.lpush(src.processing("dead"), "d0", "d1", "d2")
        await cluster_client.lpush(src.processing("live"), "l0", "l1")
        await cluster_client.set(src.heartbeat("live"), 1, px=60_000)
        rebalancer = Rebalancer(cluster_client, options=_opts())
        assert (await rebalancer.drain_state(src_tag)).processing == 5
        assert await rebalancer.copy_entries(src_tag, dst_tag) == 5
        state = await rebalancer.drain_state(src_tag, delete=True)
        assert (state.processing, state.list_length, state.drained) == (2, 0, False)
        assert not state.deleted  # what a live consumer holds is never deleted
        assert sorted(await cluster_client.lrange(dst.list, 0, -1)) == [
            b"d0",
            b"d1",
            b"d2",
            b"q0",
            b"q1",
        ]
        # The live consumer dies too (its heartbeat expires): then it is copied.
        await cluster_client.delete(src.heartbeat("live"))
        assert await rebalancer.copy_entries(src_tag, dst_tag) == 2
        assert (await rebalancer.drain_state(src_tag, delete=True)).drained
        assert not await cluster_client.exists(src.list, src.consumers, src.processing("live"))
        assert await cluster_client.llen(dst.list) == 7
    finally:
        await cluster_client.delete(*keys)


# --------------------------------------------------------------------------
# Plan changes no replica confirmed (issue 14)
# --------------------------------------------------------------------------


def _kinds(events: Sequence[RebalanceEvent]) -> list[RebalanceEventKind]:
    return [e.kind for e in events]


async def _paused_replica_setup(
    cluster: DevCluster, client: RedisCluster, url: str, queue: str
) -> tuple[ShardPlan, PlanStore, Any, list[str]]:
    """A weighted plan with 30 waiting tasks, a store with a short replica
    wait, and the replica of the plan key's master (not paused yet)."""
    plan = await _weighted_plan(client, queue)
    kicked = [f"{queue}-{i}" for i in range(30)]
    await _kick_all(url, queue, kicked)
    store = PlanStore(client, replica_timeout=0.3)
    master = await cluster.master_of_key(store.key(queue))
    replica = await cluster.replica_of(master)
    return plan, store, replica, kicked


async def _finished_without_loss(
    client: RedisCluster, url: str, queue: str, kicked: Sequence[str], before: ShardPlan
) -> None:
    ok, counts = await _status_ok(client, queue)
    assert ok, counts
    after = await PlanStore(client).load(queue)
    assert after is not None
    assert await _old_keys_gone(client, set(before.tags()) - set(after.tags()))
    got = await _drain_all(url, queue, len(kicked), timeout=30)
    assert set(kicked) - set(got) == set()


@pytest.mark.cluster
@chaos(timeout=120)
async def test_unconfirmed_switch_is_repeated_and_acted_on_once_a_replica_has_it(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    from taskiq_redis_cluster._redis import RetryPolicy

    plan, store, replica, kicked = await _paused_replica_setup(
        healthy_cluster, cluster_client, cluster_url, queue
    )
    events: list[RebalanceEvent] = []
    rebalancer = Rebalancer(
        cluster_client,
        options=_opts(max_moves_at_once=1),
        store=store,
        on_event=events.append,
        # Enough repeats to outlast the pause below; each waits 0.3 s for WAIT.
        retry=RetryPolicy(attempts=200, base=0.05, cap=0.2),
    )
    # SIGSTOP: the replica stays attached but confirms nothing.
    await healthy_cluster.pause_node(replica)
    try:
        run = asyncio.create_task(rebalancer.apply([queue]))

        async def repeated() -> bool:
            assert not run.done(), run  # an error would end the run early
            return _kinds(events).count(RebalanceEventKind.UNCONFIRMED) >= 3

        await eventually(repeated, "three repeats of the unconfirmed switch", timeout=30)
        # The switch is in force on the master, but the rebalancer does not
        # act on it: the move is not switched, nothing is drained.
        assert await store.epoch(queue) == plan.epoch + 1
        assert await _journal_states(cluster_client, queue) == ["planned", "planned"]
        assert RebalanceEventKind.SWITCHED not in _kinds(events)
        assert RebalanceEventKind.WAITING not in _kinds(events)
        seen = len(events)
    finally:
        await healthy_cluster.resume_node(replica)
    results = await asyncio.wait_for(run, 90)
    assert results[0].moves == 2
    after = _kinds(events[seen:])
    assert after.count(RebalanceEventKind.SWITCHED) == 2
    assert after.count(RebalanceEventKind.FINALIZED) == 2
    # The repeated swap was recognised as applied: one epoch per change,
    # switch and finalize of two moves.
    assert results[0].epoch == plan.epoch + 4
    await _finished_without_loss(cluster_client, cluster_url, queue, kicked, plan)


@pytest.mark.cluster
@chaos(timeout=120)
async def test_a_rerun_confirms_an_unconfirmed_switch_before_draining_it(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, cluster_url: str, queue: str
) -> None:
    from taskiq_redis_cluster import PlanNotReplicatedError
    from taskiq_redis_cluster._redis import RetryPolicy

    plan, store, replica, kicked = await _paused_replica_setup(
        healthy_cluster, cluster_client, cluster_url, queue
    )
    events: list[RebalanceEvent] = []
    await healthy_cluster.pause_node(replica)
    try:
        # A run that gives up: the switch stays unconfirmed on the master.
        first = Rebalancer(
            cluster_client,
            options=_opts(max_moves_at_once=1),
            store=store,
            retry=RetryPolicy(attempts=2, base=0.05, cap=0.1),
        )
        with pytest.raises(PlanNotReplicatedError) as info:
            await first.apply([queue])
        assert info.value.epoch == plan.epoch + 1
        assert await store.epoch(queue) == plan.epoch + 1
        assert await _journal_states(cluster_client, queue) == ["planned", "planned"]
        second = Rebalancer(
            cluster_client,
            options=_opts(max_moves_at_once=1),
            store=store,
            on_event=events.append,
            retry=RetryPolicy(attempts=200, base=0.05, cap=0.2),
        )
        run = asyncio.create_task(second.apply([queue]))

        async def repeated() -> bool:
            assert not run.done(), run
            return _kinds(events).count(RebalanceEventKind.UNCONFIRMED) >= 3

        await eventually(repeated, "three confirmation attempts", timeout=30)
        # The stored plan says "switched", but nothing is resumed, copied or
        # drained on its word until a replica has it.
        assert set(_kinds(events)) == {RebalanceEventKind.UNCONFIRMED}
    finally:
        await healthy_cluster.resume_node(replica)
    results = await asyncio.wait_for(run, 90)
    assert (results[0].resumed, results[0].moves) == (1, 1)
    await _finished_without_loss(cluster_client, cluster_url, queue, kicked, plan)


async def _replica_epoch(replica: Any, key: str) -> bytes | None:
    from redis.asyncio import Redis

    async with Redis(host=replica.host, port=replica.port, socket_timeout=5) as r:
        await r.execute_command("READONLY")
        value: bytes | None = await r.execute_command("HGET", key, "epoch")
        return value


@pytest.mark.cluster
@chaos(timeout=120)
async def test_after_an_unconfirmed_epoch_the_next_plan_never_reuses_its_number(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, queue: str
) -> None:
    from taskiq_redis_cluster import PlanNotReplicatedError
    from taskiq_redis_cluster._keys import tag_slot
    from taskiq_redis_cluster._planning import PlanFollower
    from taskiq_redis_cluster._rebalance._options import EventSink
    from taskiq_redis_cluster._rebalance._writer import PlanWriter
    from taskiq_redis_cluster._redis import RetryPolicy

    topology = await read_topology(cluster_client)
    store = PlanStore(cluster_client, replica_timeout=0.2)
    plan = await store.get_or_create(topology, QueueSpec(queue, 2))
    key = store.key(queue)
    master = await healthy_cluster.master_of_key(key)
    replica = await healthy_cluster.replica_of(master)
    writer = PlanWriter(
        store,
        check_lease=lambda: None,
        emit=EventSink(None),
        retry=RetryPolicy(attempts=3, base=0.01, cap=0.02),
    )

    def draining(salt: int) -> Any:
        tag = shard_tag(queue, 0, salt)
        extra = Shard(0, tag, tag_slot(tag), plan.shards[0].master)
        return lambda current: ShardPlan(queue, 0, current.shards, (extra,))

    follower = PlanFollower(store, queue, poll_interval=0)
    await healthy_cluster.pause_node(replica)
    try:
        with pytest.raises(PlanNotReplicatedError):
            await writer.mutate(queue, draining(7))
        # A follower read the unconfirmed epoch 2 on the master ...
        seen = await follower.refresh()
        assert (seen.epoch, seen.draining[0].tag) == (2, shard_tag(queue, 0, 7))
        # ... and a failover lost it: the promoted replica serves epoch 1.
        await cluster_client.hset(key, mapping={"epoch": "1", "plan": plan.to_json()})
    finally:
        await healthy_cluster.resume_node(replica)

    async def caught_up() -> bool:
        return await _replica_epoch(replica, key) == b"1"

    await eventually(caught_up, "the resumed replica catching up", timeout=20)
    stored = await writer.mutate(queue, draining(8))
    # Not 2 again: the follower would keep the lost plan, which has the same
    # number (followers compare epochs only).
    assert stored.epoch == 3
    now = await follower.refresh()
    assert (now.epoch, now.draining[0].tag) == (3, shard_tag(queue, 0, 8))


@pytest.mark.cluster
async def test_a_plan_created_again_is_not_changed_by_a_run_that_read_the_old_one(
    cluster_client: RedisCluster, queue: str
) -> None:
    from taskiq_redis_cluster import RebalanceError
    from taskiq_redis_cluster._keys import tag_slot
    from taskiq_redis_cluster._rebalance._options import EventSink
    from taskiq_redis_cluster._rebalance._writer import PlanWriter
    from taskiq_redis_cluster._redis import RetryPolicy

    topology = await read_topology(cluster_client)
    store = PlanStore(cluster_client)
    old = await store.get_or_create(topology, QueueSpec(queue, 2))
    writer = PlanWriter(store, check_lease=lambda: None, emit=EventSink(None), retry=RetryPolicy())
    assert await writer.begin(queue) == old
    await store.delete(queue)
    fresh = await store.get_or_create(topology, QueueSpec(queue, 2))
    tag = shard_tag(queue, 0, 9)
    extra = Shard(0, tag, tag_slot(tag), old.shards[0].master)
    with pytest.raises(RebalanceError, match="created again"):
        await writer.mutate(queue, lambda p: ShardPlan(queue, 0, p.shards, (extra,)))
    assert await store.load(queue) == fresh
    # A new run pins the new generation and may change it.
    await writer.begin(queue)
    changed = await writer.mutate(queue, lambda p: ShardPlan(queue, 0, p.shards, (extra,)))
    assert changed.epoch == fresh.epoch + 1
    writer.end(queue)


@pytest.mark.cluster
async def test_no_replica_check_option_and_the_hint_that_names_it(
    cluster_client: RedisCluster, cluster_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from taskiq_redis_cluster import PlanNotReplicatedError
    from taskiq_redis_cluster._cli import _cmd_rebalance as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    for command in ("apply", "watch"):
        for extra, required in (([], True), (["--no-replica-check"], False)):
            args = parser.parse_args(["rebalance", command, "--url", cluster_url, *extra])
            rebalancer, _ = cmd._rebalancer(cluster_client, args, cmd._Progress(sys.stderr))
            assert rebalancer.store.require_replica is required

    def failing(replicas: int) -> Any:
        async def body(_: RedisCluster) -> int:
            raise PlanNotReplicatedError(key="k", epoch=3, replicas=replicas, reason="r")

        return body

    args = parser.parse_args(["rebalance", "apply", "--url", cluster_url])
    # _run owns its event loop (asyncio.run), so it runs in a thread here.
    assert await asyncio.to_thread(cmd._run, args, failing(0)) == cmd.EXIT_ERROR
    assert "--no-replica-check" in capsys.readouterr().err
    assert await asyncio.to_thread(cmd._run, args, failing(1)) == cmd.EXIT_ERROR
    err = capsys.readouterr().err
    assert "--no-replica-check" not in err
    assert "confirms the stored plan" in err


def test_copied_and_swept_entries_are_counted() -> None:
    from prometheus_client import CollectorRegistry

    from taskiq_redis_cluster._metrics import PrometheusEvents

    registry = CollectorRegistry()
    events = PrometheusEvents(registry=registry)
    for kind, done in (
        (RebalanceEventKind.COPIED, 40),
        (RebalanceEventKind.COPIED, 2),
        (RebalanceEventKind.SWEPT, 5),
        (RebalanceEventKind.UNCONFIRMED, 1),
    ):
        events.rebalance_event(RebalanceEvent(kind=kind, queue="q", done=done, total=done))
    prefix = "taskiq_redis_cluster_rebalance_"
    assert registry.get_sample_value(prefix + "copied_entries_total", {"queue": "q"}) == 42
    assert registry.get_sample_value(prefix + "swept_entries_total", {"queue": "q"}) == 5
