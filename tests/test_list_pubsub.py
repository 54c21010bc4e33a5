"""ClusterListQueueBroker and ClusterPubSubBroker against the real 3+3 cluster."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import chaos, eventually, make_message, task_id_of
from redis.asyncio import Redis
from taskiq import BrokerMessage

from taskiq_redis_cluster import (
    ClusterListQueueBroker,
    ClusterPubSubBroker,
    InvalidNameError,
    LifecycleError,
    NotAClusterError,
)
from taskiq_redis_cluster._keys import ShardKeys, broadcast_channel
from taskiq_redis_cluster.testing import DevCluster

pytestmark = pytest.mark.cluster



def _message(task_id: str, **labels: Any) -> BrokerMessage:
    return make_message(task_id, "app:record", args=[task_id], **labels)


@pytest.fixture
async def list_broker(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterListQueueBroker]:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, brpop_timeout=0.2,
                                    plan_poll_interval=0.5)
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


async def test_list_broker_spreads_shards_over_all_masters(
    list_broker: ClusterListQueueBroker, redis_cluster: DevCluster
) -> None:
    plan = await list_broker.current_plan()
    owners: Counter[int] = Counter()
    for shard in plan.shards:
        master = await redis_cluster.master_of_key(ShardKeys(list_broker.options.prefix,
                                                             shard.tag).list)
        owners[master.port] += 1
    assert len(owners) == 3
    assert max(owners.values()) - min(owners.values()) <= 1


async def test_list_broker_round_trip_is_fair(list_broker: ClusterListQueueBroker) -> None:
    ids = [f"l{i}" for i in range(60)]
    await asyncio.gather(*(list_broker.kick(_message(i)) for i in ids))
    plan = await list_broker.current_plan()
    lengths = [await list_broker.client.llen(ShardKeys(list_broker.options.prefix, s.tag).list)
               for s in plan.shards]
    assert sum(lengths) == 60
    assert max(lengths) - min(lengths) <= 1  # round-robin
    got: list[str] = []
    gen = list_broker.listen()

    async def consume() -> None:
        async for data in gen:
            assert isinstance(data, bytes)
            got.append(str(task_id_of(data)))
            if len(got) == len(ids):
                return

    try:
        await asyncio.wait_for(consume(), 30)
    finally:
        await gen.aclose()
    assert sorted(got) == sorted(ids)


async def test_list_broker_partition_key(list_broker: ClusterListQueueBroker) -> None:
    for i in range(10):
        await list_broker.kick(_message(f"k{i}", partition_key="user-7"))
    plan = await list_broker.current_plan()
    lengths = [await list_broker.client.llen(ShardKeys(list_broker.options.prefix, s.tag).list)
               for s in plan.shards]
    assert sorted(lengths)[-1] == 10


async def test_list_broker_guards_and_bad_input(standalone_url: str) -> None:
    with pytest.raises(InvalidNameError):
        ClusterListQueueBroker("redis://127.0.0.1:7000", queue_name="}")
    broker = ClusterListQueueBroker(standalone_url, queue_name="q")
    with pytest.raises(NotAClusterError):
        await broker.startup()
    # A failed start leaves the broker new: the next use tries to start again.
    with pytest.raises(NotAClusterError):
        await broker.kick(_message("x"))
    await broker.shutdown()
    with pytest.raises(LifecycleError):
        await broker.kick(_message("x"))


_APP = textwrap.dedent(
    """
    import os
    from taskiq_redis_cluster import {cls}

    broker = {cls}(os.environ["TQRC_URL"], queue_name=os.environ["TQRC_QUEUE"], {extra})

    @broker.task(task_name="app:record")
    async def record(task_id: str) -> None:
        with open(os.environ["TQRC_LEDGER"], "a") as ledger:
            ledger.write(f"{{os.getpid()}} {{task_id}}\\n")
    """
)


def _start_worker(app_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "taskiq", "worker", "app:broker", "--workers", "1",
             "--no-configure-logging"],
            cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _ledger(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()]  # type: ignore[misc]


def _env(cluster_url: str, queue: str, ledger: Path, app_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TQRC_URL=cluster_url, TQRC_QUEUE=queue, TQRC_LEDGER=str(ledger),
               PYTHONPATH=str(app_dir))
    return env


async def test_list_broker_end_to_end_with_taskiq_worker(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(_APP.format(cls="ClusterListQueueBroker",
                                                 extra="brpop_timeout=0.5"))
    ledger = tmp_path / "ledger.txt"
    env = _env(cluster_url, unique_name, ledger, tmp_path)
    worker = _start_worker(tmp_path, env, tmp_path / "worker.log")
    producer = ClusterListQueueBroker(cluster_url, queue_name=unique_name)
    await producer.startup()
    try:
        ids = [f"e{i}" for i in range(40)]
        for task_id in ids:
            await producer.kick(_message(task_id))
        await eventually(
            lambda: len(_ledger(ledger)) >= len(ids),
            f"all 40 tasks run; worker log: {(tmp_path / 'worker.log').read_text()[-3000:]}",
            timeout=60,
        )
        assert sorted(t for _, t in _ledger(ledger)) == sorted(ids)
    finally:
        await producer.shutdown()
        _stop([worker])


@pytest.mark.slow
@chaos(timeout=120)
async def test_pubsub_broadcasts_to_every_worker_and_survives_failover(
    healthy_cluster: DevCluster, cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(_APP.format(cls="ClusterPubSubBroker",
                                                 extra="owner_check_interval=0.5"))
    ledger = tmp_path / "ledger.txt"
    env = _env(cluster_url, unique_name, ledger, tmp_path)
    workers = [_start_worker(tmp_path, env, tmp_path / f"worker{i}.log") for i in range(3)]
    producer = ClusterPubSubBroker(cluster_url, queue_name=unique_name)
    await producer.startup()
    try:
        # Subscriptions are not acknowledged, so probe until all three listen.
        channel = broadcast_channel("tqrc", unique_name)

        async def subscribers() -> int:
            master = await healthy_cluster.master_of_key(channel)
            client = Redis(host=master.host, port=master.port)
            try:
                reply = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            finally:
                await client.aclose()
            return int(reply[1])

        async def all_subscribed() -> bool:
            return await subscribers() >= 3

        await eventually(all_subscribed, "three subscribers", 60, interval=0.3)
        assert await subscribers() == 3
        for i in range(5):
            await producer.kick(_message(f"b{i}"))
        await eventually(lambda: len(_ledger(ledger)) >= 15, "15 deliveries", timeout=30)
        per_task = Counter(t for _, t in _ledger(ledger))
        assert all(per_task[f"b{i}"] == 3 for i in range(5))
        pids = {pid for pid, _ in _ledger(ledger)}
        assert len(pids) == 3

        # Fail over the channel's master; messages must flow again.
        master = await healthy_cluster.master_of_key(channel)
        replica = await healthy_cluster.replica_of(master)
        await healthy_cluster.failover(replica)
        started = time.monotonic()
        probes = itertools.count(1)

        async def broadcast_again() -> bool:
            task_id = f"after-{next(probes)}"
            try:
                await producer.kick(_message(task_id))
            except Exception:  # the producer also rides through the failover
                return False
            await asyncio.sleep(0.3)  # this probe's time to reach the three workers
            return Counter(t for _, t in _ledger(ledger))[task_id] == 3

        await eventually(broadcast_again, "broadcasts resumed after failover", 60, interval=0.2)
        recovered_after = time.monotonic() - started
        print(f"pub/sub resumed {recovered_after:.2f}s after CLUSTER FAILOVER")
        assert all(w.poll() is None for w in workers)
    finally:
        await producer.shutdown()
        _stop(workers)
