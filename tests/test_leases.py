"""Leases for long tasks and taskiq's per-task ``ack_type`` (issue 16, items 4 and 5).

Real ``taskiq worker`` processes on the real cluster. A worker keeps the
stream entries of its running tasks fresh (an owner-only ``XCLAIM ...
JUSTID``, batched per shard per tick), so ``idle_timeout`` can be a few
seconds: a task longer than that is not stolen, a SIGKILLed worker's task
comes back after about ``idle_timeout``, and a ``manual`` task that ends
without ``Context.ack()`` is redelivered after ``idle_timeout`` and
dead-lettered after ``max_deliveries``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Workers, chaos, consuming, eventually, make_message, task_id_of
from redis.asyncio import RedisCluster
from taskiq import AckableMessage

from taskiq_redis_cluster import ClusterStreamBroker
from taskiq_redis_cluster._keys import ShardKeys

pytestmark = pytest.mark.cluster

_APP = textwrap.dedent(
    """
    import asyncio
    import os
    import time

    from taskiq import Context, TaskiqDepends, TaskiqEvents
    from taskiq_redis_cluster import ClusterStreamBroker

    broker = ClusterStreamBroker(
        os.environ["TQRC_URL"], queue_name=os.environ["TQRC_QUEUE"], shards={shards},
        idle_timeout={idle_timeout}, max_deliveries={max_deliveries}, xread_block=300,
    )
    LEDGER = os.environ["TQRC_LEDGER"]


    def note(event, task_id):
        with open(LEDGER, "a") as ledger:
            ledger.write(f"{{event}} {{os.getpid()}} {{task_id}} {{time.time():.3f}}\\n")


    def attempts(task_id):
        with open(LEDGER) as ledger:
            return sum(1 for line in ledger if line.split()[0] == "begun"
                       and line.split()[2] == task_id)


    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def ready(state):
        note("ready", "-")


    @broker.task(task_name="app:long")
    async def long(task_id: str, seconds: float, rerun: float) -> None:
        note("begun", task_id)
        # A rerun (after a crash) may take another time than the first attempt.
        await asyncio.sleep(seconds if attempts(task_id) == 1 else rerun)
        note("done", task_id)


    @broker.task(task_name="app:received", ack_type="when_received")
    async def received(task_id: str, seconds: float) -> None:
        note("begun", task_id)
        await asyncio.sleep(seconds)
        note("done", task_id)


    @broker.task(task_name="app:executed", ack_type="when_executed")
    async def executed(task_id: str, seconds: float) -> None:
        note("begun", task_id)
        await asyncio.sleep(seconds)
        note("done", task_id)


    @broker.task(task_name="app:manual", ack_type="manual")
    async def manual(task_id: str, before: float, after: float,
                     context: Context = TaskiqDepends()) -> None:
        note("begun", task_id)
        await asyncio.sleep(before)
        await context.ack()
        note("acked", task_id)
        await asyncio.sleep(after)
        note("done", task_id)


    @broker.task(task_name="app:never", ack_type="manual")
    async def never(task_id: str) -> None:
        note("begun", task_id)
        await asyncio.sleep(0.1)
        note("done", task_id)
    """
)


class _Ledger:
    """Lines ``event pid task_id unix_time`` the workers append."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[tuple[str, int, str, float]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                out.append((parts[0], int(parts[1]), parts[2], float(parts[3])))
        return out

    def events(self, event: str, task_id: str) -> list[tuple[int, float]]:
        return [(pid, at) for e, pid, t, at in self.rows() if e == event and t == task_id]

    def ready(self) -> set[int]:
        return {pid for e, pid, _, _ in self.rows() if e == "ready"}


class _Workers(Workers):
    """``taskiq worker`` processes of the generated app, noting in one ledger."""

    def __init__(self, tmp_path: Path, cluster_url: str, queue: str, **settings: Any) -> None:
        ledger = tmp_path / "ledger.txt"
        ledger.touch()
        super().__init__(tmp_path, _APP.format(**settings), TQRC_URL=cluster_url,
                         TQRC_QUEUE=queue, TQRC_LEDGER=str(ledger))
        self.ledger = _Ledger(ledger)

    async def wait_ready(self, timeout: float = 60) -> None:
        # Worker processes are children of the taskiq main process.
        await eventually(lambda: len(self.ledger.ready()) >= len(self.procs),
                         f"{len(self.procs)} workers ready", timeout, detail=self.logs)

    def kill(self, pid: int) -> None:
        """SIGKILL the worker process ``pid`` (a child of a taskiq main process)."""
        os.kill(pid, signal.SIGKILL)


