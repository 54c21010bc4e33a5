"""ClusterListQueueBroker: nothing popped is lost when a worker stops gracefully.

Against the real 3+3 cluster: a closed listen hands back every message it
popped but did not give to taskiq, in the order it would have been popped;
a ``taskiq worker`` stopped with SIGTERM in the middle of a backlog loses
nothing; and in reliable mode the messages of a consumer that died are
moved back to their shard once its heartbeat expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import Workers, chaos, consuming, eventually, make_message, running, task_id_of
from redis.exceptions import ConnectionError as RedisConnectionError
from taskiq import AckableMessage, BrokerMessage

from taskiq_redis_cluster import ClusterListQueueBroker
from taskiq_redis_cluster._keys import ShardKeys
from taskiq_redis_cluster._redis._retry import RetryPolicy

pytestmark = pytest.mark.cluster

SHARDS = 3


def _message(task_id: str) -> BrokerMessage:
    return make_message(task_id, "app:work", args=[task_id])


def _payload(data: AckableMessage | bytes) -> bytes:
    return data.data if isinstance(data, AckableMessage) else data


async def _consuming_order(broker: ClusterListQueueBroker) -> dict[str, list[str]]:
    """Per shard list, the task ids in the order BRPOP would return them."""
    plan = await broker.current_plan()
    order: dict[str, list[str]] = {}
    for shard in plan.shards:
        key = ShardKeys(broker.options.prefix, shard.tag).list
        # LPUSH in, BRPOP out: the right end is popped first.
        order[shard.tag] = [task_id_of(d) for d in reversed(await broker.client.lrange(key, 0, -1))]
    return order


async def _queued(broker: ClusterListQueueBroker) -> int:
    plan = await broker.current_plan()
    return sum([
        await broker.client.llen(ShardKeys(broker.options.prefix, s.tag).list)
        for s in plan.shards
    ])


@pytest.fixture
async def broker(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterListQueueBroker]:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, shards=SHARDS,
                                    prefetch=4, brpop_timeout=0.2, plan_poll_interval=0.5)
    async with running(broker):
        yield broker


async def _kick_and_read_order(
    broker: ClusterListQueueBroker, n: int
) -> dict[str, list[str]]:
    for i in range(n):  # one by one, so each list holds its tasks in kick order
        await broker.kick(_message(f"t{i:03d}"))
    before = await _consuming_order(broker)
    assert sum(len(ids) for ids in before.values()) == n
    return before


def _check_handed_back(
    before: dict[str, list[str]], after: dict[str, list[str]], taken: list[str], n: int
) -> None:
    # Nothing lost, nothing doubled.
    remaining = [t for ids in after.values() for t in ids]
    assert len(remaining) + len(taken) == n, (len(remaining), len(taken))
    assert sorted(remaining + taken) == sorted(t for ids in before.values() for t in ids)
    # Each shard pops the rest in exactly the order it would have before.
    for tag, ids in before.items():
        assert after[tag] == [t for t in ids if t not in taken], tag


async def _first(broker: ClusterListQueueBroker, count: int) -> list[AckableMessage | bytes]:
    """The first ``count`` messages of a listen that is closed right after them."""
    listen = broker.listen()
    try:
        return [await asyncio.wait_for(anext(listen), 10) for _ in range(count)]
    finally:
        await listen.aclose()


async def test_closed_listen_hands_back_unstarted_messages_in_order(
    broker: ClusterListQueueBroker,
) -> None:
    n, take = 60, 5
    before = await _kick_and_read_order(broker, n)
    listen = broker.listen()
    try:
        taken = [task_id_of(_payload(await asyncio.wait_for(anext(listen), 10)))
                 for _ in range(take)]
        # The readers fill the buffer (prefetch=4) and then each holds one
        # more message it popped, blocked handing it over: 4 + 3 in all.
        held = broker.options.prefetch + SHARDS

        async def filled() -> bool:
            return await _queued(broker) <= n - take - held

        await eventually(filled, "buffer filled", 10)
        queued_at_close = await _queued(broker)
    finally:
        await listen.aclose()
    after = await _consuming_order(broker)
    _check_handed_back(before, after, taken, n)
    # The prefetch bound: the broker held no more than it may.
    assert queued_at_close == n - take - held


async def test_hand_back_while_readers_are_popping(broker: ClusterListQueueBroker) -> None:
    """Close right after the first message: readers are mid-BRPOP, buffer filling."""
    n = 40
    before = await _kick_and_read_order(broker, n)
    taken = [task_id_of(_payload(m)) for m in await _first(broker, 1)]
    after = await _consuming_order(broker)
    _check_handed_back(before, after, taken, n)
    # A new listen then gets the next message of some shard first, not a later one.
    [first] = [task_id_of(_payload(m)) for m in await _first(broker, 1)]
    assert first in {ids[0] for ids in after.values() if ids}


async def test_hand_back_retried_after_a_lost_reply_pushes_once(
    broker: ClusterListQueueBroker,
) -> None:
    """The connection breaks after the hand-back was applied: the retry must not double it."""
    n = 20
    before = await _kick_and_read_order(broker, n)
    real = broker._scripts["hand_back"]
    markers: list[str] = []

    async def reply_lost_once(*, keys: list[str], args: list[object]) -> object:
        markers.append(keys[1])
        reply = await real(keys=keys, args=args)
        if len(markers) == 1:
            raise RedisConnectionError("Connection closed by server.")
        return reply

    broker._scripts["hand_back"] = reply_lost_once
    taken = [task_id_of(_payload(m)) for m in await _first(broker, 2)]
    assert len(markers) >= 2
    assert markers[0] == markers[1]  # retried with the same marker
    _check_handed_back(before, await _consuming_order(broker), taken, n)


async def test_failed_hand_back_is_logged_with_its_count(
    cluster_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, shards=1, prefetch=4,
                                    brpop_timeout=0.2, retry=RetryPolicy(attempts=2, base=0.01))
    async with running(broker):
        for i in range(10):
            await broker.kick(_message(f"f{i}"))

        async def down(*, keys: list[str], args: list[object]) -> object:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1.")

        broker._scripts["hand_back"] = down
        listen = broker.listen()
        try:
            await asyncio.wait_for(anext(listen), 10)

            async def filled() -> bool:
                return await _queued(broker) == 10 - 1 - 4 - 1

            await eventually(filled, "buffer filled", 10)
        finally:
            await listen.aclose()
    lost = [r.getMessage() for r in caplog.records if "Could not hand back" in r.getMessage()]
    assert len(lost) == 1
    assert "5 unstarted messages" in lost[0]
    assert "they are lost" in lost[0]


# ---------------------------------------------------------------- real workers

_APP = textwrap.dedent(
    """
    import asyncio
    import os
    from taskiq_redis_cluster import ClusterListQueueBroker

    broker = ClusterListQueueBroker(
        os.environ["TQRC_URL"], queue_name=os.environ["TQRC_QUEUE"], brpop_timeout=0.3,
        {extra}
    )

    @broker.task(task_name="app:work")
    async def work(task_id: str) -> None:
        with open(os.environ["TQRC_STARTED"], "a") as ledger:
            ledger.write(f"{{os.getpid()}} {{task_id}}\\n")
        await asyncio.sleep(float(os.environ["TQRC_TASK_SECONDS"]))
        with open(os.environ["TQRC_LEDGER"], "a") as ledger:
            ledger.write(f"{{os.getpid()}} {{task_id}}\\n")
    """
)


class _Workers(Workers):
    """``taskiq worker`` processes of the app above, noting tasks begun and done."""

    def __init__(self, tmp_path: Path, cluster_url: str, queue: str, *, extra: str,
                 task_seconds: float) -> None:
        self.ledger = tmp_path / "done.txt"
        self.started = tmp_path / "started.txt"
        super().__init__(tmp_path, _APP.format(extra=extra), TQRC_URL=cluster_url,
                         TQRC_QUEUE=queue, TQRC_LEDGER=str(self.ledger),
                         TQRC_STARTED=str(self.started), TQRC_TASK_SECONDS=str(task_seconds))

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        return super().start("--no-configure-logging", *args)

    def done(self) -> Counter[str]:
        return self._read(self.ledger)

    def begun(self) -> Counter[str]:
        return self._read(self.started)

    @staticmethod
    def _read(path: Path) -> Counter[str]:
        if not path.exists():
            return Counter()
        return Counter(line.split()[1] for line in path.read_text().splitlines() if line.strip())


@contextlib.asynccontextmanager
async def _backlog(
    workers: _Workers, cluster_url: str, queue: str, ids: list[str]
) -> AsyncIterator[None]:
    """Queue ``ids`` (the producer stays up) and kill every worker at the end."""
    producer = ClusterListQueueBroker(cluster_url, queue_name=queue)
    try:
        async with running(producer):
            for task_id in ids:
                await producer.kick(_message(task_id))
            yield
    finally:
        workers.stop_all()


async def _all_done(workers: _Workers, ids: list[str]) -> None:
    n = len(ids)
    await eventually(lambda: len(workers.done()) >= n, f"all {n} tasks done", 30,
                     detail=lambda: f"{n - len(workers.done())} lost\n{workers.logs()}")
    assert set(workers.done()) == set(ids)


async def test_sigterm_worker_with_backlog_loses_nothing(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    """A rolling restart: SIGTERM one worker mid-backlog, start another; every task runs."""
    ids = [f"w{i:03d}" for i in range(120)]
    workers = _Workers(tmp_path, cluster_url, unique_name, extra="", task_seconds=0.1)
    async with _backlog(workers, cluster_url, unique_name, ids):
        # 4 tasks at a time at 0.1 s each: the worker holds a backlog of
        # popped messages for as long as it runs.
        first = workers.start("--max-async-tasks", "4")
        await eventually(lambda: sum(workers.done().values()) >= 12, "12 tasks done", 30,
                         detail=workers.logs)
        os.killpg(first.pid, signal.SIGTERM)  # as a deploy's stop does
        first.wait(timeout=20)
        stopped_with = sum(workers.done().values())
        assert stopped_with < len(ids) - 20, "the first worker must stop with a backlog left"
        workers.start("--max-async-tasks", "20")
        await _all_done(workers, ids)
        # At most once: nothing ran twice either.
        assert max(workers.begun().values()) == 1


# -------------------------------------------------------------- reliable mode


@pytest.fixture
async def reliable(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterListQueueBroker]:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, shards=SHARDS,
                                    prefetch=4, brpop_timeout=0.2, plan_poll_interval=0.5,
                                    reliable=True, consumer_name="survivor",
                                    heartbeat_ttl=1.5, recovery_interval=0.3)
    async with running(broker):
        yield broker


async def _processing(broker: ClusterListQueueBroker, consumer: str) -> list[str]:
    plan = await broker.current_plan()
    ids: list[str] = []
    for shard in plan.shards:
        key = ShardKeys(broker.options.prefix, shard.tag).processing(consumer)
        ids += [task_id_of(d) for d in await broker.client.lrange(key, 0, -1)]
    return ids


async def test_reliable_close_hands_back_and_ack_empties_processing(
    reliable: ClusterListQueueBroker,
) -> None:
    n, take = 30, 4
    before = await _kick_and_read_order(reliable, n)
    got = await _first(reliable, take)
    assert all(isinstance(m, AckableMessage) for m in got)
    taken = [task_id_of(_payload(m)) for m in got]
    _check_handed_back(before, await _consuming_order(reliable), taken, n)
    # Taken but not acked: still owned by this consumer, and only those.
    assert sorted(await _processing(reliable, "survivor")) == sorted(taken)
    for message in got:
        assert isinstance(message, AckableMessage)
        await message.ack()  # type: ignore[misc]
    assert await _processing(reliable, "survivor") == []


_CRASHING_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from taskiq_redis_cluster import ClusterListQueueBroker

    async def main() -> None:
        broker = ClusterListQueueBroker(
            sys.argv[1], queue_name=sys.argv[2], reliable=True, consumer_name="doomed",
            heartbeat_ttl=1.5, brpop_timeout=0.2, prefetch=4,
        )
        await broker.startup()
        listen = broker.listen()
        for _ in range(int(sys.argv[3])):
            await anext(listen)  # taken, never acked
        print("taken", flush=True)
        os._exit(0)  # a crash: no hand-back, no shutdown

    asyncio.run(main())
    """
)


