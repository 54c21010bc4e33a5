"""Sweeping retired shard tags: entries a stale producer wrote after a move.

When a move is cleaned its old tag is remembered as *retired* in the journal
(for ``retired_memory`` seconds). Only a producer that did not follow the
plan (an old version, or one that could not read the plan) still writes to
a removed tag; with ``XADD NOMKSTREAM`` a kick never recreates a deleted
stream (nor a deleted priority lane stream), but a list push always does,
and so may an old broker version or a worker's reader that still ran.
:class:`Sweeper` copies such entries (each lane's to the same lane) to the
live shard of the same index and deletes the retired keys (dedup kicks into
a recreated stream or list may have set markers there too: they go along);
``Rebalancer.sweep`` runs it under the lease (from ``apply`` and on every
``watch`` pass).
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import RedisCluster

from ._copy import ShardCopier
from ._journal import Journal
from ._options import EventSink, RebalanceEventKind, RebalanceOptions
from ._writer import PlanWriter

logger = logging.getLogger(__name__)


class Sweeper:
    """Finds and empties retired shards of a queue.

    :param client: an initialized cluster client (not owned).
    :param prefix: key prefix of the deployment.
    :param options: ``retired_memory`` bounds how long a tag is swept.
    :param writer: reads the stored plans.
    :param copier: drain checks and copies.
    :param emit: progress events (``swept``).
    """

    def __init__(
        self,
        client: RedisCluster,
        prefix: str,
        options: RebalanceOptions,
        *,
        writer: PlanWriter,
        copier: ShardCopier,
        emit: EventSink,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.options = options
        self._writer = writer
        self._copier = copier
        self._emit = emit

    async def retired_tags(self, queue: str, journal: Journal) -> dict[str, int]:
        """Retired tags of ``queue`` (not in its plan) and their shard index."""
        plan = await self._writer.load(queue)
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

    async def has_stranded(self, queue: str) -> bool:
        """Whether a retired shard of ``queue`` holds entries, delayed tasks or a
        stream (no lease)."""
        journal = Journal(self._client, self.prefix, queue)
        for tag in await self.retired_tags(queue, journal):
            state = await self._copier.drain_state(tag)
            if state.exists or state.list_length or state.processing or state.delayed:
                return True
        return False

    async def sweep_queue(self, queue: str, journal: Journal) -> int:
        """Retired shards of ``queue`` that received entries are emptied into
        live ones (the caller holds the lease); returns entries moved."""
        plan = await self._writer.load(queue)
        moved = 0
        for tag, index in (await self.retired_tags(queue, journal)).items():
            state = await self._copier.drain_state(tag)
            # A delayed kick (list broker) cannot be fenced like XADD
            # NOMKSTREAM: a retired shard may hold nothing but its delayed set.
            if not (state.exists or state.list_length or state.processing or state.delayed):
                continue
            if not state.drained:
                if not 0 <= index < len(plan.shards):
                    logger.warning("Queue %s: retired shard %s has no index %d", queue, tag, index)
                    continue
                target = plan.shards[index]
                count = await self._copier.copy_entries(tag, target)
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
            state = await self._copier.drain_state(tag, delete=True)
            if state.drained and 0 <= index < len(plan.shards):
                # Dedup kicks into a recreated stream or list set markers on
                # the retired tag; with those keys gone again (drained means
                # deleted here, or emptied by the copy) they go along.
                await self._copier.copy_markers(tag, plan.shards[index], delete=True)
            if not state.deleted and not state.drained:
                logger.warning(
                    "Queue %s: retired shard %s still has %d pending on live consumers; "
                    "swept again later",
                    queue,
                    tag,
                    state.pending,
                )
        return moved


__all__ = ["Sweeper"]
