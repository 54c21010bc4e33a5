"""The plan store, the plan follower and ``plan show`` against the real cluster.

The last test migrates a slot of the shared session cluster and moves it
back; keep it last in this file.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from helpers import chaos, eventually
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from taskiq_redis_cluster._cli._cmd_plan import run_create, run_list, run_show
from taskiq_redis_cluster._errors import (
    CorruptPlanError,
    PlanNotFoundError,
    PlanNotReplicatedError,
    PlanVersionError,
)
from taskiq_redis_cluster._keys import ShardKeys, plan_key
from taskiq_redis_cluster._planning._planner import QueueSpec, ShardPlan, plan_queue, replan
from taskiq_redis_cluster._planning._planstore import (
    PlanFollower,
    PlanStore,
    PlanVersion,
    StoredPlan,
)
from taskiq_redis_cluster._planning._topology import Topology, read_topology
from taskiq_redis_cluster._redis._connection import connect
from taskiq_redis_cluster.testing import DevCluster, Node

pytestmark = pytest.mark.cluster


@pytest_asyncio.fixture(loop_scope="session")
async def store(cluster_client: RedisCluster) -> PlanStore:
    return PlanStore(cluster_client)


@pytest_asyncio.fixture(loop_scope="session")
async def topology(healthy_cluster: DevCluster, cluster_client: RedisCluster) -> Topology:
    return await read_topology(cluster_client)


@pytest_asyncio.fixture(loop_scope="session")
async def queue(unique_name: str, cluster_client: RedisCluster) -> AsyncIterator[str]:
    yield unique_name
    await PlanStore(cluster_client).delete(unique_name)


async def test_twelve_shards_land_on_their_planned_masters(
    store: PlanStore,
    topology: Topology,
    queue: str,
    cluster_client: RedisCluster,
    healthy_cluster: DevCluster,
) -> None:
    plan = await store.get_or_create(topology, QueueSpec(queue, 12))
    assert plan.epoch == 1
    assert len(plan.shards) == 12
    assert Counter(s.master for s in plan.shards) == {m.node_id: 4 for m in topology.masters}
    any_node = cluster_client.get_random_node()
    for shard in plan.shards:
        keys = ShardKeys(store.prefix, shard.tag)
        for key in (keys.stream, keys.dead, keys.list):
            # Ask the server, not redis-py's own CRC.
            slot = await cluster_client.execute_command(
                "CLUSTER", "KEYSLOT", key, target_nodes=any_node
            )
            assert slot == shard.slot
        master = topology.master_by_id(shard.master)
        assert master is not None
        assert master.owns(shard.slot)
        live = await healthy_cluster.master_of_slot(shard.slot)
        assert live.port == master.address.port
    # A real write lands on the planned node.
    shard = plan.shards[0]
    keys = ShardKeys(store.prefix, shard.tag)
    await cluster_client.execute_command("XADD", keys.stream, "*", "data", "x")
    try:
        master = topology.master_by_id(shard.master)
        assert master is not None
        node = cluster_client.get_node(host=master.address.host, port=master.address.port)
        assert node is not None
        assert await cluster_client.execute_command("EXISTS", keys.stream, target_nodes=node) == 1
    finally:
        await cluster_client.execute_command("DEL", keys.stream)
    assert await store.load(queue) == plan
    assert await store.epoch(queue) == 1
    assert queue in await store.list_queues()


async def test_concurrent_get_or_create_agree(
    cluster_url: str, topology: Topology, queue: str
) -> None:
    clients = [await connect(cluster_url) for _ in range(10)]
    try:
        plans = await asyncio.gather(
            *(PlanStore(c).get_or_create(topology, QueueSpec(queue, 7)) for c in clients)
        )
    finally:
        for client in clients:
            await client.aclose()
    assert all(p == plans[0] for p in plans)
    assert {p.epoch for p in plans} == {1}


async def test_stored_plan_wins_over_a_new_spec(
    store: PlanStore, topology: Topology, queue: str
) -> None:
    first = await store.get_or_create(topology, QueueSpec(queue, 3))
    again = await store.get_or_create(topology, QueueSpec(queue, 9))
    assert again == first


async def test_missing_plan(store: PlanStore, queue: str) -> None:
    assert await store.load(queue) is None
    assert await store.epoch(queue) is None
    with pytest.raises(PlanNotFoundError):
        await PlanFollower(store, queue).current()


async def test_compare_and_swap(store: PlanStore, topology: Topology, queue: str) -> None:
    plan = await store.get_or_create(topology, QueueSpec(queue, 6))
    # A pretend rebalance: everything moves off the first master.
    first = topology.masters[0]
    shrunk = Topology.from_slot_map(
        {m.node_id: (m.slots if m is not first else ()) for m in topology.masters}
        | {topology.masters[1].node_id: topology.masters[1].slots + first.slots}
    )
    new = replan(plan, shrunk).plan
    assert new.epoch == 2
    stale = ShardPlan(new.queue, 7, new.shards, new.draining)
    assert not await store.compare_and_swap(stale, expected_epoch=6)
    assert await store.load(queue) == plan
    assert await store.compare_and_swap(new, expected_epoch=1)
    assert await store.epoch(queue) == 2
    assert await store.load(queue) == new
    # The loser of a race (still expecting epoch 1, with another plan) fails.
    assert not await store.compare_and_swap(ShardPlan(queue, 2, plan.shards), expected_epoch=1)
    assert await store.load(queue) == new
    # A repeat of the applied swap (its reply lost, or not yet confirmed)
    # succeeds: the stored plan is exactly the one asked for.
    assert await store.compare_and_swap(new, expected_epoch=1)
    with pytest.raises(ValueError, match="greater"):
        await store.compare_and_swap(new, expected_epoch=2)
    missing = ShardPlan(queue + "-none", 2, ())
    assert not await store.compare_and_swap(missing, expected_epoch=1)


async def test_newer_format_is_never_touched(
    store: PlanStore, topology: Topology, queue: str, cluster_client: RedisCluster
) -> None:
    key = plan_key(store.prefix, queue)
    await cluster_client.execute_command(
        "HSET", key, "format", "99", "epoch", "5", "plan", "{future stuff}", "extra", "x"
    )
    before = await cluster_client.execute_command("HGETALL", key)
    with pytest.raises(PlanVersionError) as info:
        await store.load(queue)
    assert info.value.found == 99
    with pytest.raises(PlanVersionError):
        await store.epoch(queue)
    with pytest.raises(PlanVersionError):
        await store.get_or_create(topology, QueueSpec(queue, 3))
    fresh = plan_queue(topology, QueueSpec(queue, 3), epoch=6)
    with pytest.raises(PlanVersionError):
        await store.compare_and_swap(fresh, expected_epoch=5)
    assert await cluster_client.execute_command("HGETALL", key) == before


@pytest.mark.parametrize(
    "fields",
    [
        {"format": "1", "epoch": "1", "plan": "not json"},
        {"format": "x", "epoch": "1", "plan": "{}"},
        {"epoch": "1", "plan": "{}"},
        {"format": "1", "epoch": "2"},
    ],
)
async def test_corrupt_records(
    store: PlanStore, queue: str, cluster_client: RedisCluster, fields: dict[str, str]
) -> None:
    key = plan_key(store.prefix, queue)
    await cluster_client.execute_command("HSET", key, *[x for kv in fields.items() for x in kv])
    with pytest.raises(CorruptPlanError):
        await store.load(queue)
    assert await cluster_client.execute_command("HGETALL", key) == {
        k.encode(): v.encode() for k, v in fields.items()
    }


async def test_epoch_mismatch_and_wrong_type_are_corrupt(
    store: PlanStore, topology: Topology, queue: str, cluster_client: RedisCluster
) -> None:
    key = plan_key(store.prefix, queue)
    plan = plan_queue(topology, QueueSpec(queue, 2))
    await cluster_client.execute_command(
        "HSET", key, "format", "1", "epoch", "3", "plan", plan.to_json()
    )
    with pytest.raises(CorruptPlanError, match="disagree"):
        await store.load(queue)
    await cluster_client.execute_command("DEL", key)
    await cluster_client.execute_command("SET", key, "a string")
    with pytest.raises(CorruptPlanError):
        await store.load(queue)
    with pytest.raises(CorruptPlanError):
        await store.epoch(queue)
    with pytest.raises(CorruptPlanError):
        await store.compare_and_swap(ShardPlan(queue, 2, plan.shards), expected_epoch=1)
    assert await cluster_client.execute_command("GET", key) == b"a string"


class CountingStore(PlanStore):
    def __init__(self, client: RedisCluster) -> None:
        super().__init__(client)
        self.epoch_reads = 0
        self.loads = 0

    async def version(self, queue: str) -> PlanVersion | None:
        self.epoch_reads += 1
        return await super().version(queue)

    async def load_record(self, queue: str) -> StoredPlan | None:
        self.loads += 1
        return await super().load_record(queue)


async def test_follower_polls_only_the_epoch(
    cluster_client: RedisCluster, topology: Topology, queue: str
) -> None:
    store = CountingStore(cluster_client)
    plan = await store.get_or_create(topology, QueueSpec(queue, 4))
    now = [100.0]
    follower = PlanFollower(store, queue, poll_interval=2.0, time_func=lambda: now[0])
    store.loads = 0
    assert await follower.current() == plan
    assert (store.loads, store.epoch_reads) == (1, 0)
    for _ in range(20):
        assert await follower.current() == plan
    assert (store.loads, store.epoch_reads) == (1, 0)
    now[0] += 2.5
    assert await follower.current() == plan
    assert (store.loads, store.epoch_reads) == (1, 1)

    new = ShardPlan(plan.queue, 2, plan.shards)
    assert await store.compare_and_swap(new, expected_epoch=1)
    assert (await follower.current()).epoch == 1  # still within the interval
    now[0] += 2.5
    assert (await follower.current()).epoch == 2
    assert (store.loads, store.epoch_reads) == (2, 2)

    # A vanished record or an unusable one keeps the cached plan.
    await store.delete(queue)
    now[0] += 2.5
    assert (await follower.current()).epoch == 2
    await cluster_client.execute_command("SET", store.key(queue), "junk")
    now[0] += 2.5
    assert (await follower.current()).epoch == 2
    assert follower.cached is not None


async def test_follower_refresh_and_initial(
    store: PlanStore, topology: Topology, queue: str
) -> None:
    plan = await store.get_or_create(topology, QueueSpec(queue, 2))
    follower = PlanFollower(store, queue, poll_interval=3600, initial=plan)
    assert follower.cached == plan
    assert await store.compare_and_swap(ShardPlan(queue, 7, plan.shards), expected_epoch=1)
    assert (await follower.current()).epoch == 1
    assert (await follower.refresh()).epoch == 7
    cold = PlanFollower(store, queue, poll_interval=3600)
    assert (await cold.refresh()).epoch == 7
    assert follower.generation == (await store.load_record(queue)).generation  # type: ignore[union-attr]


async def _node_call(node: Node, *args: Any) -> Any:
    # A plain connection of its own: it never wrote, and it may read a replica.
    async with Redis(host=node.host, port=node.port, socket_timeout=5) as r:
        return await r.execute_command(*args)


async def _replica_hget(node: Node, key: str, field: str) -> Any:
    async with Redis(host=node.host, port=node.port, socket_timeout=5) as r:
        await r.execute_command("READONLY")
        return await r.execute_command("HGET", key, field)


def _at_epoch(plan: ShardPlan, epoch: int) -> ShardPlan:
    return ShardPlan(plan.queue, epoch, plan.shards, plan.draining)


async def test_follower_never_goes_back_within_a_generation(
    store: PlanStore, topology: Topology, queue: str, cluster_client: RedisCluster
) -> None:
    plan = await store.get_or_create(topology, QueueSpec(queue, 3))
    assert await store.compare_and_swap(_at_epoch(plan, 2), expected_epoch=1)
    assert await store.compare_and_swap(_at_epoch(plan, 3), expected_epoch=2)
    now = [0.0]
    follower = PlanFollower(store, queue, poll_interval=1.0, time_func=lambda: now[0])
    assert (await follower.current()).epoch == 3
    # What a failover that lost epoch 3 leaves behind: epoch 2, same record
    # (the generation field is untouched).
    await cluster_client.execute_command(
        "HSET", store.key(queue), "epoch", "2", "plan", _at_epoch(plan, 2).to_json()
    )
    for _ in range(3):
        now[0] += 1.5
        assert (await follower.current()).epoch == 3
    assert (await follower.refresh()).epoch == 3
    assert follower.rollbacks_refused == 1  # one distinct older version, polled 4 times
    # Moving forward again from the stored epoch is followed as usual.
    assert await store.compare_and_swap(_at_epoch(plan, 4), expected_epoch=2)
    now[0] += 1.5
    assert (await follower.current()).epoch == 4


async def test_recreated_plan_is_picked_up_at_any_epoch(
    store: PlanStore, topology: Topology, queue: str
) -> None:
    old = await store.get_or_create(topology, QueueSpec(queue, 4))
    old_record = await store.load_record(queue)
    assert old_record is not None
    assert old_record.generation
    now = [0.0]
    follower = PlanFollower(store, queue, poll_interval=1.0, time_func=lambda: now[0])
    assert await follower.current() == old
    assert follower.generation == old_record.generation

    assert await store.delete(queue)
    new = await store.get_or_create(topology, QueueSpec(queue, 2))
    assert new.epoch == old.epoch == 1
    record = await store.load_record(queue)
    assert record is not None
    assert record.generation != old_record.generation
    now[0] += 1.5
    assert await follower.current() == new
    assert follower.generation == record.generation
    assert follower.rollbacks_refused == 0
    # A writer that read the old record cannot swap the new one.
    later = _at_epoch(new, 2)
    assert not await store.compare_and_swap(
        later, expected_epoch=1, expected_generation=old_record.generation
    )
    assert await store.compare_and_swap(
        later, expected_epoch=1, expected_generation=record.generation
    )
    # The swap kept the generation.
    assert await store.version(queue) == PlanVersion(2, record.generation)


async def test_record_without_generation_still_works(
    store: PlanStore, topology: Topology, queue: str, cluster_client: RedisCluster
) -> None:
    # A record as the previous release wrote it: no generation field.
    key = store.key(queue)
    plan = plan_queue(topology, QueueSpec(queue, 2))
    await cluster_client.execute_command(
        "HSET", key, "format", "1", "epoch", "1", "plan", plan.to_json()
    )
    assert await store.load_record(queue) == StoredPlan(plan, "")
    now = [0.0]
    follower = PlanFollower(store, queue, poll_interval=1.0, time_func=lambda: now[0])
    assert await follower.current() == plan
    assert follower.generation == ""
    assert await store.compare_and_swap(_at_epoch(plan, 2), expected_epoch=1)
    # A swap never adds a generation: a rollback to the bare record would
    # otherwise look like a new generation and be accepted.
    assert await cluster_client.execute_command("HEXISTS", key, "generation") == 0
    now[0] += 1.5
    assert (await follower.current()).epoch == 2
    await cluster_client.execute_command(
        "HSET", key, "epoch", "1", "plan", plan.to_json()
    )
    now[0] += 1.5
    assert (await follower.current()).epoch == 2
    assert follower.rollbacks_refused == 1
    # Recreated: a generation of its own, taken at epoch 1.
    await store.delete(queue)
    fresh = await store.get_or_create(topology, QueueSpec(queue, 3))
    now[0] += 1.5
    assert await follower.current() == fresh
    assert follower.generation not in (None, "")


@chaos(timeout=120)
async def test_swap_counts_only_once_a_replica_has_it(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, topology: Topology, queue: str
) -> None:
    store = PlanStore(cluster_client, replica_timeout=0.3)
    plan = await store.get_or_create(topology, QueueSpec(queue, 2))
    key = store.key(queue)
    master = await healthy_cluster.master_of_key(key)
    replica = await healthy_cluster.replica_of(master)
    probe = next(
        k
        for k in (f"{queue}:probe{i}" for i in range(5000))
        if cluster_client.get_node_from_key(k).port == master.port  # type: ignore[union-attr]
    )
    new = _at_epoch(plan, 2)
    other = Redis(host=master.host, port=master.port, single_connection_client=True)
    writer = Redis(host=master.host, port=master.port, single_connection_client=True)
    await other.ping()
    await writer.execute_command("SET", probe, "a")
    assert await writer.execute_command("WAIT", 1, 5000) == 1
    # SIGSTOP: the replica stays attached to its master but receives nothing.
    await healthy_cluster.pause_node(replica)
    try:
        # The premise of the design: WAIT counts up to the last write of its
        # own connection. On the writing connection it times out; on an older
        # connection that has not written since (a pooled one, say) it
        # confirms at once, although the replica has not seen the write.
        await writer.execute_command("SET", probe, "b")
        assert await writer.execute_command("WAIT", 1, 200) == 0
        assert await other.execute_command("WAIT", 1, 200) == 1

        with pytest.raises(PlanNotReplicatedError) as info:
            await store.compare_and_swap(new, expected_epoch=1)
        assert (info.value.epoch, info.value.replicas) == (2, 1)
        assert "call compare_and_swap again" in str(info.value)
        # It is written on the master (in force there), just not confirmed.
        assert await store.epoch(queue) == 2
    finally:
        await healthy_cluster.resume_node(replica)
        await other.aclose()
        await writer.aclose()
        await cluster_client.execute_command("DEL", probe)
    # Repeating the same swap confirms it once the replica caught up.
    async def swapped() -> bool:
        assert await store.compare_and_swap(new, expected_epoch=1)
        return True

    await eventually(swapped, "the resumed replica confirming", 20, interval=0.2,
                     ignoring=PlanNotReplicatedError)
    assert await _replica_hget(replica, key, "epoch") == b"2"


@chaos(timeout=120)
async def test_swap_on_a_master_without_replica(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, topology: Topology, queue: str
) -> None:
    store = PlanStore(cluster_client, replica_timeout=0.2)
    plan = await store.get_or_create(topology, QueueSpec(queue, 2))
    master = await healthy_cluster.master_of_key(store.key(queue))
    replica = await healthy_cluster.replica_of(master)
    await healthy_cluster.kill_node(replica)
    try:
        await eventually(
            lambda: _attached_replicas_are(master, 0), "the master dropping its replica"
        )
        with pytest.raises(PlanNotReplicatedError) as info:
            await store.compare_and_swap(_at_epoch(plan, 2), expected_epoch=1)
        assert info.value.replicas == 0
        assert "require_replica=False" in str(info.value)
        # The explicit opt-out for clusters without replicas.
        relaxed = PlanStore(cluster_client, require_replica=False)
        assert await relaxed.compare_and_swap(_at_epoch(plan, 3), expected_epoch=2)
        assert await store.epoch(queue) == 3
    finally:
        await healthy_cluster.heal()


async def _attached_replicas_are(master: Node, count: int) -> bool:
    role = await _node_call(master, "ROLE")
    return len(role[2]) == count


@chaos(timeout=120)
async def test_confirmed_swap_survives_a_failover(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, topology: Topology, queue: str
) -> None:
    store = PlanStore(cluster_client)
    plan = await store.get_or_create(topology, QueueSpec(queue, 3))
    key = store.key(queue)
    master = await healthy_cluster.master_of_key(key)
    replica = await healthy_cluster.replica_of(master)
    follower = PlanFollower(store, queue, poll_interval=0)
    assert (await follower.current()).epoch == 1
    assert await store.compare_and_swap(_at_epoch(plan, 2), expected_epoch=1)
    assert (await follower.current()).epoch == 2
    # Right after the switch was confirmed, the master dies.
    await healthy_cluster.kill_node(master)
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 60

        async def failed_over() -> bool:
            if (await healthy_cluster.master_of_key(key)).port == replica.port:
                return True
            seen.append((await follower.current()).epoch)
            return False

        await eventually(failed_over, "a failover", 60, interval=0.1)
        # Within the same 60 s as the failover.
        stored = await eventually(lambda: store.load(queue), "the promoted replica answering",
                                  deadline - time.monotonic(), interval=0.2,
                                  ignoring=(RedisError, OSError))
        assert stored == _at_epoch(plan, 2)
        assert (await follower.refresh()).epoch == 2
        assert set(seen) <= {2}
        assert follower.rollbacks_refused == 0
    finally:
        await healthy_cluster.heal()


async def test_cli_create_list_and_show_balanced(
    cluster_url: str, topology: Topology, queue: str
) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert await run_create(cluster_url, queue, 6, out=out, err=err) == 0
    assert "created" in out.getvalue()
    out = io.StringIO()
    assert await run_create(cluster_url, queue, 6, out=out, err=err) == 0
    assert "exists" in out.getvalue()
    out = io.StringIO()
    assert await run_list(cluster_url, out=out) == 0
    assert queue in out.getvalue().split()
    out = io.StringIO()
    assert await run_show(cluster_url, [queue], out=out, err=err) == 0
    text = out.getvalue()
    assert text.count(" OK") == 6
    assert "MISPLACED" not in text
    assert "imbalance 1.00" in text
    out = io.StringIO()
    assert await run_show(cluster_url, [queue], as_json=True, out=out, err=err) == 0
    doc = json.loads(out.getvalue())
    (report,) = doc["queues"]
    assert report["balanced"] is True
    assert [r["status"] for r in report["shards"]] == ["OK"] * 6
    assert err.getvalue() == ""


async def test_cli_errors(cluster_url: str, queue: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert await run_show(cluster_url, [queue], out=out, err=err) == 2
    assert "no plan" in err.getvalue()
    err = io.StringIO()
    bad = "redis://admin:s3cr3t-pw@127.0.0.1:1"
    assert await run_show(bad, [queue], out=out, err=err) == 2
    line = err.getvalue()
    assert line.count("\n") == 1
    assert "s3cr3t-pw" not in line
    err = io.StringIO()
    assert await run_create(cluster_url, "a{b", 3, out=out, err=err) == 2
    assert "Invalid queue name" in err.getvalue()


async def test_cli_entry_point_subprocess(
    cluster_url: str, store: PlanStore, topology: Topology, queue: str
) -> None:
    await store.get_or_create(topology, QueueSpec(queue, 3))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskiq_redis_cluster._cli._main",
        "plan",
        "show",
        "--url",
        cluster_url,
        "--queue",
        queue,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert f"queue {queue}" in stdout.decode()


@chaos(timeout=120)
async def test_swap_follows_a_moved_plan_key(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, topology: Topology, queue: str
) -> None:
    store = PlanStore(cluster_client)
    plan = await store.get_or_create(topology, QueueSpec(queue, 2))
    key = store.key(queue)
    slot = await cluster_client.execute_command(
        "CLUSTER", "KEYSLOT", key, target_nodes=cluster_client.get_random_node()
    )
    home = await healthy_cluster.master_of_slot(slot)
    other = next(n for n in await healthy_cluster.masters() if n.port != home.port)
    await healthy_cluster.migrate_slot(slot, other)
    try:
        # The client still routes the key to its old master: the pinned
        # batch gets MOVED, learns the new owner and waits for its replica.
        assert cluster_client.get_node_from_key(key).port == home.port  # type: ignore[union-attr]
        assert await store.compare_and_swap(_at_epoch(plan, 2), expected_epoch=1)
        replica = await healthy_cluster.replica_of(other)
        assert await _replica_hget(replica, key, "epoch") == b"2"
    finally:
        await healthy_cluster.migrate_slot(slot, home)


# Keep last: changes the shared cluster (and restores it).
@chaos(timeout=120)
async def test_migrated_slot_shows_misplaced(
    healthy_cluster: DevCluster,
    cluster_url: str,
    store: PlanStore,
    topology: Topology,
    queue: str,
) -> None:
    plan = await store.get_or_create(topology, QueueSpec(queue, 12))
    shard = plan.shards[0]
    home = await healthy_cluster.master_of_slot(shard.slot)
    other = next(n for n in await healthy_cluster.masters() if n.port != home.port)
    await healthy_cluster.migrate_slot(shard.slot, other)
    try:
        out, err = io.StringIO(), io.StringIO()
        assert await run_show(cluster_url, [queue], as_json=True, out=out, err=err) == 1
        (report,) = json.loads(out.getvalue())["queues"]
        assert report["misplaced"] == [0]
        assert report["shards"][0]["status"] == "MISPLACED"
        assert report["shards"][0]["actual_address"].endswith(f":{other.port}")
        assert report["imbalance"] > 1.0
        assert report["spread"] == 2
        assert report["balanced"] is False
        out = io.StringIO()
        assert await run_show(cluster_url, [queue], out=out, err=err) == 1
        assert "MISPLACED" in out.getvalue()
        assert "NOT balanced" in out.getvalue()
        # The rebalancer's view: exactly one shard has to move back.
        client = await connect(cluster_url)
        try:
            moved = replan(plan, await read_topology(client))
        finally:
            await client.aclose()
        assert len(moved.moves) == 1
    finally:
        await healthy_cluster.migrate_slot(shard.slot, home)
    out = io.StringIO()
    assert await run_show(cluster_url, [queue], out=out, err=io.StringIO()) == 0
