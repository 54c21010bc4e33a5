"""ClusterStreamBroker against the real 3+3 cluster (in-process parts).

Worker-process scenarios are in tests/test_stream_faults.py (SIGKILL with
tasks in flight, slot MIGRATE under load, XADD spread) and in the CI subset
of tests/test_chaos.py (stream DEL, CLUSTER FAILOVER and master SIGKILL under
load, with lost = 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from helpers import chaos, consuming, eventually, make_message, running, take, task_id_of
from redis.asyncio import RedisCluster

from taskiq_redis_cluster import (
    ClusterStreamBroker,
    ConfigurationError,
    InvalidNameError,
    KickFailedError,
    LifecycleError,
    NotAClusterError,
    StreamOptions,
)
from taskiq_redis_cluster._keys import ShardKeys
from taskiq_redis_cluster.testing import DevCluster

pytestmark = pytest.mark.cluster



Factory = Callable[..., Awaitable[ClusterStreamBroker]]


@pytest.fixture
async def make_broker(cluster_url: str, unique_name: str) -> AsyncIterator[Factory]:
    """Start brokers of the test's queue with these options; all stop at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> ClusterStreamBroker:
            broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, **options)
            await stack.enter_async_context(running(broker))
            return broker

        yield make


@pytest.fixture
async def broker(make_broker: Factory) -> ClusterStreamBroker:
    return await make_broker(idle_timeout=1_000, xread_block=200, plan_poll_interval=0.5)


async def test_kicks_immediately_after_startup_do_not_race(make_broker: Factory) -> None:
    # The redis-py first-use race breaks >= 16 concurrent commands on a fresh
    # client; startup() warms the client, so 64 kicks right after it work.
    broker = await make_broker()
    await asyncio.gather(*(broker.kick(make_message(f"t{i}")) for i in range(64)))
    plan = await broker.current_plan()
    total = 0
    for shard in plan.shards:
        total += await broker.client.xlen(ShardKeys(broker.options.prefix, shard.tag).stream)
    assert total == 64


async def test_default_plan_spreads_shards_over_every_master(
    broker: ClusterStreamBroker, redis_cluster: DevCluster
) -> None:
    plan = await broker.current_plan()
    assert len(plan.shards) == 12  # 4 per master, 3 masters
    owners = Counter()
    for shard in plan.shards:
        key = ShardKeys(broker.options.prefix, shard.tag).stream
        master = await redis_cluster.master_of_key(key)
        owners[master.port] += 1
    assert sorted(owners.values()) == [4, 4, 4]


async def test_round_trip_and_fairness(broker: ClusterStreamBroker) -> None:
    ids = [f"id-{i}" for i in range(120)]
    await asyncio.gather(*(broker.kick(make_message(i)) for i in ids))
    got = await take(broker, len(ids))
    assert sorted(task_id_of(m.data) for m in got) == sorted(ids)
    # Everything was acked, so nothing stays pending on any shard (acks go
    # out in batches within a few milliseconds).
    plan = await broker.current_plan()
    streams = [ShardKeys(broker.options.prefix, s.tag).stream for s in plan.shards]

    async def none_pending() -> bool:
        for stream in streams:
            info = await broker.client.xpending(stream, broker.options.consumer_group_name)
            if int(info["pending"]) != 0:
                return False
        return True

    await eventually(none_pending, "no pending entries on any shard")


async def test_partition_key_pins_tasks_to_one_shard_in_order(
    broker: ClusterStreamBroker,
) -> None:
    for i in range(30):
        await broker.kick(make_message(f"p{i}", partition_key="customer-42"))
    plan = await broker.current_plan()
    lengths = {
        s.tag: await broker.client.xlen(ShardKeys(broker.options.prefix, s.tag).stream)
        for s in plan.shards
    }
    assert sorted(lengths.values())[-1] == 30
    assert sum(lengths.values()) == 30
    tag = max(lengths, key=lambda t: lengths[t])
    entries = await broker.client.xrange(ShardKeys(broker.options.prefix, tag).stream)
    assert [task_id_of(e[1][b"data"]) for e in entries] == [f"p{i}" for i in range(30)]


