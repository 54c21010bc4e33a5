"""The rebalancer: keep every queue's shards spread evenly over the masters.

After a reshard, an added master or a failover, the shards of a queue may
sit on the wrong masters (see :func:`~taskiq_redis_cluster._planner.balance`).
:class:`Rebalancer` re-plans with the fewest moves
(:func:`~taskiq_redis_cluster._planner.replan`) and moves each shard to a
new hash tag on the target master. The rebalancer copies the waiting
entries itself, so a move takes time in proportion to the shard's size and
does not wait for workers to empty the old shard:

1. **planned**: the move is written to the journal.
2. **pre-copy** (still ``planned``, ``precopy`` set): the old shard's
   backlog up to the moment the copy starts is copied to the new tag, which
   nobody reads or writes yet, in order (see *Copying* below).
3. **switch** (new epoch): the shard's index gets its new tag; the old shard
   goes into ``draining``. Producers follow within one
   ``plan_poll_interval``; consumers start a reader for the new tag and keep
   reading the old one until it is finalized.
4. **drained**: after the settle window (``settle``, at least the brokers'
   ``plan_poll_interval``: a producer with a stale plan may still write to
   the old tag until then), whatever is left on the old shard is copied,
   entries pending on dead consumers are reclaimed and copied, and only
   entries pending on live consumers are waited for.
5. **finalized** (new epoch): the old shard leaves ``draining``; consumers
   stop its reader within about one poll interval.
6. **cleaned**: after the settle window, one Lua script checks the old
   stream and list once more and deletes them only if still drained (if
   something arrived, the old shard goes back into ``draining`` and step 4
   repeats). Dead letters move to the dead-letter stream of the shard that
   now holds the index; the tag is remembered as *retired*.

Finalizing *before* deleting is deliberate: a draining reader that still ran
when its stream vanished would get ``NOGROUP`` and recreate the stream.

Copying (crash-safe: a ``kill -9`` anywhere gives duplicates at worst):

* stream with consumer groups: one Lua script claims the next batch into
  the mover consumer (:data:`MOVER_CONSUMER`, ``XREADGROUP`` in every group
  that has not had the batch delivered); the entries are ``XADD``-ed to the
  target stream, then ``XACK``-ed on the old one. A rerun first copies
  whatever the mover still has pending;
* stream without a group (no consumer ever read it): ``XRANGE``, ``XADD``
  to the target, then ``XDEL`` of the copied ids, only while there is still
  no group (checked atomically);
* pending entries: those of consumers not seen on the old stream for
  ``consumer_timeout`` seconds, and entries idle for ``idle_timeout``
  seconds, are ``XCLAIM``-ed to the mover and copied; those of live
  consumers are waited for;
* list (list broker): ``LRANGE`` of the oldest entries, ``LPUSH`` to the new
  list, then one script removes from the old list whatever of that batch
  the consumers have not popped meanwhile.

Entries keep their relative order; copies land behind whatever the target
already holds (nothing, for the pre-copy). Copying is throttled by
``max_entries_per_second``.

**Retired tags** are swept: :meth:`Rebalancer.sweep` (run by ``apply`` and on
every ``watch`` pass) copies entries that landed in a retired shard (a stale
producer recreated it) to the live shard of the same index and deletes it.

Safety:

* one rebalancer at a time: a lease (``SET NX PX``, renewed in the
  background, released with compare-and-delete) at
  ``_keys.rebalance_lease_key``; a second one gets
  :class:`~taskiq_redis_cluster._errors.RebalanceLockedError`;
* every step is recorded in a journal hash next to the plan
  (``_keys.rebalance_journal_key``) and every step is idempotent. On a rerun
  the journal is reconciled with the stored plan (the plan is the truth:
  a plan with ``draining`` shards is an unfinished move) and the unfinished
  moves are completed before anything new is planned;
* a move whose old shard makes no progress for ``move_timeout`` (entries
  held by live consumers that never acknowledge) is reverted: the index
  points at the old tag again and the *new* tag goes into ``draining``,
  then :class:`~taskiq_redis_cluster._errors.RebalanceAbortedError` is
  raised. A later run drains and removes the new tag.

Delivery stays at least once. A move adds duplicates only where a copy was
interrupted (rerun), where a consumer judged dead was alive, or where
several consumer groups read one queue at different positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import (
    ConfigurationError,
    PlanNotFoundError,
    RebalanceAbortedError,
    RebalanceError,
    RebalanceLockedError,
)
from .._keys import (
    DEFAULT_PREFIX,
    ShardKeys,
    rebalance_journal_key,
    rebalance_lease_key,
    validate_name,
)
from .._planning import (
    BalanceReport,
    Move,
    PlanStore,
    Replan,
    Shard,
    ShardPlan,
    Topology,
    balance,
    read_topology,
    replan,
)

logger = logging.getLogger("taskiq_redis_cluster.rebalance")

#: Journal hash field counting completed moves (for metrics).
MOVES_TOTAL_FIELD = "moves_total"
_RECORD_PREFIX = "move:"
_RETIRED_PREFIX = "retired:"
#: Consumer name the rebalancer claims entries with while it copies them;
#: whatever it still has pending after a crash is copied again on the rerun.
MOVER_CONSUMER = "tqrc-rebalancer-mover"

# KEYS[1] lease key; ARGV token, ttl ms. Extend only our own lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lease key; ARGV token. Delete only our own lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] shard stream, KEYS[2] shard list (same tag, so one slot).
# ARGV[1] '1': delete both, atomically, when nothing is left to consume.
# Returns {exists, length, groups, undelivered, pending, list_length, deleted};
# undelivered is the largest group lag (1 when a lag is unknown but an entry
# after last-delivered-id exists; the stream length when there is no group).
_DRAIN_STATE = """
local exists, length, ngroups, undelivered, pending, llen = 0, 0, 0, 0, 0, 0
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'stream' then
  exists = 1
  length = redis.call('XLEN', KEYS[1])
  local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
  ngroups = #groups
  if ngroups == 0 then undelivered = length end
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    pending = pending + tonumber(f['pending'])
    local lag = f['lag']
    if type(lag) == 'number' then
      if lag > undelivered then undelivered = lag end
    else
      local after = redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+', 'COUNT', 1)
      if #after > 0 and undelivered < 1 then undelivered = 1 end
    end
  end
elseif t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' is a ' .. t .. ', not a stream')
end
local lt = redis.call('TYPE', KEYS[2])['ok']
if lt == 'list' then
  llen = redis.call('LLEN', KEYS[2])
elseif lt ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is a ' .. lt .. ', not a list')
end
local held = 0
if redis.call('TYPE', KEYS[3])['ok'] == 'set' then
  for _, c in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local p = ARGV[2] .. c
    if redis.call('TYPE', p)['ok'] == 'list' then held = held + redis.call('LLEN', p) end
  end
end
local deleted = 0
if ARGV[1] == '1' and undelivered == 0 and pending == 0 and llen == 0 and held == 0 then
  deleted = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
return {exists, length, ngroups, undelivered, pending, llen, deleted, held}
"""

# KEYS[1] shard list, KEYS[2] its reliable consumers set (same tag).
# ARGV[1] processing-list key prefix, ARGV[2] heartbeat key prefix.
# The processing lists of consumers whose heartbeat expired go back to the
# consuming (right) end of the shard list, as the list broker's own recovery
# does, so the copy that follows takes them first. Returns entries moved.
_LIST_RECOVER = """
if redis.call('TYPE', KEYS[2])['ok'] ~= 'set' then return 0 end
local moved = 0
for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[2] .. c) == 0 then
    local p = ARGV[1] .. c
    while redis.call('LMOVE', p, KEYS[1], 'LEFT', 'RIGHT') do moved = moved + 1 end
    redis.call('SREM', KEYS[2], c)
  end
end
return moved
"""

# Stream ids compared exactly (Lua numbers are doubles): by length, then text.
_ID_LESS = """
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
"""

# KEYS[1] source stream. ARGV[1] mover consumer, ARGV[2] batch size,
# ARGV[3] highest id to take ('+' for all).
# Takes the next batch of entries that some group has not had delivered yet
# (after the smallest last-delivered-id) and delivers them, in every group
# that has not had them, to the mover consumer: from then on they sit in
# the mover's pending list until the caller has copied and acked them.
# Returns {batch, {group, last-delivered-id before, ...}}; {{}, {}} when
# there is nothing (or no group: the caller copies ungrouped streams apart).
_CLAIM_BATCH = (
    _ID_LESS
    + """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return {{}, {}} end
