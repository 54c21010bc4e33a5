"""ClusterListQueueBroker: nothing popped is lost when a worker stops gracefully.

Against the real 3+3 cluster: a closed listen hands back every message it
popped but did not give to taskiq, in the order it would have been popped;
a ``taskiq worker`` stopped with SIGTERM in the middle of a backlog loses
nothing; and in reliable mode the messages of a consumer that died are
moved back to their shard once its heartbeat expires.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import eventually, make_message, task_id_of
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
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


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
    listen = broker.listen()
    try:
        taken = [task_id_of(_payload(await asyncio.wait_for(anext(listen), 10)))]
    finally:
        await listen.aclose()
    after = await _consuming_order(broker)
    _check_handed_back(before, after, taken, n)
    # A new listen then gets the next message of some shard first, not a later one.
    listen = broker.listen()
    try:
        first = task_id_of(_payload(await asyncio.wait_for(anext(listen), 10)))
    finally:
        await listen.aclose()
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
    listen = broker.listen()
    try:
        taken = [task_id_of(_payload(await asyncio.wait_for(anext(listen), 10)))
                 for _ in range(2)]
    finally:
        await listen.aclose()
    assert len(markers) >= 2
    assert markers[0] == markers[1]  # retried with the same marker
    _check_handed_back(before, await _consuming_order(broker), taken, n)


async def test_failed_hand_back_is_logged_with_its_count(
    cluster_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, shards=1, prefetch=4,
                                    brpop_timeout=0.2, retry=RetryPolicy(attempts=2, base=0.01))
    await broker.startup()
    try:
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
    finally:
        await broker.shutdown()
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


class _Workers:
    """``taskiq worker`` processes of one app, each in its own process group."""

    def __init__(self, tmp_path: Path, cluster_url: str, queue: str, *, extra: str,
                 task_seconds: float) -> None:
        (tmp_path / "app.py").write_text(_APP.format(extra=extra))
        self.dir = tmp_path
        self.ledger = tmp_path / "done.txt"
        self.started = tmp_path / "started.txt"
        self.env = dict(os.environ)
        self.env.update(TQRC_URL=cluster_url, TQRC_QUEUE=queue, TQRC_LEDGER=str(self.ledger),
                        TQRC_STARTED=str(self.started), TQRC_TASK_SECONDS=str(task_seconds),
                        PYTHONPATH=str(tmp_path))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        with (self.dir / f"worker{len(self.procs)}.log").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskiq", "worker", "app:broker", "--workers", "1",
                 "--no-configure-logging", *args],
                cwd=self.dir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def done(self) -> Counter[str]:
        return self._read(self.ledger)

    def begun(self) -> Counter[str]:
        return self._read(self.started)

    @staticmethod
    def _read(path: Path) -> Counter[str]:
        if not path.exists():
            return Counter()
        return Counter(line.split()[1] for line in path.read_text().splitlines() if line.strip())

    def logs(self) -> str:
        return "\n".join((self.dir / f"worker{i}.log").read_text()[-2000:]
                         for i in range(len(self.procs)))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)


async def _until(predicate: object, timeout: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())


async def test_sigterm_worker_with_backlog_loses_nothing(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    """A rolling restart: SIGTERM one worker mid-backlog, start another; every task runs."""
    n = 120
    workers = _Workers(tmp_path, cluster_url, unique_name, extra="", task_seconds=0.1)
    producer = ClusterListQueueBroker(cluster_url, queue_name=unique_name)
    await producer.startup()
    try:
        for i in range(n):
            await producer.kick(_message(f"w{i:03d}"))
        # 4 tasks at a time at 0.1 s each: the worker holds a backlog of
        # popped messages for as long as it runs.
        first = workers.start("--max-async-tasks", "4")
        assert await _until(lambda: sum(workers.done().values()) >= 12, 30), workers.logs()
        os.killpg(first.pid, signal.SIGTERM)  # as a deploy's stop does
        first.wait(timeout=20)
        stopped_with = sum(workers.done().values())
        assert stopped_with < n - 20, "the first worker must stop with a backlog left"
        workers.start("--max-async-tasks", "20")
        assert await _until(lambda: len(workers.done()) >= n, 30), (
            f"{n - len(workers.done())} of {n} tasks lost\n{workers.logs()}"
        )
        assert set(workers.done()) == {f"w{i:03d}" for i in range(n)}
        # At most once: nothing ran twice either.
        assert max(workers.begun().values()) == 1
    finally:
        await producer.shutdown()
        workers.stop_all()


# -------------------------------------------------------------- reliable mode


@pytest.fixture
async def reliable(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterListQueueBroker]:
    broker = ClusterListQueueBroker(cluster_url, queue_name=unique_name, shards=SHARDS,
                                    prefetch=4, brpop_timeout=0.2, plan_poll_interval=0.5,
                                    reliable=True, consumer_name="survivor",
                                    heartbeat_ttl=1.5, recovery_interval=0.3)
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


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
    listen = reliable.listen()
    try:
        got = [await asyncio.wait_for(anext(listen), 10) for _ in range(take)]
    finally:
        await listen.aclose()
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
    got: Counter[str] = Counter()
    listen = reliable.listen()

    async def consume() -> None:
        async for message in listen:
            assert isinstance(message, AckableMessage)
            got[task_id_of(message.data)] += 1
            await message.ack()  # type: ignore[misc]

    async def all_got() -> bool:
        return len(got) == n

    async def doomed_forgotten() -> bool:
        plan = await reliable.current_plan()
        for shard in plan.shards:
            keys = ShardKeys(reliable.options.prefix, shard.tag)
            if b"doomed" in await reliable.client.smembers(keys.consumers):
                return False
        return True

    consumer = asyncio.create_task(consume())
    try:
        # Heartbeat TTL 1.5 s + recovery every 0.3 s: well within 15 s.
        await eventually(all_got, f"all {n} tasks back", 15)
        await eventually(doomed_forgotten, "dead consumer forgotten", 15)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await listen.aclose()
    assert set(got) == {f"r{i:03d}" for i in range(n)}
    assert max(got.values()) == 1
    assert await _processing(reliable, "doomed") == []


async def test_reliable_worker_sigkill_loses_nothing(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    """kill -9 a reliable worker mid-backlog; another worker runs every task."""
    n = 40
    workers = _Workers(tmp_path, cluster_url, unique_name, task_seconds=0.5,
                       extra="reliable=True, heartbeat_ttl=1.5, recovery_interval=0.3,")
    producer = ClusterListQueueBroker(cluster_url, queue_name=unique_name)
    await producer.startup()
    try:
        for i in range(n):
            await producer.kick(_message(f"k{i:03d}"))
        first = workers.start("--max-async-tasks", "4")
        assert await _until(lambda: sum(workers.begun().values()) >= 8, 30), workers.logs()
        os.killpg(first.pid, signal.SIGKILL)  # a crash: OOM kill, node loss
        first.wait(timeout=10)
        begun_by_first = set(workers.begun())
        assert len(workers.done()) < n - 20, "the first worker must die with a backlog left"
        workers.start("--max-async-tasks", "20")
        assert await _until(lambda: len(workers.done()) >= n, 30), (
            f"{n - len(workers.done())} of {n} tasks lost\n{workers.logs()}"
        )
        assert set(workers.done()) == {f"k{i:03d}" for i in range(n)}
        # At least once: only what the dead worker had started may run twice.
        twice = {t for t, count in workers.begun().items() if count > 1}
        assert twice <= begun_by_first
    finally:
        await producer.shutdown()
        workers.stop_all()


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
    await slow.startup()
    try:
        listen = slow.listen()
        try:
            held = [await asyncio.wait_for(anext(listen), 10) for _ in range(2)]
        finally:
            await listen.aclose()
        held_ids = {task_id_of(_payload(m)) for m in held}
        got: set[str] = set()
        survivor = reliable.listen()

        async def consume() -> None:
            async for message in survivor:
                assert isinstance(message, AckableMessage)
                got.add(task_id_of(message.data))
                await message.ack()  # type: ignore[misc]

        consumer = asyncio.create_task(consume())
        try:
            async def rest_taken() -> bool:
                return len(got) == n - len(held)

            await eventually(rest_taken, "the other tasks taken", 10)
            # Three heartbeat TTLs with recovery every 0.3 s: a heartbeat
            # that stopped with the listen would have let "survivor" take them.
            await asyncio.sleep(3.0)
            assert not got & held_ids
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await survivor.aclose()
        for message in held:
            assert isinstance(message, AckableMessage)
            await message.ack()  # type: ignore[misc]
        assert await _processing(slow, "slow") == []
    finally:
        await slow.shutdown()
    assert await _processing(reliable, "slow") == []
