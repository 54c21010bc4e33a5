"""Dedup markers follow their shard to its new tag.

A marker ``P:{T}:dedup:K`` holds the task id of the kick that set it, with a
TTL (see the stream broker's ``dedup_key``). All markers of a shard share its
tag, so they sit in one slot on one master; :class:`MarkerCopier` lists them
there with ``CLUSTER GETKEYSINSLOT``, reads value and TTL together, and
writes copies under the new tag with ``SET NX PXAT``:

* a marker already on the target wins (a producer on the new plan kicked
  the key first);
* a copy expires no later than its original: its expiry is the target
  master's time, read *before* the source TTLs were read, plus the TTL;
* an expired marker is not brought back;
* a rerun changes nothing, so a move killed mid-copy just copies again.

The move calls it before the switch, right after it, after the settle
window, and once more after the old streams are deleted, this time deleting
the old markers (see ``_moves``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import RebalanceError
from .._keys import ShardKeys
from .._redis import RetryPolicy, Target, error_kind, load_script, on_slot_master

logger = logging.getLogger(__name__)

# Scripts in _redis/scripts/; each file says what it takes and returns.
_READ = load_script("rebalance_dedup_read")
_WRITE = load_script("rebalance_dedup_write")
_DELETE = load_script("rebalance_dedup_delete")

#: Extra keys asked of GETKEYSINSLOT over the count just read: a few markers
#: set in between come along (later passes take any others).
_SLOT_MARGIN = 100


class MarkerCopier:
    """Copies (and, for a removed shard, deletes) a shard's dedup markers.

    :param client: an initialized cluster client (not owned).
    :param prefix: key prefix of the deployment.
    :param batch: markers per round trip.
    :param pace: awaited with the number of markers written (the copier's
        shared throttle).
    :param retry: the backoff of the listing while the slot's master is
        unknown or its slot migrating.
    """

    def __init__(
        self,
        client: RedisCluster,
        prefix: str,
        batch: int,
        pace: Callable[[int], Awaitable[None]],
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()
        self.prefix = prefix
        self.batch = batch
        self._pace = pace

    async def copy(self, source: str, target: str, *, delete: bool = False) -> int:
        """Copy the dedup markers of tag ``source`` to tag ``target``.

        Each copy has the same value (the task id that holds the key) and
        an expiry no later than the original's; a marker already on
        ``target`` is kept, an expired one is skipped. One without a TTL
        (the broker always sets one: this is a hand-made marker) is copied
        without a TTL, as it was. With ``delete``, each copied marker is
        then deleted from ``source`` if it still holds the copied value;
        only for a shard nobody kicks into any more (its streams deleted, so
        the stream broker's kick script refuses before it sets a marker).

        :returns: markers written to ``target``.
        """
        src, dst = ShardKeys(self.prefix, source), ShardKeys(self.prefix, target)
        if src.tag == dst.tag:
            raise RebalanceError(message=f"cannot copy markers of shard {src.tag} onto itself")
        names = await self._names(src)
        cut = len(src.dedup("").encode())
        base = dst.dedup("").encode()
        # Routes the write script to the target's slot; never written (see
        # _names).
        anchor = dst.dedup("")
        written = deleted = 0
        for start in range(0, len(names), self.batch):
            chunk = names[start : start + self.batch]
            # The target master's clock, read before the source TTLs: that
            # time plus a TTL is never later than the original's expiry, on
            # the one clock that will expire the copy.
            clock: list[Any] = await _WRITE(self._client, keys=[anchor])
            now = int(clock[1])
            reply: list[Any] = await _READ(self._client, keys=chunk)
            keys: list[Any] = [anchor]
            args: list[Any] = []
            held: list[tuple[bytes, Any]] = []
            for name, value, pttl in zip(chunk, reply[0::2], reply[1::2], strict=True):
                ttl = int(pttl)
                if value is None or ttl == -2:
                    continue  # expired meanwhile: never brought back
                keys.append(base + name[cut:])
                # PTTL rounds the remaining time up by under 1 ms.
                args += [value, now + ttl - 1 if ttl >= 0 else -1]
                held.append((name, value))
            if not held:
                continue
            done: list[Any] = await _WRITE(self._client, keys=keys, args=args)
            written += int(done[0])
            await self._pace(int(done[0]))
            if delete:
                deleted += int(
                    await _DELETE(
                        self._client,
                        keys=[name for name, _ in held],
                        args=[value for _, value in held],
                    )
                )
        if written or deleted:
            logger.info(
                "Dedup markers of %s: %d of %d copied to %s, %d deleted",
                src.tag,
                written,
                len(names),
                dst.tag,
                deleted,
            )
        return written

    async def _names(self, keys: ShardKeys) -> list[bytes]:
        """Names of the dedup markers of shard ``keys``, from its slot's master.

        ``CLUSTER GETKEYSINSLOT`` is never redirected: asked of a node that
        does not own the slot (a stale slot map) it answers with nothing, and
        during a migration with part of the keys. So the node is checked
        before and after the listing with a one-key read sent to it alone:
        ``MOVED`` finds the owner again, ``ASK``/``TRYAGAIN`` (the slot is
        migrating) waits, both through ``on_slot_master`` and the retry
        policy; :class:`RebalanceError` once its attempts are spent.
        """
        prefix = keys.dedup("").encode()
        # The marker of the empty key: no kick sets it (an empty dedup_key
        # means no dedup), and being a key of the slot, only the slot's
        # stable master answers it without a redirect.
        probe = keys.dedup("")
        slot = keys.slot

        async def listing(target: Target) -> list[Any]:
            node = target.node
            await node.execute_command("EXISTS", probe)
            count = int(await node.execute_command("CLUSTER COUNTKEYSINSLOT", slot))
            names: list[Any] = []
            if count:
                names = await node.execute_command(
                    "CLUSTER GETKEYSINSLOT", slot, count + _SLOT_MARGIN
                )
            await node.execute_command("EXISTS", probe)
            return names

        try:
            names = await on_slot_master(
                self._client, probe, listing, self._retry, follow_ask=False
            )
        except (RedisError, OSError) as exc:
            raise RebalanceError(
                message=f"cannot list the dedup markers of shard {keys.tag}: slot {slot} "
                f"has no stable master (resharding?): {error_kind(exc)}; rerun the "
                f"rebalancer later"
            ) from exc
        return [
            name
            for name in (n if isinstance(n, bytes) else str(n).encode() for n in names)
            if name.startswith(prefix)
        ]


__all__ = ["MarkerCopier"]