async def test_garbage_entry_goes_to_dead_letter_and_worker_continues(
    broker: ClusterStreamBroker,
) -> None:
    # In a worker process garbage is dead-lettered (outside one, the broker
    # is a plain transport and hands raw data out: tests/test_compat.py).
    broker.is_worker_process = True
    broker.register_task(lambda: None, "tests:noop")
    plan = await broker.current_plan()
    keys = ShardKeys(broker.options.prefix, plan.shards[0].tag)
    await broker.client.xadd(keys.stream, {b"junk": b"not a task"})
    await broker.client.xadd(keys.stream, {b"data": b"\xff\xfe not json"})
    await broker.kick(make_message("after-garbage", partition_key="x"))
    # Keep listening until shard 0's reader has handled both garbage entries:
    # the task may sit on another shard and arrive first.
    async with consuming(broker) as got:

        async def task_ran_and_both_dead() -> bool:
            return got == ["after-garbage"] and int(await broker.client.xlen(keys.dead)) == 2

        await eventually(task_ran_and_both_dead, "the task ran and two dead letters")
    dead = await broker.client.xrange(keys.dead)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons[0].startswith("missing 'data' field")
    assert reasons[1].startswith("not a taskiq message")
    assert all(b"original_id" in fields for _, fields in dead)

    # Dead-lettered entries are acknowledged, so they are not redelivered.
    async def none_pending() -> bool:
        info = await broker.client.xpending(keys.stream, broker.options.consumer_group_name)
        return int(info["pending"]) == 0

    await eventually(none_pending, "no pending entries")


async def test_deleted_stream_recreates_group_at_zero(
    broker: ClusterStreamBroker, redis_cluster: DevCluster
) -> None:
    plan = await broker.current_plan()
    keys = ShardKeys(broker.options.prefix, plan.shards[0].tag)
    master = await redis_cluster.master_of_key(keys.stream)
    node = broker.client.get_node(host=master.host, port=master.port)
    shards_there = [
        s for s in plan.shards
        if (await redis_cluster.master_of_key(ShardKeys(keys.prefix, s.tag).stream)).port
        == master.port
    ]

    async def all_readers_blocked() -> bool:
        # One reader per shard reads its stream and its priority lanes.
        clients = await broker.client.client_list(target_nodes=node)
        blocked = [c for c in clients if c["cmd"] == "xreadgroup" and "b" in c["flags"]]
        return len(blocked) >= len(shards_there)

    async with consuming(broker) as received:
        await eventually(all_readers_blocked, "the shard's readers blocked in XREADGROUP")
        await broker.client.delete(keys.stream)
        # Tasks written after the DEL must not be skipped (no "$" group).
        for i in range(10):
            await broker.client.xadd(keys.stream, {b"data": make_message(f"d{i}").message})
        await eventually(lambda: len(received) >= 10, "ten tasks", timeout=20)
    assert sorted(received) == sorted(f"d{i}" for i in range(10))


async def test_unacked_entries_are_reclaimed_after_idle_timeout(make_broker: Factory) -> None:
    crashed, survivor = [
        await make_broker(idle_timeout=500, xread_block=100, consumer_name=name)
        for name in ("crashed", "survivor")
    ]
    for i in range(5):
        await crashed.kick(make_message(f"r{i}"))
    taken = await take(crashed, 5, ack=False)  # taken, never acked
    assert len(taken) == 5
    started = time.monotonic()
    again = await take(survivor, 5)
    waited = time.monotonic() - started
    assert sorted(m.data for m in again) == sorted(m.data for m in taken)
    print(f"redelivery after {waited:.2f}s (idle_timeout 0.5s)")


