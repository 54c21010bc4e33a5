"""The auto-pipeline's direct path (hiredis packing and reply parsing over
redis-py's pooled connections) against the real 3+3 cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import chaos, make_message, take, task_id_of
from redis.asyncio import RedisCluster
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskiq_redis_cluster import ClusterStreamBroker, ConnectionOptions, connect
from taskiq_redis_cluster._keys import ShardKeys
from taskiq_redis_cluster._redis._autopipeline import AutoPipeline, CommandFailure, Unroutable
from taskiq_redis_cluster._redis._retry import Outcome, write_outcome
from taskiq_redis_cluster.testing import DevCluster

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


@chaos(timeout=120)
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


@chaos(timeout=120)
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


@pytest.fixture
async def short_timeout_client(cluster_url: str) -> AsyncIterator[RedisCluster]:
    """A client of its own whose socket timeout is 1 s (the default is 10 s)."""
    client = await connect(cluster_url, ConnectionOptions(socket_timeout=1.0))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_a_timeout_mid_batch_keeps_the_replies_that_arrived(
    short_timeout_client: RedisCluster, unique_name: str, wait_replicas: int
) -> None:
    # One batch to one node: two XADDs, a BLPOP that blocks past the socket
    # timeout, one more XADD. The first two ran and their ids were read
    # before the timeout: they must be results, not "outcome unknown" (a
    # caller would retry and enqueue them twice). Only the BLPOP and what
    # follows it got no reply.
    stream, empty = f"{{{unique_name}}}:s", f"{{{unique_name}}}:empty"
    pipe = AutoPipeline(short_timeout_client, wait_replicas=wait_replicas)
    first = pipe.submit(stream, "XADD", stream, "*", "n", "1")
    second = pipe.submit(stream, "XADD", stream, "*", "n", "2")
    blocked = pipe.submit(empty, "BLPOP", empty, 5)
    third = pipe.submit(stream, "XADD", stream, "*", "n", "3")
    replies = [await first, await second]
    ids = [reply.value for reply in replies]
    # WAIT, last in the batch, never answered: the replica count is unknown
    # (None), which the stream broker reports as a ReplicationTimeoutError.
    assert [reply.replicas for reply in replies] == [None, None]
    for future in (blocked, third):
        with pytest.raises(CommandFailure) as failed:
            await future
        assert isinstance(failed.value.error, RedisTimeoutError)
        assert failed.value.sent is True
        assert write_outcome(failed.value.error, sent=True) is Outcome.UNKNOWN
    await pipe.drain()
    # The ids given back are the entries the stream holds: the replies were
    # real. The third XADD sat behind the BLPOP when the connection closed.
    entries = await short_timeout_client.xrange(stream)
    assert [entry_id for entry_id, _ in entries] == ids


async def test_the_timeout_bounds_silence_not_the_whole_exchange(
    short_timeout_client: RedisCluster, unique_name: str
) -> None:
    # Three BLPOPs of 0.4 s each, one after the other on one connection:
    # 1.2 s or more in all, beyond the 1 s socket timeout, but a reply comes
    # every 0.4-0.5 s. Bytes arriving is progress, so the batch succeeds;
    # a big reply streaming in for longer than the timeout is the same case.
    pipe = AutoPipeline(short_timeout_client)
    keys = [f"{{{unique_name}}}:empty{i}" for i in range(3)]
    waits = [pipe.submit(key, "BLPOP", key, 0.4) for key in keys]
    assert [(await f).value for f in waits] == [None, None, None]


async def test_push_frames_never_fail_a_batch(cluster_url: str, unique_name: str) -> None:
    # RESP3 key tracking on the batch's own connection: after each SET of a
    # tracked key, the server sends an invalidation push frame to this same
    # connection. One lands between two replies, one after the batch's last
    # reply. Neither is a reply; the fully applied batch succeeds.
    client = await connect(cluster_url, ConnectionOptions(extra={"protocol": 3}))
    try:
        key = f"{{{unique_name}}}:k"
        await client.set(key, "v1")
        pipe = AutoPipeline(client)
        batch = [
            pipe.submit(key, "CLIENT", "TRACKING", "ON"),
            pipe.submit(key, "GET", key),  # tracks the key
            pipe.submit(key, "SET", key, "v2"),  # invalidation push follows
            pipe.submit(key, "GET", key),  # tracks it again
            pipe.submit(key, "SET", key, "v3"),  # push after the last reply
        ]
        assert [(await f).value for f in batch] == [b"OK", b"v1", b"OK", b"v2", b"OK"]
        # The next batches (on the same, still tracking connection) read on.
        for value in (b"v4", b"v5"):
            assert (await pipe.execute(key, "SET", key, value)).value == b"OK"
            assert (await pipe.execute(key, "GET", key)).value == value
        assert await pipe.call(key, "GET", key) == b"v5"
    finally:
        await client.aclose()


async def test_call_refuses_a_bad_argument_before_sending(
    pipeline: AutoPipeline, unique_name: str
) -> None:
    key = f"{unique_name}:k"
    with pytest.raises(DataError):
        await pipeline.call(key, "SET", key, True)
    with pytest.raises(DataError):
        await pipeline.call(key, "SET", key, "\ud800")
    assert await pipeline.call(key, "GET", key) is None


async def test_commands_for_a_busy_node_wait_and_go_as_one_batch(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    # max_inflight=1: while a batch to a node is unanswered (a BLPOP of
    # 0.3 s here), new commands for that node wait and then go together;
    # another node's commands do not wait.
    empty, key = f"{{{unique_name}}}:empty", f"{{{unique_name}}}:k"
    other = next(f"{unique_name}:o{i}" for i in range(100)
                 if cluster_client.get_node_from_key(f"{unique_name}:o{i}").name
                 != cluster_client.get_node_from_key(key).name)
    pipe = AutoPipeline(cluster_client, max_inflight=1)
    batches: list[int] = []
    run = pipe._run

    async def counted(node: object, items: list[object]) -> None:
        batches.append(len(items))
        await run(node, items)  # type: ignore[arg-type]

    pipe._run = counted  # type: ignore[assignment,method-assign]
    blocked = pipe.submit(empty, "BLPOP", empty, 0.3)
    await asyncio.sleep(0.05)  # the BLPOP is on its way
    incrs = [pipe.submit(key, "INCR", key) for _ in range(50)]
    elsewhere = pipe.submit(other, "SET", other, "x")
    assert (await asyncio.wait_for(elsewhere, 0.2)).value == b"OK"
    assert not blocked.done()
    assert not any(f.done() for f in incrs)
    assert (await blocked).value is None
    assert [(await f).value for f in incrs] == list(range(1, 51))  # in order
    assert batches == [1, 1, 50]
    await pipe.drain()


async def test_commands_held_for_a_node_that_fails_fail_as_never_sent(
    short_timeout_client: RedisCluster, unique_name: str
) -> None:
    # The unanswered batch times out (its node counts as failed): what
    # waited behind it was never sent, so a kick may go elsewhere at once.
    empty, key = f"{{{unique_name}}}:empty", f"{{{unique_name}}}:k"
    pipe = AutoPipeline(short_timeout_client, max_inflight=1)
    blocked = pipe.submit(empty, "BLPOP", empty, 5)
    await asyncio.sleep(0.05)
    held = pipe.submit(key, "SET", key, "v")
    with pytest.raises(CommandFailure) as timed_out:
        await blocked
    assert timed_out.value.sent is True
    with pytest.raises(CommandFailure) as never_sent:
        await held
    assert never_sent.value.sent is False
    assert write_outcome(never_sent.value.error, sent=False) is Outcome.NOT_APPLIED
    await pipe.drain()
    assert await short_timeout_client.get(key) is None
