"""Task controls of the list broker alone: how a due task is queued.

The checks the list broker shares with the stream broker (delay, dedup
keys, real workers) run against both in tests/test_task_controls.py. Here,
in the default and the reliable mode: a due task is pushed to the back of
its list, behind what already waits there, like a new kick.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import Broker, make_message, new_broker, running, task_id_of
from redis.asyncio import RedisCluster

from taskiq_redis_cluster._brokers._delayed import list_promoter
from taskiq_redis_cluster._keys import ShardKeys, slot_of

pytestmark = pytest.mark.cluster


@pytest.fixture(params=["list", "list-reliable"])
async def broker(
    request: pytest.FixtureRequest, cluster_url: str, unique_name: str
) -> AsyncIterator[Broker]:
    b = new_broker(request.param, cluster_url, unique_name, shards=3)
    async with running(b):
        yield b


async def test_a_due_task_joins_the_back_of_its_list(
    broker: Broker, cluster_client: RedisCluster
) -> None:
    """LPUSH in, pop from the other end: a due task queues like a new kick.

    Due tasks pushed together keep their due order, and a member with a
    stream lane prefix is pushed as its bare message.
    """
    plan = await broker.current_plan()
    keys = [ShardKeys(broker.options.prefix, s.tag) for s in plan.shards]
    home = keys[slot_of("acct") % len(keys)]
    await broker.kick(make_message("d1", partition_key="acct", delay=0.2))
    await broker.kick(make_message("d2", partition_key="acct", delay=0.3))
    for i in range(3):
        await broker.kick(make_message(f"p{i}", partition_key="acct"))
    laned = make_message("laned").message
    await cluster_client.zadd(home.delayed, {b"\0L2\0" + laned: 0})
    # Until both delays are over: the promoter is stepped by hand below, so
    # this waits for the clock, not for a background effect.
    await asyncio.sleep(0.35)
    promoter = list_promoter(cluster_client, home)
    await promoter.step()
    queued = [task_id_of(d) for d in reversed(await cluster_client.lrange(home.list, 0, -1))]
    assert queued == ["p0", "p1", "p2", "laned", "d1", "d2"]
    assert int(await cluster_client.zcard(home.delayed)) == 0
