"""The per-move state machine: plan, pre-copy, switch, settle, copy, finalize, clean.

:class:`MoveDriver` runs each journal record to ``cleaned``. The
rebalancer copies the waiting entries itself, so a move takes time in
proportion to the shard's size and does not wait for workers to empty the
old shard:

1. **planned**: the move is written to the journal.
2. **pre-copy** (still ``planned``, ``precopy`` set): the old shard's
   backlog up to the moment the copy starts is copied to the new tag, which
   nobody reads or writes yet, in order; so are its dedup markers.
3. **switch** (new epoch): the shard's index gets its new tag; the old shard
   goes into ``draining``. Producers follow within one
   ``plan_poll_interval``; consumers start a reader for the new tag and keep
   reading the old one until it is finalized.
4. **drained**: after the settle window (``settle``, at least the brokers'
   ``plan_poll_interval``: a producer with a stale plan may still write to
   the old tag until then), whatever is left on the old shard is copied
   (each priority lane's entries to the same lane of the new tag),
   entries pending on dead consumers are reclaimed and copied, and only
   entries pending on live consumers are waited for. Dedup markers are
   copied again right after the switch (keys kicked since the pre-copy) and
   after the settle window (keys a stale producer kicked meanwhile).
5. **finalized** (new epoch): the old shard leaves ``draining``; consumers
   stop its reader within about one poll interval.
6. **cleaned**: after the settle window, one Lua script checks the old
   streams (the shard's stream and its priority lane streams) and list once
   more and deletes them only if still drained (if
   something arrived, the old shard goes back into ``draining`` and step 4
   repeats). Then its dedup markers are copied a last time and deleted:
   with its streams gone no stream kick can set one there any more (the
   kick script refuses a shard whose stream is missing; what a list push
   recreates is the sweep's, see ``_sweep``). Dead letters move to
   the dead-letter stream of the shard that now holds the index; the tag is
   remembered as *retired*.

Finalizing *before* deleting is deliberate: a draining reader that still ran
when its stream vanished would get ``NOGROUP`` and recreate the stream.

Every plan change goes through :class:`~._writer.PlanWriter`, so a step
takes effect only once a replica has the new plan. A move whose old shard
makes no progress for ``move_timeout`` (entries held by live consumers that
never acknowledge) is reverted: the index points at the old tag again and
the *new* tag goes into ``draining``, then
:class:`~taskiq_redis_cluster._errors.RebalanceAbortedError` is raised. A
later run drains and removes the new tag.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .._errors import RebalanceAbortedError, RebalanceError
from .._keys import ShardKeys
from .._planning import ShardPlan
from ._copy import DrainState, ShardCopier
from ._journal import Journal, MoveRecord, MoveState
from ._options import EventSink, RebalanceEventKind, RebalanceOptions
from ._writer import PlanWriter, Stale

logger = logging.getLogger(__name__)


class _Dropped(Exception):
    """A journal record was forgotten because the plan contradicts it."""


class MoveDriver:
    """Drives journal records of one rebalancer through their states.

    :param prefix: key prefix of the deployment.
    :param options: pacing and bounds.
    :param writer: reads and changes the stored plans.
    :param copier: drain checks and copies.
    :param emit: progress events.
    """

    def __init__(
        self,
        prefix: str,
        options: RebalanceOptions,
        *,
        writer: PlanWriter,
        copier: ShardCopier,
        emit: EventSink,
    ) -> None:
        self.prefix = prefix
        self.options = options
        self._writer = writer
        self._copier = copier
        self._emit = emit

    async def drive_all(
        self, queue: str, journal: Journal, records: list[MoveRecord], *, total: int
    ) -> int:
        """Drive ``records`` with at most ``max_moves_at_once`` in flight.

        Returns the number of completed moves. After the first abort no new
        move starts (planned ones are forgotten); running ones finish, then
        the abort is raised. Any other error stops every move (nothing new
        starts, running ones are cancelled) and is raised.
        """
        if not records:
            return 0
        semaphore = asyncio.Semaphore(self.options.max_moves_at_once)
        aborts: list[RebalanceAbortedError] = []
        done = 0
        failed = False

        async def one(rec: MoveRecord) -> None:
            nonlocal done, failed
            async with semaphore:
                if failed:
                    # Another move failed (e.g. a plan change no replica
                    # confirmed): start nothing more, the error ends the run.
                    # The semaphore hands over before that error reaches
                    # the cancellation below.
                    return
                if aborts and rec.state is MoveState.PLANNED:
                    await self._abandon_precopy(queue, rec)
                    await journal.remove([rec])
                    return
                try:
                    if await self._drive(queue, journal, rec, done_total=(done, total)):
                        done += 1
                except RebalanceAbortedError as exc:
                    aborts.append(exc)
                except BaseException:
                    failed = True
                    raise

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
                raise Stale
            shards = list(plan.shards)
            shards[index] = new
            return ShardPlan(queue, plan.epoch + 1, tuple(shards), (*plan.draining, cur))

        try:
            plan = await self._writer.mutate(queue, change)
        except Stale:
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
        copied = await self._copier.copy_entries(rec.old, rec.new, snapshot=True)
        if copied:
            rec.copied += copied
            await journal.put(rec)
            self._emit(RebalanceEventKind.COPIED, queue, rec, done=copied, total=copied)
        # Markers too: a kick on the new plan then finds its key held.
        await self._copier.copy_markers(rec.old, rec.new)

    async def _abandon_precopy(self, queue: str, rec: MoveRecord) -> None:
        """A pre-copied move that will not switch: return its copies to the live shard."""
        if not rec.precopy:
            return
        plan = await self._writer.load(queue)
        if rec.new.tag in {s.tag for s in plan.all_shards()}:
            return  # in the plan after all: consumers read it
        if not 0 <= rec.index < len(plan.shards):
            raise RebalanceError(
                message=f"queue {queue!r} has no shard {rec.index} to return copies to"
            )
        target = plan.shards[rec.index]
        copied = await self._copier.copy_entries(rec.new, target)
        state = await self._copier.drain_state(rec.new, delete=True)
        # The pre-copied markers are copies of the live shard's (NX: no-ops).
        await self._copier.copy_markers(rec.new, target, delete=True)
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
        if rec.switched_at + self.options.settle > time.time():
            # Keys kicked between the pre-copy and the switch: without this
            # a producer already on the new plan could queue them again
            # until the copy after the settle window.
            await self._copy_markers(queue, rec)
        await self._wait_settled(rec.switched_at)
        # Keys a producer on the old plan kicked during the settle window.
        await self._copy_markers(queue, rec)
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
            state = await self._copier.drain_state(rec.draining)
            if not state.drained:
                target = await self._target_tag(queue, rec)
                copied = await self._copier.copy_entries(rec.draining, target)
                state = await self._copier.drain_state(rec.draining)
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
                raise Stale
            shards = list(plan.shards)
            shards[index] = by_tag[old.tag]
            draining = (*(s for s in plan.draining if s.tag != old.tag), cur)
            return ShardPlan(queue, plan.epoch + 1, tuple(shards), draining)

        try:
            plan = await self._writer.mutate(queue, change)
        except Stale:
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

        plan = await self._writer.mutate(queue, change)
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
        plan = await self._writer.load(queue)
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
        state = await self._copier.drain_state(rec.draining, delete=True)
        if not state.drained:
            await self._redrain(queue, journal, rec, state, deadline)
            return
        target = plan.shards[rec.index]
        # Its streams are gone, so no stream kick sets a marker there any
        # more: the last copy takes every one, and they go with the shard.
        await self._copier.copy_markers(rec.draining, target, delete=True)
        await self._copier.move_dead_letters(
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

        plan = await self._writer.mutate(queue, change)
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

    async def _copy_markers(self, queue: str, rec: MoveRecord) -> None:
        """Copy the draining tag's dedup markers to the tag that holds its index now.

        Skipped (the cleanup step decides what happens) when the plan has
        no such index or the draining tag is active again.
        """
        plan = await self._writer.load(queue)
        if not 0 <= rec.index < len(plan.shards) or plan.shards[rec.index].tag == rec.draining:
            return
        await self._copier.copy_markers(rec.draining, plan.shards[rec.index])

    async def _target_tag(self, queue: str, rec: MoveRecord) -> str:
        """Where a record's draining entries go: the tag that holds its index now."""
        plan = await self._writer.load(queue)
        if not 0 <= rec.index < len(plan.shards):
            raise RebalanceError(message=f"queue {queue!r} has no shard {rec.index}")
        tag = plan.shards[rec.index].tag
        if tag == rec.draining:
            raise RebalanceError(
                message=f"shard {rec.draining} of {queue!r} is active again; not copying it"
            )
        return tag


__all__ = ["MoveDriver"]
