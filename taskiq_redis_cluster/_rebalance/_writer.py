"""Changes of the stored plan, made by the rebalancer under its lease.

Every change is a compare-and-swap of the stored plan
(:meth:`~taskiq_redis_cluster._planning.PlanStore.compare_and_swap`), and it
counts only once a replica of the plan key's master has it:

* A swap that raises :class:`~taskiq_redis_cluster._errors.PlanNotReplicatedError`
  is in force on the master but may be lost at a failover. The writer repeats
  the *same* swap, with the package's backoff (:class:`RetryPolicy`), until a
  replica confirms it (a repeat of an applied swap is recognised and returns
  True) or the plan moved on (False: re-read, decide again). Until then the
  caller does not act on it: no move counts as switched, nothing is drained,
  finalized or deleted. When the attempts run out the error is raised; a
  rerun confirms the stored plan first (:meth:`PlanWriter.confirm`).
* After any unconfirmed write of epoch N, the next different plan gets an
  epoch above N, not the stored epoch + 1. Followers compare epochs only: one
  that read N before a failover lost it must never meet another plan that is
  also numbered N (it would keep the lost one). The floor lives in this
  process; a restarted rebalancer starts from the stored epoch.
* Every swap names the generation of the record it read, and a run is pinned
  to the generation it began with: a plan deleted and created again is never
  overwritten by a rebalancer that read the old one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .._errors import PlanNotFoundError, PlanNotReplicatedError, RebalanceError
from .._planning import PlanStore, ShardPlan
from .._redis import RetryPolicy
from ._options import EventSink, RebalanceEventKind

logger = logging.getLogger(__name__)

#: Attempts of one plan change when the epoch moves under us.
_MUTATE_ATTEMPTS = 5

#: Decides a plan change: the wanted plan (its epoch is replaced), ``None``
#: when the change is already in place, or raises :class:`Stale`.
Change = Callable[[ShardPlan], "ShardPlan | None"]


class Stale(Exception):
    """A plan change no longer fits the stored plan."""


class PlanWriter:
    """Reads the stored plan of a queue and changes it, one change at a time.

    :param store: where plans live (its ``require_replica`` decides whether a
        change must be confirmed by a replica).
    :param check_lease: raises when the rebalance lease is no longer held;
        called before every write.
    :param emit: progress events (``unconfirmed``).
    :param retry: backoff between repeats of an unconfirmed swap.
    """

    def __init__(
        self,
        store: PlanStore,
        *,
        check_lease: Callable[[], None],
        emit: EventSink,
        retry: RetryPolicy,
    ) -> None:
        self.store = store
        self._check_lease = check_lease
        self._emit = emit
        self._retry = retry
        self._locks: dict[str, asyncio.Lock] = {}
        #: Highest epoch written per queue that a replica did not confirm at once.
        self._floors: dict[str, int] = {}
        #: Generation each queue's run began with.
        self._generations: dict[str, str] = {}

    async def load(self, queue: str) -> ShardPlan:
        """The stored plan of ``queue``.

        :raises PlanNotFoundError: if the queue has no plan.
        """
        plan = await self.store.load(queue)
        if plan is None:
            raise PlanNotFoundError(queue=queue, key=self.store.key(queue))
        return plan

    async def begin(self, queue: str) -> ShardPlan:
        """Pin ``queue`` to the generation stored now; returns its plan."""
        self._generations.pop(queue, None)
        plan, generation = await self._read(queue)
        self._generations[queue] = generation
        return plan

    def end(self, queue: str) -> None:
        """Forget the pin of :meth:`begin`."""
        self._generations.pop(queue, None)

    def next_epoch(self, queue: str, plan: ShardPlan) -> int:
        """The epoch of the next change of ``queue`` whose stored plan is ``plan``."""
        return max(plan.epoch, self._floors.get(queue, 0)) + 1

    async def _read(self, queue: str) -> tuple[ShardPlan, str]:
        record = await self.store.load_record(queue)
        if record is None:
            raise PlanNotFoundError(queue=queue, key=self.store.key(queue))
        pinned = self._generations.get(queue)
        if pinned is not None and record.generation != pinned:
            raise RebalanceError(
                message=f"the plan of queue {queue!r} was deleted and created again while "
                "the rebalancer ran (its journal refers to the old plan); rerun the rebalancer"
            )
        return record.plan, record.generation

    async def mutate(self, queue: str, change: Change) -> ShardPlan:
        """Apply ``change`` to the stored plan; returns the plan in force, confirmed.

        A swap lost to a concurrent writer (or a retried command) is decided
        again on the fresh plan.

        :raises Stale: from ``change``.
        :raises PlanNotReplicatedError: no replica confirmed the change after
            every repeat; it is in force on the master.
        :raises RebalanceError: the plan kept changing, was created again, or
            the lease was lost.
        """
        lock = self._locks.setdefault(queue, asyncio.Lock())
        async with lock:
            for _ in range(_MUTATE_ATTEMPTS):
                self._check_lease()
                plan, generation = await self._read(queue)
                wanted = change(plan)
                if wanted is None:
                    return plan
                new = ShardPlan(queue, self.next_epoch(queue, plan), wanted.shards, wanted.draining)
                if await self._swap(new, plan.epoch, generation):
                    return new
        raise RebalanceError(message=f"the plan of queue {queue!r} kept changing; retry later")

    async def confirm(self, queue: str) -> ShardPlan:
        """Wait until a replica has the stored plan of ``queue``; returns it.

        A run that resumes unfinished moves calls this first: the stored plan
        may be a change an earlier run wrote but could not get confirmed, and
        nothing may be drained on its word until a replica has it. The swap
        that stored it is repeated, which the store recognises as applied.
        """
        if not self.store.require_replica:
            return await self.load(queue)
        lock = self._locks.setdefault(queue, asyncio.Lock())
        async with lock:
            seen: tuple[int, str] | None = None
            for _ in range(_MUTATE_ATTEMPTS):
                self._check_lease()
                plan, generation = await self._read(queue)
                if (plan.epoch, generation) == seen:
                    # Unchanged, yet not recognised: the stored text differs
                    # from ours (written by another release). Nothing to repeat.
                    logger.warning(
                        "Queue %s: cannot confirm plan epoch %d by repeating it; going on",
                        queue,
                        plan.epoch,
                    )
                    return plan
                seen = (plan.epoch, generation)
                if await self._swap(plan, plan.epoch - 1, generation):
                    return plan
        raise RebalanceError(message=f"the plan of queue {queue!r} kept changing; retry later")

    async def _swap(self, new: ShardPlan, expected_epoch: int, generation: str) -> bool:
        """One compare-and-swap, repeated while no replica confirms it."""
        policy = self._retry
        for attempt in range(1, policy.attempts + 1):
            try:
                return await self.store.compare_and_swap(
                    new, expected_epoch=expected_epoch, expected_generation=generation
                )
            except PlanNotReplicatedError as exc:
                self._floors[new.queue] = max(self._floors.get(new.queue, 0), new.epoch)
                if attempt == policy.attempts:
                    logger.error(
                        "Queue %s: plan epoch %d is in force on its master, but no replica "
                        "confirmed it after %d attempts; stopping before acting on it",
                        new.queue,
                        new.epoch,
                        attempt,
                    )
                    raise
                delay = policy.delay(attempt)
                logger.warning(
                    "Queue %s: plan epoch %d is not confirmed by a replica yet (%d attached); "
                    "repeating the change in %.2fs",
                    new.queue,
                    new.epoch,
                    exc.replicas,
                    delay,
                )
                self._emit(
                    RebalanceEventKind.UNCONFIRMED,
                    new.queue,
                    epoch=new.epoch,
                    done=attempt,
                    total=policy.attempts,
                    message=f"{exc.replicas} replica(s) attached",
                )
                await policy.sleep(delay)
                self._check_lease()
        raise AssertionError("unreachable: the last attempt returns or raises")


__all__ = ["Change", "PlanWriter", "Stale"]