WorkersOf = Callable[..., Awaitable[_Workers]]


@pytest.fixture
async def workers_of(
    tmp_path: Path, cluster_url: str, unique_name: str
) -> AsyncIterator[WorkersOf]:
    """Start ``count`` ready workers of the app with these settings (stopped at the end)."""
    made: list[_Workers] = []

    async def start(count: int = 1, *, idle: float, max_deliveries: int) -> _Workers:
        workers = _Workers(tmp_path, cluster_url, unique_name, shards=2,
                           idle_timeout=int(idle * 1000), max_deliveries=max_deliveries)
        made.append(workers)
        for _ in range(count):
            workers.start()
        await workers.wait_ready()
        return workers

    try:
        yield start
    finally:
        for workers in made:
            workers.stop_all()


@pytest.fixture
async def producer(cluster_url: str, unique_name: str) -> AsyncIterator[ClusterStreamBroker]:
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=2)
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


def _kick(producer: ClusterStreamBroker, name: str, **labels: Any) -> Any:
    """A kicker of task ``name`` as the app declares it (labels included)."""

    async def stub(*args: Any) -> None:  # the body runs in the workers only
        del args

    return producer.task(task_name=name, **labels)(stub)


async def _pending(client: RedisCluster, producer: ClusterStreamBroker) -> int:
    plan = await producer.current_plan()
    total = 0
    for shard in plan.shards:
        summary = await client.xpending(ShardKeys(producer.options.prefix, shard.tag).stream,
                                        producer.options.consumer_group_name)
        total += int(summary["pending"])
    return total


async def test_long_task_with_short_idle_timeout_runs_once(
    producer: ClusterStreamBroker, workers_of: WorkersOf
) -> None:
    """12 s task, idle_timeout 3 s, 2 workers: without leases it ran 4 times."""
    workers = await workers_of(2, idle=3.0, max_deliveries=10)
    started = time.monotonic()
    await _kick(producer, "app:long").kiq("L", 12.0, 12.0)
    await eventually(lambda: workers.ledger.events("done", "L"), "the task done", 30,
                     detail=workers.logs)
    took = time.monotonic() - started
    begun = workers.ledger.events("begun", "L")
    print(f"12 s task with idle_timeout 3 s: {len(begun)} run(s), done after {took:.1f}s")
    assert len(begun) == 1, workers.logs()


@chaos(timeout=120)
async def test_sigkilled_worker_task_comes_back_after_about_idle_timeout(
    producer: ClusterStreamBroker, workers_of: WorkersOf
) -> None:
    idle = 3.0
    workers = await workers_of(idle=idle, max_deliveries=10)
    ledger = workers.ledger
    await _kick(producer, "app:long").kiq("K", 60.0, 0.2)
    await eventually(lambda: ledger.events("begun", "K"), "the task begun", 30,
                     detail=workers.logs)
    (victim, _), = ledger.events("begun", "K")
    workers.start()  # a bystander: it must not take the task while the victim lives
    await workers.wait_ready()
    # Past idle_timeout while the victim lives and renews its lease: the
    # wait is what the check is about, not synchronisation.
    await asyncio.sleep(idle * 1.5)
    assert len(ledger.events("begun", "K")) == 1, workers.logs()
    killed_at = time.time()
    workers.kill(victim)
    await eventually(lambda: len(ledger.events("begun", "K")) >= 2, "the task begun again", 30,
                     detail=workers.logs)
    (rescuer, again_at), = ledger.events("begun", "K")[1:]
    await eventually(lambda: ledger.events("done", "K"), "the rerun done", 30,
                     detail=workers.logs)
    waited = again_at - killed_at
    print(f"after SIGKILL the task began again {waited:.2f}s later (idle_timeout {idle}s)")
    assert rescuer != victim
    # idle_timeout, plus at most one reclaim interval (idle/4) and the
    # renewal age at the kill (idle/3 at most), plus scheduling slack.
    assert waited <= idle + idle / 4 + 2.0, waited
    assert len(ledger.events("begun", "K")) == 2


