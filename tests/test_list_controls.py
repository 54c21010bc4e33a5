"""Task controls of the list broker: the ``delay`` label and ``dedup_key`` kicks.

On the real cluster, in the default and the reliable mode: a delayed task
waits in its shard's delayed set and is pushed to the list when due (not
early, within about a second), behind what already waits there; it
outlives the worker that was listening when it was kicked; bad values are
refused before any write; a dedup key queues its task once however many
producers race, until its TTL runs out, and a retry of the holding task is
queued. With real ``taskiq worker`` processes, ``with_labels(delay=3)``,
``SmartRetryMiddleware(default_delay=2)`` without a schedule source, and
five kicks of one dedup key behave as with the stream broker.
"""

from __future__ import annotations

import asyncio
import math
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CONTROL_TASKS, WorkerProcess, eventually, make_message, task_id_of
from redis.asyncio import RedisCluster
from taskiq import AckableMessage
from taskiq.kicker import AsyncKicker

from taskiq_redis_cluster import ClusterListQueueBroker, InvalidOptionError
from taskiq_redis_cluster._brokers._delayed import list_promoter
from taskiq_redis_cluster._keys import ShardKeys, slot_of

pytestmark = pytest.mark.cluster

MODES = [pytest.param(False, id="default"), pytest.param(True, id="reliable")]


async def _started(url: str, queue: str, *, reliable: bool = False,
                   **kwargs: Any) -> ClusterListQueueBroker:
    broker = ClusterListQueueBroker(url, queue_name=queue, brpop_timeout=0.2,
                                    plan_poll_interval=0.5, reliable=reliable, **kwargs)
    await broker.startup()
    return broker


@pytest.fixture(params=MODES)
async def broker(
    request: pytest.FixtureRequest, cluster_url: str, unique_name: str
) -> AsyncIterator[ClusterListQueueBroker]:
    b = await _started(cluster_url, unique_name, reliable=request.param, shards=3)
    try:
        yield b
    finally:
        await b.shutdown()


async def _shard_keys(broker: ClusterListQueueBroker) -> list[ShardKeys]:
    plan = await broker.current_plan()
    return [ShardKeys(broker.options.prefix, s.tag) for s in plan.shards]


async def _counts(client: RedisCluster, keys: list[ShardKeys]) -> tuple[int, int]:
    """(messages in the lists, members of the delayed sets) over all shards."""
    lists = sum([int(await client.llen(k.list)) for k in keys])
    delayed = sum([int(await client.zcard(k.delayed)) for k in keys])
    return lists, delayed


async def _consuming_order(client: RedisCluster, keys: ShardKeys) -> list[str]:
    """The task ids of one shard's list in the order a pop returns them."""
    return [task_id_of(d) for d in reversed(await client.lrange(keys.list, 0, -1))]


class _Receiver:
    """Listens in the background and records when each task id arrived."""

    def __init__(self, broker: ClusterListQueueBroker) -> None:
        self.at: dict[str, float] = {}
        self._listen = broker.listen()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self._listen:
            data = msg.data if isinstance(msg, AckableMessage) else msg
            self.at.setdefault(task_id_of(data), time.time())
            if isinstance(msg, AckableMessage):
                await msg.ack()  # type: ignore[misc]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._listen.aclose()



# ------------------------------------------------------------------ delay
async def test_delayed_kick_waits_in_its_shard_then_runs_on_time(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    keys = await _shard_keys(broker)
    kicked = time.time()
    await broker.kick(make_message("late", delay=1.2))
    # Held in a delayed set, not in any list (before: LPUSH-ed at once).
    assert await _counts(cluster_client, keys) == (0, 1)
    receiver = _Receiver(broker)
    try:
        await eventually(lambda: bool(receiver.at), "the delayed task", timeout=10)
    finally:
        await receiver.close()
    waited = receiver.at["late"] - kicked
    print(f"list broker, delay=1.2 arrived after {waited:.3f} s")
    assert 1.2 <= waited < 2.2, waited
    assert await _counts(cluster_client, keys) == (0, 0)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, "soon", True, 1e12])
async def test_bad_delay_is_refused_before_any_write(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster, bad: Any
) -> None:
    with pytest.raises(InvalidOptionError, match="delay label"):
        await broker.kick(make_message("bad", delay=bad, dedup_key="bad-delay"))
    assert await _counts(cluster_client, await _shard_keys(broker)) == (0, 0)
    assert await broker.dedup_task_id("bad-delay") is None  # no marker either


