"""The rebalancer's values: options, progress events, status, preview, result."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import InvalidOptionError
from .._planning import BalanceReport, Move, Replan, ShardPlan
from ._journal import MoveRecord

logger = logging.getLogger(__name__)


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
    :param max_entries_per_second: cap on entries (tasks, dead letters and
        dedup markers written) copied per second.
    :param copy_batch: entries (or dedup markers) copied per round trip.
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
            value = getattr(self, name)
            if not value > 0:  # also refuses NaN
                raise InvalidOptionError(option=name, reason=f"must be > 0, got {value!r}")
        for name in ("settle_margin", "lock_wait"):
            value = getattr(self, name)
            if not value >= 0:
                raise InvalidOptionError(option=name, reason=f"must be >= 0, got {value!r}")
        for name in ("max_moves_at_once", "copy_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(
                    option=name, reason=f"must be an integer >= 1, got {value!r}"
                )
        if self.lease_ttl < 1.0:
            raise InvalidOptionError(
                option="lease_ttl", reason=f"must be >= 1 second, got {self.lease_ttl!r}"
            )
        if self.settle_window is not None and not self.settle_window >= self.plan_poll_interval:
            # Shorter than one poll interval, a producer that has not polled
            # yet still writes to the old tag after the window has passed.
            raise InvalidOptionError(
                option="settle_window",
                reason=f"{self.settle_window}s must be at least "
                f"plan_poll_interval ({self.plan_poll_interval}s)",
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
    #: a plan change is in force on its master but no replica confirmed it
    #: yet; the rebalancer repeats it (with backoff) before acting on it
    UNCONFIRMED = "unconfirmed"
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


class EventSink:
    """Builds :class:`RebalanceEvent` values and hands them to ``on_event``.

    A failing callback is logged, never raised: a progress display must not
    break a move.
    """

    def __init__(self, on_event: Callable[[RebalanceEvent], None] | None) -> None:
        self._on_event = on_event

    def __call__(
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
            except Exception:
                logger.exception("on_event callback failed")


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


__all__ = [
    "EventSink",
    "RebalanceEvent",
    "RebalanceEventKind",
    "RebalanceOptions",
    "RebalancePreview",
    "RebalanceResult",
    "RebalanceStatus",
]