async def test_reliable_recovers_messages_of_a_crashed_consumer(
    reliable: ClusterListQueueBroker, cluster_url: str, unique_name: str
) -> None:
    n, take = 30, 5
    for i in range(n):
        await reliable.kick(_message(f"r{i:03d}"))
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_CONSUMER, cluster_url, unique_name, str(take),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(crashed.communicate(), 30)
    assert out.strip() == b"taken"
    # Everything the dead consumer popped is in its processing lists: the
    # tasks it took and its prefetch.
    stranded = await _processing(reliable, "doomed")
    assert len(stranded) >= take
    assert len(stranded) + await _queued(reliable) == n
    async def doomed_forgotten() -> bool:
        plan = await reliable.current_plan()
        for shard in plan.shards:
            keys = ShardKeys(reliable.options.prefix, shard.tag)
            if b"doomed" in await reliable.client.smembers(keys.consumers):
                return False
        return True

    async with consuming(reliable) as got:
        # Heartbeat TTL 1.5 s + recovery every 0.3 s: well within 15 s.
        await eventually(lambda: len(set(got)) == n, f"all {n} tasks back", 15)
        await eventually(doomed_forgotten, "dead consumer forgotten", 15)
    assert set(got) == {f"r{i:03d}" for i in range(n)}
    assert max(Counter(got).values()) == 1
    assert await _processing(reliable, "doomed") == []


