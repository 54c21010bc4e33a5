"""ClusterStreamBroker with real worker processes under faults (issue 4).

Uses the fault-injection harness (scripts/chaos/, a dev tool imported from
there like the bench): real
``taskiq worker`` processes, a ledger of executions outside Redis, and a
cluster of this module's own because the faults are destructive.

Covered here: a worker SIGKILLed with 50 slow tasks in flight, a shard's
slot MIGRATEd under load, and the spread of XADDs over the masters. The
other issue-4 faults under load (DEL of a shard's stream, CLUSTER FAILOVER,
SIGKILL of a master with and without ``wait_replicas=1``) run as the
harness's CI subset in tests/test_chaos.py, with the same assertions
(lost = 0, no worker death, no phantom), so they are not run twice.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import chaos, eventually
from redis.asyncio import Redis

from taskiq_redis_cluster import ClusterStreamBroker
from taskiq_redis_cluster._redis._connection import connect
from taskiq_redis_cluster.testing import DevCluster

ROOT = Path(__file__).resolve().parent.parent
# The chaos harness is a dev tool under scripts/, not part of the installed package.
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from chaos.config import ChaosConfig  # noqa: E402
from chaos.harness import chaos_cluster, run_scenario  # noqa: E402
from chaos.ledger import read_executions  # noqa: E402
from chaos.probes import pending_entries, stream_keys  # noqa: E402
from chaos.processes import WorkerPool, sleep_env, worker_env  # noqa: E402
from chaos.producer import produce, producer_broker  # noqa: E402
from chaos.report import format_table  # noqa: E402
from chaos.scenarios import SCENARIOS  # noqa: E402


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevCluster]:
    """A 3+3 cluster of this module only, on free ports."""
    async with chaos_cluster(tmp_path_factory.mktemp("faults-cluster")) as started:
        yield started


async def _xadd_calls(cluster: DevCluster, port: int) -> int:
    client = Redis(host=cluster.host, port=port, socket_timeout=5)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


async def test_xadd_spread_over_masters_is_even(cluster: DevCluster) -> None:
    await cluster.heal()
    broker = ClusterStreamBroker(cluster.url, queue_name=f"spread-{uuid.uuid4().hex[:6]}")
    await broker.startup()
    try:
        plan = await broker.current_plan()
        assert len(plan.shards) == 12  # default: 4 shards per master
        masters = [m.port for m in await cluster.masters()]
        assert len(masters) == 3
        before = {p: await _xadd_calls(cluster, p) for p in masters}
        ids = [f"s{i}" for i in range(1200)]
        kicks = await produce(broker, ids, rate=2000.0, kick_timeout=30.0)
        assert all(k.outcome == "acked" for k in kicks)
        after = {p: await _xadd_calls(cluster, p) for p in masters}
    finally:
        await broker.shutdown()
    deltas = {p: after[p] - before[p] for p in masters}
    mean = sum(deltas.values()) / len(deltas)
    print(f"XADD calls per master: {deltas} (mean {mean:.0f})")
    assert sum(deltas.values()) == 1200
    for port, calls in deltas.items():
        assert abs(calls - mean) <= 0.1 * mean, (port, deltas)


@chaos(timeout=120)
async def test_worker_sigkill_with_50_slow_tasks_in_flight(
    cluster: DevCluster, tmp_path: Path
) -> None:
    await cluster.heal()
    # The first worker's tasks sleep far longer than the test; the
    # replacement's do not, so every run in the ledger is a redelivery.
    # idle_timeout leaves room: a worker also reclaims its own entries once
    # they idle that long, and max_deliveries would then dead-letter them.
    config = ChaosConfig(tasks=50, workers=1, idle_timeout=4000, xread_block=500, task_sleep=120.0)
    queue = f"inflight-{uuid.uuid4().hex[:6]}"
    pool = WorkerPool(tmp_path, worker_env(cluster.url, queue, tmp_path, config))
    producer = producer_broker(cluster.url, queue, config)
    admin = await connect(cluster.url)
    try:
        await producer.startup()
        keys = await stream_keys(producer, queue)
        pool.start()
        await pool.wait_ready([0], 90)
        ids = [f"slow-{i}" for i in range(50)]
        kicks = await produce(producer, ids, rate=200.0, kick_timeout=30.0)
        assert all(k.outcome == "acked" for k in kicks)

        async def all_in_flight() -> bool:
            return await pending_entries(admin, keys) == 50

        await eventually(all_in_flight, "50 tasks delivered to the worker", timeout=60)
        killed_at = time.time()
        pool.kill(0)
        replacement = pool.start(sleep_env(0))
        await pool.wait_ready([replacement], 90)

        async def all_ran() -> bool:
            return {e.task_id for e in read_executions(tmp_path)} >= set(ids)

        await eventually(all_ran, "every kicked task executed", timeout=90)
        runs = read_executions(tmp_path)
        first: dict[str, float] = {}
        for e in runs:
            first.setdefault(e.task_id, e.at)
        took = max(first[i] for i in ids) - killed_at
        print(
            f"redelivery of 50 in-flight tasks took {took:.2f}s after the SIGKILL "
            f"(idle_timeout {config.idle_timeout / 1000:.1f}s, plus the replacement's "
            "startup)"
        )
        assert pool.unexpected_exits() == []
        assert pool.child_restarts() == 0
    finally:
        await pool.stop_all()
        await producer.shutdown()
        await admin.aclose()


@chaos(timeout=120)
async def test_slot_migrated_under_load_loses_nothing(cluster: DevCluster, tmp_path: Path) -> None:
    config = ChaosConfig(
        tasks=240, rate=30.0, workers=2, idle_timeout=2000, xread_block=500, task_sleep=0.1
    )
    result = await run_scenario(cluster, SCENARIOS["slot-migrate"], config, tmp_path)
    print()
    print(format_table([result]))
    assert result.status != "error", result.reason
    assert result.lost == 0, result.lost_sample
    assert result.phantoms == 0
    assert result.worker_exits == []
    assert result.child_restarts == 0
    assert result.status == "ok", result.violations
