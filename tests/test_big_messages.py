"""32 MB tasks end to end through both sharded brokers on the real cluster.

Before the fast path parsed with hiredis, a reply was quadratic to read: a
24 MB task timed out on every delivery (``Reading ... failed (timeout)``) and
never ran. The brokers' socket timeout here is their floor (block time plus
5 s), which a quadratic read of 32 MB overran (about 10 s on this machine)
while a linear one takes a small fraction of it.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from helpers import eventually, make_message, take
from taskiq import BrokerMessage

from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker
from taskiq_redis_cluster._keys import ShardKeys

pytestmark = pytest.mark.cluster

_SIZE = 32 << 20


def _big_message(task_id: str) -> BrokerMessage:
    # Random hex, so a lost, doubled or shifted piece cannot compare equal.
    message = make_message(task_id, args=[os.urandom(_SIZE // 2).hex()])
    assert len(message.message) > _SIZE
    return message


async def test_a_32_mb_task_through_the_stream_broker(cluster_url: str, unique_name: str) -> None:
    broker = ClusterStreamBroker(
        cluster_url, queue_name=unique_name, xread_block=200, idle_timeout=120_000, shards=3
    )
    await broker.startup()
    try:
        message = _big_message("big-stream")
        await broker.kick(message)
        (got,) = await take(broker, 1, timeout=30)  # acks it
        assert got.data == message.message
        plan = await broker.current_plan()
        streams = [ShardKeys(broker.options.prefix, s.tag).stream for s in plan.shards]
        group = broker.options.consumer_group_name

        async def nothing_pending() -> bool:
            counts = [(await broker.client.xpending(s, group))["pending"] for s in streams]
            return sum(counts) == 0

        await eventually(nothing_pending, "the 32 MB entry acknowledged")
        assert sum([await broker.client.xlen(s) for s in streams]) == 1
    finally:
        await broker.shutdown()


async def test_a_32_mb_task_through_the_list_broker(cluster_url: str, unique_name: str) -> None:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, brpop_timeout=0.2)
    await broker.startup()
    try:
        message = _big_message("big-list")
        await broker.kick(message)
        listen = broker.listen()
        try:
            got = await asyncio.wait_for(anext(listen), 30)
        finally:
            await listen.aclose()
        assert got == message.message
    finally:
        await broker.shutdown()
