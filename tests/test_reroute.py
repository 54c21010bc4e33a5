"""Free kicks keep flowing while a master fails (issue: route around a dead master).

A producer kicks at a fixed rate; a third of the way in, the master of some
shards gets SIGKILL and its replica is promoted after the node timeout. Kicks
without a routing key must go to the healthy shards at once, so the producer
sends about as many kicks as without the fault, with few errors and nothing
lost. Kicks with a ``partition_key`` keep their shard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import chaos, eventually, make_message, task_id_of
from redis.asyncio import RedisCluster
from taskiq import AckableMessage

from taskiq_redis_cluster import (
    BrokerEvents,
    ClusterListQueueBroker,
    ClusterStreamBroker,
    KickError,
)
from taskiq_redis_cluster._brokers._routing import FailingShards
from taskiq_redis_cluster._keys import ShardKeys, plan_key
from taskiq_redis_cluster.testing import DevCluster

pytestmark = pytest.mark.cluster


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failing_shards_cool_down_double_and_recover() -> None:
    clock = _Clock()
    failing = FailingShards(cooldown=0.5, max_cooldown=2.0, clock=clock)
    assert not failing
    failing.mark(["a", "b"])
    assert failing
    assert failing.failing("a")
    assert not failing.failing("c")
    clock.now += 0.6
    assert not failing.failing("a")  # cool-down over: the next kick probes it
    failing.mark(["a"])  # the probe failed: twice as long
    clock.now += 0.9
    assert failing.failing("a")
    clock.now += 0.2
    assert not failing.failing("a")
    for _ in range(5):
        failing.mark(["a"])
    clock.now += 1.9
    assert failing.failing("a")  # capped at 2.0 s
    clock.now += 0.2
    assert not failing.failing("a")
    failing.recovered("a")
    failing.recovered("b")
    assert not failing


@dataclass
class _Counting(BrokerEvents):
    rerouted_count: int = 0

    def rerouted(self, queue: str, shard: int) -> None:
        self.rerouted_count += 1


@dataclass
class _Run:
    sent: list[str] = field(default_factory=list)
    errors: int = 0
    longest: float = 0.0


async def _kick_paced(
    broker: Any, prefix: str, seconds: float, rate: float,
    fault: Callable[[], Any] | None = None, **labels: Any,
) -> _Run:
    """Kick one at a time at ``rate`` for ``seconds``, as a request handler would."""
    run = _Run()
    start = time.monotonic()
    fault_task: asyncio.Task[Any] | None = None
    for i in range(int(seconds * rate)):
        due = start + i / rate
        now = time.monotonic()
        if now >= start + seconds:
            break
        if due > now:
            await asyncio.sleep(due - now)
        if fault is not None and fault_task is None and now >= start + seconds / 3:
            fault_task = asyncio.create_task(fault())
        task_id = f"{prefix}-{i}"
        began = time.monotonic()
        try:
            await broker.kick(make_message(task_id, **labels))
        except KickError:
            run.errors += 1
        else:
            run.sent.append(task_id)
        run.longest = max(run.longest, time.monotonic() - began)
    if fault_task is not None:
        await fault_task
    return run


async def _victim(cluster: DevCluster, broker: Any) -> Any:
    """A master that holds some of the queue's shards but not its plan key."""
    plan = await broker.current_plan()
    plan_master = await cluster.master_of_key(plan_key(broker.options.prefix, broker.queue_name))
    for shard in plan.shards:
        master = await cluster.master_of_key(ShardKeys(broker.options.prefix, shard.tag).stream)
        if master.port != plan_master.port:
            return master
    raise AssertionError("every shard sits on the plan key's master")


