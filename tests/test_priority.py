"""Priority lanes of the stream broker (the ``priority`` label).

The listen buffer's rule on its own (highest lane first, every n-th
hand-out the oldest, room per class); option and label checks before any
I/O; then, on the real cluster, where prioritised kicks land, the order a
listener sees them in, that a busy high lane does not starve lane 0, that
delayed prioritised tasks keep their lane, and the issue's acceptance with
a real ``taskiq worker`` at 5 concurrent tasks: 20 ``priority=9`` kicks
behind 400 default ones all start within the first 80 executions, whether
they were queued before the worker started or while it was busy.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WorkerProcess, consuming, eventually, make_message, started, task_id_of
from redis.asyncio import RedisCluster
from taskiq import AckableMessage
from taskiq.kicker import AsyncKicker

from taskiq_redis_cluster import ClusterStreamBroker, InvalidOptionError, StreamOptions
from taskiq_redis_cluster._brokers._base import Sink
from taskiq_redis_cluster._brokers._buffer import ListenBuffer
from taskiq_redis_cluster._keys import ShardKeys


# ------------------------------------------------------------ the rule
async def test_buffer_hands_out_the_highest_lane_first_fifo_within_a_lane() -> None:
    buffer: ListenBuffer[str] = ListenBuffer(capacity=10, lanes=3, fairness=10)
    for item, lane in [("a1", 0), ("a2", 0), ("b1", 1), ("c1", 2), ("b2", 1), ("c2", 2)]:
        await buffer.put(item, lane)
    assert [buffer.get_nowait() for _ in range(6)] == ["c1", "c2", "b1", "b2", "a1", "a2"]
    assert buffer.empty()


async def test_every_nth_hand_out_is_the_oldest_so_low_lanes_never_starve() -> None:
    buffer: ListenBuffer[str] = ListenBuffer(capacity=100, lanes=3, fairness=4)
    for i in range(3):
        buffer.put_nowait(f"low{i}", 0)
    for i in range(20):
        buffer.put_nowait(f"high{i}", 2)
    got = [buffer.get_nowait() for _ in range(12)]
    # Gets 4, 8 and 12 take the oldest message: the lane-0 ones, in order.
    assert [got[3], got[7], got[11]] == ["low0", "low1", "low2"]
    assert [g for i, g in enumerate(got) if i % 4 != 3] == [f"high{i}" for i in range(9)]


async def test_each_class_has_its_own_room() -> None:
    buffer: ListenBuffer[str] = ListenBuffer(capacity=2, lanes=2, fairness=10)
    await buffer.put("a", 0)
    await buffer.put("b", 0)
    assert buffer.full(0)
    assert not buffer.full(1)
    # A full lane 0 does not keep a priority message out...
    await asyncio.wait_for(buffer.put("p", 1), timeout=1)
    # ...and a lane-0 put waits until a lane-0 message leaves.
    waiting = asyncio.ensure_future(buffer.put("c", 0))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert buffer.get_nowait() == "p"  # leaves lane 1: lane 0 is still full
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert buffer.get_nowait() == "a"
    await asyncio.wait_for(waiting, timeout=1)
    assert [buffer.get_nowait() for _ in range(2)] == ["b", "c"]


async def test_a_cancelled_putter_passes_its_wake_up_on() -> None:
    buffer: ListenBuffer[str] = ListenBuffer(capacity=1)
    await buffer.put("a")
    first = asyncio.ensure_future(buffer.put("b"))
    second = asyncio.ensure_future(buffer.put("c"))
    await asyncio.sleep(0.01)
    buffer.get_nowait()  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.wait_for(second, timeout=1)
    assert buffer.get_nowait() == "c"


async def test_a_waiting_reader_is_woken_once_a_quarter_is_free_and_none_is_stranded() -> None:
    buffer: ListenBuffer[int] = ListenBuffer(capacity=8)
    for i in range(8):
        buffer.put_nowait(i)
    # Five readers with ten messages each wait for room (as shard readers do).
    readers = [asyncio.ensure_future(_put_all(buffer, range(100 * r, 100 * r + 10)))
               for r in range(1, 6)]
    await asyncio.sleep(0.01)
    buffer.get_nowait()  # one free slot: nobody is woken for it
    await asyncio.sleep(0.01)
    assert len(buffer) == 7
    buffer.get_nowait()  # a quarter (2) free: one reader fills the room
    await asyncio.sleep(0.01)
    assert len(buffer) == 8
    got = [0, 1]
    while len(got) < 58:
        got.append(await asyncio.wait_for(buffer.get(), timeout=1))
    await asyncio.wait_for(asyncio.gather(*readers), timeout=1)
    sent = [n for r in range(1, 6) for n in range(100 * r, 100 * r + 10)]
    assert sorted(got) == [*range(8), *sent]
    for r in range(1, 6):  # each reader's messages in its order
        mine = [n for n in got if 100 * r <= n < 100 * r + 10]
        assert mine == sorted(mine)


async def _put_all(buffer: ListenBuffer[int], items: range) -> None:
    sink = Sink(buffer)  # type: ignore[arg-type]
    for item in items:
        if not sink.offer(item):  # type: ignore[arg-type]
            await sink(item)  # type: ignore[arg-type]


# --------------------------------------------------------- bad options
def test_lane_of_spreads_priorities_over_the_lanes() -> None:
    opts = StreamOptions(queue_name="q")
    assert [opts.lane_of(p) for p in range(12)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    off = StreamOptions(queue_name="q", priority_lanes=1)
    assert {off.lane_of(p) for p in range(12)} == {0}
    ten = StreamOptions(queue_name="q", priority_lanes=10)
    assert [ten.lane_of(p) for p in range(11)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]


@pytest.mark.parametrize(
    "values",
    [{"priority_lanes": 0}, {"priority_lanes": 11}, {"priority_lanes": 5, "max_priority": 3},
     {"priority_fairness": 1}],
)
def test_bad_lane_options_are_refused(values: dict[str, int]) -> None:
    with pytest.raises(InvalidOptionError):
        StreamOptions(queue_name="q", **values)


# ------------------------------------------------------ on the cluster
cluster = pytest.mark.cluster


@pytest.fixture
async def broker(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterStreamBroker]:
    b = await started(cluster_url, unique_name, shards=1)
    try:
        yield b
    finally:
        await b.shutdown()


async def _lane_lengths(client: RedisCluster, broker: ClusterStreamBroker) -> list[int]:
    plan = await broker.current_plan()
    keys = ShardKeys(broker.options.prefix, plan.shards[0].tag)
    return [int(await client.xlen(stream)) for stream in keys.lanes(3)]


async def _listen(
    broker: ClusterStreamBroker, n: int, timeout: float = 20, *, settle: float = 0.0,
    pace: float = 0.0,
) -> list[str]:
    """Task ids of the first ``n`` messages a listener gets, acking each.

    ``settle``: seconds to wait after the first message, as a busy worker
    would, so that every shard reader has read what was queued. ``pace``:
    seconds spent on each message after that (a worker at capacity, whose
    buffer the readers keep full).
    """
    got: list[str] = []
    listen = broker.listen()
    try:
        async def take() -> None:
            async for msg in listen:
                assert isinstance(msg, AckableMessage)
                got.append(task_id_of(msg.data))
                await msg.ack()  # type: ignore[misc]
                if len(got) == 1 and settle:
                    await asyncio.sleep(settle)
                elif pace:
                    await asyncio.sleep(pace)
                if len(got) == n:
                    return

        await asyncio.wait_for(take(), timeout)
    finally:
        await listen.aclose()
    return got


@cluster
async def test_prioritised_kicks_land_in_their_lane_and_are_read_first(
    broker: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    await broker.kick(make_message("plain"))
    await broker.kick(make_message("p3", priority=3))
    await broker.kick(make_message("p9", priority="9"))  # a numeric string counts
    await broker.kick(make_message("p0", priority=0))
    await broker.kick(make_message("p99", priority=99))  # above max_priority: the top lane
    assert await _lane_lengths(cluster_client, broker) == [2, 1, 2]
    got = await _listen(broker, 5, settle=0.5)
    # The first hand-out goes to whichever lane's reader answered first;
    # from then on the buffer holds them all and hands them out by lane.
    expected = ["p9", "p99", "p3", "plain", "p0"]
    expected.remove(got[0])
    assert got[1:] == expected, got


@cluster
@pytest.mark.parametrize("bad", [-1, "high", 1.5, True, [9]])
async def test_bad_priority_is_refused_before_any_write(
    broker: ClusterStreamBroker, cluster_client: RedisCluster, bad: Any
) -> None:
    with pytest.raises(InvalidOptionError, match="priority"):
        await broker.kick(make_message("bad", priority=bad))
    assert await _lane_lengths(cluster_client, broker) == [0, 0, 0]


@cluster
async def test_priorities_off_puts_everything_in_the_stream(
    cluster_url: str, unique_name: str, cluster_client: RedisCluster
) -> None:
    broker = await started(cluster_url, unique_name, shards=1, priority_lanes=1)
    try:
        await broker.kick(make_message("p9", priority=9))
        assert await _lane_lengths(cluster_client, broker) == [1, 0, 0]
        assert await _listen(broker, 1) == ["p9"]
    finally:
        await broker.shutdown()


@cluster
async def test_a_busy_high_lane_does_not_starve_lane_0(
    cluster_url: str, unique_name: str
) -> None:
    broker = await started(cluster_url, unique_name, shards=1, xread_count=20)
    try:
        for i in range(30):
            await broker.kick(make_message(f"low{i}"))
        await asyncio.gather(*(broker.kick(make_message(f"high{i}", priority=9))
                               for i in range(300)))
        got = await _listen(broker, 100, settle=0.5, pace=0.003)
    finally:
        await broker.shutdown()
    low = [g for g in got if g.startswith("low")]
    # Preferred: most of the first 100 are high. Not starved: lane 0 still
    # gets about one in priority_fairness (10), in its own order.
    assert 5 <= len(low) <= 20, got
    assert low == [f"low{i}" for i in range(len(low))]


@cluster
async def test_a_delayed_prioritised_task_keeps_its_lane(
    broker: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    await broker.kick(make_message("later-p9", delay=0.3, priority=9))
    await broker.kick(make_message("later-p2", delay=0.3, priority=2))
    await broker.kick(make_message("later-plain", delay=0.3))
    assert await _lane_lengths(cluster_client, broker) == [0, 0, 0]
    got = await _listen(broker, 3)
    assert sorted(got) == ["later-p2", "later-p9", "later-plain"]
    assert await _lane_lengths(cluster_client, broker) == [1, 1, 1]


@cluster
async def test_a_dedup_key_with_a_priority_is_queued_once_in_its_lane(
    broker: ClusterStreamBroker, cluster_client: RedisCluster
) -> None:
    for i in range(3):
        await broker.kick(make_message(f"d{i}", dedup_key="k", priority=9))
    assert await _lane_lengths(cluster_client, broker) == [0, 0, 1]
    assert await _listen(broker, 1) == ["d0"]


@cluster
@pytest.mark.parametrize("worker_lanes", [1, 3])
async def test_a_worker_reads_lanes_it_was_not_configured_for(
    cluster_url: str, unique_name: str, worker_lanes: int
) -> None:
    # A producer with more lanes than the worker (a rolling deploy that
    # changes priority_lanes): its top lane must not strand tasks.
    producer = await started(cluster_url, unique_name, shards=1, priority_lanes=5)
    worker = await started(cluster_url, unique_name, shards=1, priority_lanes=worker_lanes,
                            trim_interval=0.5)
    try:
        async with consuming(worker) as got:
            await producer.kick(make_message("top", priority=9))
            await producer.kick(make_message("plain"))
            await eventually(lambda: bool(len(got) == 2), "both tasks")
            # A lane that appears while the worker listens is found at its
            # next look (every trim_interval).
            other = await started(cluster_url, unique_name, shards=1, priority_lanes=8)
            try:
                await other.kick(make_message("newer", priority=9))
            finally:
                await other.shutdown()
            await eventually(lambda: bool(len(got) == 3), "the task in the new lane")
            assert sorted(got) == ["newer", "plain", "top"]
    finally:
        await producer.shutdown()
        await worker.shutdown()


@cluster
async def test_lanes_are_reclaimed_dead_lettered_and_trimmed_like_the_stream(
    cluster_url: str, unique_name: str, cluster_client: RedisCluster
) -> None:
    broker = await started(cluster_url, unique_name, shards=1, idle_timeout=1000,
                            renew_leases=False)
    try:
        plan = await broker.current_plan()
        keys = ShardKeys(broker.options.prefix, plan.shards[0].tag)
        group = broker.options.consumer_group_name
        await broker.kick(make_message("orphan", priority=9))
        await cluster_client.xadd(keys.lane(1), {"garbage": "1"})
        # A consumer that then dies takes the lane-2 entry.
        await cluster_client.xreadgroup(group, "dead-worker", {keys.lane(2): ">"}, count=1)
        await asyncio.sleep(1.1)
        async with consuming(broker) as got:
            await eventually(lambda: _dead_count(cluster_client, keys.dead), "the dead letter")
            await eventually(lambda: bool(got), "the reclaimed entry")
        assert got == ["orphan"]  # reclaimed from lane 2
        await broker._acks.drain()  # type: ignore[union-attr]
        [(_, fields)] = await cluster_client.xrange(keys.dead)
        assert fields[b"stream"] == keys.lane(1).encode()
        assert fields[b"reason"] == b"missing 'data' field"
        for lane in (1, 2):
            assert await cluster_client.xpending(keys.lane(lane), group) == {
                "pending": 0, "min": None, "max": None, "consumers": []
            }
            await broker._housekeep(keys.lane(lane))
            assert await cluster_client.xlen(keys.lane(lane)) == 0  # acked: trimmed
    finally:
        await broker.shutdown()


async def _dead_count(client: RedisCluster, dead: str) -> bool:
    return bool(await client.xlen(dead))


# ------------------------------------------------------ real workers
_APP = textwrap.dedent(
    """
    import asyncio
    import os
    import time

    from taskiq_redis_cluster import ClusterStreamBroker

    broker = ClusterStreamBroker(
        os.environ["TQRC_URL"], queue_name=os.environ["TQRC_QUEUE"], xread_block=200,
        plan_poll_interval=0.5,
    )

    @broker.task(task_name="app:work")
    async def work(tag: str) -> None:
        with open(os.environ["TQRC_LEDGER"], "a") as ledger:
            ledger.write(f"{tag} {time.time()}\\n")
        await asyncio.sleep(0.02)
    """
)


@pytest.fixture
def worker_env(tmp_path: Path, cluster_url: str, unique_name: str) -> tuple[Path, str, str]:
    return tmp_path, cluster_url, unique_name


async def _kick_defaults(producer: ClusterStreamBroker, batch: str) -> None:
    kicker = AsyncKicker("app:work", producer, {})
    for start in range(0, 400, 50):
        await asyncio.gather(*(kicker.kiq(f"{batch}-default-{i}")
                               for i in range(start, start + 50)))


async def _kick_urgent(producer: ClusterStreamBroker, batch: str) -> None:
    kicker = AsyncKicker("app:work", producer, {}).with_labels(priority=9)
    await asyncio.gather(*(kicker.kiq(f"{batch}-urgent-{i}") for i in range(20)))


def _check_first_80(started: list[str], batch: str) -> None:
    mine = [tag for tag in started if tag.startswith(batch + "-")]
    positions = [n for n, tag in enumerate(mine) if "-urgent-" in tag]
    print(f"{batch}: priority=9 tasks started at positions {positions}")
    assert len(positions) == 20
    assert max(positions) < 80, positions


@cluster
async def test_worker_starts_20_urgent_tasks_within_the_first_80(
    worker_env: tuple[Path, str, str],
) -> None:
    tmp, url, queue = worker_env
    producer = await started(url, queue)
    worker: WorkerProcess | None = None
    try:
        # Queued before the worker starts.
        await _kick_defaults(producer, "cold")
        await _kick_urgent(producer, "cold")
        worker = WorkerProcess(tmp, _APP, url, queue, "--max-async-tasks", "5")
        await eventually(lambda: bool(len(worker.words()) >= 420), "the cold backlog",
                         timeout=60)
        _check_first_80(worker.words(), "cold")
        # Kicked while the worker is busy with the default ones (its buffer
        # full of them).
        await _kick_defaults(producer, "busy")
        await eventually(lambda: bool(len(worker.words()) >= 440), "the busy worker")
        await _kick_urgent(producer, "busy")
        await eventually(lambda: bool(len(worker.words()) >= 840), "the busy backlog",
                         timeout=60)
        _check_first_80(worker.words(), "busy")
        await asyncio.sleep(0.2)
        assert sorted(worker.words()) == sorted(set(worker.words()))  # none ran twice
    finally:
        if worker is not None:
            worker.stop()
        await producer.shutdown()

