"""The auto-pipeline's direct path (own RESP encoding and reply parsing over
redis-py's pooled connections) against the real 3+3 cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import make_message, take, task_id_of
from redis.asyncio import RedisCluster
from redis.exceptions import DataError, ResponseError

from taskiq_redis_cluster import ClusterStreamBroker
from taskiq_redis_cluster._autopipeline import AutoPipeline, CommandFailure, Unroutable
from taskiq_redis_cluster._keys import ShardKeys
from taskiq_redis_cluster.devcluster import DevCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
async def pipeline(cluster_client: RedisCluster) -> AsyncIterator[AutoPipeline]:
    pipe = AutoPipeline(cluster_client)
    yield pipe
    await pipe.drain()


async def test_batch_of_mixed_commands_over_every_master(
    pipeline: AutoPipeline, cluster_client: RedisCluster, unique_name: str
) -> None:
    keys = [f"{unique_name}:{i}" for i in range(60)]
    assert len({cluster_client.get_node_from_key(k).name for k in keys}) == 3
    sets = [pipeline.submit(k, "SET", k, f"v{i}") for i, k in enumerate(keys)]
    assert [(await f).value for f in sets] == [b"OK"] * len(keys)
    gets = [pipeline.submit(k, "GET", k) for k in keys]
    assert [(await f).value for f in gets] == [f"v{i}".encode() for i in range(len(keys))]
    assert await cluster_client.get(keys[7]) == b"v7"


async def test_a_bad_argument_or_error_reply_fails_only_its_own_command(
    pipeline: AutoPipeline, unique_name: str
) -> None:
    key = f"{unique_name}:k"
    before = pipeline.submit(key, "SET", key, "v")
    bad = pipeline.submit(key, "SET", key, True)
    wrong_type = pipeline.submit(key, "LPUSH", key, "x")
    after = pipeline.submit(key, "GET", key)
    assert (await before).value == b"OK"
    with pytest.raises(CommandFailure) as unpackable:
        await bad
    assert isinstance(unpackable.value.error, DataError)
    assert unpackable.value.sent is False
    with pytest.raises(CommandFailure) as rejected:
        await wrong_type
    assert isinstance(rejected.value.error, ResponseError)
    assert str(rejected.value.error).startswith("WRONGTYPE")
    assert (await after).value == b"v"


async def test_a_connection_killed_between_batches_is_replaced(
    pipeline: AutoPipeline, cluster_client: RedisCluster, unique_name: str
) -> None:
    key = f"{unique_name}:k"
    assert (await pipeline.execute(key, "SET", key, "1")).value == b"OK"
    node = cluster_client.get_node_from_key(key)
    await cluster_client.execute_command(
        "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes", target_nodes=node
    )
    # The pooled connection is dead; the first use may fail (outcome known to
    # be sent or not), after which a fresh connection is used.
    for _ in range(3):
        try:
            reply = await pipeline.execute(key, "INCR", key)
            break
        except CommandFailure:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the pipeline never recovered from a killed connection")
    assert reply.value in (2, 3)


async def test_call_gives_way_to_redis_py_when_the_slot_moved(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, unique_name: str
) -> None:
    key = f"{{{unique_name}}}:k"
    await cluster_client.set(key, "v")
    pipe = AutoPipeline(cluster_client)
    assert await pipe.call(key, "GET", key) == b"v"
    slot = cluster_client.keyslot(key)
    source = await healthy_cluster.master_of_key(key)
    target = next(m for m in await healthy_cluster.masters() if m.port != source.port)
    await healthy_cluster.migrate_slot(slot, target)
    try:
        # The client's slot map still names the old owner, which says MOVED.
        with pytest.raises(Unroutable):
            await pipe.call(key, "GET", key)
        assert await cluster_client.get(key) == b"v"  # redis-py follows and learns
        assert await pipe.call(key, "GET", key) == b"v"
    finally:
        await healthy_cluster.migrate_slot(slot, source)


async def test_readers_follow_a_shard_whose_slot_moved(
    healthy_cluster: DevCluster, cluster_url: str, unique_name: str
) -> None:
    broker = ClusterStreamBroker(
        cluster_url, queue_name=unique_name, xread_block=200, idle_timeout=2_000, shards=3
    )
    await broker.startup()
    try:
        plan = await broker.current_plan()
        stream = ShardKeys(broker.options.prefix, plan.shards[0].tag).stream
        slot = broker.client.keyslot(stream)
        first = [f"a{i}" for i in range(30)]
        await asyncio.gather(*(broker.kick(make_message(i)) for i in first))
        assert sorted(task_id_of(m.data) for m in await take(broker, 30)) == sorted(first)
        source = await healthy_cluster.master_of_key(stream)
        target = next(m for m in await healthy_cluster.masters() if m.port != source.port)
        await healthy_cluster.migrate_slot(slot, target)
        try:
            second = [f"b{i}" for i in range(30)]
            await asyncio.gather(*(broker.kick(make_message(i)) for i in second))
            got = await take(broker, 30)
            assert sorted(task_id_of(m.data) for m in got) == sorted(second)
        finally:
            await healthy_cluster.migrate_slot(slot, source)
    finally:
        await broker.shutdown()


async def test_resp2_connections_work_end_to_end(cluster_url: str, unique_name: str) -> None:
    # redis-py 8 speaks RESP3 by default; the raw replies differ in shape.
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, protocol=2, shards=3)
    await broker.startup()
    try:
        node = broker.client.get_default_node()
        connection = node.acquire_connection()
        node.release(connection)
        assert connection.protocol == 2
        ids = [f"r{i}" for i in range(40)]
        await asyncio.gather(*(broker.kick(make_message(i)) for i in ids))
        got = await take(broker, len(ids))
        assert sorted(task_id_of(m.data) for m in got) == sorted(ids)
    finally:
        await broker.shutdown()
