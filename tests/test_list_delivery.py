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
from taskiq import AckableMessage, BrokerMessage

from taskiq_redis_cluster import ClusterListQueueBroker
from taskiq_redis_cluster._keys import ShardKeys

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
