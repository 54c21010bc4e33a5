"""ClusterListScheduleSource against the real session cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers import chaos, eventually
from redis.asyncio import RedisCluster
from taskiq import AsyncBroker, BrokerMessage, ScheduledTask, ScheduleSource, TaskiqScheduler
from taskiq.cli.scheduler.run import SchedulerLoop, get_all_schedules
from taskiq.exceptions import ScheduledTaskCancelledError, SendTaskError

from taskiq_redis_cluster import _keys
from taskiq_redis_cluster._errors import InvalidNameError, InvalidOptionError, LifecycleError
from taskiq_redis_cluster._schedule_source import ClusterListScheduleSource
from taskiq_redis_cluster.testing import DevCluster

pytestmark = pytest.mark.cluster

Factory = Callable[..., Awaitable[ClusterListScheduleSource]]


@pytest.fixture
async def make_source(cluster_url: str, unique_name: str) -> AsyncIterator[Factory]:
    """Build started sources named ``unique_name`` unless told otherwise."""
    made: list[ClusterListScheduleSource] = []

    async def factory(**kwargs: Any) -> ClusterListScheduleSource:
        kwargs.setdefault("name", unique_name)
        source = ClusterListScheduleSource(cluster_url, **kwargs)
        made.append(source)
        await source.startup()
        return source

    yield factory
    for source in made:
        await source.shutdown()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _task(schedule_id: str, **when: Any) -> ScheduledTask:
    return ScheduledTask(
        task_name="tests:noop",
        labels={"origin": "test"},
        args=[1, "two"],
        kwargs={"k": 3},
        schedule_id=schedule_id,
        **when,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ids(schedules: list[ScheduledTask]) -> set[str]:
    return {s.schedule_id for s in schedules}


async def _fires(source: ClusterListScheduleSource, task: ScheduledTask) -> bool:
    """Do what taskiq's scheduler does around a kick; True if it would send."""
    try:
        await source.pre_send(task)
    except ScheduledTaskCancelledError:
        return False
    await source.post_send(task)
    return True


async def test_returns_cron_interval_and_due_one_off(make_source: Factory) -> None:
    source = await make_source(lookahead=60)
    now = _now()
    schedules = [
        _task("cron", cron="*/5 * * * *"),
        _task("interval", interval=timedelta(seconds=30)),
        _task("past", time=now - timedelta(hours=2)),
        _task("soon", time=now + timedelta(seconds=20)),
        _task("later", time=now + timedelta(hours=3)),
        _task("naive", time=(now - timedelta(minutes=1)).replace(tzinfo=None)),
    ]
    for schedule in schedules:
        await source.add_schedule(schedule)

    got = {s.schedule_id: s for s in await source.get_schedules()}
    assert set(got) == {"cron", "interval", "past", "soon", "naive"}
    # Records come back equal to what was stored (JSON round trip), except
    # that one-off schedules carry the task id of their firing.
    for schedule in schedules:
        if schedule.schedule_id in got:
            back = got[schedule.schedule_id]
            if schedule.time is not None:
                assert back.task_id is not None
                back = back.model_copy(update={"task_id": None})
            assert back == schedule
    assert got["cron"].task_id is None


async def test_one_off_task_id_is_the_same_in_every_scheduler(make_source: Factory) -> None:
    one, two = await make_source(), await make_source()
    due = _now() + timedelta(seconds=30)
    await one.add_schedule(_task("a", time=due))
    await one.add_schedule(_task("b", time=due))
    await one.add_schedule(_task("mine", time=due).model_copy(update={"task_id": "given"}))
    first = {s.schedule_id: s.task_id for s in await one.get_schedules()}
    assert first == {s.schedule_id: s.task_id for s in await two.get_schedules()}
    assert first["mine"] == "given"  # a task id set by the user is kept
    assert len({first["a"], first["b"], "given"}) == 3
    # Re-timed, it is another firing with another task id.
    await one.add_schedule(_task("a", time=due + timedelta(seconds=1)))
    assert {s.schedule_id: s.task_id for s in await two.get_schedules()}["a"] != first["a"]


