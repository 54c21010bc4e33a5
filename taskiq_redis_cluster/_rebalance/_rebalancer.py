"""The rebalancer: keep every queue's shards spread evenly over the masters.

After a reshard, an added master or a failover, the shards of a queue may
sit on the wrong masters (see :func:`~taskiq_redis_cluster._planning.balance`).
:class:`Rebalancer` re-plans with the fewest moves
(:func:`~taskiq_redis_cluster._planning.replan`) and moves each shard to a
new hash tag on the target master. The parts, lowest first:

* :mod:`._journal`: the per-queue journal and :func:`~._journal.reconcile`;
* :mod:`._options`: options, events, status, preview and result values;
* :mod:`._lease`: one rebalancer at a time;
* :mod:`._copy`: crash-safe copying of a shard's entries;
* :mod:`._writer`: plan changes, each confirmed by a replica;
* :mod:`._sweep`: retired tags that a stale producer wrote to;
* :mod:`._moves`: the per-move state machine;
* this module: the facade (``apply``, ``status``, ``preview``, ``sweep``,
  ``watch``).

Safety:

* one rebalancer at a time: a lease (``SET NX PX``, renewed in the
  background, released with compare-and-delete) at
  ``_keys.rebalance_lease_key``; a second one gets
  :class:`~taskiq_redis_cluster._errors.RebalanceLockedError`;
* every step is recorded in a journal hash next to the plan
  (``_keys.rebalance_journal_key``) and every step is idempotent. On a rerun
  the journal is reconciled with the stored plan (the plan is the truth:
  a plan with ``draining`` shards is an unfinished move), the stored plan is
  confirmed by a replica, and the unfinished moves are completed before
  anything new is planned;
* a plan change counts only once a replica has it; an unconfirmed one is
  repeated, never acted on (see :mod:`._writer`);
* a move that makes no progress for ``move_timeout`` is reverted and
  :class:`~taskiq_redis_cluster._errors.RebalanceAbortedError` is raised.

Delivery stays at least once. A move adds duplicates only where a copy was
interrupted (rerun), where a consumer judged dead was alive, or where
several consumer groups read one queue at different positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from redis.asyncio import RedisCluster

from .._errors import (
    InvalidOptionError,
    PlanNotFoundError,
    PlanNotReplicatedError,
    RebalanceAbortedError,
    RebalanceError,
    RebalanceLockedError,
)
from .._keys import DEFAULT_PREFIX, validate_name
from .._planning import (
    PlanStore,
    Replan,
    Shard,
    ShardPlan,
    Topology,
    balance,
    read_topology,
    replan,
)
from .._redis import RetryPolicy
from ._copy import DrainState, ShardCopier
from ._journal import Journal, MoveRecord, MoveState, reconcile
from ._lease import RebalanceLease
from ._moves import MoveDriver
from ._options import (
    EventSink,
    RebalanceEvent,
    RebalanceEventKind,
    RebalanceOptions,
    RebalancePreview,
    RebalanceResult,
    RebalanceStatus,
)
from ._sweep import Sweeper
from ._writer import PlanWriter, Stale

logger = logging.getLogger(__name__)


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
        on ``client`` with ``prefix`` and its default replica check; pass
        ``PlanStore(client, require_replica=False)`` for a cluster without
        replicas).
    :param retry: backoff between repeats of a plan change no replica
        confirmed yet (default: the package's :class:`RetryPolicy`).
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
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._run_hook = run_hook
        self.prefix = validate_name(prefix, "prefix")
        self.options = options or RebalanceOptions()
        self.store = store or PlanStore(client, prefix=prefix)
        self._emit = EventSink(on_event)
        self._lease: RebalanceLease | None = None
        self._copier = ShardCopier(client, self.prefix, self.options)
        self._writer = PlanWriter(
            self.store, check_lease=self._check_lease, emit=self._emit, retry=retry or RetryPolicy()
        )
        self._sweeper = Sweeper(
            client,
            self.prefix,
            self.options,
            writer=self._writer,
            copier=self._copier,
            emit=self._emit,
        )
        self._moves = MoveDriver(
            self.prefix, self.options, writer=self._writer, copier=self._copier, emit=self._emit
        )

    # ------------------------------------------------------------- reading
    async def queues(self) -> list[str]:
        """Every queue that has a plan."""
        return await self.store.list_queues()

    async def _plan(self, queue: str) -> ShardPlan:
        return await self._writer.load(queue)

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

        Stream figures cover the shard's stream and its priority lane
        streams. With ``delete=True`` the streams and the list are deleted
        in the same atomic step when they are drained (``deleted`` tells).
        """
        return await self._copier.drain_state(shard, delete=delete)

    async def copy_entries(
        self, source: Shard | str, target: Shard | str, *, snapshot: bool = False
    ) -> int:
        """Move what is left to consume in shard ``source`` to shard ``target``.

        See :meth:`~._copy.ShardCopier.copy_entries`; returns entries written.
        """
        return await self._copier.copy_entries(source, target, snapshot=snapshot)

    # -------------------------------------------------------------- sweeping
    async def sweep(self, queues: Sequence[str] | None = None) -> int:
        """Move entries found in retired shards to the live ones (under the lease).

        The lease is taken only when some retired shard holds a key, so a
        ``watch`` that sweeps every poll does not churn it.

        :returns: entries moved.
        :raises RebalanceLockedError: another rebalancer holds the lease.
        """
        names = list(queues) if queues is not None else await self.queues()
        todo = [queue for queue in names if await self._sweeper.has_stranded(queue)]
        if not todo:
            return 0
        async with RebalanceLease(
            self._client, prefix=self.prefix, ttl=self.options.lease_ttl, wait=0.0
        ) as lease:
            self._lease = lease
            try:
                total = 0
                for queue in todo:
                    total += await self._sweeper.sweep_queue(
                        queue, Journal(self._client, self.prefix, queue)
                    )
                return total
            finally:
                self._lease = None

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

    def _check_lease(self) -> None:
        if self._lease is None:
            raise RebalanceError(message="the rebalancer runs outside apply()")
        self._lease.check()

    async def _apply_queue(self, queue: str) -> RebalanceResult:
        await self._writer.begin(queue)
        try:
            return await self._apply_pinned(queue)
        finally:
            self._writer.end(queue)

    async def _apply_pinned(self, queue: str) -> RebalanceResult:
        journal = Journal(self._client, self.prefix, queue)
        records = await journal.records()
        plan = await self._plan(queue)
        if plan.draining or any(not r.finished for r in records):
            # An earlier run may have stopped on a plan change no replica
            # confirmed: nothing is drained on its word until one has it.
            plan = await self._writer.confirm(queue)
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
        swept = await self._sweeper.sweep_queue(queue, journal)
        resumed = len(active)
        if active:
            logger.info("Queue %s: resuming %d unfinished move(s)", queue, len(active))
            await self._moves.drive_all(queue, journal, active, total=len(active))
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
            moves += await self._moves.drive_all(
                queue, journal, new_records, total=len(new_records)
            )
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
                raise Stale
            fresh = tuple(
                current.shards[i] if i in moved else shards[i] for i in range(len(shards))
            )
            if fresh == current.shards:
                return None
            return ShardPlan(queue, current.epoch + 1, fresh, current.draining)

        try:
            stored = await self._writer.mutate(queue, change)
        except Stale:
            return False
        self._emit(RebalanceEventKind.RELABELLED, queue, epoch=stored.epoch)
        return True

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

        While watching forever, a held lease, an aborted move or a plan
        change no replica confirmed is logged and retried at the next
        settled check (the same instance remembers the unconfirmed epoch, see
        :mod:`._writer`); with ``once`` they are raised.

        Every poll also sweeps retired shards (:meth:`sweep`): entries a
        stale producer wrote to a removed tag reach a live shard within one
        ``poll_interval``, not only when ``apply`` runs next. A pass whose
        lease is held elsewhere skips the sweep.

        :returns: how many times :meth:`apply` ran.
        """
        if not poll_interval > 0:
            raise InvalidOptionError(
                option="poll_interval", reason=f"must be > 0, got {poll_interval!r}"
            )
        if settle_polls < 1:
            raise InvalidOptionError(
                option="settle_polls", reason=f"must be >= 1, got {settle_polls!r}"
            )
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
                    except (
                        RebalanceLockedError,
                        RebalanceAbortedError,
                        PlanNotReplicatedError,
                    ) as exc:
                        if once:
                            raise
                        logger.error("Rebalance did not complete: %s; retrying later", exc)
                    stable = 0
                if once:
                    return runs
            await asyncio.sleep(poll_interval)
        return runs


__all__ = ["Rebalancer"]
