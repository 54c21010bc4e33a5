"""The rebalancer's journal: one hash per queue, next to its plan record.

Every step of a move is recorded here before (or right after) it takes
effect, and every step is idempotent, so a killed rebalancer resumes where it
stopped. The stored plan is the truth: :func:`reconcile` re-derives each
unfinished record's state from it (a kill can land between a plan change and
its journal entry), and a plan with ``draining`` shards but no record is an
unfinished move too.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import RedisCluster

from .._keys import rebalance_journal_key, validate_name
from .._planning import Shard, ShardPlan

logger = logging.getLogger(__name__)

#: Journal hash field counting completed moves (for metrics).
MOVES_TOTAL_FIELD = "moves_total"
_RECORD_PREFIX = "move:"
_RETIRED_PREFIX = "retired:"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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


__all__ = ["MOVES_TOTAL_FIELD", "Journal", "MoveRecord", "MoveState", "reconcile"]