async def test_poison_entry_is_dead_lettered_after_max_deliveries(
    make_broker: Factory,
) -> None:
    broker = await make_broker(idle_timeout=200, xread_block=100, max_deliveries=2,
                               reclaim_interval=0.1)
    await broker.kick(make_message("poison", partition_key="p"))
    # Receive it repeatedly without acking, as a crashing task would.
    await take(broker, 2, ack=False, timeout=20)
    plan = await broker.current_plan()
    deads = [ShardKeys(broker.options.prefix, shard.tag).dead for shard in plan.shards]

    async def dead_letters() -> list[Any]:
        return [entry for key in deads for entry in await broker.client.xrange(key)]

    gen = broker.listen()
    consumer = asyncio.create_task(_drain_forever(gen))
    try:
        dead = await eventually(dead_letters, "a dead letter", timeout=20)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await gen.aclose()
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"reason"].startswith(b"max deliveries exceeded")
    assert int(fields[b"deliveries"]) > 2
    assert task_id_of(fields[b"field:data"]) == "poison"


async def _drain_forever(gen: Any) -> None:
    async for _ in gen:  # never ack
        pass


async def test_trim_removes_only_acknowledged_entries(make_broker: Factory) -> None:
    broker = await make_broker(xread_block=100, trim_interval=0.2, shards=1)
    for i in range(50):
        await broker.kick(make_message(f"a{i}"))
    got = await take(broker, 50)
    assert len(got) == 50
    for i in range(20):
        await broker.kick(make_message(f"b{i}"))  # never read: must survive trims
    plan = await broker.current_plan()
    stream = ShardKeys(broker.options.prefix, plan.shards[0].tag).stream
    script = broker._scripts["trim"]
    await script(keys=[stream])
    remaining = await broker.client.xrange(stream)
    datas = {task_id_of(fields[b"data"]) for _, fields in remaining}
    assert {f"b{i}" for i in range(20)} <= datas
    assert len(remaining) < 70  # acknowledged entries went away (MINID ~)


async def test_lifecycle_guards(cluster_url: str, unique_name: str) -> None:
    # The first kick starts the broker (as taskiq-redis's do); an explicit
    # startup() after that is a no-op, two explicit ones are a mistake.
    lazy = ClusterStreamBroker(cluster_url, queue_name=unique_name)
    await lazy.kick(make_message("x"))
    await lazy.startup()
    await lazy.shutdown()
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name)
    await broker.startup()
    with pytest.raises(LifecycleError, match="twice"):
        await broker.startup()
    await broker.shutdown()
    await broker.shutdown()  # idempotent
    with pytest.raises(LifecycleError, match="after shutdown"):
        await broker.kick(make_message("x"))


async def test_bad_input_gives_typed_errors(standalone_url: str) -> None:
    with pytest.raises(InvalidNameError):
        ClusterStreamBroker("redis://127.0.0.1:7000", queue_name="a{b}")
    with pytest.raises(ConfigurationError):
        ClusterStreamBroker("redis://127.0.0.1:7000", additional_streams={"x": ">"})
    with pytest.raises(ConfigurationError, match="excludes other keyword"):
        ClusterStreamBroker("redis://127.0.0.1:7000", options=StreamOptions(), ssl_ca_certs="ca")
    with pytest.raises(ConfigurationError, match="decode_responses"):
        ClusterStreamBroker("redis://127.0.0.1:7000", decode_responses=True)
    # Option names become options; anything else goes to redis-py.
    configured = ClusterStreamBroker(
        "redis://127.0.0.1:7000", wait_replicas=1, max_connection_pool_size=8,
        ssl_ca_certs="ca.pem",
    )
    assert configured.options.wait_replicas == 1
    assert configured.options.connection.max_connections == 8
    assert configured.options.connection.extra == {"ssl_ca_certs": "ca.pem"}
    broker = ClusterStreamBroker(standalone_url, queue_name="q")
    with pytest.raises(NotAClusterError):
        await broker.startup()
    await broker.shutdown()


async def test_password_never_in_repr() -> None:
    broker = ClusterStreamBroker("redis://user:s3cret@127.0.0.1:7000", queue_name="q")
    assert "s3cret" not in repr(broker)


async def test_kick_to_unreachable_cluster_fails_clearly(
    cluster_client: RedisCluster,
) -> None:
    assert KickFailedError  # typed error exists for kicks that surely failed