@pytest.mark.parametrize("bad", [0, -5, "never", math.nan])
async def test_bad_dedup_ttl_is_refused_before_any_write(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster, bad: Any
) -> None:
    with pytest.raises(InvalidOptionError, match="dedup_ttl label"):
        await broker.kick(make_message("t", dedup_key="k", dedup_ttl=bad))
    assert await _counts(cluster_client, await _shard_keys(broker)) == (0, 0)
    assert await broker.dedup_task_id("k") is None


async def test_zero_delay_and_priority_queue_at_once(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    """0 means no delay; ``priority`` is not implemented and is ignored, as before."""
    keys = await _shard_keys(broker)
    await broker.kick(make_message("zero", delay=0))
    await broker.kick(make_message("prio", priority=9))
    await broker.kick(make_message("text", delay="30"))
    assert await _counts(cluster_client, keys) == (2, 1)


async def test_a_due_task_joins_the_back_of_its_list(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    """LPUSH in, pop from the other end: a due task queues like a new kick.

    Due tasks pushed together keep their due order, and a member with a
    stream lane prefix is pushed as its bare message.
    """
    keys = await _shard_keys(broker)
    home = keys[slot_of("acct") % len(keys)]
    await broker.kick(make_message("d1", partition_key="acct", delay=0.2))
    await broker.kick(make_message("d2", partition_key="acct", delay=0.3))
    for i in range(3):
        await broker.kick(make_message(f"p{i}", partition_key="acct"))
    laned = make_message("laned").message
    await cluster_client.zadd(home.delayed, {b"\0L2\0" + laned: 0})
    await asyncio.sleep(0.35)
    promoter = list_promoter(cluster_client, home)
    await promoter.step()
    assert await _consuming_order(cluster_client, home) == ["p0", "p1", "p2", "laned", "d1", "d2"]
    assert int(await cluster_client.zcard(home.delayed)) == 0


async def test_delay_keeps_the_partition_shard(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    keys = await _shard_keys(broker)
    home = keys[slot_of("customer-7") % len(keys)]
    for i in range(6):
        await broker.kick(make_message(f"p{i}", partition_key="customer-7", delay=0.2))
    assert int(await cluster_client.zcard(home.delayed)) == 6
    receiver = _Receiver(broker)
    try:
        await eventually(lambda: bool(len(receiver.at) == 6), "six delayed tasks")
    finally:
        await receiver.close()
    assert await _counts(cluster_client, keys) == (0, 0)


@pytest.mark.parametrize("reliable", MODES)
async def test_delayed_tasks_outlive_the_listening_worker(
    cluster_url: str, unique_name: str, reliable: bool
) -> None:
    """Kicked while one worker listens, due after it stopped: the next one runs them."""
    first = await _started(cluster_url, unique_name, reliable=reliable, shards=3)
    receiver = _Receiver(first)
    try:
        for i in range(10):
            await first.kick(make_message(f"s{i}", delay=1.0))
        await asyncio.sleep(0.2)
    finally:
        await receiver.close()
        await first.shutdown()
    assert receiver.at == {}
    assert len(first._promoters) == 0  # shutdown waited for every promoter
    second = await _started(cluster_url, unique_name, reliable=reliable)
    receiver = _Receiver(second)
    try:
        await eventually(lambda: bool(len(receiver.at) == 10), "ten delayed tasks")
    finally:
        await receiver.close()
        await second.shutdown()
    assert sorted(receiver.at) == sorted(f"s{i}" for i in range(10))


# ------------------------------------------------------------------ dedup
@pytest.mark.parametrize("reliable", MODES)
async def test_racing_producers_queue_a_dedup_key_once(
    cluster_url: str, unique_name: str, cluster_client: RedisCluster, reliable: bool
) -> None:
    producers = [
        await _started(cluster_url, unique_name, reliable=reliable, shards=3) for _ in range(3)
    ]
    try:
        kicks = [
            p.kick(make_message(f"r{n}-{i}", dedup_key="invoice-42"))
            for n, p in enumerate(producers) for i in range(20)
        ]
        await asyncio.gather(*kicks)
        keys = await _shard_keys(producers[0])
        assert await _counts(cluster_client, keys) == (1, 0)
        home = keys[slot_of("invoice-42") % len(keys)]
        queued = await _consuming_order(cluster_client, home)
        assert len(queued) == 1
        # The task id to look for the result under is the queued one.
        assert await producers[1].dedup_task_id("invoice-42") == queued[0]
        assert await producers[1].dedup_task_id("invoice-43") is None
    finally:
        for p in producers:
            await p.shutdown()


async def test_dedup_ttl_label_and_expiry(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    keys = await _shard_keys(broker)
    await broker.kick(make_message("a1", dedup_key="k", dedup_ttl=0.5))
    await broker.kick(make_message("a2", dedup_key="k", dedup_ttl=0.5))
    assert await _counts(cluster_client, keys) == (1, 0)

    async def queued_again() -> bool:
        await broker.kick(make_message(f"a{time.monotonic()}", dedup_key="k", dedup_ttl=60))
        return (await _counts(cluster_client, keys))[0] == 2

    await eventually(queued_again, "a kick after the TTL", timeout=5)
    # The 60 s marker now holds: one more kick is a duplicate.
    await broker.kick(make_message("a3", dedup_key="k"))
    assert await _counts(cluster_client, keys) == (2, 0)


async def test_the_broker_option_sets_the_default_ttl(
    cluster_url: str, unique_name: str, cluster_client: RedisCluster
) -> None:
    broker = await _started(cluster_url, unique_name, shards=3, dedup_ttl=0.3)
    try:
        keys = await _shard_keys(broker)
        await broker.kick(make_message("o1", dedup_key="opt"))
        home = keys[slot_of("opt") % len(keys)]
        ttl = int(await cluster_client.pttl(home.dedup("opt")))
        assert 0 < ttl <= 300, ttl
        await asyncio.sleep(0.4)
        await broker.kick(make_message("o2", dedup_key="opt"))
        assert await _consuming_order(cluster_client, home) == ["o1", "o2"]
    finally:
        await broker.shutdown()


async def test_delayed_dedup_kicks_are_held_once(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    keys = await _shard_keys(broker)
    for i in range(3):
        await broker.kick(make_message(f"dd{i}", dedup_key="nightly", delay=30))
    assert await _counts(cluster_client, keys) == (0, 1)
    assert await broker.dedup_task_id("nightly") == "dd0"


async def test_a_retry_of_the_holding_task_is_not_a_duplicate(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    """taskiq's retry middlewares re-kick a failed task with its id and ``_retries``."""
    keys = await _shard_keys(broker)
    await broker.kick(make_message("holder", dedup_key="sync"))
    await broker.kick(make_message("holder", dedup_key="sync", _retries=1))  # its retry
    await broker.kick(make_message("holder", dedup_key="sync"))  # resent, not a retry
    await broker.kick(make_message("other", dedup_key="sync", _retries=1))  # another task
    # A delayed retry (SmartRetryMiddleware's way) is held, not refused.
    await broker.kick(make_message("holder", dedup_key="sync", _retries=2, delay=30))
    assert await _counts(cluster_client, keys) == (2, 1)
    assert await broker.dedup_task_id("sync") == "holder"


async def test_dedup_key_with_partition_key_lives_in_the_partition_shard(
    broker: ClusterListQueueBroker, cluster_client: RedisCluster
) -> None:
    keys = await _shard_keys(broker)
    home = keys[slot_of("tenant-1") % len(keys)]
    await broker.kick(make_message("pk1", partition_key="tenant-1", dedup_key="job"))
    await broker.kick(make_message("pk2", partition_key="tenant-1", dedup_key="job"))
    assert await _consuming_order(cluster_client, home) == ["pk1"]
    assert await broker.dedup_task_id("job", partition_key="tenant-1") == "pk1"


# ------------------------------------------------------------ real workers
_APP = textwrap.dedent(
    """
    import os

    from taskiq_redis_cluster import ClusterListQueueBroker

    broker = ClusterListQueueBroker(
        os.environ["TQRC_URL"], queue_name=os.environ["TQRC_QUEUE"], brpop_timeout=0.2,
        plan_poll_interval=0.5, reliable=os.environ["TQRC_RELIABLE"] == "1",
    )
    """
) + CONTROL_TASKS


class _Worker(WorkerProcess):
    """A ``taskiq worker`` of the app above, in the default or the reliable mode."""

    def __init__(self, tmp: Path, url: str, queue: str, *, reliable: bool) -> None:
        super().__init__(tmp, _APP, url, queue, TQRC_RELIABLE="1" if reliable else "0")
        self.reliable = reliable


@pytest.fixture(scope="module", params=MODES)
def worker(
    request: pytest.FixtureRequest, cluster_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Worker]:
    queue = f"t-list-controls-{uuid.uuid4().hex[:8]}"
    w = _Worker(tmp_path_factory.mktemp("list-controls"), cluster_url, queue,
                reliable=request.param)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
async def producer(cluster_url: str, worker: _Worker) -> AsyncIterator[ClusterListQueueBroker]:
    b = await _started(cluster_url, worker.queue, reliable=worker.reliable)
    try:
        yield b
    finally:
        await b.shutdown()


async def test_worker_runs_delay_3_after_3_seconds(
    worker: _Worker, producer: ClusterListQueueBroker
) -> None:
    await worker.ready(producer)
    kicked = time.time()
    await AsyncKicker("app:stamp", producer, {}).with_labels(delay=3).kiq("d3")
    await eventually(lambda: bool(worker.lines("stamp d3")), "the delayed task", timeout=10)
    started = worker.lines("stamp d3")[0] - kicked
    print(f"list broker (reliable={worker.reliable}): delay=3 started after {started:.3f} s")
    assert 2.8 <= started <= 4.0, started


async def test_smart_retry_waits_its_default_delay_without_a_schedule_source(
    worker: _Worker, producer: ClusterListQueueBroker
) -> None:
    await worker.ready(producer)
    tag = f"f1-{uuid.uuid4().hex[:6]}"
    await AsyncKicker("app:flaky", producer, {}).kiq(tag)
    await eventually(lambda: bool(len(worker.lines(f"flaky {tag}")) >= 2), "the retry",
                     timeout=10)
    first, second = worker.lines(f"flaky {tag}")[:2]
    print(f"list broker (reliable={worker.reliable}): SmartRetryMiddleware(default_delay=2) "
          f"retried after {second - first:.3f} s")
    assert 1.8 <= second - first <= 4.0, second - first
    await asyncio.sleep(0.5)
    assert len(worker.lines(f"flaky {tag}")) == 2  # the retry succeeded: no third run


async def test_smart_retry_of_a_deduplicated_task_still_runs(
    worker: _Worker, producer: ClusterListQueueBroker
) -> None:
    await worker.ready(producer)
    key = f"sync-{uuid.uuid4().hex[:6]}"
    await AsyncKicker("app:flaky", producer, {}).with_labels(dedup_key=key).kiq(f"{key}-a")
    await eventually(lambda: bool(len(worker.lines(f"flaky {key}-a")) >= 2), "the retry",
                     timeout=10)
    await AsyncKicker("app:flaky", producer, {}).with_labels(dedup_key=key).kiq(f"{key}-b")
    await AsyncKicker("app:stamp", producer, {}).kiq(f"after-{key}")
    await eventually(lambda: bool(worker.lines(f"stamp after-{key}")), "the next task")
    await asyncio.sleep(1.0)
    assert len(worker.lines(f"flaky {key}-a")) == 2
    assert worker.lines(f"flaky {key}-b") == []  # a duplicate of the first one's key


async def test_worker_runs_five_kicks_of_one_dedup_key_once(
    worker: _Worker, producer: ClusterListQueueBroker
) -> None:
    await worker.ready(producer)
    key = f"order-{uuid.uuid4().hex[:6]}"
    kicker = AsyncKicker("app:stamp", producer, {})
    for i in range(5):
        await kicker.with_labels(dedup_key=key).kiq(f"{key}-{i}")
    await kicker.with_labels(dedup_key=key + "-other").kiq(f"{key}-other")
    await eventually(
        lambda: bool(worker.lines(f"stamp {key}-other") and worker.lines(f"stamp {key}-0")),
        "both keys' tasks",
    )
    await asyncio.sleep(1.0)  # a duplicate, had one been queued, would have run by now
    runs = {i: len(worker.lines(f"stamp {key}-{i}")) for i in range(5)}
    assert runs == {0: 1, 1: 0, 2: 0, 3: 0, 4: 0}, runs
    assert len(worker.lines(f"stamp {key}-other")) == 1
    executions = sum(runs.values()) + len(worker.lines(f"stamp {key}-other"))
    assert executions == 2
