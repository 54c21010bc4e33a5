"""Plans stored in Redis: one hash per queue, created once, swapped atomically.

The record of queue ``Q`` is the hash at ``_keys.plan_key(prefix, Q)`` (a
slot of its own) with three fields::

    format  "1"                      layout version (PLAN_FORMAT_VERSION)
    epoch   "7"                      grows by one with every change
    plan    "{...}"                  ShardPlan.to_json()

``format`` and ``epoch`` are separate fields so that the hot path (am I
still on the current epoch?) is one small ``HGET``/``HMGET``, and so that a
record written by a newer release is recognised, and left alone, before its
plan is even parsed. Both writes (first creation and compare-and-swap) are
Lua scripts on that one key, so they are atomic.

Redis errors (connection loss, cluster down) propagate unchanged; plan
problems raise :class:`~taskiq_redis_cluster._errors.PlanError` subclasses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError, ResponseError

from ._errors import CorruptPlanError, PlanError, PlanNotFoundError, PlanVersionError
from ._keys import DEFAULT_PREFIX, plan_key, plans_index_key, validate_name
from ._planner import PLAN_FORMAT_VERSION, QueueSpec, ShardPlan, plan_queue
from ._topology import Topology

logger = logging.getLogger("taskiq_redis_cluster.planstore")

# KEYS[1] plan key; ARGV format, epoch, plan json. Returns 1 if created.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'format', ARGV[1], 'epoch', ARGV[2], 'plan', ARGV[3])
return 1
"""