async def test_per_task_ack_types(
    producer: ClusterStreamBroker, cluster_client: RedisCluster, workers_of: WorkersOf
) -> None:
    """when_received leaves the pending list at once, when_executed at the end,
    manual at Context.ack(), even when that comes after idle_timeout."""
    idle = 1.5
    workers = await workers_of(idle=idle, max_deliveries=10)
    ledger = workers.ledger

    async def while_running(task_id: str, event: str = "begun") -> int:
        await eventually(lambda: ledger.events(event, task_id), f"{task_id} {event}", 30,
                         detail=workers.logs)
        await asyncio.sleep(0.3)  # the batched ack is sent within milliseconds
        return await _pending(cluster_client, producer)

    async def finished(task_id: str) -> None:
        await eventually(lambda: ledger.events("done", task_id), f"{task_id} done", 30,
                         detail=workers.logs)

        async def settled() -> bool:
            return await _pending(cluster_client, producer) == 0

        await eventually(settled, "no entry pending after the task", 5)

    await _kick(producer, "app:received", ack_type="when_received").kiq("R", 2.0)
    assert await while_running("R") == 0  # acked before it ran
    await finished("R")

    await _kick(producer, "app:executed", ack_type="when_executed").kiq("E", 2.0)
    assert await while_running("E") == 1  # pending until it returns
    await finished("E")

    # Runs 2 x idle_timeout before acking: the lease keeps it from others.
    await _kick(producer, "app:manual", ack_type="manual").kiq("M", 2 * idle, 1.0)
    assert await while_running("M") == 1
    assert await while_running("M", "acked") == 0  # Context.ack() took it out
    await finished("M")

    for task_id in ("R", "E", "M"):
        assert len(ledger.events("begun", task_id)) == 1, (task_id, workers.logs())


async def test_manual_task_that_never_acks_is_redelivered_then_dead_lettered(
    producer: ClusterStreamBroker, cluster_client: RedisCluster, workers_of: WorkersOf
) -> None:
    idle = 1.0
    workers = await workers_of(idle=idle, max_deliveries=2)
    ledger = workers.ledger
    await _kick(producer, "app:never", ack_type="manual").kiq("N")
    plan = await producer.current_plan()
    deads = [ShardKeys(producer.options.prefix, s.tag).dead for s in plan.shards]

    async def dead_letters() -> list[Any]:
        return [entry for key in deads for entry in await cluster_client.xrange(key)]

    dead = await eventually(dead_letters, "a dead letter", 30, detail=workers.logs)
    runs = ledger.events("begun", "N")
    done = ledger.events("done", "N")
    print(f"manual task without ack: ran at {[round(at - runs[0][1], 2) for _, at in runs]}"
          f" s, then dead-lettered")
    assert len(runs) == 2, workers.logs()
    # Not renewed once the task ended: redelivered idle_timeout after its
    # last renewal, which is at most a third of idle_timeout before the end.
    assert runs[1][1] - done[0][1] >= idle * (1 - 1 / 3) - 0.1
    assert dead[0][1][b"reason"].startswith(b"max deliveries exceeded")
    assert await _pending(cluster_client, producer) == 0


# ------------------------------------------------------- the broker, in-process


async def test_renewal_skips_entries_no_longer_pending_on_this_worker(
    cluster_url: str, unique_name: str, cluster_client: RedisCluster
) -> None:
    """The owner check: renewing never takes back an entry another worker
    reclaimed (a plain XCLAIM would), and JUSTID keeps the delivery count."""
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=1,
                                 consumer_name="A", idle_timeout=60_000)
    await broker.startup()
    try:
        plan = await broker.current_plan()
        stream = ShardKeys(broker.options.prefix, plan.shards[0].tag).stream
        group = broker.options.consumer_group_name
        for i in range(3):
            await broker.kick(make_message(f"o{i}"))
        reply = await cluster_client.xreadgroup(group, "A", {stream: ">"}, count=3)
        ids = [entry_id for _, entries in reply for entry_id, _ in entries]
        assert len(ids) == 3
        await cluster_client.xclaim(stream, group, "B", 0, [ids[0]], justid=True)
        await cluster_client.xack(stream, group, ids[1])
        await asyncio.sleep(0.3)

        lost = await broker._renew_leases(stream, ids)

        assert sorted(lost) == sorted(ids[:2])
        rows = {r["message_id"]: r for r in await cluster_client.xpending_range(
            stream, group, min="-", max="+", count=10)}
        assert set(rows) == {ids[0], ids[2]}
        assert rows[ids[0]]["consumer"] == b"B"  # not taken back
        assert rows[ids[2]]["consumer"] == b"A"
        assert rows[ids[2]]["time_since_delivered"] < 200  # renewed: idle reset
        assert rows[ids[2]]["times_delivered"] == 1  # JUSTID: not a delivery

        # A deleted stream took its group and pending list: nothing is left to renew.
        await cluster_client.delete(stream)
        assert sorted(await broker._renew_leases(stream, ids)) == sorted(ids)
    finally:
        await broker.shutdown()


