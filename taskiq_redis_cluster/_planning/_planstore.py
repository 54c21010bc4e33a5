"""Plans stored in Redis: one hash per queue, created once, swapped atomically.

The record of queue ``Q`` is the hash at ``_keys.plan_key(prefix, Q)`` (a
slot of its own) with these fields::

    format      "1"                  layout version (PLAN_FORMAT_VERSION)
    epoch       "7"                  grows by one with every change
    plan        "{...}"              ShardPlan.to_json()
    generation  "9f2c..."            random token written at creation only

``format`` and ``epoch`` are separate fields so that the hot path (am I
still on the current epoch?) is one small ``HMGET``, and so that a record
written by a newer release is recognised, and left alone, before its plan is
even parsed. Both writes (first creation and compare-and-swap) are Lua
scripts on that one key, so they are atomic.

Two rules keep a process from ever routing by an older plan:

* A change counts only once a replica has it. Replication is asynchronous:
  a swap acknowledged by a master that dies before its replica received it
  is lost at the failover, the promoted replica serves the older epoch, and
  kicks already sent by the newer plan would be orphaned. So
  :meth:`PlanStore.compare_and_swap` sends the script (``EVALSHA``, or
  ``EVAL`` after ``NOSCRIPT``) then ``WAIT 1`` in one batch on one
  connection to the key's master. ``WAIT`` counts replicas up
  to the replication offset of *its own connection's* last write, so it must
  follow the write on the same connection: on a pooled connection that has
  not written since, it confirms at once while the replica still lacks the
  write (``test_swap_counts_only_once_a_replica_has_it`` shows both).
  redis-py's ``ClusterPipeline`` cannot promise that (its retry after a
  connection error re-routes ``WAIT`` to another node), so the batch is
  written on one pooled connection of the node taken from redis-py (which
  connects, authenticates and does TLS) by ``_redis.send_batch``, without a
  hidden retry; redirects and lost connections are retried here, paced by
  :class:`~taskiq_redis_cluster._redis.RetryPolicy`. A swap no
  replica confirmed raises
  :class:`~taskiq_redis_cluster._errors.PlanNotReplicatedError` instead of
  returning True. Creation does not wait (a startup must work on a cluster
  without replicas); a creation lost at a failover is recreated with a new
  generation, which the next rule handles.
* Followers are monotonic within a generation. ``generation`` is written
  when the record is created and kept by every swap; a record deleted and
  created again gets a new one. :class:`PlanFollower` never replaces its plan
  by a lower epoch of the same generation (it keeps its plan, logs a warning
  and counts it), and takes any epoch of a different generation. Records
  written before this field existed have none: they count as generation
  ``""``, and a swap never adds one (adding one would turn a rollback of
  that record into an accepted "new generation").

Redis errors (connection loss, cluster down) propagate unchanged; plan
problems raise :class:`~taskiq_redis_cluster._errors.PlanError` subclasses.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError, ResponseError

from .._errors import (
    CorruptPlanError,
    InvalidOptionError,
    PlanError,
    PlanNotFoundError,
    PlanNotReplicatedError,
    PlanVersionError,
)
from .._keys import DEFAULT_PREFIX, plan_key, plans_index_key, validate_name
from .._redis import RetryPolicy, Target, load_script, on_slot_master, send_batch
from ._planner import PLAN_FORMAT_VERSION, QueueSpec, ShardPlan, plan_queue
from ._topology import Topology

logger = logging.getLogger(__name__)

# Creation and compare-and-swap of the record (see _redis/scripts/plan_*.lua
# for their arguments and reply codes).
_CREATE = load_script("plan_create")
_CAS = load_script("plan_cas")

#: Attempts of get_or_create when the record vanishes between losing the
#: creation race and reading the winner's plan (someone deleted it).
_CREATE_ATTEMPTS = 3

#: Attempts of a confirmed write that was redirected (MOVED/ASK/TRYAGAIN) or
#: lost its connection; a repeat is safe (see plan_cas.lua, code 2).
_WRITE_ATTEMPTS = 5


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse_int_field(raw: Any, key: str, name: str) -> int:
    try:
        return int(_text(raw))
    except ValueError:
        raise CorruptPlanError(key=key, reason=f"bad {name} field {raw!r:.50}") from None


@dataclass(frozen=True)
class PlanVersion:
    """What identifies a stored plan: its epoch within its generation."""

    epoch: int
    #: Random token of the record's creation; ``""`` for records written
    #: before generations existed.
    generation: str


@dataclass(frozen=True)
class StoredPlan:
    """A stored plan with the generation of its record."""

    plan: ShardPlan
    generation: str

    @property
    def version(self) -> PlanVersion:
        return PlanVersion(self.plan.epoch, self.generation)


class PlanStore:
    """Reads and writes shard plans in the cluster.

    :param client: an initialized cluster client (see ``connect``); the store
        does not own it and never closes it.
    :param prefix: key prefix shared by every component of one deployment.
    :param require_replica: a swap counts only once a replica of the plan
        key's master has it (see the module docstring). Pass False only for a
        cluster without replicas, where no failover can happen: a swap is
        then done when its master has it.
    :param replica_timeout: seconds a swap waits for that replica. Keep it
        below the client's socket timeout, which bounds the whole exchange.
    :param retry: attempts and backoff of a confirmed swap that was
        redirected or lost its connection (5 attempts by default).

    :raises InvalidOptionError: for a ``replica_timeout`` that is not > 0.
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        require_replica: bool = True,
        replica_timeout: float = 2.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not replica_timeout > 0:  # also rejects NaN
            raise InvalidOptionError(
                option="replica_timeout", reason=f"must be > 0, got {replica_timeout}"
            )
        self._client = client
        self._retry = retry or RetryPolicy(attempts=_WRITE_ATTEMPTS)
        self.prefix = prefix
        self.require_replica = require_replica
        self.replica_timeout = replica_timeout

    def key(self, queue: str) -> str:
        """Redis key of the plan record of ``queue``."""
        return plan_key(self.prefix, validate_name(queue, "queue"))

    async def _hmget(self, key: str, *fields: str) -> list[Any]:
        try:
            values: list[Any] = await self._client.execute_command("HMGET", key, *fields)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise CorruptPlanError(key=key, reason="the key is not a hash") from None
            raise
        return values

    @staticmethod
    def _check_format(key: str, fmt: Any) -> None:
        found = _parse_int_field(fmt, key, "format")
        if found > PLAN_FORMAT_VERSION:
            raise PlanVersionError(key=key, found=found, supported=PLAN_FORMAT_VERSION)

    async def load_record(self, queue: str) -> StoredPlan | None:
        """The stored plan of ``queue`` with its generation, ``None`` if none.

        :raises PlanVersionError: if the record has a newer format version
            (it is left untouched).
        :raises CorruptPlanError: if the record cannot be parsed.
        """
        key = self.key(queue)
        fmt, epoch, text, generation = await self._hmget(
            key, "format", "epoch", "plan", "generation"
        )
        if fmt is None and epoch is None and text is None:
            return None
        if fmt is None:
            raise CorruptPlanError(key=key, reason="no format field")
        self._check_format(key, fmt)
        if text is None or epoch is None:
            raise CorruptPlanError(key=key, reason="missing epoch or plan field")
        plan = ShardPlan.from_json(text, key=key)
        if plan.queue != queue:
            raise CorruptPlanError(key=key, reason=f"the plan is for queue {plan.queue!r}")
        if plan.epoch != _parse_int_field(epoch, key, "epoch"):
            raise CorruptPlanError(key=key, reason="epoch field and plan disagree")
        return StoredPlan(plan, "" if generation is None else _text(generation))

    async def load(self, queue: str) -> ShardPlan | None:
        """The stored plan of ``queue``, or ``None`` if there is none.

        :raises PlanVersionError: if the record has a newer format version
            (it is left untouched).
        :raises CorruptPlanError: if the record cannot be parsed.
        """
        record = await self.load_record(queue)
        return None if record is None else record.plan

    async def version(self, queue: str) -> PlanVersion | None:
        """The stored epoch and generation of ``queue`` (one small read).

        :raises PlanVersionError: if the record has a newer format version.
        :raises CorruptPlanError: if the fields cannot be parsed.
        """
        key = self.key(queue)
        fmt, epoch, generation = await self._hmget(key, "format", "epoch", "generation")
        if fmt is None and epoch is None:
            return None
        if fmt is None or epoch is None:
            raise CorruptPlanError(key=key, reason="missing format or epoch field")
        self._check_format(key, fmt)
        return PlanVersion(
            _parse_int_field(epoch, key, "epoch"),
            "" if generation is None else _text(generation),
        )

    async def epoch(self, queue: str) -> int | None:
        """The stored epoch of ``queue`` (one small read), ``None`` if no plan.

        :raises PlanVersionError: if the record has a newer format version.
        :raises CorruptPlanError: if the fields cannot be parsed.
        """
        version = await self.version(queue)
        return None if version is None else version.epoch

    async def get_or_create(self, topology: Topology, spec: QueueSpec) -> ShardPlan:
        """The plan of ``spec.name``, creating it from ``topology`` if absent.

        Creation is atomic: when many processes start at once exactly one
        record is written and every caller returns that plan. A stored plan
        always wins over ``spec`` (a different shard count is logged, not
        applied: changing it is a migration, not a startup side effect). A
        new record gets a new random generation.

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
            created = await _CREATE(
                self._client,
                keys=[key],
                args=[PLAN_FORMAT_VERSION, fresh.epoch, fresh.to_json(), secrets.token_hex(16)],
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

    async def compare_and_swap(
        self,
        new: ShardPlan,
        expected_epoch: int,
        *,
        expected_generation: str | None = None,
    ) -> bool:
        """Store ``new`` if the stored epoch is still ``expected_epoch``.

        With ``require_replica`` (the default) True means a replica of the
        plan key's master has the new plan too, so no failover can undo it.
        Calling again with the same arguments after a swap that was applied
        (an unconfirmed one, or one whose reply was lost) returns True once a
        replica has it, instead of False.

        :param expected_generation: also require this generation (see
            :meth:`load_record`), so a plan deleted and created again is not
            swapped by a writer that read the old one.
        :returns: True if stored (and confirmed); False if the epoch or the
            generation moved on, or no record exists.
        :raises ValueError: if ``new.epoch`` is not greater than
            ``expected_epoch`` (followers detect changes by epoch alone).
        :raises PlanNotReplicatedError: the plan was written on the master at
            ``new.epoch`` and is in force there, but no replica confirmed it
            within ``replica_timeout`` (or the master has none). Do not act
            on it as done (do not drain or delete what the old plan used);
            re-read the plan and call again with the same arguments later, or
            resume from the stored plan after a failover.
        :raises PlanVersionError: if the record has a newer format version;
            it is never overwritten.
        :raises CorruptPlanError: if the record is not a readable plan hash.
        """
        if new.epoch <= expected_epoch:
            raise ValueError(
                f"new epoch {new.epoch} must be greater than the expected epoch {expected_epoch}"
            )
        key = self.key(new.queue)
        args: list[str | int] = [
            PLAN_FORMAT_VERSION,
            expected_epoch,
            new.epoch,
            new.to_json(),
            "0" if expected_generation is None else "1",
            expected_generation or "",
        ]
        if self.require_replica:
            reply, acked, attached = await self._write_confirmed(key, args)
        else:
            reply, acked, attached = await _CAS(self._client, keys=[key], args=args), None, 0
        code, detail = int(reply[0]), reply[1]
        if code in (1, 2):
            if acked is None or acked >= 1:
                logger.info(
                    "Stored plan of queue %s at epoch %d%s",
                    new.queue,
                    new.epoch,
                    "" if acked is None else f" (confirmed by {acked} replica(s))",
                )
                return True
            timeout_ms = self._timeout_ms()
            if attached == 0:
                reason = (
                    "its master has no replica attached (none configured, or none "
                    "connected right now, e.g. just after a failover); give every master "
                    "a replica, or create the PlanStore with require_replica=False if "
                    "the cluster has none"
                )
            else:
                reason = (
                    f"none of its {attached} replica(s) acknowledged it within "
                    f"{timeout_ms} ms; the change may be lost on a failover. Re-read "
                    "the plan, and call compare_and_swap again with the same plan and "
                    "expected epoch to confirm it once a replica has caught up"
                )
            logger.warning(
                "Plan of queue %s written at epoch %d but not confirmed by a replica "
                "(%d attached, waited %d ms)",
                new.queue,
                new.epoch,
                attached,
                timeout_ms,
            )
            raise PlanNotReplicatedError(
                key=key, epoch=new.epoch, replicas=attached, reason=reason
            )
        if code == -3:
            found = _parse_int_field(detail, key, "format")
            raise PlanVersionError(key=key, found=found, supported=PLAN_FORMAT_VERSION)
        if code == -2:
            raise CorruptPlanError(key=key, reason=_text(detail))
        if code == -4:
            logger.info(
                "Plan of queue %s not stored: expected generation %r, found %r",
                new.queue,
                expected_generation,
                _text(detail),
            )
            return False
        logger.info(
            "Plan of queue %s not stored: expected epoch %d, found %s",
            new.queue,
            expected_epoch,
            _text(detail) if code == 0 else "no record",
        )
        return False

    def _timeout_ms(self) -> int:
        return max(1, round(self.replica_timeout * 1000))

    async def _write_confirmed(self, key: str, args: Sequence[Any]) -> tuple[Any, int, int]:
        """Run the CAS script on ``key`` then ``WAIT 1`` on one connection.

        Returns the script's reply, the replicas ``WAIT`` counted and the
        replicas attached to the master (``ROLE``). Redirects, ``NOSCRIPT``
        and transient errors are recovered from by ``on_slot_master``; a
        batch that broke off has an unknown outcome, and the swap is safe to
        repeat (code 2 of plan_cas.lua).
        """

        async def send(target: Target) -> tuple[Any, int, int]:
            script = (_CAS.eval_command if target.use_eval else _CAS.command)([key], args)
            commands: list[Sequence[Any]] = [("ASKING",)] if target.asking else []
            commands += [script, ("WAIT", 1, self._timeout_ms()), ("ROLE",)]
            replies = await send_batch(target.node, commands)
            reply, acked, role = replies[1:] if target.asking else replies
            for value in (reply, acked):
                if isinstance(value, RedisError):
                    raise value
            return reply, int(acked), self._attached(role)

        return await on_slot_master(self._client, key, send, self._retry)

    @staticmethod
    def _attached(role: Any) -> int:
        # ROLE of a master: [b"master", offset, [[host, port, offset], ...]].
        if isinstance(role, list) and len(role) >= 3 and isinstance(role[2], list):
            return len(role[2])
        return 0

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
    """A cached plan that follows the stored one cheaply, never going back.

    :meth:`current` returns the cached plan and, at most once per
    ``poll_interval`` seconds, reads the stored epoch and generation (one
    small read); only when they changed is the whole plan read again. So
    kicks do not pay a plan round trip each, and a rebalance reaches every
    process within about ``poll_interval``.

    The cached plan is only replaced by a higher epoch of the same
    generation, or by any epoch of another generation (the record was
    deleted and created again). A lower epoch of the same generation means
    the stored plan rolled back (a failover lost a change that was not
    confirmed by a replica, or someone wrote the record by hand): the cached
    plan is kept, a warning is logged and :attr:`rollbacks_refused` counts it,
    because the newer plan may already have sent kicks to shards the older
    one does not read.

    If the record cannot be read (connection trouble) or vanished, the
    cached plan keeps being used and the read is retried after the next
    interval: the plan is only a routing table, and a send that truly
    cannot work fails on its own.

    :param time_func: monotonic clock, injectable for tests.
    :param initial: a plan already loaded (e.g. from ``get_or_create``).
    :param initial_generation: the generation of ``initial``; when unknown,
        the first poll adopts the stored generation if its epoch is not lower.

    :raises InvalidOptionError: for a negative ``poll_interval``.
    """

    def __init__(
        self,
        store: PlanStore,
        queue: str,
        *,
        poll_interval: float = 2.0,
        time_func: Callable[[], float] = time.monotonic,
        initial: ShardPlan | None = None,
        initial_generation: str | None = None,
    ) -> None:
        if not poll_interval >= 0:  # also rejects NaN
            raise InvalidOptionError(
                option="poll_interval", reason=f"must be >= 0, got {poll_interval}"
            )
        self._store = store
        self._queue = validate_name(queue, "queue")
        self._interval = poll_interval
        self._time = time_func
        self._plan = initial
        self._generation = initial_generation if initial is not None else None
        self._checked_at = time_func() if initial is not None else float("-inf")
        self._lock = asyncio.Lock()
        self._refused: PlanVersion | None = None
        #: Distinct older stored versions that were refused (see the class doc).
        self.rollbacks_refused = 0

    @property
    def cached(self) -> ShardPlan | None:
        """The cached plan without any I/O."""
        return self._plan

    @property
    def generation(self) -> str | None:
        """Generation of the cached plan (``None`` while unknown)."""
        return self._generation

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
        """Read the stored plan now, whatever the interval (never an older one)."""
        plan = self._plan
        if plan is None:
            async with self._lock:
                if self._plan is None:
                    return await self._load_first()
                return self._plan
        self._checked_at = self._time()
        return await self._poll(plan, force=True)

    async def _load_first(self) -> ShardPlan:
        record = await self._store.load_record(self._queue)
        if record is None:
            raise PlanNotFoundError(queue=self._queue, key=self._store.key(self._queue))
        self._plan, self._generation = record.plan, record.generation
        self._checked_at = self._time()
        return record.plan

    def _takes(self, held: ShardPlan, seen: PlanVersion) -> bool:
        """Whether the stored ``seen`` may replace the cached ``held``."""
        if self._generation is not None and seen.generation != self._generation:
            return True
        if seen.epoch < held.epoch:
            if seen != self._refused:
                self._refused = seen
                self.rollbacks_refused += 1
                logger.warning(
                    "Queue %s: the stored plan went back from epoch %d to %d; keeping "
                    "epoch %d (a plan change lost at a failover, or a hand-written record)",
                    self._queue,
                    held.epoch,
                    seen.epoch,
                    held.epoch,
                )
            return False
        # Same epoch: nothing new, unless the generation is still unknown
        # (the record must then be read once to learn it).
        return seen.epoch > held.epoch or self._generation is None

    async def _poll(self, plan: ShardPlan, *, force: bool = False) -> ShardPlan:
        try:
            if not force:
                seen = await self._store.version(self._queue)
                if seen is None:
                    logger.warning(
                        "Plan of queue %s vanished; keeping epoch %d", self._queue, plan.epoch
                    )
                    return plan
                if not self._takes(plan, seen):
                    return plan
            record = await self._store.load_record(self._queue)
        except (RedisError, OSError, PlanError) as exc:
            logger.warning(
                "Cannot re-read the plan of queue %s (%s); keeping epoch %d",
                self._queue,
                exc,
                plan.epoch,
            )
            return plan
        if record is None or not self._takes(plan, record.version):
            return plan
        if record.generation != self._generation and self._generation is not None:
            logger.warning(
                "Queue %s: the plan record was created again (epoch %d -> %d)",
                self._queue,
                plan.epoch,
                record.plan.epoch,
            )
        elif record.plan.epoch != plan.epoch:
            logger.info(
                "Queue %s: plan epoch %d -> %d", self._queue, plan.epoch, record.plan.epoch
            )
        self._plan, self._generation = record.plan, record.generation
        return record.plan