# KEYS[1] plan key; ARGV supported format, expected epoch, new epoch, plan json.
# Returns {code, detail}: 1 swapped, 0 epoch mismatch (detail = stored
# epoch), -1 missing, -2 corrupt (detail = reason), -3 newer format
# (detail = stored format). A newer format is never overwritten.
_CAS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return {-2, 'not a hash'} end
local vals = redis.call('HMGET', KEYS[1], 'format', 'epoch')
local fmt = tonumber(vals[1])
if not fmt then return {-2, 'missing or bad format field'} end
if fmt > tonumber(ARGV[1]) then return {-3, vals[1]} end
local epoch = tonumber(vals[2])
if not epoch then return {-2, 'missing or bad epoch field'} end
if epoch ~= tonumber(ARGV[2]) then return {0, vals[2]} end
redis.call('HSET', KEYS[1], 'format', ARGV[1], 'epoch', ARGV[3], 'plan', ARGV[4])
return {1, ''}
"""

#: Attempts of get_or_create when the record vanishes between losing the
#: creation race and reading the winner's plan (someone deleted it).
_CREATE_ATTEMPTS = 3


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse_int_field(raw: Any, key: str, name: str) -> int:
    try:
        return int(_text(raw))
    except ValueError:
        raise CorruptPlanError(key=key, reason=f"bad {name} field {raw!r:.50}") from None


class PlanStore:
    """Reads and writes shard plans in the cluster.

    :param client: an initialized cluster client (see ``connect``); the store
        does not own it and never closes it.
    :param prefix: key prefix shared by every component of one deployment.
    """

    def __init__(self, client: RedisCluster, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = client
        self.prefix = prefix

    def key(self, queue: str) -> str:
        """Redis key of the plan record of ``queue``."""
        return plan_key(self.prefix, validate_name(queue, "queue"))

    async def load(self, queue: str) -> ShardPlan | None:
        """The stored plan of ``queue``, or ``None`` if there is none.

        :raises PlanVersionError: if the record has a newer format version
            (it is left untouched).
        :raises CorruptPlanError: if the record cannot be parsed.
        """
        key = self.key(queue)
        try:
            fmt, epoch, text = await self._client.execute_command(
                "HMGET", key, "format", "epoch", "plan"
            )
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise CorruptPlanError(key=key, reason="the key is not a hash") from None
            raise
        if fmt is None and epoch is None and text is None:
            return None
        if fmt is None:
            raise CorruptPlanError(key=key, reason="no format field")
        found = _parse_int_field(fmt, key, "format")
        if found > PLAN_FORMAT_VERSION:
            raise PlanVersionError(key=key, found=found, supported=PLAN_FORMAT_VERSION)
        if text is None or epoch is None:
            raise CorruptPlanError(key=key, reason="missing epoch or plan field")
        plan = ShardPlan.from_json(text, key=key)
        if plan.queue != queue:
            raise CorruptPlanError(key=key, reason=f"the plan is for queue {plan.queue!r}")
        if plan.epoch != _parse_int_field(epoch, key, "epoch"):
            raise CorruptPlanError(key=key, reason="epoch field and plan disagree")
        return plan

    async def epoch(self, queue: str) -> int | None:
        """The stored epoch of ``queue`` (one small read), ``None`` if no plan.

        :raises PlanVersionError: if the record has a newer format version.
        :raises CorruptPlanError: if the fields cannot be parsed.
        """
        key = self.key(queue)
        try:
            fmt, epoch = await self._client.execute_command("HMGET", key, "format", "epoch")
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise CorruptPlanError(key=key, reason="the key is not a hash") from None
            raise
        if fmt is None and epoch is None:
            return None
        if fmt is None or epoch is None:
            raise CorruptPlanError(key=key, reason="missing format or epoch field")
        found = _parse_int_field(fmt, key, "format")
        if found > PLAN_FORMAT_VERSION:
            raise PlanVersionError(key=key, found=found, supported=PLAN_FORMAT_VERSION)
        return _parse_int_field(epoch, key, "epoch")

    async def get_or_create(self, topology: Topology, spec: QueueSpec) -> ShardPlan:
        """The plan of ``spec.name``, creating it from ``topology`` if absent.

        Creation is atomic: when many processes start at once exactly one
        record is written and every caller returns that plan. A stored plan
        always wins over ``spec`` (a different shard count is logged, not
        applied: changing it is a migration, not a startup side effect).

        :raises NoMastersError: if a plan must be created and no master
            serves slots.
        :raises PlanVersionError, CorruptPlanError: for an unusable record.
        """
        key = self.key(spec.name)
        plan: ShardPlan | None = None
        for _ in range(_CREATE_ATTEMPTS):
            plan = await self.load(spec.name)
            if plan is not None:
                break
            fresh = plan_queue(topology, spec)
            created = await self._client.execute_command(
                "EVAL", _CREATE, 1, key, PLAN_FORMAT_VERSION, fresh.epoch, fresh.to_json()
            )
            if int(created) == 1:
                logger.info(
                    "Created plan for queue %s: %d shards, epoch %d",
                    spec.name,
                    len(fresh.shards),
                    fresh.epoch,
                )
                plan = fresh
                break
            # Lost the race: another process created it; read theirs.
        if plan is None:
            raise PlanError(message=f"plan record {key!r} keeps disappearing during creation")
        # Always (re)register: idempotent, and heals an index entry lost
        # between creation and this call in an earlier crash.
        await self._client.execute_command("SADD", plans_index_key(self.prefix), spec.name)
        if len(plan.shards) != spec.shards:
            logger.warning(
                "Queue %s has a stored plan with %d shards; the requested %d is ignored",
                spec.name,
                len(plan.shards),
                spec.shards,
            )
        return plan

    async def compare_and_swap(self, new: ShardPlan, expected_epoch: int) -> bool:
        """Store ``new`` if the stored epoch is still ``expected_epoch``.

        :returns: True if stored; False if the epoch moved on or no record
            exists.
        :raises ValueError: if ``new.epoch`` is not greater than
            ``expected_epoch`` (followers detect changes by epoch alone).
        :raises PlanVersionError: if the record has a newer format version;
            it is never overwritten.
        :raises CorruptPlanError: if the record is not a readable plan hash.
        """
        if new.epoch <= expected_epoch:
            raise ValueError(
                f"new epoch {new.epoch} must be greater than the expected epoch {expected_epoch}"
            )
        key = self.key(new.queue)
        code, detail = await self._client.execute_command(
            "EVAL",
            _CAS,
            1,
            key,
            PLAN_FORMAT_VERSION,
            expected_epoch,
            new.epoch,
            new.to_json(),
        )
        code = int(code)
        if code == 1:
            logger.info("Stored plan of queue %s at epoch %d", new.queue, new.epoch)
            return True
        if code == -3:
            found = _parse_int_field(detail, key, "format")
            raise PlanVersionError(key=key, found=found, supported=PLAN_FORMAT_VERSION)
        if code == -2:
            raise CorruptPlanError(key=key, reason=_text(detail))
        logger.info(
            "Plan of queue %s not stored: expected epoch %d, found %s",
            new.queue,
            expected_epoch,
            _text(detail) if code == 0 else "no record",
        )
        return False

    async def list_queues(self) -> list[str]:
        """Names of the queues that have a plan, sorted."""
        members = await self._client.execute_command("SMEMBERS", plans_index_key(self.prefix))
        return sorted(_text(m) for m in members)

    async def delete(self, queue: str) -> bool:
        """Remove the plan of ``queue`` (tools and tests); True if it existed.

        Only the record goes; the shards' streams are not touched.
        """
        removed = await self._client.execute_command("DEL", self.key(queue))
        await self._client.execute_command("SREM", plans_index_key(self.prefix), queue)
        return int(removed) > 0


class PlanFollower:
    """A cached plan that follows the stored one cheaply.

    :meth:`current` returns the cached plan and, at most once per
    ``poll_interval`` seconds, reads the stored epoch (one small read); only
    when the epoch changed is the whole plan read again. So kicks do not pay
    a plan round trip each, and a rebalance reaches every process within
    about ``poll_interval``.

    If the epoch cannot be read (connection trouble) or the record vanished,
    the cached plan keeps being used and the read is retried after the next
    interval: the plan is only a routing table, and a send that truly
    cannot work fails on its own.

    :param time_func: monotonic clock, injectable for tests.
    :param initial: a plan already loaded (e.g. from ``get_or_create``).
    """

    def __init__(
        self,
        store: PlanStore,
        queue: str,
        *,
        poll_interval: float = 2.0,
        time_func: Callable[[], float] = time.monotonic,
        initial: ShardPlan | None = None,
    ) -> None:
        if poll_interval < 0:
            raise ValueError("poll_interval must be >= 0")
        self._store = store
        self._queue = validate_name(queue, "queue")
        self._interval = poll_interval
        self._time = time_func
        self._plan = initial
        self._checked_at = time_func() if initial is not None else float("-inf")
        self._lock = asyncio.Lock()

    @property
    def cached(self) -> ShardPlan | None:
        """The cached plan without any I/O."""
        return self._plan

    def fresh(self) -> ShardPlan | None:
        """The cached plan if it was validated within ``poll_interval``, else None.

        Lets a hot path skip a coroutine call; on None, await :meth:`current`.
        """
        plan = self._plan
        if plan is not None and self._time() - self._checked_at < self._interval:
            return plan
        return None

    async def current(self) -> ShardPlan:
        """The current plan, re-validated at most once per ``poll_interval``.

        :raises PlanNotFoundError: if no plan was ever seen and none is stored.
        :raises PlanVersionError, CorruptPlanError: if the stored record
            cannot be used and no plan is cached.
        """
        plan = self._plan
        if plan is not None and self._time() - self._checked_at < self._interval:
            return plan
        if plan is None:
            async with self._lock:
                if self._plan is None:
                    return await self._load_first()
                return self._plan
        # Claim the check before awaiting, so concurrent callers keep using
        # the cached plan instead of all polling at once.
        self._checked_at = self._time()
        return await self._poll(plan)

    async def refresh(self) -> ShardPlan:
        """Read the stored plan now, whatever the interval."""
        plan = self._plan
        if plan is None:
            async with self._lock:
                if self._plan is None:
                    return await self._load_first()
                return self._plan
        self._checked_at = self._time()
        return await self._poll(plan, force=True)

    async def _load_first(self) -> ShardPlan:
        plan = await self._store.load(self._queue)
        if plan is None:
            raise PlanNotFoundError(queue=self._queue, key=self._store.key(self._queue))
        self._plan = plan
        self._checked_at = self._time()
        return plan

    async def _poll(self, plan: ShardPlan, *, force: bool = False) -> ShardPlan:
        try:
            epoch = None if force else await self._store.epoch(self._queue)
            if not force and epoch == plan.epoch:
                return plan
            if not force and epoch is None:
                logger.warning(
                    "Plan of queue %s vanished; keeping epoch %d", self._queue, plan.epoch
                )
                return plan
            fresh = await self._store.load(self._queue)
        except (RedisError, OSError, PlanError) as exc:
            logger.warning(
                "Cannot re-read the plan of queue %s (%s); keeping epoch %d",
                self._queue,
                exc,
                plan.epoch,
            )
            return plan
        if fresh is None:
            return plan
        if fresh.epoch != plan.epoch:
            logger.info("Queue %s: plan epoch %d -> %d", self._queue, plan.epoch, fresh.epoch)
        self._plan = fresh
        return fresh
