"""Crash-safe copying of a shard's entries to another shard.

A ``kill -9`` anywhere gives duplicates at worst, never a loss: every entry
is written to the target before it leaves the source.

Everything below about "the stream" holds for each of a shard's streams:
lane 0 (``P:{T}:stream``) and every priority lane stream (``P:{T}:lane:N``)
that exists; a lane's entries go to the same lane of the target. Lanes are
found by key (``TYPE`` of lanes 1..``MAX_LANES``-1, pipelined), so the
rebalancer needs no broker option.

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
  the consumers have not popped meanwhile;
* delayed set (delayed tasks of the stream broker): members as they are
  (a priority lane's ``NUL L<n> NUL`` marker goes along, so the new shard's
  promoter puts them into the same lane), with their due times, ``ZADD`` to
  the new shard's set before ``ZREM`` from the old one. A worker still
  promoting the old shard may meanwhile move a member to the old stream:
  that task then runs twice, never zero times.

Entries keep their relative order; copies land behind whatever the target
already holds. Copying is throttled by ``max_entries_per_second``, one pace
shared by every move in flight. Dead letters move with
:meth:`ShardCopier.move_dead_letters`.

Dedup markers are not entries: :meth:`ShardCopier.copy_markers` hands them
to :class:`~._markers.MarkerCopier`, paced by the same throttle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster

from .._errors import RebalanceError
from .._keys import MAX_LANES, ShardKeys
from .._planning import Shard
from .._redis import load_script
from ._markers import MarkerCopier
from ._options import RebalanceOptions

logger = logging.getLogger(__name__)

#: Consumer name the rebalancer claims entries with while it copies them;
#: whatever it still has pending after a crash is copied again on the rerun.
MOVER_CONSUMER = "tqrc-rebalancer-mover"

# Scripts in _redis/scripts/; each file says what it takes and returns.
_DRAIN_STATE = load_script("rebalance_drain_state")
_LIST_RECOVER = load_script("rebalance_list_recover")
_CLAIM_BATCH = load_script("rebalance_claim_batch")
_DELETE_UNGROUPED = load_script("rebalance_delete_ungrouped")
_LIST_TAKEN = load_script("rebalance_list_taken")

#: Dead-letter entries scanned from the newest end of the target dead
#: stream to find where an interrupted copy stopped.
_DEAD_RESUME_SCAN = 1000
_DEAD_BATCH = 100


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DrainState:
    """What is left to consume in one shard's streams and list.

    The stream figures are summed over the shard's stream and its priority
    lane streams (``groups`` is the most groups of one of them).
    """

    exists: bool
    length: int
    groups: int
    undelivered: int
    pending: int
    list_length: int
    deleted: bool = False
    #: entries held in the processing lists of reliable list consumers
    processing: int = 0
    #: delayed tasks not due yet, in the shard's delayed set
    delayed: int = 0
    #: priority lanes (> 0) whose stream exists
    lanes: tuple[int, ...] = ()

    @property
    def drained(self) -> bool:
        """No group has undelivered or pending entries, the list is empty, no
        reliable list consumer holds any and no delayed task waits."""
        return (
            self.undelivered == 0
            and self.pending == 0
            and self.list_length == 0
            and self.processing == 0
            and self.delayed == 0
        )


class ShardCopier:
    """Reads what is left in a shard and copies it to another, crash-safely.

    :param client: an initialized cluster client (not owned).
    :param prefix: key prefix of the deployment.
    :param options: batch size, pace and the dead-consumer timeouts.
    """

    def __init__(self, client: RedisCluster, prefix: str, options: RebalanceOptions) -> None:
        self._client = client
        self.prefix = prefix
        self.options = options
        # One pace for all moves in flight: the cap is per rebalancer.
        self._throttle = _Throttle(options.max_entries_per_second)
        self._markers = MarkerCopier(client, prefix, options.copy_batch, self._throttle)

    async def drain_state(self, shard: Shard | str, *, delete: bool = False) -> DrainState:
        """What is left to consume in ``shard`` (a Shard or a tag).

        With ``delete=True`` the streams (lane 0 and every lane) and the
        list are deleted in the same atomic step when they are drained
        (``deleted`` tells): a stale producer's ``NOMKSTREAM`` kick into
        any lane of the retired shard is then refused.
        """
        tag = shard.tag if isinstance(shard, Shard) else shard
        keys = ShardKeys(self.prefix, tag)
        # Every possible lane is named: the script checks them atomically
        # with the rest, and a missing one costs a TYPE.
        reply = await _DRAIN_STATE(
            self._client,
            keys=[keys.stream, keys.list, keys.consumers, keys.delayed, *keys.lanes()[1:]],
            args=["1" if delete else "0", keys.processing("")],
        )
        values = [int(v) for v in reply[:9]]
        return DrainState(
            exists=bool(values[0]),
            length=values[1],
            groups=values[2],
            undelivered=values[3],
            pending=values[4],
            list_length=values[5],
            deleted=values[6] > 0,
            processing=values[7],
            delayed=values[8],
            lanes=tuple(int(lane) for lane in reply[9]),
        )

    async def lanes(self, shard: Shard | str) -> list[int]:
        """Priority lanes (> 0) of ``shard`` whose stream exists (one pipeline)."""
        keys = ShardKeys(self.prefix, shard.tag if isinstance(shard, Shard) else shard)
        pipe = self._client.pipeline(transaction=False)
        for lane in range(1, MAX_LANES):
            pipe.type(keys.lane(lane))
        types = await pipe.execute()
        return [lane for lane, kind in enumerate(types, start=1) if _text(kind) == "stream"]

    # ------------------------------------------------------------- copying
    async def copy_entries(
        self, source: Shard | str, target: Shard | str, *, snapshot: bool = False
    ) -> int:
        """Move what is left to consume in shard ``source`` to shard ``target``.

        Streams (lane 0 and each priority lane stream that exists, each to
        the same lane of ``target``): first whatever the mover consumer
        still has pending (an interrupted run), then every entry some group has not had delivered,
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
        copied = 0
        for lane in [0, *await self.lanes(src.tag)]:
            copied += await self._copy_stream(
                src.lane(lane), dst.lane(lane), throttle, snapshot=snapshot
            )
        # Reliable list consumers that died hand their processing lists back
        # first (the broker's own rule: the heartbeat expired).
        recovered = await _LIST_RECOVER(
            self._client,
            keys=[src.list, src.consumers],
            args=[src.processing(""), src.heartbeat("")],
        )
        if int(recovered):
            logger.info("Returned %d entries of dead list consumers to %s", recovered, src.list)
        copied += await self._copy_list(src.list, dst.list, throttle, snapshot=snapshot)
        copied += await self._copy_delayed(src.delayed, dst.delayed, throttle)
        return copied

    async def _copy_delayed(self, source: str, target: str, throttle: _Throttle) -> int:
        """Move the delayed tasks of ``source`` (a shard's delayed set), due times kept.

        Each batch is added to ``target`` before it leaves ``source``: an
        interruption leaves a task in both sets (run twice at worst), never
        in neither. The new shard's workers promote them when due.
        """
        client = self._client
        if _text(await client.type(source)) != "zset":
            return 0
        batch = self.options.copy_batch
        copied = 0
        # Bounded: every pass removes what it copied; late kicks into the
        # old shard (stale producers) are few and taken by the next pass.
        for _ in range(int(await client.zcard(source)) // batch + 100):
            rows: list[Any] = await client.zrange(source, 0, batch - 1, withscores=True)
            if not rows:
                break
            await client.zadd(target, dict(rows))
            await client.zrem(source, *[member for member, _ in rows])
            copied += len(rows)
            await throttle(len(rows))
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
            deleted = await _DELETE_UNGROUPED(
                client, keys=[source], args=[entry_id for entry_id, _ in rows]
            )
            await throttle(len(entries))
            if int(deleted) < 0:
                break  # a group appeared: claimed below, so copied twice at worst
        for _ in range(passes):
            reply = await _CLAIM_BATCH(client, keys=[source], args=[MOVER_CONSUMER, batch, until])
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
            await _LIST_TAKEN(client, keys=[source], args=items)
            copied += len(items)
            await throttle(len(items))
        return copied

    async def copy_markers(
        self, source: Shard | str, target: Shard | str, *, delete: bool = False
    ) -> int:
        """Copy the dedup markers of shard ``source`` to shard ``target``
        (see :meth:`MarkerCopier.copy <._markers.MarkerCopier.copy>`)."""
        src = source.tag if isinstance(source, Shard) else source
        dst = target.tag if isinstance(target, Shard) else target
        return await self._markers.copy(src, dst, delete=delete)

    async def move_dead_letters(self, source: str, target: str) -> None:
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


__all__ = ["MOVER_CONSUMER", "DrainState", "ShardCopier"]