async def test_read_entries_are_renewed_in_one_call_per_shard_and_released_at_close(
    cluster_url: str, unique_name: str
) -> None:
    """Entries a worker read but taskiq has not taken yet are leased (another
    worker would run them while this one also does later); one taken by a
    plain listen() consumer that neither acks nor runs it is not, as before."""
    idle = 1.0
    settings: dict[str, Any] = {"shards": 3, "idle_timeout": int(idle * 1000),
                                "xread_block": 200}
    holder = ClusterStreamBroker(cluster_url, queue_name=unique_name, consumer_name="holder",
                                 **settings)
    other = ClusterStreamBroker(cluster_url, queue_name=unique_name, consumer_name="other",
                                **settings)
    await holder.startup()
    await other.startup()
    listen = holder.listen()
    try:
        ids = [f"h{i}" for i in range(12)]
        for task_id in ids:
            await holder.kick(make_message(task_id))
        first = await anext(listen)
        assert isinstance(first, AckableMessage)
        leases = holder._leases
        assert leases is not None
        calls: list[tuple[float, str, int]] = []
        renew = leases._renew

        async def counted(stream: str, entry_ids: list[bytes]) -> list[bytes]:
            calls.append((time.monotonic(), stream, len(entry_ids)))
            return await renew(stream, entry_ids)

        leases._renew = counted
        watched_from = time.monotonic()

        async def all_read() -> bool:
            return leases.renewed_count() == 11 and leases.waiting_count() == 1

        await eventually(all_read, "the holder read all 12 entries")
        plan = await holder.current_plan()
        streams = [ShardKeys(holder.options.prefix, s.tag).stream for s in plan.shards]

        async def deliveries() -> dict[str, int]:
            counts: dict[str, int] = {}
            for stream in streams:
                for row in await holder.client.xpending_range(stream, "taskiq", "-", "+", 50):
                    entry = await holder.client.xrange(stream, row["message_id"],
                                                       row["message_id"])
                    counts[task_id_of(entry[0][1][b"data"])] = row["times_delivered"]
            return counts

        first_id = task_id_of(first.data)
        async with consuming(other) as got:
            # The handed-out entry nobody runs is reclaimed after idle_timeout,
            # by whichever worker's reclaim pass comes first (the holder's own
            # readers reclaim too)...
            async def reclaimed() -> bool:
                return (await deliveries()).get(first_id, 1) >= 2 or got == [first_id]

            await eventually(reclaimed, "the unrun entry reclaimed", timeout=idle * 10)
            # ...and over two more idle_timeouts no leased entry follows it.
            await asyncio.sleep(idle * 2)
            counts = await deliveries()
            assert {t: n for t, n in counts.items() if t != first_id} == {
                t: 1 for t in ids if t != first_id
            }
            assert got in ([], [first_id])
            ticks = (time.monotonic() - watched_from) / leases.interval + 1
            assert calls, "nothing was renewed"
            assert len(calls) <= 3 * ticks, (len(calls), ticks)
            # Each tick renews every held entry: the 11, plus the unrun one if
            # the holder's own reclaim took it back into its buffer.
            held = 11 if got == [first_id] else 12
            assert sum(n for *_, n in calls[-3:]) == held
            await listen.aclose()  # releases the 11 for others at once

            async def all_got() -> bool:
                return sorted(got) == sorted(ids)

            await eventually(all_got, "the other worker got the released entries",
                             timeout=idle * 4)
        print(f"{len(calls)} renewal calls in {ticks:.0f} ticks for 11 entries on 3 shards")
    finally:
        await listen.aclose()
        await holder.shutdown()
        await other.shutdown()