async def test_records_are_json_and_keys_share_one_slot(
    make_source: Factory, cluster_client: RedisCluster
) -> None:
    source = await make_source()
    await source.add_schedule(_task("one", cron="* * * * *"))
    raw = await cluster_client.hget(source.keys.schedules, "one")
    assert raw is not None
    assert json.loads(raw)["task_name"] == "tests:noop"

    keys = source.keys
    slots = {
        _keys.slot_of(key)
        for key in (keys.schedules, keys.cron, keys.timeline, keys.claim("one", 123))
    }
    assert len(slots) == 1


async def test_delete_stops_a_schedule_at_once(make_source: Factory) -> None:
    source = await make_source()
    cron = _task("cron", cron="* * * * *")
    await source.add_schedule(cron)
    await source.add_schedule(_task("keep", interval=60))
    held = await source.get_schedules()  # what a running scheduler holds
    assert _ids(held) == {"cron", "keep"}

    await source.delete_schedule("cron")
    await source.delete_schedule("never-existed")  # no-op
    assert _ids(await source.get_schedules()) == {"keep"}
    # A scheduler still holding the old list asks pre_send, which refuses.
    assert not await _fires(source, cron)


async def test_readding_moves_between_kinds(make_source: Factory) -> None:
    source = await make_source(lookahead=0)
    await source.add_schedule(_task("x", time=_now() + timedelta(hours=1)))
    assert _ids(await source.get_schedules()) == set()
    await source.add_schedule(_task("x", cron="* * * * *"))
    assert _ids(await source.get_schedules()) == {"x"}
    await source.add_schedule(_task("x", time=_now() + timedelta(hours=1)))
    assert _ids(await source.get_schedules()) == set()


async def test_past_due_one_off_fires_once_after_restart(make_source: Factory) -> None:
    first = await make_source()
    one_off = _task("missed", time=_now() - timedelta(minutes=10))
    await first.add_schedule(one_off)
    await first.shutdown()  # the scheduler was down when it was due

    restarted = await make_source()
    [due] = await restarted.get_schedules()
    assert due.schedule_id == "missed"
    assert await _fires(restarted, due)
    assert not await _fires(restarted, due)  # never twice
    assert await restarted.get_schedules() == []

    again = await make_source()
    assert await again.get_schedules() == []


async def test_skip_past_schedules(make_source: Factory) -> None:
    writer = await make_source()
    await writer.add_schedule(_task("old", time=_now() - timedelta(hours=1)))
    await writer.add_schedule(_task("new", time=_now() + timedelta(seconds=5)))
    skipping = await make_source(skip_past_schedules=True)
    assert _ids(await skipping.get_schedules()) == {"new"}


async def test_changed_time_is_not_fired_from_a_stale_copy(make_source: Factory) -> None:
    source = await make_source()
    old = _task("moved", time=_now() - timedelta(seconds=1))
    await source.add_schedule(old)
    [held] = await source.get_schedules()
    await source.add_schedule(_task("moved", time=_now() + timedelta(hours=1)))
    assert not await _fires(source, held)
    # The re-timed schedule survived the refused stale firing.
    assert (await source._ready_client("test").zscore(source.keys.timeline, "moved")) is not None


