"""The slot planner: which hash tag, slot and master each shard of a queue uses.

Pure functions over immutable values: no I/O, no clock, no randomness, so
the same topology and spec always give the same plan, in every process.

A queue of ``N`` shards is spread over the masters that serve slots. Each
master gets a quota (equal shares differing by at most one, or shares
proportional to weights by largest-remainder apportionment); shard ``i``
assigned to master ``M`` gets the tag ``shard_tag(queue, i, salt)`` with the
smallest ``salt`` whose slot ``M`` serves, preferring a slot that no other
shard of the queue uses yet.

:func:`replan` is sticky: after the cluster changed it moves as few shards
as possible. A moved shard gets a new tag; its old shard is kept in
``draining`` so consumers can empty it (see the rebalancer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from .._errors import (
    CorruptPlanError,
    InvalidOptionError,
    InvalidShardCountError,
    NoMastersError,
    PlanVersionError,
    TopologyError,
)
from .._keys import ShardKeys, shard_tag, shard_tag_slots, tag_slot, validate_name
from ._topology import SLOT_COUNT, Topology

#: Version of the plan record layout written by this release.
PLAN_FORMAT_VERSION = 1

#: Most shards a queue may have (one per slot at most is not required, but
#: more shards than slots is never useful).
MAX_SHARDS = SLOT_COUNT

#: Bound on salts tried for one shard. A master serving ``s`` slots needs
#: about ``16384 / s`` tries on average; this cap is reached with
#: probability below 1e-5 even for a master with a single slot.
MAX_SALT_TRIES = 200_000


@dataclass(frozen=True)
class QueueSpec:
    """What a queue should look like: its name, shard count and optional weights.

    :param name: queue name; no braces (they would break the hash tag).
    :param shards: number of shards, 1..16384.
    :param weights: optional ``{master node id: weight > 0}``; masters not
        listed weigh 1.0. Without weights every master gets an equal share.
    :raises InvalidNameError: for an unusable name.
    :raises InvalidShardCountError: for a shard count outside 1..16384.
    :raises ValueError: for a weight that is not a finite number > 0.
    """

    name: str
    shards: int
    weights: Mapping[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        validate_name(self.name, "queue")
        if (
            isinstance(self.shards, bool)
            or not isinstance(self.shards, int)
            or not 1 <= self.shards <= MAX_SHARDS
        ):
            raise InvalidShardCountError(queue=self.name, shards=self.shards)
        if self.weights is not None:
            object.__setattr__(self, "weights", _check_weights(self.weights))


def _check_weights(weights: Mapping[str, float]) -> Mapping[str, float]:
    checked: dict[str, float] = {}
    for node_id, weight in weights.items():
        if not isinstance(node_id, str) or not node_id:
            raise InvalidOptionError(
                option="weights", reason=f"keys must be master node ids, got {node_id!r}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidOptionError(
                option="weights", reason=f"weight of {node_id} must be a number, got {weight!r}"
            )
        if not math.isfinite(weight) or weight <= 0:
            raise InvalidOptionError(
                option="weights",
                reason=f"weight of {node_id} must be finite and > 0, got {weight!r}",
            )
        checked[node_id] = float(weight)
    return MappingProxyType(checked)


@dataclass(frozen=True)
class Shard:
    """One shard: its index in the queue, hash tag, slot and planned master id."""

    index: int
    tag: str
    slot: int
    master: str

    def keys(self, prefix: str) -> ShardKeys:
        """The shard's Redis keys under ``prefix``."""
        return ShardKeys(prefix, self.tag)

    @property
    def salt(self) -> int:
        """The salt part of the tag (``queue/index~salt``)."""
        return _salt_of(self.tag)