@chaos(timeout=120)
async def test_reliable_worker_sigkill_loses_nothing(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    """kill -9 a reliable worker mid-backlog; another worker runs every task."""
    ids = [f"k{i:03d}" for i in range(40)]
    workers = _Workers(tmp_path, cluster_url, unique_name, task_seconds=0.5,
                       extra="reliable=True, heartbeat_ttl=1.5, recovery_interval=0.3,")
    async with _backlog(workers, cluster_url, unique_name, ids):
        first = workers.start("--max-async-tasks", "4")
        await eventually(lambda: sum(workers.begun().values()) >= 8, "8 tasks begun", 30,
                         detail=workers.logs)
        os.killpg(first.pid, signal.SIGKILL)  # a crash: OOM kill, node loss
        first.wait(timeout=10)
        begun_by_first = set(workers.begun())
        assert len(workers.done()) < len(ids) - 20, "the first worker must die with a backlog left"
        workers.start("--max-async-tasks", "20")
        await _all_done(workers, ids)
        # At least once: only what the dead worker had started may run twice.
        twice = {t for t, count in workers.begun().items() if count > 1}
        assert twice <= begun_by_first


async def test_reliable_live_consumer_keeps_its_messages_after_listen_closed(
    reliable: ClusterListQueueBroker, cluster_url: str, unique_name: str
) -> None:
    """taskiq runs what it took after the listen closed: the heartbeat must outlive it."""
    n = 12
    for i in range(n):
        await reliable.kick(_message(f"s{i:03d}"))
    slow = ClusterListQueueBroker(cluster_url, queue_name=unique_name, reliable=True,
                                  consumer_name="slow", heartbeat_ttl=1.0, brpop_timeout=0.2,
                                  prefetch=4)
    async with running(slow):
        held = await _first(slow, 2)
        held_ids = {task_id_of(_payload(m)) for m in held}
        async with consuming(reliable) as got:
            await eventually(lambda: len(set(got)) == n - len(held), "the other tasks taken", 10)
            # Three heartbeat TTLs with recovery every 0.3 s: a heartbeat
            # that stopped with the listen would have let "survivor" take
            # them. A wait for what must not happen, not synchronisation.
            await asyncio.sleep(3.0)
            assert not set(got) & held_ids
        for message in held:
            assert isinstance(message, AckableMessage)
            await message.ack()  # type: ignore[misc]
        assert await _processing(slow, "slow") == []
    assert await _processing(reliable, "slow") == []
