"""Stream broker delivery bookkeeping, deterministically on the real cluster.

Each test sets up, with raw commands, a state that a routine operation
reaches (a dead worker between busy ones, a dead-letter key of the wrong
type, a shard retired under a reader, a producer holding an old plan) and
checks that no entry is lost, dead-lettered by mistake or left waiting for
``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from helpers import eventually, make_message, task_id_of
from redis.asyncio import RedisCluster
from taskiq import AckableMessage

from taskiq_redis_cluster import ClusterStreamBroker, PlanStore, Shard, ShardPlan
from taskiq_redis_cluster._brokers._base import Sink, StopSignal
from taskiq_redis_cluster._brokers._buffer import ListenBuffer
from taskiq_redis_cluster._keys import ShardKeys, shard_tag, tag_slot

pytestmark = pytest.mark.cluster

_GROUP = "taskiq"


async def _started(url: str, queue: str, **kwargs: Any) -> ClusterStreamBroker:
    broker = ClusterStreamBroker(url, queue_name=queue, **kwargs)
    await broker.startup()
    return broker


@pytest.fixture
async def one_shard(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterStreamBroker]:
    """A broker whose queue has a single shard, consumer name ``W``."""
    broker = await _started(
        cluster_url, unique_name, shards=1, consumer_name="W", idle_timeout=1_000,
        xread_block=200, plan_poll_interval=0.2,
    )
    try:
        yield broker
    finally:
        await broker.shutdown()


async def _only_shard(broker: ClusterStreamBroker) -> tuple[Shard, ShardKeys]:
    plan = await broker.current_plan()
    assert len(plan.shards) == 1
    shard = plan.shards[0]
    return shard, ShardKeys(broker.options.prefix, shard.tag)


def _collecting_sink() -> tuple[Sink, list[AckableMessage | bytes]]:
    """A reader's sink whose messages land in a list (a buffer with room for all)."""
    buffer: ListenBuffer[AckableMessage | bytes] = ListenBuffer(10_000)
    got: list[AckableMessage | bytes] = []
    real_put = buffer.put_nowait

    def put_nowait(item: AckableMessage | bytes, lane: int = 0) -> None:
        got.append(item)
        real_put(item, lane)

    buffer.put_nowait = put_nowait  # type: ignore[method-assign]
    return Sink(buffer), got


async def _read_as(client: RedisCluster, stream: str, consumer: str, count: int) -> list[bytes]:
    reply = await client.xreadgroup(_GROUP, consumer, {stream: ">"}, count=count)
    return [entry_id for _, entries in reply for entry_id, _ in entries]


