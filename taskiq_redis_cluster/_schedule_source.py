"""Schedule source for Redis Cluster that several schedulers may share.

Storage (see ``_keys.ScheduleKeys``; every key carries the source's single
hash tag, so all of them sit in one slot and every script below is legal
in a cluster)::

    schedules   hash      schedule id -> encoded ScheduledTask
    cron        set       ids of recurring (cron or interval) schedules
    timeline    zset      ids of one-off ``time`` schedules, score = due (ms)
    claim:ID:T  string    "firing T of schedule ID is taken" (SET NX PX)

``get_schedules()`` reads the recurring ids plus the one-off ids due up to
``now + lookahead`` from the timeline index; it never scans the keyspace.

Exactly-once firing with several ``taskiq scheduler`` processes: taskiq
calls ``pre_send`` before every kick and skips the kick when it raises
``ScheduledTaskCancelledError``. ``pre_send`` atomically checks that the
schedule still exists and claims the firing with ``SET NX``. The firing is
named by the schedule id and its tick: the minute for cron, the
interval-aligned window for interval schedules, and the due time for
one-off schedules. Schedulers that reach the same tick compute the same
claim key, so only the first one sends.

One-off schedules are deleted in ``post_send``, after the kick succeeded.
Their claim is a lease (``one_off_lease``): a firing that was claimed but
never marked done (the kick failed, or the scheduler died between the kick
and ``post_send``) can be claimed again once the lease has run out. taskiq's
loop never fires a ``time`` schedule twice while it keeps seeing its id, so
``get_schedules`` leaves a one-off that was already due at its previous call
(and is still stored, so it was not sent) out of one answer; the loop then
forgets it and fires it again on the next answer. Every send of one firing
carries the same task id, derived from the schedule id and due time, so a
duplicate can be recognised downstream.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from redis.asyncio import Redis, RedisCluster
from taskiq import ScheduledTask, ScheduleSource
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.exceptions import ScheduledTaskCancelledError

from . import _keys
from ._errors import CorruptScheduleError, InvalidOptionError
from ._lifecycle import OwnedClient, client_options
from ._redis import ConnectionOptions, load_script, redact_url, validate_url
from ._serialization import default_serializer, dump_model, load_model

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover - exercised on Python 3.10 only
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: How far ahead one-off schedules are returned. taskiq's scheduler re-reads
#: sources every ``--update-interval`` (60 s by default) and fires a one-off
#: schedule at its time only if it was already in the list it holds.
DEFAULT_LOOKAHEAD = 60.0

#: Default lease (seconds) of a one-off firing's claim. It must outlast a
#: kick, including redis-py's retries through a failover, or a slow kick is
#: sent twice; it is also how soon a firing whose scheduler died mid-send is
#: sent again.
DEFAULT_ONE_OFF_LEASE = 60.0

#: Namespace of the task ids derived for one-off firings (a fixed random UUID,
#: so every scheduler derives the same id for the same firing).
_TASK_ID_NAMESPACE = uuid.UUID("5b0d3c52-8f1e-4f5e-9c8a-2d6f7f1c4e31")

#: Older taskiq releases have no ``ScheduledTask.task_id`` (their scheduler
#: always generates a random id), so there is nothing to derive there.
_HAS_TASK_ID = "task_id" in ScheduledTask.model_fields

#: Extra life of a cron/interval claim beyond its tick, so a scheduler whose
#: loop runs late within the same tick still finds the claim.
_CLAIM_MARGIN_MS = 60_000

# The source's Lua scripts (every key shares the source's tag; see
# _redis/scripts/schedule_*.lua for what each takes and returns).
_ADD_SCRIPT = load_script("schedule_add")
_DELETE_SCRIPT = load_script("schedule_delete")
_GET_SCRIPT = load_script("schedule_get")
_CLAIM_SCRIPT = load_script("schedule_claim")
_DONE_SCRIPT = load_script("schedule_done")


class ClusterListScheduleSource(ScheduleSource):
    """Cron, interval and one-off schedules stored in Redis Cluster.

    Behaves like taskiq-redis's ``ListRedisScheduleSource`` (dynamic
    ``add_schedule``/``delete_schedule``, one-off schedules deleted once
    sent, past-due one-off schedules sent after a restart), and in addition
    lets several ``taskiq scheduler`` processes share one source: each
    firing is sent once while kicks succeed, and a one-off firing whose send
    was not recorded is sent again within ``one_off_lease`` plus a few reads
    (see the module docstring and docs/schedule-source.md).

    The positional order and keywords of ``ListRedisScheduleSource`` are
    accepted with the same meaning (docs/brokers.md lists each difference).
    No ``startup()`` is needed to add or read schedules: the first call
    starts the source, including a migration set up with
    :meth:`with_migrate_from`.

    :param url: ``redis://`` or ``rediss://`` URL of any cluster node.
    :param prefix: first part of every key.
    :param max_connection_pool_size: connections per cluster node.
    :param serializer: how schedules are encoded; JSON by default.
    :param buffer_size: accepted for taskiq-redis compatibility, without
        effect: ``get_schedules()`` reads its index in one script, so there
        are no batches to size. Must be positive.
    :param skip_past_schedules: do not return one-off schedules that were
        already due when the source started (they stay stored until
        deleted). By default they are sent once after a restart.
    :param name: name of this source; every key of it shares the hash tag
        ``{sched:<name>}``. Sources with the same prefix and name are the
        same source, which is how several schedulers share it.
    :param lookahead: seconds ahead of now for which one-off schedules are
        returned. Keep it at least the scheduler's ``--update-interval``
        (60 s by default), or one-off schedules fire late.
    :param one_off_lease: seconds a scheduler holds the claim of a one-off
        firing. A firing not marked done by then (its kick failed, or its
        scheduler died before ``post_send``) is sent again; keep it above the
        longest kick (and above taskiq's ``--send-timeout`` if set).
    :param connection: client options (pool size, timeouts, TLS ...).
    :param connection_kwargs: as in taskiq-redis, further keywords go to
        redis-py (here its ``RedisCluster``); not together with
        ``connection``.

    :raises InvalidNameError: for a name or prefix that cannot be used in a
        hash tag.
    :raises InvalidOptionError: for a negative lookahead, a lease or a
        ``buffer_size`` that is not positive, or a keyword the cluster
        client does not take.
    """

    def __init__(
        self,
        url: str,
        prefix: str = _keys.DEFAULT_PREFIX,
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        buffer_size: int = 50,
        skip_past_schedules: bool = False,
        *,
        name: str = "default",
        lookahead: float = DEFAULT_LOOKAHEAD,
        one_off_lease: float = DEFAULT_ONE_OFF_LEASE,
        connection: ConnectionOptions | None = None,
        **connection_kwargs: Any,
    ) -> None:
        validate_url(url)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise InvalidOptionError(
                option="buffer_size", reason=f"must be an int > 0, got {buffer_size!r}"
            )
        self.buffer_size = buffer_size
        self._url = url
        self.name = _keys.validate_name(name, kind="schedule source")
        self.prefix = _keys.validate_name(prefix, kind="prefix")
        if lookahead < 0:
            raise InvalidOptionError(option="lookahead", reason=f"must be >= 0, got {lookahead}")
        self.lookahead = lookahead
        if not one_off_lease > 0:  # also rejects NaN
            raise InvalidOptionError(
                option="one_off_lease", reason=f"must be > 0, got {one_off_lease}"
            )
        self.one_off_lease = one_off_lease
        self.skip_past_schedules = skip_past_schedules
        self.serializer: TaskiqSerializer = serializer or default_serializer()
        self.keys = _keys.ScheduleKeys(self.prefix, self.name)
        self._connection = client_options(
            connection, connection_kwargs, max_connections=max_connection_pool_size
        )
        self._owned = OwnedClient(f"ClusterListScheduleSource({self.name!r})")
        # Identifies this process in claim markers; only for debugging.
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._started_at_ms = 0
        self._reported_corrupt: set[str] = set()
        # One-off firings (id -> due ms) that were already due when the last
        # get_schedules() answer was built; see get_schedules().
        self._due_at_last_read: dict[str, int] = {}
        self._migrate_from: ScheduleSource | None = None
        self._migrate_delete = True

    def __repr__(self) -> str:
        return (
            f"ClusterListScheduleSource({redact_url(self._url)!r}, "
            f"name={self.name!r}, prefix={self.prefix!r})"
        )

    def with_migrate_from(self, source: ScheduleSource, delete_schedules: bool = True) -> Self:
        """Copy every schedule of ``source`` into this one during ``startup()``.

        Same name and meaning as taskiq-redis's method. ``source`` is started
        and shut down around the copy. With ``delete_schedules=True`` (the
        default) copied schedules are removed from ``source``; without it
        every restart copies them again, which re-creates one-off schedules
        that have already fired.
        """
        self._migrate_from = source
        self._migrate_delete = delete_schedules
        return self

    @property
    def redis(self) -> RedisCluster:
        """The source's cluster client (taskiq-redis's cluster source name).

        Only while running (:class:`LifecycleError` otherwise); the source
        owns it and closes it in ``shutdown()``.
        """
        return self._owned.get("redis")

    async def __aenter__(self) -> Self:
        await self.startup()
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.shutdown()

    async def startup(self) -> None:
        """Connect, then run a migration set up by :meth:`with_migrate_from`.

        Optional: the first call that needs the cluster starts the source,
        and after such a lazy start this does nothing.

        :raises LifecycleError: if called twice, or after ``shutdown()``.
        :raises NotAClusterError: if the URL is not a cluster node.
        :raises ConnectError: if the cluster cannot be reached.
        """
        await self._owned.lifecycle.start(self._start)

    async def _start(self) -> None:
        await self._owned.open(self._url, self._connection)
        self._started_at_ms = _floor_minute_ms(_now())
        self._owned.lifecycle.started()
        if self._migrate_from is not None:
            try:
                await self._migrate_from.startup()
                try:
                    await self.import_from(self._migrate_from, delete=self._migrate_delete)
                finally:
                    await self._migrate_from.shutdown()
            except BaseException:
                # Close, and allow a retry of startup() on the same object.
                await self._owned.abort()
                raise

    async def shutdown(self) -> None:
        """Close the client; safe to call twice or without startup."""
        await self._owned.close()

    def _ready_client(self, action: str) -> RedisCluster:
        """The client while running; :class:`LifecycleError` otherwise."""
        return self._owned.get(action)

    async def _started_client(self, action: str) -> RedisCluster:
        """The client, starting the source first on its first use."""
        return await self._owned.ready(self.startup, action)

    def _index_keys(self) -> list[str]:
        return [self.keys.schedules, self.keys.cron, self.keys.timeline]

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        """Store ``schedule``, replacing one with the same ``schedule_id``.

        A schedule with ``cron`` or ``interval`` is recurring (a ``time`` on
        it is then only used by taskiq's loop, as with taskiq-redis); one with
        only ``time`` fires once and is deleted after it was sent.

        The task name is not checked: a source does not know the broker's
        tasks. An unknown name is kicked by the scheduler like any other and
        the worker logs ``task "..." is not found``.
        """
        client = await self._started_client("add_schedule()")
        due = _one_off_due_ms(schedule)
        await _ADD_SCRIPT(
            client,
            self._index_keys(),
            [schedule.schedule_id, _to_str(dump_model(schedule, self.serializer)), _opt(due)],
        )
        logger.debug("Added schedule %s (task %s)", schedule.schedule_id, schedule.task_name)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule; a no-op for an unknown id.

        Schedulers that already hold the schedule in memory still ask
        ``pre_send`` before sending it, which refuses, so it stops at once.
        """
        client = await self._started_client("delete_schedule()")
        removed = await _DELETE_SCRIPT(client, self._index_keys(), [schedule_id])
        logger.debug("Deleted schedule %s (existed: %s)", schedule_id, bool(removed))

    async def get_schedules(self) -> list[ScheduledTask]:
        """Recurring schedules plus one-off schedules due by now + lookahead.

        A one-off schedule that was already due at this object's previous
        call and is still stored was not sent: its kick failed, it is being
        sent right now, or the scheduler that claimed it died. taskiq's loop
        does not fire a ``time`` schedule again while its id stays in the
        list, so such a schedule is left out of this answer once; the loop
        drops its memory of the firing, and the next answer brings the
        schedule back, to be claimed again once its lease has run out.

        One-off schedules without a ``task_id`` get one derived from the
        source, schedule id and due time, so every send of one firing (by
        any scheduler) carries the same task id.

        A record that cannot be decoded is skipped and logged (once per
        schedule id and source object, at WARNING); the rest are returned.
        """
        client = await self._started_client("get_schedules()")
        now_ms = int(_now().timestamp() * 1000)
        low = str(self._started_at_ms) if self.skip_past_schedules else "-inf"
        high = str(now_ms + int(self.lookahead * 1000))
        flat = await _GET_SCRIPT(client, self._index_keys(), [low, high])
        schedules: list[ScheduledTask] = []
        due_now: dict[str, int] = {}
        held_back = 0
        for raw_id, payload in zip(flat[::2], flat[1::2], strict=True):
            schedule_id = _to_str(raw_id)
            try:
                schedule = load_model(ScheduledTask, payload, self.serializer)
                if schedule.schedule_id != schedule_id:
                    raise ValueError(f"record carries schedule_id {schedule.schedule_id!r}")
            except ValueError as exc:
                self._report_corrupt(schedule_id, str(exc))
                continue
            due = _one_off_due_ms(schedule)
            if due is not None:
                if due <= now_ms:
                    if self._due_at_last_read.get(schedule_id) == due:
                        held_back += 1
                        continue
                    due_now[schedule_id] = due
                if _HAS_TASK_ID and schedule.task_id is None:
                    schedule = schedule.model_copy(
                        update={"task_id": self._firing_task_id(schedule_id, due)}
                    )
            schedules.append(schedule)
        self._due_at_last_read = due_now
        if held_back:
            logger.info(
                "Source %s: %d due one-off schedules are still unsent (kick failed, "
                "in progress, or their scheduler died); they come back on the next read",
                self.name,
                held_back,
            )
        logger.debug("Source %s returned %d schedules", self.name, len(schedules))
        return schedules

    def _firing_task_id(self, schedule_id: str, due_ms: int) -> str:
        """The task id of every send of one one-off firing, same in every scheduler."""
        name = "\0".join((self.prefix, self.name, schedule_id, str(due_ms)))
        return uuid.uuid5(_TASK_ID_NAMESPACE, name).hex

    def _report_corrupt(self, schedule_id: str, reason: str) -> None:
        error = CorruptScheduleError(source=self.name, schedule_id=schedule_id, reason=reason)
        if schedule_id in self._reported_corrupt:
            logger.debug("%s; skipped", error)
            return
        self._reported_corrupt.add(schedule_id)
        logger.warning("%s; skipped (fix or delete it; the other schedules still run)", error)

    async def pre_send(self, task: ScheduledTask) -> None:
        """Claim this firing of ``task``; cancel the send if that fails.

        :raises ScheduledTaskCancelledError: if the schedule was deleted (or
            re-timed) since it was read, or another scheduler already claimed
            this firing.
        """
        client = await self._started_client("pre_send()")
        due = _one_off_due_ms(task)
        if due is None:
            tick, ttl_ms = _recurring_tick_ms(task, _now())
        else:
            tick, ttl_ms = due, max(1, int(self.one_off_lease * 1000))
        outcome = await _CLAIM_SCRIPT(
            client,
            [self.keys.cron, self.keys.timeline, self.keys.claim(task.schedule_id, tick)],
            [task.schedule_id, _opt(due), ttl_ms, self._owner],
        )
        if outcome == 1:
            return
        if outcome == 0:
            logger.info(
                "Schedule %s (task %s) was deleted or changed; not sending it",
                task.schedule_id,
                task.task_name,
            )
        else:
            logger.debug(
                "Firing %d of schedule %s was claimed by another scheduler",
                tick,
                task.schedule_id,
            )
        raise ScheduledTaskCancelledError

    async def post_send(self, task: ScheduledTask) -> None:
        """Mark a one-off firing done: delete the schedule and its claim."""
        due = _one_off_due_ms(task)
        if due is None:
            return
        client = await self._started_client("post_send()")
        await _DONE_SCRIPT(
            client,
            [self.keys.schedules, self.keys.timeline, self.keys.claim(task.schedule_id, due)],
            [task.schedule_id, str(due)],
        )

    async def import_from(self, other: ScheduleSource, *, delete: bool = False) -> int:
        """Copy every schedule of ``other`` (a started source) into this one.

        Schedules keep their ids, so importing twice does not duplicate
        them. For taskiq-redis's ``ListRedisScheduleSource`` the stored
        records are read directly, because its ``get_schedules()`` leaves out
        one-off schedules that are not due yet; any other source is read
        through ``get_schedules()``.

        :param delete: delete each copied schedule from ``other``.
        :return: the number of schedules copied.
        """
        await self._started_client("import_from()")
        schedules = await _read_all(other)
        for schedule in schedules:
            await self.add_schedule(schedule)
            if delete:
                await other.delete_schedule(schedule.schedule_id)
        logger.info(
            "Imported %d schedules from %s into source %s",
            len(schedules),
            type(other).__name__,
            self.name,
        )
        return len(schedules)


async def _read_all(other: ScheduleSource) -> list[ScheduledTask]:
    pool = getattr(other, "_connection_pool", None)
    prefix = getattr(other, "_prefix", None)
    serializer = getattr(other, "_serializer", None)
    if (
        type(other).__name__ == "ListRedisScheduleSource"
        and pool is not None
        and isinstance(prefix, str)
        and isinstance(serializer, TaskiqSerializer)
    ):
        return await _read_list_redis_source(pool, prefix, serializer)
    return await other.get_schedules()


async def _read_list_redis_source(
    pool: Any, prefix: str, serializer: TaskiqSerializer
) -> list[ScheduledTask]:
    """Every record of a taskiq-redis ListRedisScheduleSource (standalone Redis)."""
    redis: Redis = Redis(connection_pool=pool)
    schedules: list[ScheduledTask] = []
    try:
        async for key in redis.scan_iter(match=f"{_glob_escape(prefix)}:data:*", count=500):
            raw = await redis.get(key)
            if raw is None:  # deleted while we scanned
                continue
            try:
                schedules.append(load_model(ScheduledTask, raw, serializer))
            except ValueError as exc:
                logger.warning("Not importing schedule record %r: %s", _to_str(key), exc)
    finally:
        await redis.aclose()
    return schedules


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _now() -> datetime:
    return datetime.now(tz=timezone.utc)


def _to_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _floor_minute_ms(moment: datetime) -> int:
    return int(moment.timestamp()) // 60 * 60_000


def _one_off_due_ms(schedule: ScheduledTask) -> int | None:
    """Due time in ms of a one-off schedule; None for a recurring one."""
    if schedule.cron is not None or schedule.interval is not None or schedule.time is None:
        return None
    moment = schedule.time
    if moment.tzinfo is None:  # taskiq reads naive times as UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _recurring_tick_ms(schedule: ScheduledTask, now: datetime) -> tuple[int, int]:
    """(tick, claim ttl) of a cron/interval firing happening at ``now``.

    taskiq's loop runs at whole seconds, so ``now`` is rounded to the
    nearest second first; a wake-up a few ms early then names the same tick.
    """
    seconds = round(now.timestamp())
    if schedule.cron is not None:
        period = 60
    else:
        interval = schedule.interval
        period = (
            int(interval.total_seconds()) if isinstance(interval, timedelta) else int(interval or 1)
        )
        period = max(period, 1)
    tick = seconds // period * period
    return tick * 1000, period * 1000 + _CLAIM_MARGIN_MS
