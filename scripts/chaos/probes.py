"""What the queue holds in Redis: its keys, pending entries, backlog, dead letters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from redis.asyncio import RedisCluster
from taskiq import AsyncBroker

from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker
from taskiq_redis_cluster._keys import ShardKeys


async def pending_entries(
    admin: RedisCluster, stream_keys: Iterable[str], group: str = "taskiq"
) -> int:
    """Entries delivered but not yet acknowledged, over ``stream_keys``.

    ``taskiq`` is the default consumer group of both brokers. Streams that
    cannot be read (missing, node down) count as 0.
    """
    total = 0
    for key in stream_keys:
        with contextlib.suppress(Exception):
            total += int((await admin.xpending(key, group))["pending"])
    return total


async def stream_keys(producer: AsyncBroker, queue: str) -> list[str]:
    """The keys holding ``queue``'s tasks: one stream (or list) per shard, or
    taskiq-redis's one stream.

    For ClusterStreamBroker the shards' streams come first, in shard order
    (the faults aim at the first), then their priority lane streams.
    """
    if isinstance(producer, ClusterStreamBroker):
        plan = await producer.current_plan()
        keys = [ShardKeys(producer.options.prefix, s.tag) for s in plan.shards]
        lanes = range(1, producer.options.priority_lanes)
        return [k.stream for k in keys] + [k.lane(n) for k in keys for n in lanes]
    if isinstance(producer, ClusterListQueueBroker):
        plan = await producer.current_plan()
        return [ShardKeys(producer.options.prefix, s.tag).list for s in plan.shards]
    return [queue]


async def dead_letter_keys(producer: AsyncBroker) -> list[str]:
    """The dead-letter streams of the producer's queue (ClusterStreamBroker only)."""
    if not isinstance(producer, ClusterStreamBroker):
        return []
    plan = await producer.current_plan()
    prefix = producer.options.prefix
    return [ShardKeys(prefix, s.tag).dead for s in (*plan.shards, *plan.draining)]


async def delayed_count(producer: AsyncBroker, admin: RedisCluster) -> int:
    """Delayed tasks not promoted yet, over the shards' delayed sets (ours only)."""
    if not isinstance(producer, ClusterStreamBroker):
        return 0
    plan = await producer.current_plan()
    prefix = producer.options.prefix
    total = 0
    for shard in (*plan.shards, *plan.draining):
        total += int(await admin.zcard(ShardKeys(prefix, shard.tag).delayed))
    return total


async def dead_letter_count(admin: RedisCluster, keys: Iterable[str]) -> int:
    """Entries in the dead-letter streams ``keys`` (a missing one counts 0)."""
    total = 0
    for key in keys:
        total += int(await admin.xlen(key))
    return total


async def queue_depth(
    admin: RedisCluster, broker: str, keys: Iterable[str], group: str = "taskiq"
) -> tuple[int, int]:
    """``(queued, pending)`` over the queue's ``keys``.

    Queued: in Redis and never delivered (a list's length; a stream
    group's lag). Pending: delivered to a consumer and not acknowledged
    (streams only; lists have no such state). A key that cannot be read
    counts 0, and so does a lag Redis cannot tell (null after XDEL).
    """
    queued = pending = 0
    for key in keys:
        with contextlib.suppress(Exception):
            if broker == "ours-list":
                queued += int(await admin.llen(key))
                continue
            for info in await admin.xinfo_groups(key):
                name = info.get("name")
                if (name.decode() if isinstance(name, bytes) else name) != group:
                    continue
                pending += int(info.get("pending") or 0)
                queued += int(info.get("lag") or 0)
    return queued, pending