async def test_corrupt_record_is_skipped_and_logged(
    make_source: Factory,
    cluster_client: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = await make_source()
    for schedule_id in ("good-1", "bad-bytes", "bad-shape", "good-2"):
        await source.add_schedule(_task(schedule_id, interval=10))
    await cluster_client.hset(source.keys.schedules, "bad-bytes", b"\x80\x04garbage")
    await cluster_client.hset(source.keys.schedules, "bad-shape", b'{"task_name": 5}')

    with caplog.at_level(logging.WARNING, logger="taskiq_redis_cluster"):
        assert _ids(await source.get_schedules()) == {"good-1", "good-2"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'bad-bytes'" in m and "corrupt" in m for m in warned)
    assert any("'bad-shape'" in m and "corrupt" in m for m in warned)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="taskiq_redis_cluster"):
        assert _ids(await source.get_schedules()) == {"good-1", "good-2"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # once per id


async def test_two_schedulers_fire_each_tick_once(make_source: Factory) -> None:
    one = await make_source()
    two = await make_source()  # same name: a second scheduler process
    now = _now()
    schedules = (
        [_task(f"once-{i}", time=now - timedelta(seconds=i)) for i in range(10)]
        + [_task(f"cron-{i}", cron="* * * * *") for i in range(5)]
        + [_task(f"every-{i}", interval=3600) for i in range(5)]
    )
    for schedule in schedules:
        await one.add_schedule(schedule)
    held_one, held_two = await one.get_schedules(), await two.get_schedules()
    assert _ids(held_one) == _ids(held_two) == {s.schedule_id for s in schedules}

    by_id = {s.schedule_id: s for s in held_two}
    await _away_from_a_minute_boundary()  # both must see the same cron tick
    outcomes = await asyncio.gather(
        *(_fires(one, s) for s in held_one),
        *(_fires(two, by_id[s.schedule_id]) for s in held_one),
    )
    assert sum(outcomes) == 20
    # Each schedule was sent by exactly one of the two.
    per_schedule = [a + b for a, b in zip(outcomes[:20], outcomes[20:], strict=True)]
    assert per_schedule == [1] * 20
    # One-off schedules are gone; recurring ones stay for the next tick.
    assert _ids(await one.get_schedules()) == {s.schedule_id for s in schedules if s.time is None}


async def _away_from_a_minute_boundary() -> None:
    second = _now().second
    if second >= 57:
        await asyncio.sleep(61 - second)  # waits for the clock: not synchronisation


class _MemorySource(ScheduleSource):
    """A minimal non-Redis source to import from."""

    def __init__(self, schedules: list[ScheduledTask]) -> None:
        self.schedules = {s.schedule_id: s for s in schedules}

    async def get_schedules(self) -> list[ScheduledTask]:
        return list(self.schedules.values())

    async def delete_schedule(self, schedule_id: str) -> None:
        self.schedules.pop(schedule_id, None)


async def test_import_from_any_source(make_source: Factory) -> None:
    source = await make_source()
    old = _MemorySource([_task("a", cron="0 * * * *"), _task("b", time=_now())])
    assert await source.import_from(old) == 2
    assert await source.import_from(old) == 2  # idempotent: same ids
    assert _ids(await source.get_schedules()) == {"a", "b"}
    assert old.schedules  # kept by default
    await source.import_from(old, delete=True)
    assert old.schedules == {}


async def test_migrate_from_taskiq_redis_list_source(
    standalone_redis: str, cluster_url: str, unique_name: str
) -> None:
    from taskiq_redis import ListRedisScheduleSource

    old = ListRedisScheduleSource(standalone_redis, prefix="legacy")
    await old.startup()
    await old.add_schedule(_task("cron", cron="*/10 * * * *"))
    # A one-off schedule far ahead: taskiq-redis's get_schedules() does not
    # return it yet, the importer must still find it.
    await old.add_schedule(_task("future", time=_now() + timedelta(days=2)))
    await old.add_schedule(_task("past", time=_now() - timedelta(hours=1)))
    await _close_list_source(old)

    legacy = ListRedisScheduleSource(standalone_redis, prefix="legacy")
    source = ClusterListScheduleSource(cluster_url, name=unique_name, lookahead=0)
    source.with_migrate_from(legacy, delete_schedules=True)
    await source.startup()
    try:
        assert _ids(await source.get_schedules()) == {"cron", "past"}
        stored = await source._ready_client("test").hkeys(source.keys.schedules)
        assert {_text(k) for k in stored} == {"cron", "future", "past"}
    finally:
        await source.shutdown()
        await _close_list_source(legacy)

    check = ListRedisScheduleSource(standalone_redis, prefix="legacy")
    await check.startup()
    try:
        assert await check.get_schedules() == []  # moved, not copied
    finally:
        await _close_list_source(check)


async def _close_list_source(source: Any) -> None:
    # taskiq-redis's ListRedisScheduleSource.shutdown() leaves its pool open.
    await source.shutdown()
    await source._connection_pool.disconnect()


def test_rejects_bad_names_and_options(cluster_url: str) -> None:
    with pytest.raises(InvalidNameError):
        ClusterListScheduleSource(cluster_url, name="a{b}")
    with pytest.raises(InvalidNameError):
        ClusterListScheduleSource(cluster_url, prefix="")
    with pytest.raises(InvalidOptionError):
        ClusterListScheduleSource(cluster_url, lookahead=-1)
    for lease in (0, -1, float("nan")):
        with pytest.raises(InvalidOptionError, match="one_off_lease"):
            ClusterListScheduleSource(cluster_url, one_off_lease=lease)


async def test_lifecycle_guards(cluster_url: str, unique_name: str) -> None:
    lazy = ClusterListScheduleSource(cluster_url, name=unique_name)
    # The first use starts the source; an explicit startup() after it is a no-op.
    assert await lazy.get_schedules() == []
    await lazy.startup()
    await lazy.shutdown()
    source = ClusterListScheduleSource(cluster_url, name=unique_name)
    await source.startup()
    with pytest.raises(LifecycleError, match="twice"):
        await source.startup()
    await source.shutdown()
    await source.shutdown()
    with pytest.raises(LifecycleError, match="after shutdown"):
        await source.add_schedule(_task("x", interval=5))


# --------------------------------------------------------------------------
# One-off firings whose send was not recorded: a failed kick, or a scheduler
# that died between the kick and post_send. They must be sent again within
# the lease plus two reads, and never at some later restart.

#: Short lease so these tests take seconds; the rules are the same at 60 s.
_LEASE = 1.0


class _BrokerDown(Exception):
    """A kick that did not reach the broker."""


class _SchedulerDied(BaseException):
    """Raised right after a kick reached the broker: the process is gone.

    A BaseException, like the KeyboardInterrupt or SystemExit that ends a
    real process, so nothing in taskiq's send path handles it.
    """


class _RecordingBroker(AsyncBroker):
    """Records (schedule id, task id) of each kick; can fail or die on kicks."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []
        self.sent_at: list[float] = []
        self.failures = 0
        self.fail_next = 0
        self.die_after_next = False

    async def kick(self, message: BrokerMessage) -> None:
        if self.fail_next:
            self.fail_next -= 1
            self.failures += 1
            raise _BrokerDown
        self.sent.append((message.labels["schedule_id"], message.task_id))
        self.sent_at.append(time.monotonic())
        if self.die_after_next:
            self.die_after_next = False
            raise _SchedulerDied

    async def listen(self) -> AsyncIterator[bytes]:  # pragma: no cover - never listened to
        raise NotImplementedError
        yield b""


class _SteppedScheduler:
    """One `taskiq scheduler` process: taskiq's own SchedulerLoop, stepped by hand.

    ``read()`` and ``tick()`` run the loop's own code for taking in a
    get_schedules() answer and for deciding that a schedule is ready, so the
    rules (one ``time`` firing per schedule id while the id stays listed) are
    the installed taskiq's; only the clock is the test's.
    """

    def __init__(self, source: ClusterListScheduleSource, broker: _RecordingBroker) -> None:
        self.scheduler = TaskiqScheduler(broker, [source])
        self.loop = SchedulerLoop(self.scheduler)

    async def read(self) -> None:
        answer = asyncio.ensure_future(get_all_schedules(self.scheduler))
        await answer
        self.loop._update_schedules_task_future_callback(answer)

    async def tick(self) -> None:
        now = _now()
        for source, schedules in self.loop.scheduled_tasks:
            for schedule in schedules:
                if self.loop._is_schedule_ready_to_send(task=schedule, now=now):
                    # A failed send is logged by taskiq's loop, which goes on.
                    with contextlib.suppress(SendTaskError):
                        await self.scheduler.on_ready(source, schedule)

    async def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Read and tick (an --update-interval of 0.2 s) until ``done()``."""

        async def stepped() -> bool:
            if done():
                return True
            await self.read()
            await self.tick()
            return False

        await eventually(stepped, "the one-off schedule sent again", timeout, interval=0.2)


async def _stored_ids(source: ClusterListScheduleSource) -> set[str]:
    stored = await source._ready_client("test").hkeys(source.keys.schedules)
    return {_text(k) for k in stored}


@pytest.mark.parametrize("who_resends", ["restarted scheduler", "running peer"])
async def test_one_off_is_resent_within_the_lease_after_its_scheduler_died(
    make_source: Factory, who_resends: str
) -> None:
    broker = _RecordingBroker()
    dying_source = await make_source(one_off_lease=_LEASE)
    await dying_source.add_schedule(_task("remind", time=_now() - timedelta(seconds=1)))
    dying = _SteppedScheduler(dying_source, broker)
    other_source = await make_source(one_off_lease=_LEASE)
    other = _SteppedScheduler(other_source, broker)
    if who_resends == "running peer":
        await other.read()  # already running: it holds the one-off too
    await dying.read()

    claimed_at = time.monotonic()
    broker.die_after_next = True
    with pytest.raises(_SchedulerDied):
        await dying.tick()  # pre_send claimed it, the kick went out, post_send never ran
    await dying_source.shutdown()
    [(_, task_id)] = broker.sent

    await other.tick()  # the claim is still held: not sent yet
    assert len(broker.sent) == 1
    await other.run_until(lambda: len(broker.sent) == 2, timeout=_LEASE + 8)
    # Not before the dead scheduler's lease ran out, and as the same task.
    assert broker.sent_at[1] - claimed_at >= _LEASE
    assert broker.sent == [("remind", task_id), ("remind", task_id)]

    # Done for good: nothing is left for a later restart to send.
    assert await _stored_ids(other_source) == set()
    later = _SteppedScheduler(await make_source(one_off_lease=_LEASE), broker)
    await later.read()
    await later.tick()
    assert len(broker.sent) == 2


@pytest.mark.parametrize("read_early", [False, True], ids=["read-when-due", "read-ahead"])
async def test_failed_kick_of_one_off_is_retried_by_the_same_scheduler(
    make_source: Factory, read_early: bool
) -> None:
    source = await make_source(one_off_lease=_LEASE)
    due = _now() + timedelta(seconds=0.5 if read_early else -1)
    await source.add_schedule(_task("remind", time=due))
    broker = _RecordingBroker()
    broker.fail_next = 2  # the broker is down for two attempts
    scheduler = _SteppedScheduler(source, broker)
    await scheduler.read()  # read-ahead: listed through lookahead, not due yet
    # Until it is due: the scheduler is stepped by hand, so this waits for
    # the clock, not for a background effect.
    await asyncio.sleep(max(0.0, (due - _now()).total_seconds()) + 0.05)
    await scheduler.tick()
    assert (broker.failures, broker.sent) == (1, [])
    assert await _stored_ids(source) == {"remind"}  # kept for the retry

    await scheduler.run_until(lambda: len(broker.sent) == 1, timeout=2 * _LEASE + 10)
    assert broker.failures == 2
    assert [schedule_id for schedule_id, _ in broker.sent] == ["remind"]
    assert await _stored_ids(source) == set()
    await scheduler.read()
    await scheduler.tick()
    assert len(broker.sent) == 1


async def test_one_off_due_later_fires_at_its_time_not_a_read_later(
    make_source: Factory,
) -> None:
    # Returned ahead of time (lookahead), then due: the hold-back of unsent
    # due firings must not delay its first send.
    source = await make_source(one_off_lease=_LEASE)
    due = _now() + timedelta(seconds=1)
    await source.add_schedule(_task("soon", time=due))
    broker = _RecordingBroker()
    scheduler = _SteppedScheduler(source, broker)
    await scheduler.read()
    await scheduler.tick()
    assert broker.sent == []
    await asyncio.sleep(max(0.0, (due - _now()).total_seconds()) + 0.05)  # the clock, as above
    await scheduler.read()
    await scheduler.tick()
    assert [schedule_id for schedule_id, _ in broker.sent] == ["soon"]


async def test_real_scheduler_loop_retries_a_failed_one_off_kick(make_source: Factory) -> None:
    """taskiq's SchedulerLoop.run itself, with its clock: the retry comes without a restart."""
    source = await make_source(one_off_lease=_LEASE)
    broker = _RecordingBroker()
    broker.fail_next = 1
    await source.add_schedule(_task("remind", time=_now() - timedelta(seconds=1)))
    loop = SchedulerLoop(TaskiqScheduler(broker, [source]))
    running = asyncio.create_task(loop.run(update_interval=timedelta(seconds=1)))

    def retried() -> bool:
        assert not running.done(), running
        return bool(broker.sent)

    try:
        await eventually(retried, "the retried kick", 2 * _LEASE + 10,
                         detail=lambda: f"{broker.failures} failures")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert broker.failures == 1
    assert [schedule_id for schedule_id, _ in broker.sent] == ["remind"]
    assert await _stored_ids(source) == set()


# --------------------------------------------------------------------------
# End to end: two real `taskiq scheduler` processes share one source.

_APP = '''
"""Scheduler app for the end-to-end test; kicks are RPUSHed to the cluster."""

import os

from taskiq import AsyncBroker, TaskiqScheduler

from taskiq_redis_cluster._redis._connection import connect
from taskiq_redis_cluster._schedule_source import ClusterListScheduleSource

URL = os.environ["TQRC_E2E_URL"]
KICKS = os.environ["TQRC_E2E_KICKS"]


class RecordingBroker(AsyncBroker):
    """Records every kick in a cluster list instead of queueing it."""

    client = None

    async def startup(self):
        await super().startup()
        self.client = await connect(URL)

    async def shutdown(self):
        if self.client is not None:
            await self.client.aclose()
        await super().shutdown()

    async def kick(self, message):
        schedule_id = message.labels.get("schedule_id")
        await self.client.rpush(KICKS, f"{schedule_id}|{os.getpid()}")

    async def listen(self):
        raise NotImplementedError
        yield b""


broker = RecordingBroker()
source = ClusterListScheduleSource(URL, name=os.environ["TQRC_E2E_SOURCE"])
scheduler = TaskiqScheduler(broker, [source])
'''


class _Scheduler:
    """One `taskiq scheduler` process with its log in a file."""

    def __init__(self, app_dir: Path, index: int, env: dict[str, str]) -> None:
        self.log = app_dir / f"scheduler-{index}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskiq",
                "scheduler",
                "app:scheduler",
                "--app-dir",
                str(app_dir),
                "--update-interval",
                "1",
                "--skip-first-run",
            ],
            cwd=app_dir,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return "Startup completed" in self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


@chaos(timeout=120)
async def test_two_real_schedulers_send_each_one_off_once(
    healthy_cluster: DevCluster,
    cluster_url: str,
    cluster_client: RedisCluster,
    unique_name: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(_APP))
    kicks_key = f"tqrc-test:{unique_name}:kicks"
    env = dict(os.environ)
    env.update(
        TQRC_E2E_URL=cluster_url,
        TQRC_E2E_KICKS=kicks_key,
        TQRC_E2E_SOURCE=unique_name,
        PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]),
    )
    source = ClusterListScheduleSource(cluster_url, name=unique_name)
    await source.startup()
    schedulers = [_Scheduler(tmp_path, i, env) for i in range(2)]

    async def kicks() -> list[str]:
        return [_text(k) for k in await cluster_client.lrange(kicks_key, 0, -1)]

    async def count_is(n: int) -> bool:
        return len(await kicks()) >= n

    try:

        async def all_ready() -> bool:
            return all(s.ready() for s in schedulers)

        await eventually(all_ready, "both schedulers to start", timeout=30)
        # Due shortly after both schedulers have loaded them: they race.
        due = _now() + timedelta(seconds=2)
        for i in range(20):
            await source.add_schedule(_task(f"batch-{i}", time=due))
        await eventually(lambda: count_is(20), "20 kicks", timeout=30)
        # A duplicate would show up within a few loop turns: a wait for what
        # must not happen, not synchronisation.
        await asyncio.sleep(2.5)
        sent = [k.split("|")[0] for k in await kicks()]
        assert sorted(sent) == sorted(f"batch-{i}" for i in range(20))
        assert await source.get_schedules() == []

        # Added while running, due a little later: fires once.
        await source.add_schedule(_task("late", time=_now() + timedelta(seconds=1)))
        await eventually(lambda: count_is(21), "the late schedule", timeout=30)

        # Fail over the master that holds the source; schedulers keep working.
        master = await healthy_cluster.master_of_key(source.keys.schedules)
        await healthy_cluster.failover(await healthy_cluster.replica_of(master))
        await source.add_schedule(_task("after-failover", time=_now() + timedelta(seconds=1)))
        await eventually(lambda: count_is(22), "the schedule added after a failover", timeout=60)
        await asyncio.sleep(2.5)  # as above: no duplicate may follow
        sent = [k.split("|")[0] for k in await kicks()]
        assert sorted(sent) == sorted(
            [f"batch-{i}" for i in range(20)] + ["late", "after-failover"]
        )
    finally:
        for scheduler in schedulers:
            scheduler.stop()
        await cluster_client.delete(kicks_key)
        await source.shutdown()