local names, lasts, low = {}, {}, nil
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  names[#names + 1] = name
  lasts[#lasts + 1] = last
  if low == nil or less(last, low) then low = last end
end
local batch = redis.call('XRANGE', KEYS[1], '(' .. low, ARGV[3], 'COUNT', ARGV[2])
if #batch == 0 then return {{}, {}} end
local top = batch[#batch][1]
local claimed = {}
for i, name in ipairs(names) do
  if less(lasts[i], top) then
    local n = #redis.call('XRANGE', KEYS[1], '(' .. lasts[i], top)
    if n > 0 then
      redis.call('XREADGROUP', 'GROUP', name, ARGV[1], 'COUNT', n, 'STREAMS', KEYS[1], '>')
      claimed[#claimed + 1] = name
      claimed[#claimed + 1] = lasts[i]
    end
  end
end
return {batch, claimed}
"""
)

# KEYS[1] source stream; ARGV entry ids already copied. Deletes them only
# while the stream has no consumer group: once a group exists, a deleted
# entry could be one a consumer holds pending (returns -1; the caller then
# claims through the group, which at worst copies these again).
_DELETE_UNGROUPED = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok and #groups > 0 then return -1 end
return redis.call('XDEL', KEYS[1], unpack(ARGV))
"""

# KEYS[1] source list; ARGV the batch as LRANGE key -n -1 returned it
# (leftmost first), already pushed to the target list. Consumers pop from
# the right and producers push on the left, so what is left of the batch is
# its first j elements at the very right end: remove those (largest j that
# matches). Returns j.
_LIST_TAKEN = """
local n = #ARGV
local tail = redis.call('LRANGE', KEYS[1], -n, -1)
local t = #tail
for j = math.min(n, t), 1, -1 do
  local same = true
  for k = 1, j do
    if tail[t - j + k] ~= ARGV[k] then
      same = false
      break
    end
  end
  if same then
    redis.call('LTRIM', KEYS[1], 0, -(j + 1))
    return j
  end
end
return 0
"""

#: Dead-letter entries scanned from the newest end of the target dead
#: stream to find where an interrupted copy stopped.
_DEAD_RESUME_SCAN = 1000
_DEAD_BATCH = 100
#: Attempts of one plan change when the epoch moves under us.
_MUTATE_ATTEMPTS = 5


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------
# Options, events, results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RebalanceOptions:
    """How the rebalancer paces and bounds its work.

    :param plan_poll_interval: the brokers' ``plan_poll_interval`` (seconds);
        use the largest value any producer or consumer of the queue uses.
    :param settle_margin: extra seconds added to ``2 * plan_poll_interval``
        for the default settle window.
    :param settle_window: seconds after a plan change until every producer
        and consumer surely follows it; default ``2 * plan_poll_interval +
        settle_margin``. It may not be shorter than ``plan_poll_interval``.
    :param move_timeout: seconds one move may go without progress (nothing
        copied, nothing acknowledged) before it is reverted.
    :param max_moves_at_once: moves of one queue driven concurrently.
    :param max_entries_per_second: cap on entries (tasks and dead letters)
        copied per second.
    :param copy_batch: entries copied per round trip.
    :param idle_timeout: seconds after which an entry pending on any
        consumer is reclaimed and copied (use the brokers' ``idle_timeout``,
        which is in ms there).
    :param consumer_timeout: seconds a consumer may go without reading the
        old stream before it counts as dead and its pending entries are
        reclaimed and copied. A live broker reads every ``xread_block``
        while it has room in its prefetch buffer.
    :param retired_memory: seconds a retired tag is remembered and swept.
    :param check_interval: seconds between two drain checks.
    :param lease_ttl: seconds the lease lives without renewal (it is renewed
        every third of that); a killed rebalancer blocks others this long.
    :param lock_wait: seconds to wait for a lease held by someone else
        before giving up with ``RebalanceLockedError``.
    """

    plan_poll_interval: float = 2.0
    settle_margin: float = 1.0
    settle_window: float | None = None
    move_timeout: float = 600.0
    max_moves_at_once: int = 1
    max_entries_per_second: float = 1000.0
    copy_batch: int = 100
    idle_timeout: float = 600.0
    consumer_timeout: float = 60.0
    retired_memory: float = 7 * 86400.0
    check_interval: float = 0.5
    lease_ttl: float = 30.0
    lock_wait: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "plan_poll_interval",
            "move_timeout",
            "max_entries_per_second",
            "idle_timeout",
            "consumer_timeout",
            "retired_memory",
            "check_interval",
            "lease_ttl",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(message=f"{name} must be > 0")
        for name in ("settle_margin", "lock_wait"):
            if getattr(self, name) < 0:
                raise ConfigurationError(message=f"{name} must be >= 0")
        for name in ("max_moves_at_once", "copy_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise ConfigurationError(message=f"{name} must be >= 1")
        if self.lease_ttl < 1.0:
            raise ConfigurationError(message="lease_ttl must be >= 1 second")
        if self.settle_window is not None and self.settle_window < self.plan_poll_interval:
            # Shorter than one poll interval, a producer that has not polled
            # yet still writes to the old tag after the window has passed.
            raise ConfigurationError(
                message=f"settle_window ({self.settle_window}s) must be at least "
                f"plan_poll_interval ({self.plan_poll_interval}s)"
            )

    @property
    def settle(self) -> float:
        """Seconds after a plan change until every process surely follows it."""
        if self.settle_window is not None:
            return self.settle_window
        return 2 * self.plan_poll_interval + self.settle_margin


class RebalanceEventKind(str, enum.Enum):
    """What a :class:`RebalanceEvent` reports."""

    RESUMED = "resumed"  #: an unfinished move found in the journal/plan
    RELABELLED = "relabelled"  #: master ids refreshed after a failover, no move
    PLANNED = "planned"
    SWITCHED = "switched"
    #: entries copied from the draining (or pre-copied) shard to the target
    COPIED = "copied"
    #: entries found in a retired shard were moved to the live shard
    SWEPT = "swept"
    WAITING = "waiting"  #: periodic drain progress (lag, pending)
    DRAINED = "drained"
    #: a move took effect: its old shard left the plan (once per completed move)
    FINALIZED = "finalized"
    #: a draining shard that is not a move's old shard left the plan (after a
    #: revert, a re-drain, or a leftover draining shard)
    RETIRED = "retired"
    REDRAIN = "redrain"  #: entries appeared after finalizing; draining again
    CLEANED = "cleaned"  #: the old shard's keys are deleted
    REVERTED = "reverted"
    SKIPPED = "skipped"  #: a planned move no longer fits the stored plan
    QUEUE_DONE = "queue_done"


@dataclass(frozen=True)
class RebalanceEvent:
    """Progress of a rebalance, passed to the ``on_event`` callback."""

    kind: RebalanceEventKind
    queue: str
    index: int | None = None
    old_tag: str | None = None
    new_tag: str | None = None
    draining_tag: str | None = None
    epoch: int | None = None
    undelivered: int | None = None
    pending: int | None = None
    done: int = 0
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class DrainState:
    """What is left to consume in one shard's stream and list."""

    exists: bool
    length: int
    groups: int
    undelivered: int
    pending: int
    list_length: int
    deleted: bool = False
    #: entries held in the processing lists of reliable list consumers
    processing: int = 0

    @property
    def drained(self) -> bool:
        """No group has undelivered or pending entries, the list is empty and
        no reliable list consumer holds any."""
        return (
            self.undelivered == 0
            and self.pending == 0
            and self.list_length == 0
            and self.processing == 0
        )


class MoveState(str, enum.Enum):
    """Journal states of one move, in order (a revert goes back to SWITCHED)."""

    PLANNED = "planned"
    SWITCHED = "switched"
    DRAINED = "drained"
    FINALIZED = "finalized"
    CLEANED = "cleaned"


@dataclass
class MoveRecord:
    """One journal entry: shard ``index`` moves from ``old`` to ``new``.

    ``draining`` is the tag being emptied: ``old.tag`` normally, ``new.tag``
    after a revert. ``kind`` is ``"move"`` for a planned move and
    ``"drain"`` for a draining shard found in the plan without a journal
    entry (it is only drained and removed). ``precopy`` says the old
    shard's backlog may already sit in the new tag (so a planned move is
    never simply forgotten); ``copied`` counts entries copied so far.
    Times are Unix seconds.
    """

    index: int
    old: Shard
    new: Shard
    state: MoveState
    draining: str
    kind: str = "move"
    reverted: bool = False
    redrain: bool = False
    precopy: bool = False
    copied: int = 0
    switched_epoch: int | None = None
    switched_at: float | None = None
    finalized_epoch: int | None = None
    finalized_at: float | None = None
    reason: str = ""
    updated_at: float = 0.0

    @property
    def id(self) -> str:
        """Stable journal field suffix: ``index:old-tag``."""
        return f"{self.index}:{self.old.tag}"

    @property
    def draining_shard(self) -> Shard:
        """The shard record being emptied."""
        return self.new if self.draining == self.new.tag else self.old

    @property
    def target_shard(self) -> Shard:
        """The shard that takes (or keeps) the index once this record is done."""
        return self.old if self.draining == self.new.tag else self.new

    @property
    def finished(self) -> bool:
        """Whether nothing is left to do."""
        return self.state is MoveState.CLEANED

    def to_json(self) -> str:
        """Compact JSON for the journal hash."""
        record = {
            "index": self.index,
            "old": _shard_dict(self.old),
            "new": _shard_dict(self.new),
            "state": self.state.value,
            "draining": self.draining,
            "kind": self.kind,
            "reverted": self.reverted,
            "redrain": self.redrain,
            "precopy": self.precopy,
            "copied": self.copied,
            "switched_epoch": self.switched_epoch,
            "switched_at": self.switched_at,
            "finalized_epoch": self.finalized_epoch,
            "finalized_at": self.finalized_at,
            "reason": self.reason,
            "updated_at": self.updated_at,
        }
        return json.dumps(record, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> MoveRecord:
        """Parse :meth:`to_json` output.

        :raises ValueError: for anything malformed.
        """
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("journal record is not an object")
        try:
            return cls(
                index=int(raw["index"]),
                old=_shard_from(raw["old"]),
                new=_shard_from(raw["new"]),
                state=MoveState(raw["state"]),
                draining=str(raw["draining"]),
                kind=str(raw.get("kind", "move")),
                reverted=bool(raw.get("reverted", False)),
                redrain=bool(raw.get("redrain", False)),
                precopy=bool(raw.get("precopy", False)),
                copied=int(raw.get("copied", 0)),
                switched_epoch=_opt_int(raw.get("switched_epoch")),
                switched_at=_opt_float(raw.get("switched_at")),
                finalized_epoch=_opt_int(raw.get("finalized_epoch")),
                finalized_at=_opt_float(raw.get("finalized_at")),
                reason=str(raw.get("reason", "")),
                updated_at=float(raw.get("updated_at", 0.0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"journal record lacks a field: {exc}") from None


def _shard_dict(shard: Shard) -> dict[str, Any]:
    return {"index": shard.index, "tag": shard.tag, "slot": shard.slot, "master": shard.master}


def _shard_from(raw: Any) -> Shard:
    if not isinstance(raw, dict):
        raise ValueError("shard is not an object")
    return Shard(int(raw["index"]), str(raw["tag"]), int(raw["slot"]), str(raw["master"]))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class RebalanceStatus:
    """How one queue's plan sits on the live topology, plus unfinished work.

    ``ok`` is what ``rebalance verify`` checks: every shard on its planned
    master, spread at most one shard, nothing draining, no unfinished move.
    """

    queue: str
    plan: ShardPlan
    report: BalanceReport
    unfinished: tuple[MoveRecord, ...] = ()
    migrating: bool = False

    @property
    def ok(self) -> bool:
        """Balanced, nothing draining and nothing left in the journal."""
        return self.report.balanced and not self.plan.draining and not self.unfinished

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "queue": self.queue,
            "epoch": self.plan.epoch,
            "ok": self.ok,
            "balanced": self.report.balanced,
            "imbalance": round(self.report.imbalance, 4),
            "spread": self.report.spread,
            "shards_per_master": dict(self.report.counts),
            "misplaced": list(self.report.misplaced),
            "orphaned": list(self.report.orphaned),
            "draining": [s.tag for s in self.plan.draining],
            "unfinished": [
                {
                    "index": r.index,
                    "old": r.old.tag,
                    "new": r.new.tag,
                    "state": r.state.value,
                    "draining": r.draining,
                }
                for r in self.unfinished
            ],
            "migrating": self.migrating,
        }


@dataclass(frozen=True)
class RebalancePreview:
    """What ``apply`` would do to one queue (the ``plan`` dry run)."""

    queue: str
    plan: ShardPlan
    replan: Replan
    before: Mapping[str, int]
    after: Mapping[str, int]
    unfinished: tuple[MoveRecord, ...] = ()

    @property
    def moves(self) -> tuple[Move, ...]:
        """The moves that restore the balance."""
        return self.replan.moves

    @property
    def needed(self) -> bool:
        """Whether ``apply`` would change anything."""
        return self.replan.changed or bool(self.plan.draining) or bool(self.unfinished)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "queue": self.queue,
            "epoch": self.plan.epoch,
            "needed": self.needed,
            "relabel": self.replan.relabelled,
            "moves": [
                {
                    "index": m.index,
                    "old_tag": m.old.tag,
                    "old_master": m.old.master,
                    "new_tag": m.new.tag,
                    "new_master": m.new.master,
                    "new_slot": m.new.slot,
                }
                for m in self.moves
            ],
            "finish_draining": [s.tag for s in self.plan.draining],
            "before": dict(self.before),
            "after": dict(self.after),
        }


@dataclass(frozen=True)
class RebalanceResult:
    """Outcome of ``apply`` for one queue."""

    queue: str
    moves: int
    resumed: int
    relabelled: bool
    epoch: int
    aborted: str | None = None
    #: entries moved out of retired shards (a stale producer wrote there)
    swept: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "queue": self.queue,
            "moves": self.moves,
            "resumed": self.resumed,
            "relabelled": self.relabelled,
            "epoch": self.epoch,
            "aborted": self.aborted,
            "swept": self.swept,
        }


# --------------------------------------------------------------------------
# Lease
# --------------------------------------------------------------------------


def _holder_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class RebalanceLease:
    """The lease that lets one rebalancer run at a time.

    ``SET key token NX PX ttl``; a background task extends it every third
    of ``ttl`` (only while the key still holds our token) and the lease is
    released with a compare-and-delete script, so a rebalancer never deletes
    a lease another one took after ours expired. If the lease cannot be
    renewed for a whole ``ttl``, or someone else holds it, :meth:`check`
    raises and the rebalancer stops before its next plan change.

    Use as ``async with RebalanceLease(client, prefix=...)``.
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 30.0,
        wait: float = 0.0,
    ) -> None:
        self._client = client
        self.key = rebalance_lease_key(prefix)
        self.token = _holder_token()
        self._ttl_ms = max(1000, int(ttl * 1000))
        self._wait = wait
        self._renewer: asyncio.Task[None] | None = None
        self._lost: str | None = None
        self._renewed_at = 0.0

    async def acquire(self) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a holder to leave.

        :raises RebalanceLockedError: if another rebalancer holds it.
        """
        deadline = time.monotonic() + self._wait
        # Bounded: one pass per 0.05..0.5 s of waiting, plus a few quick
        # retries when the lease expires between our SET and GET.
        for _ in range(int(self._wait / 0.05) + 10):
            ok = await self._client.set(self.key, self.token, nx=True, px=self._ttl_ms)
            if ok:
                break
            holder = await self._client.get(self.key)
            ttl = await self._client.pttl(self.key)
            if holder is None:
                continue  # expired between SET and GET: try again at once
            if time.monotonic() >= deadline:
                raise RebalanceLockedError(key=self.key, holder=_text(holder), ttl_ms=int(ttl))
            await asyncio.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        else:
            raise RebalanceLockedError(key=self.key, holder="unknown", ttl_ms=-1)
        self._renewed_at = time.monotonic()
        self._lost = None
        self._renewer = asyncio.create_task(self._renew_loop(), name="tqrc-rebalance-lease")
        logger.info("Acquired the rebalance lease %s as %s", self.key, self.token)

    async def _renew_loop(self) -> None:
        interval = self._ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                extended = await self._client.eval(_RENEW, 1, self.key, self.token, self._ttl_ms)
            except (RedisError, OSError) as exc:
                if time.monotonic() - self._renewed_at > self._ttl_ms / 1000:
                    self._lost = f"could not renew it for {self._ttl_ms} ms ({exc})"
                    logger.error("Rebalance lease lost: %s", self._lost)
                    return
                logger.warning("Renewing the rebalance lease failed (%s); retrying", exc)
                continue
            if int(extended) != 1:
                self._lost = "it expired and was taken or removed by someone else"
                logger.error("Rebalance lease lost: %s", self._lost)
                return
            self._renewed_at = time.monotonic()

    def check(self) -> None:
        """Raise if the lease is no longer ours (called before every plan change).

        :raises RebalanceError: when the lease was lost.
        """
        if self._renewer is None:
            raise RebalanceError(message="the rebalance lease is not held")
        if self._lost is not None:
            raise RebalanceError(message=f"the rebalance lease was lost: {self._lost}")
        if time.monotonic() - self._renewed_at > self._ttl_ms / 1000:
            raise RebalanceError(message="the rebalance lease was not renewed in time")

    async def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        renewer, self._renewer = self._renewer, None
        if renewer is None:
            return
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        try:
            await self._client.eval(_RELEASE, 1, self.key, self.token)
        except (RedisError, OSError) as exc:  # it expires on its own
            logger.warning("Could not release the rebalance lease (%s); it expires", exc)
        else:
            logger.info("Released the rebalance lease %s", self.key)

    async def __aenter__(self) -> RebalanceLease:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


# --------------------------------------------------------------------------
# Journal
# --------------------------------------------------------------------------


class Journal:
    """The rebalancer's journal of one queue: a hash next to the plan record.

    Fields: ``move:<index>:<old tag>`` holds a :class:`MoveRecord` as JSON;
    ``retired:<tag>`` remembers a removed shard tag (``{"index", "at"}``) so
    entries a stale producer writes there later are swept; ``moves_total``
    counts completed moves. The hash shares the plan's slot.
    """

    def __init__(self, client: RedisCluster, prefix: str, queue: str) -> None:
        self._client = client
        self.queue = validate_name(queue, "queue")
        self.key = rebalance_journal_key(prefix, queue)

    async def records(self) -> list[MoveRecord]:
        """Every readable record, ordered by index (bad ones are logged and skipped)."""
        raw = await self._client.hgetall(self.key)
        records: list[MoveRecord] = []
        for name, value in raw.items():
            if not _text(name).startswith(_RECORD_PREFIX):
                continue
            try:
                records.append(MoveRecord.from_json(value))
            except ValueError as exc:
                logger.warning(
                    "Ignoring unreadable journal field %s of %s: %s", _text(name), self.key, exc
                )
        return sorted(records, key=lambda r: (r.index, r.old.tag))

    async def put(self, record: MoveRecord) -> None:
        """Store ``record`` (overwrites the same move's previous state)."""
        record.updated_at = time.time()
        await self._client.hset(self.key, _RECORD_PREFIX + record.id, record.to_json())

    async def remove(self, records: Iterable[MoveRecord]) -> None:
        """Forget ``records``."""
        fields = [_RECORD_PREFIX + r.id for r in records]
        if fields:
            await self._client.hdel(self.key, *fields)

    async def retire(self, tag: str, index: int) -> None:
        """Remember ``tag`` (of shard ``index``) as removed from the plan."""
        value = json.dumps({"index": index, "at": time.time()}, separators=(",", ":"))
        await self._client.hset(self.key, _RETIRED_PREFIX + tag, value)

    async def retired(self, *, older_than: float | None = None) -> dict[str, int]:
        """Retired tags and their shard index; fields older than ``older_than``
        (Unix seconds) are forgotten on the way."""
        raw = await self._client.hgetall(self.key)
        found: dict[str, int] = {}
        stale: list[str] = []
        for name, value in raw.items():
            field = _text(name)
            if not field.startswith(_RETIRED_PREFIX):
                continue
            try:
                doc = json.loads(value)
                index, at = int(doc["index"]), float(doc["at"])
            except (ValueError, KeyError, TypeError):
                stale.append(field)
                continue
            if older_than is not None and at < older_than:
                stale.append(field)
                continue
            found[field[len(_RETIRED_PREFIX) :]] = index
        if stale:
            await self._client.hdel(self.key, *stale)
        return found

    async def forget_retired(self, tags: Iterable[str]) -> None:
        """Stop sweeping ``tags``."""
        fields = [_RETIRED_PREFIX + t for t in tags]
        if fields:
            await self._client.hdel(self.key, *fields)

    async def count_move(self) -> None:
        """Add one completed move to ``moves_total``."""
        await self._client.hincrby(self.key, MOVES_TOTAL_FIELD, 1)

    async def moves_total(self) -> int:
        """Completed moves ever recorded for this queue."""
        value = await self._client.hget(self.key, MOVES_TOTAL_FIELD)
        return int(value) if value is not None else 0


def reconcile(
    plan: ShardPlan, records: Sequence[MoveRecord]
) -> tuple[list[MoveRecord], list[MoveRecord]]:
    """Bring journal ``records`` in line with the stored ``plan`` (the truth).

    A kill can land between a plan change and its journal entry, so each
    unfinished record's state is re-derived from the plan; draining shards
    of the plan that no record covers become ``"drain"`` records. Returns
    ``(active, dropped)``: the records to drive on, and the records that no
    longer match the plan (forgotten; a planned move that never switched is
    re-planned from scratch).
    """
    tags = {s.tag for s in plan.shards}
    drain_tags = {s.tag for s in plan.draining}
    active: list[MoveRecord] = []
    dropped: list[MoveRecord] = []
    for rec in records:
        if rec.finished:
            continue
        if not 0 <= rec.index < len(plan.shards):
            dropped.append(rec)
            continue
        cur = plan.shards[rec.index].tag
        state = rec.state
        if state is MoveState.PLANNED:
            if cur == rec.new.tag and rec.old.tag in drain_tags:
                # Killed after the switch but before the journal said so.
                active.append(replace(rec, state=MoveState.SWITCHED, switched_at=None))
            elif cur == rec.new.tag and rec.old.tag not in tags:
                # Switched and already out of the plan: only cleaning is
                # left, which re-checks (and re-drains) the old shard.
                active.append(replace(rec, state=MoveState.FINALIZED, finalized_at=None))
            elif rec.precopy:
                # Entries may already sit in the new tag, which nobody reads
                # yet: the move goes on (or its copies are moved back).
                active.append(rec)
            else:
                dropped.append(rec)
            continue
        if rec.draining in drain_tags:
            if state is MoveState.FINALIZED:
                # The tag is draining again (killed during a re-drain).
                rec = replace(rec, state=MoveState.SWITCHED, redrain=True, switched_at=None)
            active.append(rec)
            continue
        if (
            not rec.reverted
            and rec.kind == "move"
            and cur == rec.old.tag
            and rec.new.tag in drain_tags
        ):
            # Killed after the revert but before the journal said so.
            active.append(
                replace(
                    rec,
                    state=MoveState.SWITCHED,
                    reverted=True,
                    draining=rec.new.tag,
                    switched_at=None,
                )
            )
            continue
        if rec.draining in tags:
            # The tag is active again: never delete it. Someone else changed
            # the plan; forget this record.
            dropped.append(rec)
            continue
        # Not in the plan any more: finalized (maybe killed before saying so).
        if state is not MoveState.FINALIZED:
            rec = replace(rec, state=MoveState.FINALIZED, finalized_at=None)
        active.append(rec)
    covered = {r.draining for r in active}
    for shard in plan.draining:
        if shard.tag in covered:
            continue
        active.append(
            MoveRecord(
                index=shard.index,
                old=shard,
                new=plan.shards[shard.index],
                state=MoveState.SWITCHED,
                draining=shard.tag,
                kind="drain",
            )
        )
    active.sort(key=lambda r: (r.index, r.old.tag))
    return active, dropped


# --------------------------------------------------------------------------
# The rebalancer
# --------------------------------------------------------------------------


class _Stale(Exception):
    """A plan change no longer fits the stored plan."""


class _Dropped(Exception):
    """A journal record was forgotten because the plan contradicts it."""


class Rebalancer:
    """Detects imbalance and moves shards back into balance, safely.

    :param client: an initialized cluster client (see ``connect``); not
        owned, never closed here.
    :param prefix: key prefix of the deployment.
    :param options: pacing and bounds, see :class:`RebalanceOptions`.
    :param on_event: called with every :class:`RebalanceEvent` (progress
        bars, logs, ``PrometheusEvents.rebalance_event``); must not block.
    :param run_hook: a context manager factory entered around each
        :meth:`apply` run once the lease is held (for example
        ``PrometheusEvents.track_rebalance``).
    :param store: the plan store to read and swap plans with (default: one
        on ``client`` with ``prefix`` and its default replica check).
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        options: RebalanceOptions | None = None,
        on_event: Callable[[RebalanceEvent], None] | None = None,
        run_hook: Callable[[], AbstractContextManager[Any]] | None = None,
        store: PlanStore | None = None,
    ) -> None:
        self._client = client
        self._run_hook = run_hook
        self.prefix = validate_name(prefix, "prefix")
        self.options = options or RebalanceOptions()
        self.store = store or PlanStore(client, prefix=prefix)
        self._on_event = on_event
        self._lease: RebalanceLease | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._drain_script = client.register_script(_DRAIN_STATE)
        self._claim_script = client.register_script(_CLAIM_BATCH)
        self._delete_ungrouped = client.register_script(_DELETE_UNGROUPED)
        self._list_taken = client.register_script(_LIST_TAKEN)
        self._list_recover = client.register_script(_LIST_RECOVER)
        # One pace for all moves in flight: the cap is per rebalancer.
        self._throttle = _Throttle(self.options.max_entries_per_second)

    # ------------------------------------------------------------- reading
    async def queues(self) -> list[str]:
        """Every queue that has a plan."""
        return await self.store.list_queues()

    async def _plan(self, queue: str) -> ShardPlan:
        plan = await self.store.load(queue)
        if plan is None:
            raise PlanNotFoundError(queue=queue, key=self.store.key(queue))
        return plan

    async def status(self, queue: str, topology: Topology | None = None) -> RebalanceStatus:
        """Detect: misplaced shards, imbalance and unfinished moves of ``queue``.

        :raises PlanNotFoundError: if the queue has no plan.
        """
        topology = topology or await read_topology(self._client)
        plan = await self._plan(queue)
        unfinished = [
            r for r in await Journal(self._client, self.prefix, queue).records() if not r.finished
        ]
        active, _ = reconcile(plan, unfinished)
        return RebalanceStatus(
            queue=queue,
            plan=plan,
            report=balance(plan, topology),
            unfinished=tuple(active),
            migrating=topology.migrating,
        )

    async def preview(self, queue: str, topology: Topology | None = None) -> RebalancePreview:
        """The moves ``apply`` would make now, with shard counts before and after."""
        topology = topology or await read_topology(self._client)
        plan = await self._plan(queue)
        records = await Journal(self._client, self.prefix, queue).records()
        active, _ = reconcile(plan, records)
        result = replan(plan, topology)
        return RebalancePreview(
            queue=queue,
            plan=plan,
            replan=result,
            before=balance(plan, topology).counts,
            after=balance(result.plan, topology).counts,
            unfinished=tuple(active),
        )

    async def drain_state(self, shard: Shard | str, *, delete: bool = False) -> DrainState:
        """What is left to consume in ``shard`` (a Shard or a tag).

        With ``delete=True`` the stream and list are deleted in the same
        atomic step when they are drained (``deleted`` tells).
        """
        tag = shard.tag if isinstance(shard, Shard) else shard
        keys = ShardKeys(self.prefix, tag)
        reply = await self._drain_script(
            keys=[keys.stream, keys.list, keys.consumers],
            args=["1" if delete else "0", keys.processing("")],
        )
        values = [int(v) for v in reply]
        return DrainState(
            exists=bool(values[0]),
            length=values[1],
            groups=values[2],
            undelivered=values[3],
            pending=values[4],
            list_length=values[5],
            deleted=values[6] > 0,
            processing=values[7],
        )

    # ------------------------------------------------------------- copying
    async def copy_entries(
        self, source: Shard | str, target: Shard | str, *, snapshot: bool = False
    ) -> int:
        """Move what is left to consume in shard ``source`` to shard ``target``.

        Streams: first whatever the mover consumer still has pending (an
        interrupted run), then every entry some group has not had delivered,
        then entries pending on dead consumers or idle for ``idle_timeout``.
        Entries pending on live consumers stay. Lists: from the oldest end.
        Each entry is written to ``target`` before it leaves ``source``, so
        an interruption gives duplicates, never a loss. With ``snapshot``
        only what ``source`` held when the call started is taken (the
        pre-copy, while producers still write to it). Throttled by
        ``max_entries_per_second``.

        :returns: entries written to ``target``.
        """
        src = ShardKeys(self.prefix, source.tag if isinstance(source, Shard) else source)
        dst = ShardKeys(self.prefix, target.tag if isinstance(target, Shard) else target)
        if src.tag == dst.tag:
            raise RebalanceError(message=f"cannot copy shard {src.tag} onto itself")
        throttle = self._throttle
        copied = await self._copy_stream(src.stream, dst.stream, throttle, snapshot=snapshot)
        # Reliable list consumers that died hand their processing lists back
        # first (the broker's own rule: the heartbeat expired).
        recovered = await self._list_recover(
            keys=[src.list, src.consumers], args=[src.processing(""), src.heartbeat("")]
        )
        if int(recovered):
            logger.info("Returned %d entries of dead list consumers to %s", recovered, src.list)
        copied += await self._copy_list(src.list, dst.list, throttle, snapshot=snapshot)
        return copied

    async def _copy_stream(
        self, source: str, target: str, throttle: _Throttle, *, snapshot: bool
    ) -> int:
        client = self._client
        if _text(await client.type(source)) != "stream":
            return 0
        batch = self.options.copy_batch
        until = "+"
        if snapshot:
            last = await client.xrevrange(source, count=1)
            until = _text(last[0][0]) if last else "0-0"
        # Bounded: each pass takes up to `batch` entries; producers stopped
        # writing here (settle window) or `until` caps the range.
        passes = int(await client.xlen(source)) // batch + 100
        copied = await self._flush_mover(source, target, throttle)
        for _ in range(passes):
            if await client.xinfo_groups(source):
                break
            rows: list[Any] = await client.xrange(source, min="-", max=until, count=batch) or []
            if not rows:
                break
            entries: list[tuple[Any, Any]] = [
                (entry_id, fields) for entry_id, fields in rows if fields
            ]
            await self._append(target, entries)
            copied += len(entries)
            deleted = await self._delete_ungrouped(
                keys=[source], args=[entry_id for entry_id, _ in rows]
            )
            await throttle(len(entries))
            if int(deleted) < 0:
                break  # a group appeared: claimed below, so copied twice at worst
        for _ in range(passes):
            reply = await self._claim_script(keys=[source], args=[MOVER_CONSUMER, batch, until])
            claimed: list[Any] = reply[1]
            rows = reply[0]
            if not rows:
                break
            entries = [(row[0], _pairs(row[1])) for row in rows]
            await self._append(target, entries)
            for i in range(0, len(claimed), 2):
                after = _id_key(claimed[i + 1])
                ids = [entry_id for entry_id, _ in entries if _id_key(entry_id) > after]
                if ids:
                    await client.xack(source, claimed[i], *ids)
            copied += len(entries)
            await throttle(len(entries))
        copied += await self._reclaim_dead(source, target, throttle)
        return copied

    async def _reclaim_dead(self, source: str, target: str, throttle: _Throttle) -> int:
        """Copy entries pending on dead consumers, or idle for ``idle_timeout``."""
        client = self._client
        batch = self.options.copy_batch
        dead_ms = int(self.options.consumer_timeout * 1000)
        idle_ms = int(self.options.idle_timeout * 1000)
        copied = 0
        done: set[bytes] = set()
        for group in await client.xinfo_groups(source):
            name, pending = group["name"], int(group["pending"])
            if not pending:
                continue
            for consumer in await client.xinfo_consumers(source, name):
                if (
                    _text(consumer["name"]) == MOVER_CONSUMER
                    or not int(consumer["pending"])
                    or int(consumer["idle"]) < dead_ms
                ):
                    continue
                logger.info(
                    "Consumer %s of %s/%s was not seen for %.0fs; copying its %d pending entries",
                    _text(consumer["name"]),
                    source,
                    _text(name),
                    int(consumer["idle"]) / 1000,
                    int(consumer["pending"]),
                )
                for _ in range(int(consumer["pending"]) // batch + 2):
                    rows = await client.xpending_range(
                        source, name, "-", "+", batch, consumername=consumer["name"]
                    )
                    if not rows:
                        break
                    taken: list[Any] = [row["message_id"] for row in rows]
                    await client.xclaim(source, name, MOVER_CONSUMER, 0, taken, justid=True)
                    copied += await self._flush_group(source, target, name, throttle, done)
            start: Any = "0-0"
            for _ in range(pending // batch + 2):
                result = await client.xautoclaim(
                    source, name, MOVER_CONSUMER, idle_ms, start_id=start, count=batch
                )
                copied += await self._flush_group(source, target, name, throttle, done)
                start = result[0]
                if _text(start) == "0-0":
                    break
        return copied

    async def _flush_mover(self, source: str, target: str, throttle: _Throttle) -> int:
        """Copy and ack what the mover holds pending (left by an interrupted run)."""
        copied = 0
        done: set[bytes] = set()
        for group in await self._client.xinfo_groups(source):
            copied += await self._flush_group(source, target, group["name"], throttle, done)
        return copied

    async def _flush_group(
        self, source: str, target: str, group: Any, throttle: _Throttle, done: set[bytes]
    ) -> int:
        """Copy the mover's pending entries of ``group`` (skipping ids in ``done``), then ack."""
        client = self._client
        copied = 0
        # Bounded: every pass acks what it read, so the pending list shrinks.
        for _ in range(100_000):
            rows = await client.xpending_range(
                source, group, "-", "+", self.options.copy_batch, consumername=MOVER_CONSUMER
            )
            if not rows:
                break
            ids: list[Any] = [row["message_id"] for row in rows]
            got: list[Any] = await client.xclaim(source, group, MOVER_CONSUMER, 0, ids) or []
            fresh = [(i, f) for i, f in got if f and i not in done]
            await self._append(target, fresh)
            done.update(i for i, _ in fresh)
            await client.xack(source, group, *ids)
            copied += len(fresh)
            await throttle(len(fresh))
        return copied

    async def _append(self, stream: str, entries: Sequence[tuple[Any, Any]]) -> None:
        """XADD ``entries``' fields to ``stream``, in order, in one round trip."""
        if not entries:
            return
        pipe = self._client.pipeline(transaction=False)
        for _, fields in entries:
            pipe.xadd(stream, fields)
        await pipe.execute()

    async def _copy_list(
        self, source: str, target: str, throttle: _Throttle, *, snapshot: bool
    ) -> int:
        client = self._client
        if _text(await client.type(source)) != "list":
            return 0
        batch = self.options.copy_batch
        length = int(await client.llen(source))
        copied = 0
        # Bounded: a pass moves up to `batch` entries; with `snapshot` the
        # total is capped at the length when we started.
        for _ in range(length // batch + 100):
            want = batch if not snapshot else min(batch, length - copied)
            if want <= 0:
                break
            items = await client.lrange(source, -want, -1)
            if not items:
                break
            # The right end is the oldest (consumers pop there). LPUSH of the
            # batch oldest first keeps their order, behind what the target
            # already holds.
            await client.lpush(target, *reversed(items))
            await self._list_taken(keys=[source], args=items)
            copied += len(items)
            await throttle(len(items))
        return copied

    async def _target_tag(self, queue: str, rec: MoveRecord) -> str:
        """Where a record's draining entries go: the tag that holds its index now."""
        plan = await self._plan(queue)
        if not 0 <= rec.index < len(plan.shards):
            raise RebalanceError(message=f"queue {queue!r} has no shard {rec.index}")
        tag = plan.shards[rec.index].tag
        if tag == rec.draining:
            raise RebalanceError(
                message=f"shard {rec.draining} of {queue!r} is active again; not copying it"
            )
        return tag

    # -------------------------------------------------------------- sweeping
    async def sweep(self, queues: Sequence[str] | None = None) -> int:
        """Move entries found in retired shards to the live ones (under the lease).

        The lease is taken only when some retired shard holds a key, so a
        ``watch`` that sweeps every poll does not churn it.

        :returns: entries moved.
        :raises RebalanceLockedError: another rebalancer holds the lease.
        """
        names = list(queues) if queues is not None else await self.queues()
        todo = [queue for queue in names if await self._has_stranded(queue)]
        if not todo:
            return 0
        async with RebalanceLease(
            self._client, prefix=self.prefix, ttl=self.options.lease_ttl, wait=0.0
        ) as lease:
            self._lease = lease
            try:
                total = 0
                for queue in todo:
                    total += await self._sweep_queue(
                        queue, Journal(self._client, self.prefix, queue)
                    )
                return total
            finally:
                self._lease = None

    async def _retired_tags(self, queue: str, journal: Journal) -> dict[str, int]:
        """Retired tags of ``queue`` (not in its plan) and their shard index."""
        plan = await self._plan(queue)
        live = {s.tag for s in plan.all_shards()}
        retired = await journal.retired(older_than=time.time() - self.options.retired_memory)
        for rec in await journal.records():
            if rec.finished:
                retired.setdefault(rec.draining, rec.index)
        back = [tag for tag in retired if tag in live]
        if back:
            # Someone made the tag active again: it is no longer retired.
            await journal.forget_retired(back)
        return {tag: index for tag, index in retired.items() if tag not in live}

    async def _has_stranded(self, queue: str) -> bool:
        """Whether a retired shard of ``queue`` holds entries or a stream (no lease)."""
        journal = Journal(self._client, self.prefix, queue)
        for tag in await self._retired_tags(queue, journal):
            state = await self.drain_state(tag)
            if state.exists or state.list_length or state.processing:
                return True
        return False

    async def _sweep_queue(self, queue: str, journal: Journal) -> int:
        """Retired shards of ``queue`` that received entries are emptied into live ones.

        Only a producer that did not follow the plan (an old version, or
        one that could not read the plan) still writes to a removed tag;
        with ``XADD NOMKSTREAM`` a kick never recreates a deleted stream,
        but a list push always does.
        """
        plan = await self._plan(queue)
        moved = 0
        for tag, index in (await self._retired_tags(queue, journal)).items():
            state = await self.drain_state(tag)
            if not state.exists and not state.list_length and not state.processing:
                continue
            if not state.drained:
                if not 0 <= index < len(plan.shards):
                    logger.warning("Queue %s: retired shard %s has no index %d", queue, tag, index)
                    continue
                target = plan.shards[index]
                count = await self.copy_entries(tag, target)
                moved += count
                logger.warning(
                    "Queue %s: retired shard %s received entries after it was removed; "
                    "moved %d to %s",
                    queue,
                    tag,
                    count,
                    target.tag,
                )
                self._emit(
                    RebalanceEventKind.SWEPT,
                    queue,
                    index=index,
                    old_tag=tag,
                    new_tag=target.tag,
                    draining_tag=tag,
                    done=count,
                    total=count,
                )
            state = await self.drain_state(tag, delete=True)
            if not state.deleted and not state.drained:
                logger.warning(
                    "Queue %s: retired shard %s still has %d pending on live consumers; "
                    "swept again later",
                    queue,
                    tag,
                    state.pending,
                )
        return moved

    # ------------------------------------------------------------- applying
    async def apply(self, queues: Sequence[str] | None = None) -> list[RebalanceResult]:
        """Rebalance ``queues`` (default: every queue with a plan) under the lease.

        Unfinished moves (journal, or ``draining`` shards in the plan) are
        completed first; then each queue is re-planned and its moves are
        driven, ``max_moves_at_once`` at a time. Queues are handled one
        after the other; a queue whose move aborts does not stop the others.

        :raises RebalanceLockedError: another rebalancer holds the lease.
        :raises RebalanceAbortedError: a move timed out and was reverted
            (raised after the other queues were handled).
        :raises RebalanceError: slot migrations did not settle, the lease was
            lost, or the plan kept changing under the rebalancer.
        """
        async with RebalanceLease(
            self._client,
            prefix=self.prefix,
            ttl=self.options.lease_ttl,
            wait=self.options.lock_wait,
        ) as lease:
            self._lease = lease
            hook = self._run_hook() if self._run_hook is not None else contextlib.nullcontext()
            try:
                with hook:
                    return await self._apply_all(queues)
            finally:
                self._lease = None

    async def _apply_all(self, queues: Sequence[str] | None) -> list[RebalanceResult]:
        names = list(queues) if queues is not None else await self.queues()
        results: list[RebalanceResult] = []
        first_abort: RebalanceAbortedError | None = None
        for queue in names:
            try:
                results.append(await self._apply_queue(queue))
            except RebalanceAbortedError as exc:
                logger.error("Rebalance of queue %s aborted: %s", queue, exc)
                plan = await self._plan(queue)
                results.append(RebalanceResult(queue, 0, 0, False, plan.epoch, str(exc)))
                first_abort = first_abort or exc
        if first_abort is not None:
            raise first_abort
        return results

    def _emit(
        self, kind: RebalanceEventKind, queue: str, rec: MoveRecord | None = None, **extra: Any
    ) -> None:
        if rec is not None:
            extra.setdefault("index", rec.index)
            extra.setdefault("old_tag", rec.old.tag)
            extra.setdefault("new_tag", rec.new.tag)
            extra.setdefault("draining_tag", rec.draining)
        event = RebalanceEvent(kind=kind, queue=queue, **extra)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a progress display must not break a move
                logger.exception("on_event callback failed")

    def _check_lease(self) -> None:
        if self._lease is None:
            raise RebalanceError(message="the rebalancer runs outside apply()")
        self._lease.check()

    async def _apply_queue(self, queue: str) -> RebalanceResult:
        journal = Journal(self._client, self.prefix, queue)
        plan = await self._plan(queue)
        records = await journal.records()
        active, dropped = reconcile(plan, records)
        if dropped:
            logger.warning(
                "Queue %s: forgetting %d journal entries that no longer match the plan",
                queue,
                len(dropped),
            )
            await journal.remove(dropped)
        for rec in active:
            await journal.put(rec)
            self._emit(RebalanceEventKind.RESUMED, queue, rec, message=rec.state.value)
        swept = await self._sweep_queue(queue, journal)
        resumed = len(active)
        if active:
            logger.info("Queue %s: resuming %d unfinished move(s)", queue, len(active))
            await self._drive_all(queue, journal, active, total=len(active))
        relabelled = False
        moves = 0
        # A round re-plans on the current topology; more than one round is
        # only needed when the cluster changed while moves ran.
        for _ in range(3):
            topology = await self._settled_topology()
            plan = await self._plan(queue)
            result = replan(plan, topology)
            if not result.changed:
                break
            relabelled = await self._relabel(queue, plan, result) or relabelled
            if not result.moves:
                continue
            await journal.remove([r for r in await journal.records() if r.finished])
            new_records = [
                MoveRecord(
                    index=m.index, old=m.old, new=m.new, state=MoveState.PLANNED, draining=m.old.tag
                )
                for m in result.moves
            ]
            for rec in new_records:
                await journal.put(rec)
                self._emit(RebalanceEventKind.PLANNED, queue, rec)
            moves += await self._drive_all(queue, journal, new_records, total=len(new_records))
        plan = await self._plan(queue)
        self._emit(RebalanceEventKind.QUEUE_DONE, queue, epoch=plan.epoch, done=moves, total=moves)
        return RebalanceResult(queue, moves, resumed, relabelled, plan.epoch, swept=swept)

    async def _settled_topology(self) -> Topology:
        """The live topology once no slot is migrating (bounded by move_timeout)."""
        deadline = time.monotonic() + self.options.move_timeout
        for _ in range(int(self.options.move_timeout / self.options.check_interval) + 2):
            topology = await read_topology(self._client)
            if not topology.migrating:
                return topology
            if time.monotonic() >= deadline:
                break
            logger.info("Waiting for slot migrations to finish before re-planning")
            await asyncio.sleep(self.options.check_interval)
        slots = ", ".join(str(m.slot) for m in topology.migrating_slots[:10])
        raise RebalanceError(
            message=f"slot migrations still in progress after "
            f"{self.options.move_timeout:.0f}s (slots {slots}); rebalance afterwards"
        )

    async def _relabel(self, queue: str, plan: ShardPlan, result: Replan) -> bool:
        """Store the master ids of shards that stay (a failover renamed owners)."""
        moved = {m.index for m in result.moves}
        shards = tuple(
            plan.shards[i] if i in moved else result.plan.shards[i] for i in range(len(plan.shards))
        )
        if shards == plan.shards:
            return False

        def change(current: ShardPlan) -> ShardPlan | None:
            if current.tags() != plan.tags():
                raise _Stale
            fresh = tuple(
                current.shards[i] if i in moved else shards[i] for i in range(len(shards))
            )
            if fresh == current.shards:
                return None
            return ShardPlan(queue, current.epoch + 1, fresh, current.draining)

        try:
            stored = await self._mutate(queue, change)
        except _Stale:
            return False
        self._emit(RebalanceEventKind.RELABELLED, queue, epoch=stored.epoch)
        return True

    async def _mutate(
        self, queue: str, change: Callable[[ShardPlan], ShardPlan | None]
    ) -> ShardPlan:
        """Apply ``change`` to the stored plan with compare-and-swap.

        ``change`` returns the wanted plan (its epoch is replaced by the next
        one), ``None`` when the change is already in place, or raises
        ``_Stale``. A CAS lost to a retried command or a concurrent writer
        is re-evaluated on the fresh plan.
        """
        lock = self._locks.setdefault(queue, asyncio.Lock())
        async with lock:
            for _ in range(_MUTATE_ATTEMPTS):
                self._check_lease()
                plan = await self._plan(queue)
                wanted = change(plan)
                if wanted is None:
                    return plan
                new = ShardPlan(queue, plan.epoch + 1, wanted.shards, wanted.draining)
                if await self.store.compare_and_swap(new, expected_epoch=plan.epoch):
                    return new
        raise RebalanceError(message=f"the plan of queue {queue!r} kept changing; retry later")

    async def _drive_all(
        self, queue: str, journal: Journal, records: list[MoveRecord], *, total: int
    ) -> int:
        """Drive ``records`` with at most ``max_moves_at_once`` in flight.

        Returns the number of completed moves. After the first abort no new
        move starts (planned ones are forgotten); running ones finish, then
        the abort is raised.
        """
        if not records:
            return 0
        semaphore = asyncio.Semaphore(self.options.max_moves_at_once)
        aborts: list[RebalanceAbortedError] = []
        done = 0

        async def one(rec: MoveRecord) -> None:
            nonlocal done
            async with semaphore:
                if aborts and rec.state is MoveState.PLANNED:
                    await self._abandon_precopy(queue, rec)
                    await journal.remove([rec])
                    return
                try:
                    if await self._drive(queue, journal, rec, done_total=(done, total)):
                        done += 1
                except RebalanceAbortedError as exc:
                    aborts.append(exc)

        tasks = [asyncio.create_task(one(rec)) for rec in records]
        try:
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in finished:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if aborts:
            raise aborts[0]
        return done

    async def _drive(
        self, queue: str, journal: Journal, rec: MoveRecord, *, done_total: tuple[int, int]
    ) -> bool:
        """Run one record to CLEANED; True if a move took effect in this run."""
        deadline = time.monotonic() + self.options.move_timeout
        done, total = done_total
        counted = False
        # Bounded: each pass advances the state or waits inside a bounded
        # step; a re-drain loops back at most a few times before the deadline.
        for _ in range(1000):
            if rec.state is MoveState.PLANNED:
                await self._precopy(queue, journal, rec)
                if not await self._switch(queue, journal, rec):
                    return False
            elif rec.state is MoveState.SWITCHED:
                deadline = await self._wait_drained(queue, journal, rec, deadline, done, total)
            elif rec.state is MoveState.DRAINED:
                counted = await self._finalize(queue, journal, rec) or counted
            elif rec.state is MoveState.FINALIZED:
                try:
                    await self._clean(queue, journal, rec, deadline)
                except _Dropped:
                    return False
            else:
                self._emit(RebalanceEventKind.CLEANED, queue, rec, done=done + 1, total=total)
                return counted
        raise RebalanceError(message=f"move of shard {rec.index} of {queue!r} does not progress")

    async def _switch(self, queue: str, journal: Journal, rec: MoveRecord) -> bool:
        old, new, index = rec.old, rec.new, rec.index

        def change(plan: ShardPlan) -> ShardPlan | None:
            cur = plan.shards[index]
            drain_tags = {s.tag for s in plan.draining}
            if cur.tag == new.tag and old.tag in drain_tags:
                return None
            if cur.tag != old.tag or new.tag in drain_tags:
                raise _Stale
            shards = list(plan.shards)
            shards[index] = new
            return ShardPlan(queue, plan.epoch + 1, tuple(shards), (*plan.draining, cur))

        try:
            plan = await self._mutate(queue, change)
        except _Stale:
            logger.warning(
                "Queue %s: move of shard %d no longer fits the plan; skipped", queue, index
            )
            await self._abandon_precopy(queue, rec)
            await journal.remove([rec])
            self._emit(RebalanceEventKind.SKIPPED, queue, rec)
            return False
        rec.state = MoveState.SWITCHED
        rec.switched_epoch = plan.epoch
        rec.switched_at = time.time()
        await journal.put(rec)
        logger.info(
            "Queue %s: shard %d switched %s -> %s (epoch %d)",
            queue,
            index,
            old.tag,
            new.tag,
            plan.epoch,
        )
        self._emit(RebalanceEventKind.SWITCHED, queue, rec, epoch=plan.epoch)
        return True

    async def _precopy(self, queue: str, journal: Journal, rec: MoveRecord) -> None:
        """Copy the old shard's backlog into the new tag before the switch.

        Nobody reads or writes the new tag yet, so the copies keep their
        order ahead of everything producers send after the switch. The
        journal says ``precopy`` first: a rerun then never forgets the move
        while entries may sit in the new tag.
        """
        if not rec.precopy:
            rec.precopy = True
            await journal.put(rec)
        copied = await self.copy_entries(rec.old, rec.new, snapshot=True)
        if copied:
            rec.copied += copied
            await journal.put(rec)
            self._emit(RebalanceEventKind.COPIED, queue, rec, done=copied, total=copied)

    async def _abandon_precopy(self, queue: str, rec: MoveRecord) -> None:
        """A pre-copied move that will not switch: return its copies to the live shard."""
        if not rec.precopy:
            return
        plan = await self._plan(queue)
        if rec.new.tag in {s.tag for s in plan.all_shards()}:
            return  # in the plan after all: consumers read it
        if not 0 <= rec.index < len(plan.shards):
            raise RebalanceError(
                message=f"queue {queue!r} has no shard {rec.index} to return copies to"
            )
        target = plan.shards[rec.index]
        copied = await self.copy_entries(rec.new, target)
        state = await self.drain_state(rec.new, delete=True)
        logger.warning(
            "Queue %s: move of shard %d abandoned; %d pre-copied entries returned to %s%s",
            queue,
            rec.index,
            copied,
            target.tag,
            "" if state.drained else " (some still pending)",
        )

    async def _wait_settled(self, since: float | None) -> None:
        """Sleep until ``settle`` seconds after the Unix time ``since``."""
        if since is None:
            return
        left = since + self.options.settle - time.time()
        if left > 0:
            await asyncio.sleep(min(left, self.options.settle))

    async def _wait_drained(
        self,
        queue: str,
        journal: Journal,
        rec: MoveRecord,
        deadline: float,
        done: int,
        total: int,
    ) -> float:
        """Copy and wait until ``rec.draining`` is drained; returns the deadline.

        The deadline moves on with every pass that makes progress (entries
        copied, or fewer left pending), so only a shard that is stuck times
        out, however large it is.
        """
        if rec.switched_at is None:
            # Unknown switch time (killed before the journal said): count
            # the settle window from now, which is later than the real one.
            rec.switched_at = time.time()
            await journal.put(rec)
        await self._wait_settled(rec.switched_at)
        # Bounded by the deadline (checked every pass) and a hard count.
        limit = (
            # x10: the deadline moves on while copying or acks make progress.
            10
            * int((self.options.move_timeout + self.options.settle) / self.options.check_interval)
            + 10
        )
        state: DrainState | None = None
        left: int | None = None
        for _ in range(limit):
            state = await self.drain_state(rec.draining)
            if not state.drained:
                copied = await self.copy_entries(rec.draining, await self._target_tag(queue, rec))
                state = await self.drain_state(rec.draining)
                if copied:
                    rec.copied += copied
                    await journal.put(rec)
                    self._emit(RebalanceEventKind.COPIED, queue, rec, done=copied, total=copied)
                now_left = state.undelivered + state.pending + state.list_length + state.processing
                if copied or (left is not None and now_left < left):
                    # Progress: the timeout counts time without any.
                    deadline = max(deadline, time.monotonic() + self.options.move_timeout)
                left = now_left
            self._emit(
                RebalanceEventKind.WAITING,
                queue,
                rec,
                undelivered=state.undelivered,
                pending=state.pending + state.list_length + state.processing,
                done=done,
                total=total,
            )
            if state.drained:
                rec.state = MoveState.DRAINED
                await journal.put(rec)
                self._emit(RebalanceEventKind.DRAINED, queue, rec, done=done, total=total)
                return deadline
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(self.options.check_interval)
        await self._timed_out(queue, journal, rec, state)
        return deadline

    async def _timed_out(
        self, queue: str, journal: Journal, rec: MoveRecord, state: DrainState | None
    ) -> None:
        left = (
            f"{state.undelivered} undelivered, {state.pending} pending, "
            f"{state.list_length} in the list, {state.processing} held by list consumers"
            if state is not None
            else "unknown"
        )
        timeout = self.options.move_timeout
        if rec.kind == "move" and not rec.reverted and not rec.redrain:
            await self._revert(queue, journal, rec, reason=f"timeout after {timeout:.0f}s")
            raise RebalanceAbortedError(
                queue=queue,
                shard=rec.index,
                reason=f"old shard {rec.old.tag} did not drain within {timeout:.0f}s ({left}); "
                f"the index points at {rec.old.tag} again and {rec.new.tag} is draining "
                f"(a later run removes it)",
            )
        raise RebalanceAbortedError(
            queue=queue,
            shard=rec.index,
            reason=f"shard {rec.draining} did not drain within {timeout:.0f}s ({left}); it stays "
            f"in 'draining' so consumers keep reading it; rerun the rebalancer later",
        )

    async def _revert(self, queue: str, journal: Journal, rec: MoveRecord, *, reason: str) -> None:
        old, new, index = rec.old, rec.new, rec.index

        def change(plan: ShardPlan) -> ShardPlan | None:
            cur = plan.shards[index]
            by_tag = {s.tag: s for s in plan.draining}
            if cur.tag == old.tag and new.tag in by_tag:
                return None
            if cur.tag != new.tag or old.tag not in by_tag:
                raise _Stale
            shards = list(plan.shards)
            shards[index] = by_tag[old.tag]
            draining = (*(s for s in plan.draining if s.tag != old.tag), cur)
            return ShardPlan(queue, plan.epoch + 1, tuple(shards), draining)

        try:
            plan = await self._mutate(queue, change)
        except _Stale:
            raise RebalanceError(
                message=f"cannot revert the move of shard {index} of {queue!r}: the plan changed"
            ) from None
        rec.reverted = True
        rec.draining = new.tag
        rec.state = MoveState.SWITCHED
        rec.switched_epoch = plan.epoch
        rec.switched_at = time.time()
        rec.reason = reason
        await journal.put(rec)
        logger.warning(
            "Queue %s: move of shard %d reverted to %s (%s); %s is draining",
            queue,
            index,
            old.tag,
            reason,
            new.tag,
        )
        self._emit(RebalanceEventKind.REVERTED, queue, rec, epoch=plan.epoch, message=reason)

    async def _finalize(self, queue: str, journal: Journal, rec: MoveRecord) -> bool:
        """Take the drained tag out of the plan; True if that completed a move."""
        tag = rec.draining

        def change(plan: ShardPlan) -> ShardPlan | None:
            if tag not in {s.tag for s in plan.draining}:
                return None
            return plan.drained([tag])

        plan = await self._mutate(queue, change)
        rec.state = MoveState.FINALIZED
        rec.finalized_epoch = plan.epoch
        rec.finalized_at = time.time()
        await journal.put(rec)
        forward = rec.kind == "move" and not rec.reverted and not rec.redrain
        if forward:
            await journal.count_move()
        self._emit(
            RebalanceEventKind.FINALIZED if forward else RebalanceEventKind.RETIRED,
            queue,
            rec,
            epoch=plan.epoch,
        )
        return forward

    async def _clean(self, queue: str, journal: Journal, rec: MoveRecord, deadline: float) -> None:
        if rec.finalized_at is None:
            rec.finalized_at = time.time()
            await journal.put(rec)
        # Let every consumer stop its reader of the tag first: a reader that
        # is still running when the stream vanishes would recreate it.
        await self._wait_settled(rec.finalized_at)
        plan = await self._plan(queue)
        if rec.draining in {s.tag for s in plan.shards}:
            # Never delete an active shard; someone else changed the plan.
            logger.error("Queue %s: %s is active again; not deleting it", queue, rec.draining)
            await journal.remove([rec])
            raise _Dropped
        if rec.draining in {s.tag for s in plan.draining}:
            # Put back into draining by someone (or a re-drain we were killed in).
            rec.state = MoveState.SWITCHED
            rec.redrain = True
            await journal.put(rec)
            return
        # Check and delete in one atomic step: an entry written late (by a
        # producer whose plan was very stale) is never deleted unread.
        state = await self.drain_state(rec.draining, delete=True)
        if not state.drained:
            await self._redrain(queue, journal, rec, state, deadline)
            return
        target = plan.shards[rec.index]
        await self._move_dead_letters(
            ShardKeys(self.prefix, rec.draining).dead, ShardKeys(self.prefix, target.tag).dead
        )
        await journal.retire(rec.draining, rec.index)
        rec.state = MoveState.CLEANED
        await journal.put(rec)
        logger.info("Queue %s: removed old shard %s", queue, rec.draining)

    async def _redrain(
        self, queue: str, journal: Journal, rec: MoveRecord, state: DrainState, deadline: float
    ) -> None:
        """Entries reached the tag after it was finalized: read it again."""
        shard = rec.draining_shard

        def change(plan: ShardPlan) -> ShardPlan | None:
            if shard.tag in {s.tag for s in plan.all_shards()}:
                return None
            return ShardPlan(queue, plan.epoch + 1, plan.shards, (*plan.draining, shard))

        plan = await self._mutate(queue, change)
        rec.state = MoveState.SWITCHED
        rec.redrain = True
        rec.switched_epoch = plan.epoch
        rec.switched_at = time.time()
        await journal.put(rec)
        logger.warning(
            "Queue %s: %s received entries after it was finalized (%d undelivered, "
            "%d pending); draining it again",
            queue,
            shard.tag,
            state.undelivered,
            state.pending,
        )
        self._emit(
            RebalanceEventKind.REDRAIN,
            queue,
            rec,
            epoch=plan.epoch,
            undelivered=state.undelivered,
            pending=state.pending,
        )
        if time.monotonic() >= deadline:
            await self._timed_out(queue, journal, rec, state)

    async def _move_dead_letters(self, source: str, target: str) -> None:
        """Move every entry of dead stream ``source`` to ``target``, then delete it.

        Copies in id order, deleting each copied batch from the source, so
        an interrupted run copies at most one batch twice, and even that is
        avoided by looking for the last ``moved_from_id`` in ``target``.
        """
        client = self._client
        if not await client.exists(source):
            return
        rate = self.options.max_entries_per_second
        batch = max(1, min(_DEAD_BATCH, int(rate)))
        copied_upto: tuple[int, int] | None = None
        marker = source.encode()
        for _entry_id, fields in await client.xrevrange(target, count=_DEAD_RESUME_SCAN) or []:
            if fields and fields.get(b"moved_from") == marker:
                last = fields.get(b"moved_from_id")
                copied_upto = _id_key(last) if last is not None else None
                break
        moved = 0
        # Bounded: every pass removes up to `batch` entries from the source.
        for _ in range(10_000_000):
            entries: list[Any] = await client.xrange(source, min="-", max="+", count=batch) or []
            if not entries:
                break
            ids = [entry_id for entry_id, _ in entries]
            for entry_id, fields in entries:
                if copied_upto is not None and _id_key(entry_id) <= copied_upto:
                    continue  # already copied before an interruption
                moved_fields: dict[Any, Any] = dict(fields or {})
                moved_fields[b"moved_from"] = marker
                moved_fields[b"moved_from_id"] = entry_id
                await client.xadd(target, moved_fields)
                moved += 1
            await client.xdel(source, *ids)
            await asyncio.sleep(len(entries) / rate)
        await client.delete(source)
        if moved:
            logger.info("Moved %d dead-letter entries from %s to %s", moved, source, target)

    # --------------------------------------------------------------- watching
    async def watch(
        self,
        queues: Sequence[str] | None = None,
        *,
        poll_interval: float = 5.0,
        settle_polls: int = 3,
        once: bool = False,
        max_runtime: float | None = None,
    ) -> int:
        """Watch the topology and rebalance when it has settled and is unbalanced.

        The topology counts as settled when no slot is migrating and the slot
        ownership has been the same for ``settle_polls`` consecutive polls.
        Then every queue (``queues`` or every queue with a plan) that is not
        ``ok`` is rebalanced with :meth:`apply`. Runs until cancelled, until
        ``max_runtime`` seconds have passed, or, with ``once``, after the
        first settled check (rebalancing if needed).

        While watching forever, a held lease or an aborted move is logged and
        retried at the next settled check; with ``once`` they are raised.

        Every poll also sweeps retired shards (:meth:`sweep`): entries a
        stale producer wrote to a removed tag reach a live shard within one
        ``poll_interval``, not only when ``apply`` runs next. A pass whose
        lease is held elsewhere skips the sweep.

        :returns: how many times :meth:`apply` ran.
        """
        if poll_interval <= 0 or settle_polls < 1:
            raise ConfigurationError(message="poll_interval must be > 0 and settle_polls >= 1")
        started = time.monotonic()
        last: tuple[Any, ...] | None = None
        stable = 0
        runs = 0
        while max_runtime is None or time.monotonic() - started < max_runtime:
            try:
                await self.sweep(queues)
            except RebalanceLockedError:
                logger.debug("Sweep skipped: another rebalancer holds the lease")
            except PlanNotFoundError as exc:
                logger.warning("Sweep skipped: %s", exc)
            topology = await read_topology(self._client)
            shape = tuple((m.node_id, m.slots) for m in topology.masters)
            if topology.migrating or shape != last:
                stable = 0
            else:
                stable += 1
            last = shape
            if stable >= settle_polls - 1 and not topology.migrating:
                names = list(queues) if queues is not None else await self.queues()
                todo = []
                for name in names:
                    if not (await self.status(name, topology)).ok:
                        todo.append(name)
                if todo:
                    logger.info("Topology settled; rebalancing %s", ", ".join(todo))
                    try:
                        await self.apply(todo)
                        runs += 1
                    except (RebalanceLockedError, RebalanceAbortedError) as exc:
                        if once:
                            raise
                        logger.error("Rebalance did not complete: %s; retrying later", exc)
                    stable = 0
                if once:
                    return runs
            await asyncio.sleep(poll_interval)
        return runs


class _Throttle:
    """Paces everyone who shares it to ``rate`` entries per second in total.

    Each call books ``count / rate`` seconds after the last booking (or
    now, if that is past: idle time earns no burst) and sleeps until then.
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._free_at = 0.0

    async def __call__(self, count: int) -> None:
        now = time.monotonic()
        self._free_at = max(self._free_at, now) + count / self._rate
        await asyncio.sleep(self._free_at - now)


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = _text(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


__all__ = [
    "MOVER_CONSUMER",
    "DrainState",
    "Journal",
    "MoveRecord",
    "MoveState",
    "RebalanceEvent",
    "RebalanceEventKind",
    "RebalanceLease",
    "RebalanceOptions",
    "RebalancePreview",
    "RebalanceResult",
    "RebalanceStatus",
    "Rebalancer",
    "reconcile",
]