async def test_reclaimed_entries_are_counted_exactly_and_never_dead_lettered_by_mistake(
    one_shard: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    # A dead worker "deadA" holds one old entry and 50 recent ones; the live
    # worker W holds 200 in between. W's reclaim claims deadA's 51: each was
    # delivered exactly twice now, so none may be dead-lettered.
    broker = one_shard
    shard, keys = await _only_shard(broker)
    await broker._ensure_group(keys.stream)
    for i in range(251):
        await broker.kick(make_message(f"m{i}", partition_key="p"))
    dead_a = await _read_as(cluster_client, keys.stream, "deadA", 1)
    mine = await _read_as(cluster_client, keys.stream, "W", 200)
    dead_a += await _read_as(cluster_client, keys.stream, "deadA", 50)
    assert (len(dead_a), len(mine)) == (51, 200)
    await asyncio.sleep(1.1)  # deadA's entries pass idle_timeout (1 s)...
    # ...while W's own are fresh: it is alive and working on them.
    await cluster_client.xclaim(keys.stream, _GROUP, "W", 0, mine, justid=True)

    sink, got = _collecting_sink()
    await broker._reclaim(keys, shard, keys.stream, 0, sink, StopSignal())
    assert len(got) == 51
    assert await cluster_client.xlen(keys.dead) == 0
    rows = await cluster_client.xpending_range(
        keys.stream, _GROUP, min="-", max="+", count=300, consumername="W"
    )
    counts = {r["message_id"]: r["times_delivered"] for r in rows}
    assert {counts[i] for i in dead_a} == {2}


async def test_entry_acked_between_claim_and_count_is_not_run_again(
    one_shard: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    broker = one_shard
    shard, keys = await _only_shard(broker)
    await broker._ensure_group(keys.stream)
    await broker.kick(make_message("slow", partition_key="p"))
    [entry_id] = await _read_as(cluster_client, keys.stream, "slowpoke", 1)
    await asyncio.sleep(1.1)
    counted = broker._delivery_counts

    async def ack_first(stream: str, ids: list[bytes]) -> dict[bytes, int]:
        # The slow (not dead) first worker acks right after W's claim.
        await cluster_client.xack(stream, _GROUP, entry_id)
        return await counted(stream, ids)

    broker._delivery_counts = ack_first  # type: ignore[method-assign]
    sink, got = _collecting_sink()
    await broker._reclaim(keys, shard, keys.stream, 0, sink, StopSignal())
    assert got == []
    assert await cluster_client.xlen(keys.dead) == 0


async def test_a_failing_dead_letter_does_not_strand_the_rest_of_the_batch(
    one_shard: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    # The dead-letter key holds a string, so dead-lettering the garbage entry
    # fails with WRONGTYPE. The valid entries read in the same batch must
    # still go out at once, not after idle_timeout (set to 10 min here).
    broker = await _started(
        one_shard.url, one_shard.queue_name + "-w", shards=1, idle_timeout=600_000,
        xread_block=200, plan_poll_interval=0.2,
    )
    try:
        _, keys = await _only_shard(broker)
        await broker._ensure_group(keys.stream)
        await cluster_client.set(keys.dead, "not a stream")
        await cluster_client.xadd(keys.stream, {"garbage": "1"})
        for i in range(5):
            await broker.kick(make_message(f"ok{i}", partition_key="p"))
        got: list[str] = []
        listen = broker.listen()
        try:
            async def consume() -> None:
                async for msg in listen:
                    assert isinstance(msg, AckableMessage)
                    got.append(task_id_of(msg.data))
                    await msg.ack()  # type: ignore[misc]
                    if len(got) == 5:
                        return

            await asyncio.wait_for(consume(), 10)
        finally:
            await listen.aclose()
        assert sorted(got) == [f"ok{i}" for i in range(5)]
        # The garbage entry was released, so the next reclaim pass retries it.
        [row] = await cluster_client.xpending_range(keys.stream, _GROUP, "-", "+", 10)
        assert row["time_since_delivered"] >= 600_000
    finally:
        await broker.shutdown()


async def test_reader_of_a_retired_shard_hands_out_what_it_read(
    one_shard: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    # The listen buffer (xread_count 10) is full and the reader holds a
    # second batch of 10 when the shard leaves the plan. The reader must hand
    # out that batch to the live listen, not park it until the listen closes
    # (the entries would stay pending and stall a rebalancer's drain).
    broker = await _started(
        one_shard.url, one_shard.queue_name + "-r", shards=1, idle_timeout=600_000,
        xread_block=200, xread_count=10, plan_poll_interval=0.2,
    )
    try:
        shard, keys = await _only_shard(broker)
        for i in range(25):
            await broker.kick(make_message(f"m{i:02d}", partition_key="p"))
        listen = broker.listen()
        first = await asyncio.wait_for(listen.__anext__(), 5)
        assert isinstance(first, AckableMessage)

        async def holds_second_batch() -> bool:
            info = await cluster_client.xpending(keys.stream, _GROUP)
            return int(info["pending"]) == 20

        await eventually(holds_second_batch, "reader holding its second batch")
        store = PlanStore(cluster_client, prefix=broker.options.prefix)
        plan = await broker.current_plan()
        new_tag = shard_tag(broker.queue_name, 0, shard.salt + 1)
        retired = ShardPlan(
            plan.queue, plan.epoch + 1,
            (replace(shard, tag=new_tag, slot=tag_slot(new_tag)),),
        )
        assert await store.compare_and_swap(retired, plan.epoch)
        new_stream = ShardKeys(broker.options.prefix, new_tag).stream

        async def supervisor_switched() -> bool:
            # It starts the new shard's reader (which creates its stream)
            # right after stopping the old one.
            return bool(await cluster_client.exists(new_stream))

        await eventually(supervisor_switched, "reader of the new shard started")
        got = [task_id_of(first.data)]
        deadline = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < deadline:
            try:
                msg = await asyncio.wait_for(listen.__anext__(), 1)
            except asyncio.TimeoutError:
                continue
            assert isinstance(msg, AckableMessage)
            got.append(task_id_of(msg.data))
        await listen.aclose()
        assert got == [f"m{i:02d}" for i in range(20)]
    finally:
        await broker.shutdown()


async def test_stale_producer_never_kicks_into_a_retired_stream(
    one_shard: ClusterStreamBroker, cluster_client: RedisCluster, cluster_url: str
) -> None:
    # The producer's plan is frozen (it never polls) across a complete move
    # and cleanup; its next kick must land on the live shard, and must not
    # recreate the deleted stream where nobody would read it.
    queue = one_shard.queue_name
    producer = await _started(cluster_url, queue, plan_poll_interval=3600)
    try:
        shard, old = await _only_shard(producer)
        await producer.kick(make_message("before", partition_key="p"))
        store = PlanStore(cluster_client, prefix=producer.options.prefix)
        plan = await store.load(queue)
        assert plan is not None
        new_tag = shard_tag(queue, 0, shard.salt + 1)
        moved = ShardPlan(
            plan.queue, plan.epoch + 1, (replace(shard, tag=new_tag, slot=tag_slot(new_tag)),)
        )
        assert await store.compare_and_swap(moved, plan.epoch)
        await cluster_client.delete(old.stream)

        await producer.kick(make_message("after", partition_key="p"))
        new = ShardKeys(producer.options.prefix, new_tag)
        assert await cluster_client.exists(old.stream) == 0
        entries = await cluster_client.xrange(new.stream)
        assert [task_id_of(fields[b"data"]) for _, fields in entries] == ["after"]
        # Created with its group at 0, so workers get it.
        groups = await cluster_client.xinfo_groups(new.stream)
        assert [g["name"] for g in groups] == [_GROUP.encode()]
    finally:
        await producer.shutdown()


async def test_live_shard_whose_stream_vanished_is_recreated_by_the_kick(
    one_shard: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    broker = one_shard
    _, keys = await _only_shard(broker)
    await broker.kick(make_message("a", partition_key="p"))
    await cluster_client.delete(keys.stream)
    await broker.kick(make_message("b", partition_key="p"))
    entries = await cluster_client.xrange(keys.stream)
    assert [task_id_of(fields[b"data"]) for _, fields in entries] == ["b"]
    groups = await cluster_client.xinfo_groups(keys.stream)
    assert [(g["name"], g["last-delivered-id"]) for g in groups] == [(_GROUP.encode(), b"0-0")]