@pytest.mark.parametrize("xread_count", [50, 5], ids=["in-buffer", "in-reader"])
async def test_closing_listen_releases_unprocessed_entries_at_once(
    make_broker: Factory, xread_count: int
) -> None:
    # A graceful stop must not make prefetched-but-unprocessed tasks wait a
    # whole idle_timeout (here 60 s) before another worker may take them:
    # neither those in the listen buffer nor, when a read is larger than the
    # free buffer space, those its reader still holds.
    first = await make_broker(idle_timeout=60_000, xread_block=100, xread_count=xread_count,
                              shards=1)
    second = await make_broker(idle_timeout=60_000, xread_block=100, reclaim_interval=0.2)
    for i in range(20):
        await first.kick(make_message(f"rel{i}"))
    got = await take(first, 1)  # the rest sit in first's buffer
    assert len(got) == 1
    # Without the release this would wait for idle_timeout (60 s) and fail.
    rest = await take(second, 19, timeout=20)
    assert sorted(task_id_of(m.data) for m in rest + got) == sorted(
        f"rel{i}" for i in range(20)
    )


@chaos(timeout=120)
async def test_producer_only_process_follows_a_master_failover(
    healthy_cluster: DevCluster, cluster_url: str, unique_name: str
) -> None:
    # No reader runs here, and the shard is chosen off the plan key's master,
    # so nothing but the kick path itself can notice that the shard's master
    # died and reload the slot map.
    from taskiq_redis_cluster._keys import plan_key, slot_of

    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name)
    await broker.startup()
    try:
        plan = await broker.current_plan()
        plan_master = await healthy_cluster.master_of_key(plan_key("tqrc", unique_name))
        index = 0
        for shard in plan.shards:
            stream = ShardKeys(broker.options.prefix, shard.tag).stream
            if (await healthy_cluster.master_of_key(stream)).port != plan_master.port:
                index = shard.index
                break
        stream = ShardKeys(broker.options.prefix, plan.shards[index].tag).stream
        key = next(
            f"k{i}" for i in range(10_000) if slot_of(f"k{i}") % len(plan.shards) == index
        )
        await broker.kick(make_message("before", partition_key=key))
        master = await healthy_cluster.master_of_key(stream)
        await healthy_cluster.kill_node(master)
        kicks = itertools.count(1)

        async def kicked() -> bool:
            await broker.kick(make_message(f"after-{next(kicks)}", partition_key=key))
            return True

        # A kick that fails while the failover is in progress fails cleanly.
        await eventually(kicked, "a kick that reached the promoted replica", timeout=60,
                         interval=0.5, ignoring=Exception)
        assert (await healthy_cluster.master_of_key(stream)).port != master.port
    finally:
        await broker.shutdown()
        await healthy_cluster.heal()


async def test_housekeeping_removes_stale_consumers_but_not_busy_ones(
    make_broker: Factory,
) -> None:
    broker = await make_broker(shards=1, xread_block=100, stale_consumer_idle=300,
                               trim_interval=0.2)
    plan = await broker.current_plan()
    stream = ShardKeys(broker.options.prefix, plan.shards[0].tag).stream
    group = broker.options.consumer_group_name  # created by startup()
    for i in range(2):
        await broker.kick(make_message(f"s{i}"))
    # A worker that finished its work and went away, and one that died
    # holding an entry: only the first may be forgotten.
    done = await broker.client.xreadgroup(group, "gone-idle", {stream: ">"}, count=1)
    await broker.client.xack(stream, group, done[0][1][0][0])
    await broker.client.xreadgroup(group, "gone-busy", {stream: ">"}, count=1)
    # Both stay idle past stale_consumer_idle (0.3 s): the wait is what
    # makes them stale, and housekeeping is run by hand after it.
    await asyncio.sleep(0.5)
    await broker._housekeep(ShardKeys(broker.options.prefix, plan.shards[0].tag).stream)
    names = {c["name"] for c in await broker.client.xinfo_consumers(stream, group)}
    assert b"gone-idle" not in names
    assert b"gone-busy" in names