async def _received_all(consumer: Any, want: set[str], timeout: float) -> set[str]:
    got: set[str] = set()
    listen = consumer.listen()

    async def take() -> None:
        async for msg in listen:
            data = msg.data if isinstance(msg, AckableMessage) else msg
            if isinstance(msg, AckableMessage):
                await msg.ack()  # type: ignore[misc]
            got.add(task_id_of(data))
            if want <= got:
                return

    try:
        await asyncio.wait_for(take(), timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        await listen.aclose()
    return want - got


@pytest.mark.parametrize("kind", [ClusterStreamBroker, ClusterListQueueBroker])
@pytest.mark.slow
@chaos(timeout=120)
async def test_free_kicks_route_around_a_killed_master(
    healthy_cluster: DevCluster, cluster_url: str, unique_name: str, kind: type[Any],
    cluster_client: RedisCluster,
) -> None:
    events = _Counting()
    producer = kind(cluster_url, queue_name=unique_name, events=events)
    consumer = kind(cluster_url, queue_name=unique_name, plan_poll_interval=0.5)
    await producer.startup()
    await consumer.startup()
    try:
        seconds, rate = 9.0, 400.0
        calm = await _kick_paced(producer, "calm", seconds, rate)
        victim = await _victim(healthy_cluster, producer)

        async def kill() -> None:
            # The replica has everything acknowledged so far; what follows is
            # the test's subject, not replication lag.
            await cluster_client.execute_command(
                "WAIT", 1, 200, target_nodes=cluster_client.get_node(victim.host, victim.port)
            )
            await healthy_cluster.kill_node(victim)

        faulty = await _kick_paced(producer, "fault", seconds, rate, fault=kill)
        figures = (
            f"calm: {len(calm.sent)} sent; fault: {len(faulty.sent)} sent, {faulty.errors} "
            f"errors, longest kick {faulty.longest:.2f}s, {events.rerouted_count} rerouted"
        )
        assert calm.errors == 0, figures
        assert len(faulty.sent) >= 0.9 * len(calm.sent), figures
        assert faulty.errors <= 5, figures
        # Without rerouting, each kick sent to the dead master's shards waits
        # through the retries (measured before: 1,207 of 3,600 sent).
        assert events.rerouted_count > 0, figures
        missing = await _received_all(consumer, set(calm.sent + faulty.sent), timeout=60)
        assert missing == set()
    finally:
        await producer.shutdown()
        await consumer.shutdown()
        await healthy_cluster.heal()


@chaos(timeout=120)
async def test_keyed_kicks_keep_their_shard_through_a_master_failure(
    healthy_cluster: DevCluster, cluster_url: str, unique_name: str
) -> None:
    # The shard of a partition key sits on the killed master: its kicks wait
    # or fail, but never land on another shard (order depends on it).
    events = _Counting()
    producer = ClusterStreamBroker(cluster_url, queue_name=unique_name, events=events)
    await producer.startup()
    try:
        plan = await producer.current_plan()
        victim = await _victim(healthy_cluster, producer)
        from taskiq_redis_cluster._keys import slot_of

        on_victim = set()
        for shard in plan.shards:
            stream = ShardKeys(producer.options.prefix, shard.tag).stream
            if (await healthy_cluster.master_of_key(stream)).port == victim.port:
                on_victim.add(shard.index)
        key = next(
            f"k{i}" for i in range(100_000) if slot_of(f"k{i}") % len(plan.shards) in on_victim
        )
        await healthy_cluster.kill_node(victim)
        sent: list[str] = []
        for i in range(5):
            try:
                await producer.kick(make_message(f"keyed-{i}", partition_key=key))
                sent.append(f"keyed-{i}")
            except KickError:
                pass
        assert events.rerouted_count == 0
        shard = plan.shards[slot_of(key) % len(plan.shards)]
        stream = ShardKeys(producer.options.prefix, shard.tag).stream

        async def landed() -> bool:
            client = producer.client
            entries = await client.xrange(stream)
            return {task_id_of(f[b"data"]) for _, f in entries} >= set(sent)

        await eventually(landed, "keyed kicks on their own shard", timeout=30)
    finally:
        await producer.shutdown()
        await healthy_cluster.heal()