def _salt_of(tag: str) -> int:
    _, sep, salt = tag.rpartition("~")
    if not sep or not salt.isdigit():
        raise ValueError(f"tag {tag!r} has no salt")
    return int(salt)


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one queue at one epoch.

    Producers send to ``shards``; consumers read ``shards`` and
    ``draining`` (old shards of moves that may still hold messages). The
    epoch grows by one with every change, so a cheap epoch read tells a
    process whether its cached plan is current.
    """

    queue: str
    epoch: int
    shards: tuple[Shard, ...]
    draining: tuple[Shard, ...] = ()

    def shard(self, index: int) -> Shard:
        """Shard number ``index``."""
        shard = self.shards[index]
        if shard.index != index:  # pragma: no cover - guarded by from_record
            raise IndexError(index)
        return shard

    def tags(self) -> tuple[str, ...]:
        """Tags of the active shards, in index order."""
        return tuple(s.tag for s in self.shards)

    def all_shards(self) -> tuple[Shard, ...]:
        """Active shards followed by draining ones (what consumers read)."""
        return self.shards + self.draining

    def drained(self, tags: Iterable[str]) -> ShardPlan:
        """A plan at the next epoch without the draining shards in ``tags``.

        Returns ``self`` when none of ``tags`` is draining.
        """
        done = set(tags)
        keep = tuple(s for s in self.draining if s.tag not in done)
        if len(keep) == len(self.draining):
            return self
        return ShardPlan(self.queue, self.epoch + 1, self.shards, keep)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_record` reads it back."""
        return {
            "format": PLAN_FORMAT_VERSION,
            "queue": self.queue,
            "epoch": self.epoch,
            "shards": [_shard_record(s) for s in self.shards],
            "draining": [_shard_record(s) for s in self.draining],
        }

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_record`."""
        return json.dumps(self.to_record(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, *, key: str = "") -> ShardPlan:
        """Parse JSON text written by :meth:`to_json`.

        :raises CorruptPlanError: if the text is not a JSON object.
        """
        try:
            record = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptPlanError(key=key, reason=f"invalid JSON: {exc}") from None
        return cls.from_record(record, key=key)

    @classmethod
    def from_record(cls, record: Any, *, key: str = "") -> ShardPlan:
        """Rebuild a plan from :meth:`to_record` output, checking everything.

        :param key: the Redis key the record came from (for error messages).
        :raises PlanVersionError: if the record has a newer format version.
        :raises CorruptPlanError: if the record is malformed, or a shard's
            slot does not match its tag.
        """
        if not isinstance(record, Mapping):
            raise CorruptPlanError(key=key, reason="the record is not an object")
        fmt = record.get("format")
        if isinstance(fmt, bool) or not isinstance(fmt, int):
            raise CorruptPlanError(key=key, reason=f"bad format version {fmt!r}")
        if fmt > PLAN_FORMAT_VERSION:
            raise PlanVersionError(key=key, found=fmt, supported=PLAN_FORMAT_VERSION)
        if fmt < 1:
            raise CorruptPlanError(key=key, reason=f"bad format version {fmt!r}")
        queue = record.get("queue")
        epoch = record.get("epoch")
        if not isinstance(queue, str) or not queue or "{" in queue or "}" in queue:
            raise CorruptPlanError(key=key, reason=f"bad queue name {queue!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise CorruptPlanError(key=key, reason=f"bad epoch {epoch!r}")
        shards = _shards_from_record(record.get("shards"), queue, key, "shards")
        if not 1 <= len(shards) <= MAX_SHARDS:
            raise CorruptPlanError(key=key, reason=f"{len(shards)} shards")
        if [s.index for s in shards] != list(range(len(shards))):
            raise CorruptPlanError(key=key, reason="shard indexes are not 0..n-1 in order")
        draining = _shards_from_record(record.get("draining", []), queue, key, "draining")
        tags = [s.tag for s in shards + draining]
        if len(set(tags)) != len(tags):
            raise CorruptPlanError(key=key, reason="a tag appears twice")
        return cls(queue=queue, epoch=epoch, shards=shards, draining=draining)


def _shard_record(shard: Shard) -> dict[str, Any]:
    return {"index": shard.index, "tag": shard.tag, "slot": shard.slot, "master": shard.master}


def _shards_from_record(value: Any, queue: str, key: str, what: str) -> tuple[Shard, ...]:
    if not isinstance(value, list):
        raise CorruptPlanError(key=key, reason=f"{what!r} is not a list")
    shards: list[Shard] = []
    for item in value:
        if not isinstance(item, Mapping):
            raise CorruptPlanError(key=key, reason=f"an entry of {what!r} is not an object")
        index, tag, slot, master = (item.get(k) for k in ("index", "tag", "slot", "master"))
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise CorruptPlanError(key=key, reason=f"bad shard index {index!r} in {what!r}")
        if not isinstance(tag, str) or not isinstance(master, str):
            raise CorruptPlanError(key=key, reason=f"bad tag or master of shard {index}")
        if not tag.startswith(f"{queue}/{index}~"):
            raise CorruptPlanError(key=key, reason=f"tag {tag!r} does not belong to shard {index}")
        try:
            _salt_of(tag)
        except ValueError:
            raise CorruptPlanError(key=key, reason=f"tag {tag!r} has no salt") from None
        if slot != tag_slot(tag):
            # A hand-edited or truncated record: trusting it would send
            # keys to a slot the plan does not describe.
            raise CorruptPlanError(key=key, reason=f"slot {slot!r} does not match tag {tag!r}")
        shards.append(Shard(index=index, tag=tag, slot=slot, master=master))
    return tuple(shards)


@dataclass(frozen=True)
class Move:
    """Shard ``index`` moves from ``old`` (now draining) to ``new``."""

    index: int
    old: Shard
    new: Shard


@dataclass(frozen=True)
class Replan:
    """Result of :func:`replan`: the new plan and the moves that lead to it.

    :ivar relabelled: nothing moved, but some live owners changed node id
        (a failover), so ``plan`` is the old plan with fresh master ids at
        the next epoch.
    """

    plan: ShardPlan
    moves: tuple[Move, ...]
    relabelled: bool = False

    @property
    def changed(self) -> bool:
        """Whether ``plan`` is a new epoch that should be stored."""
        return bool(self.moves) or self.relabelled


@dataclass(frozen=True)
class BalanceReport:
    """How a plan sits on the live topology.

    :ivar counts: shards per slot-serving master (live owner), zero included.
    :ivar imbalance: max / mean shards per slot-serving master (1.0 is perfect).
    :ivar misplaced: indexes of shards whose live owner is not the planned master.
    :ivar orphaned: indexes of shards whose slot no master serves.
    :ivar spread: max - min of ``counts``.
    """

    counts: Mapping[str, int]
    imbalance: float
    misplaced: tuple[int, ...]
    orphaned: tuple[int, ...]
    spread: int

    @property
    def balanced(self) -> bool:
        """No shard misplaced or orphaned, and per-master counts differ by at most one."""
        return not self.misplaced and not self.orphaned and self.spread <= 1


# --------------------------------------------------------------------------
# Quotas
# --------------------------------------------------------------------------


def _eligible(topology: Topology) -> list[str]:
    ids = [m.node_id for m in topology.masters if m.slots]
    if not ids:
        raise NoMastersError()
    return ids


def quotas(
    masters: Sequence[str],
    total: int,
    weights: Mapping[str, float] | None = None,
    current: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Shards per master: each quota is the floor or ceiling of its exact share.

    The exact share of master ``m`` is ``total * w(m) / sum(w)`` (all
    weights 1 when ``weights`` is None, 1.0 for masters not listed). The
    units left after flooring go, in order, to masters that currently hold
    more than their floor (so fewer shards move), then to larger fractional
    parts (largest remainder), then by node id.
    """
    current = current or {}
    if weights is None:
        exact = {m: Fraction(total, len(masters)) for m in masters}
    else:
        w = {m: Fraction(weights.get(m, 1.0)) for m in masters}
        wsum = sum(w.values())
        exact = {m: total * w[m] / wsum for m in masters}
    quota = {m: math.floor(exact[m]) for m in masters}
    extra = total - sum(quota.values())
    candidates = sorted(
        (m for m in masters if exact[m] != quota[m]),
        key=lambda m: (current.get(m, 0) <= quota[m], -(exact[m] - quota[m]), m),
    )
    for m in candidates[:extra]:
        quota[m] += 1
    return quota


# --------------------------------------------------------------------------
# Tag search
# --------------------------------------------------------------------------


class _TagFinder:
    """Finds salts whose slot a given master serves, preferring unused slots."""

    def __init__(self, topology: Topology, queue: str, used: Iterable[int]) -> None:
        self._owners = topology.slot_owners
        self._queue = queue
        self._used = set(used)
        self._slot_count = {m.node_id: m.slot_count for m in topology.masters}
        self._used_on: dict[str, int] = {}
        for slot in self._used:
            owner = self._owners[slot]
            if owner is not None:
                self._used_on[owner] = self._used_on.get(owner, 0) + 1

    def find(self, index: int, master: str, start_salt: int) -> Shard:
        owners = self._owners
        queue = self._queue
        # A distinct slot is only worth looking for while the master has one.
        want_free = self._used_on.get(master, 0) < self._slot_count[master]
        fallback: tuple[int, int] | None = None
        for salt, slot in shard_tag_slots(queue, index, start_salt, MAX_SALT_TRIES):
            if owners[slot] != master:
                continue
            if not want_free or slot not in self._used:
                return self._take(index, shard_tag(queue, index, salt), slot, master)
            if fallback is None:
                fallback = (salt, slot)
        if fallback is not None:
            return self._take(index, shard_tag(queue, index, fallback[0]), fallback[1], master)
        raise TopologyError(
            message=f"no tag for shard {index} of queue {queue!r} lands on master {master} "
            f"within {MAX_SALT_TRIES} tries"
        )

    def _take(self, index: int, tag: str, slot: int, master: str) -> Shard:
        if slot not in self._used:
            self._used.add(slot)
            self._used_on[master] = self._used_on.get(master, 0) + 1
        return Shard(index=index, tag=tag, slot=slot, master=master)


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------


def plan_queue(topology: Topology, spec: QueueSpec, *, epoch: int = 1) -> ShardPlan:
    """A fresh plan for ``spec`` on ``topology``.

    Masters are taken in node-id order and shards are dealt round-robin over
    the masters that still have quota left, so neighbouring shard indexes
    land on different masters.

    :raises NoMastersError: if no master serves a slot.
    :raises TopologyError: if no tag can be found for a master (practically
        impossible; see ``MAX_SALT_TRIES``).
    """
    masters = _eligible(topology)
    quota = quotas(masters, spec.shards, spec.weights)
    finder = _TagFinder(topology, spec.name, ())
    left = dict(quota)
    shards: list[Shard] = []
    cursor = 0
    for index in range(spec.shards):
        # Round-robin that skips masters whose quota is used up; the loop
        # is bounded because sum(left) == shards remaining.
        while left[masters[cursor % len(masters)]] == 0:
            cursor += 1
        master = masters[cursor % len(masters)]
        cursor += 1
        left[master] -= 1
        shards.append(finder.find(index, master, 0))
    return ShardPlan(queue=spec.name, epoch=epoch, shards=tuple(shards))


def replan(
    old: ShardPlan, topology: Topology, *, weights: Mapping[str, float] | None = None
) -> Replan:
    """Re-plan ``old`` on a changed topology, moving as few shards as possible.

    A shard's current owner is whoever serves its slot now (not the planned
    master id). Quotas are recomputed over the slot-serving masters; only
    the excess shards of over-quota masters and the shards whose slot no
    master serves move, to under-quota masters. A moved shard gets a fresh
    tag (salt above the old one) whose slot its new master serves, and the
    old shard is appended to ``draining``.

    When nothing moves and every planned master id is still the live owner,
    ``old`` itself is returned (same epoch). When nothing moves but some
    owners changed id (a failover), the plan is relabelled at the next
    epoch, still without moves.

    :raises NoMastersError: if no master serves a slot.
    """
    masters = _eligible(topology)
    owners = topology.slot_owners
    eligible = set(masters)
    held: dict[str, list[Shard]] = {m: [] for m in masters}
    homeless: list[Shard] = []
    for shard in old.shards:
        owner = owners[shard.slot]
        if owner is None or owner not in eligible:
            homeless.append(shard)
        else:
            held[owner].append(shard)
    counts = {m: len(held[m]) for m in masters}
    checked = _check_weights(weights) if weights is not None else None
    quota = quotas(masters, len(old.shards), checked, counts)

    staying: dict[int, Shard] = {}
    moving: list[Shard] = list(homeless)
    for m in masters:
        # Keep the lowest indexes: stable and easy to reason about.
        mine = sorted(held[m], key=lambda s: s.index)
        for shard in mine[: quota[m]]:
            staying[shard.index] = Shard(shard.index, shard.tag, shard.slot, m)
        moving.extend(mine[quota[m] :])

    if not moving:
        new_shards = tuple(staying[i] for i in range(len(old.shards)))
        if new_shards == old.shards:
            return Replan(plan=old, moves=())
        relabelled = ShardPlan(old.queue, old.epoch + 1, new_shards, old.draining)
        return Replan(plan=relabelled, moves=(), relabelled=True)

    deficit = {m: quota[m] - min(counts[m], quota[m]) for m in masters}
    used = [s.slot for s in staying.values()] + [s.slot for s in old.draining]
    finder = _TagFinder(topology, old.queue, used)
    moves: list[Move] = []
    for shard in sorted(moving, key=lambda s: s.index):
        # The master missing the most shards first; ties by node id.
        target = min((m for m in masters if deficit[m] > 0), key=lambda m: (-deficit[m], m))
        deficit[target] -= 1
        new = finder.find(shard.index, target, shard.salt + 1)
        staying[shard.index] = new
        moves.append(Move(index=shard.index, old=shard, new=new))
    plan = ShardPlan(
        queue=old.queue,
        epoch=old.epoch + 1,
        shards=tuple(staying[i] for i in range(len(old.shards))),
        draining=old.draining + tuple(m.old for m in moves),
    )
    return Replan(plan=plan, moves=tuple(moves))


def balance(plan: ShardPlan, topology: Topology) -> BalanceReport:
    """How ``plan``'s active shards are spread over the live masters.

    :raises NoMastersError: if no master serves a slot.
    """
    masters = _eligible(topology)
    owners = topology.slot_owners
    counts = dict.fromkeys(masters, 0)
    misplaced: list[int] = []
    orphaned: list[int] = []
    for shard in plan.shards:
        owner = owners[shard.slot]
        if owner is None:
            orphaned.append(shard.index)
        else:
            counts[owner] += 1
        if owner != shard.master:
            misplaced.append(shard.index)
    mean = len(plan.shards) / len(masters)
    top = max(counts.values())
    return BalanceReport(
        counts=MappingProxyType(counts),
        imbalance=top / mean,
        misplaced=tuple(misplaced),
        orphaned=tuple(orphaned),
        spread=top - min(counts.values()),
    )
