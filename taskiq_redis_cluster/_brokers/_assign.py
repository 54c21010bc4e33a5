"""Which shards a listening worker reads: shared out among the live workers.

Before, every worker read every shard: a process held one blocked read per
shard and ran every shard's timers (delayed-task promotion, reclaim, trim),
so an idle queue cost Redis workers times shards commands. Now the workers of a
queue share the shards out, Kafka-style, but with no coordinator:

* **Membership.** Each listening worker beats every
  ``heartbeat_interval`` into the queue's worker set (``P:{plan:Q}:workers``,
  a sorted set scored by expiry in the master's clock; one script,
  ``workers_heartbeat.lua``), and the reply is the list of live members. A
  worker that leaves (its listen closes) removes itself; one that dies
  expires ``worker_ttl`` seconds after its last beat.
* **Assignment** (:func:`assign`, pure). Every worker computes the same
  answer from the same member list and plan: sorted members, and the
  plan's tags (active, then draining) in order; member ``i`` of ``m`` keeps
  house for tags ``i, i+m, i+2m, ...`` and reads them, and when there are
  more members than tags it also reads tag ``i mod t``, so that no worker
  sits idle while others have work. Every tag has exactly one housekeeper
  (promoter, reclaim, trim) and at least one reader.
* **Failing open.** A worker that cannot beat (its heartbeat is older than
  ``worker_ttl``, or the script is refused) reads and keeps house for every
  shard, as before assignment: while it cannot tell who else is alive, it
  must assume nobody is. Reading a shard twice is harmless (the consumer
  group hands each entry to one reader); leaving it unread is not.

Views differ only for one heartbeat interval after a member joins or
leaves: a shard may then be read twice, or go unread for that long (its
entries wait in the stream; nothing is lost). A killed worker's shards wait
at most ``worker_ttl`` plus one interval for their next reader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import RedisCluster

from .._redis import error_kind, is_transient, load_script

logger = logging.getLogger(__name__)

_HEARTBEAT = load_script("workers_heartbeat")


@dataclass(frozen=True)
class Assignment:
    """The tags one worker reads, and those it keeps house for (a subset)."""

    reads: frozenset[str]
    keeps_house: frozenset[str]


def assign(tags: Sequence[str], members: Sequence[str] | None, me: str) -> Assignment:
    """The share of ``tags`` that member ``me`` reads, given the live ``members``.

    ``members`` must be the same list for every worker (sorted); ``None``
    (membership unknown) or a list without ``me`` gives every tag, the safe
    answer. Pure: no I/O.
    """
    everything = frozenset(tags)
    if not members or me not in members or not tags:
        return Assignment(everything, everything)
    index, count = members.index(me), len(members)
    own = frozenset(tags[index::count])
    return Assignment(own | {tags[index % len(tags)]}, own)


class Membership:
    """One listen's membership of its queue's worker set, kept by heartbeats.

    :param client: the broker's cluster client.
    :param key: the queue's worker set (``_keys.workers_key``).
    :param member: this listen's member name (the broker's consumer name).
    :param ttl: ``worker_ttl``, seconds.
    """

    def __init__(self, client: RedisCluster, key: str, member: str, ttl: float) -> None:
        self._client = client
        self._key = key
        self.member = member
        self._ttl = ttl
        self._members: list[str] | None = None
        self._last_beat = 0.0
        self._failures = 0

    async def beat(self) -> list[str] | None:
        """Beat once; the live members (sorted), or None if they are not known.

        None when no beat succeeded within ``ttl``: the others may already
        count this worker as gone, so it must read every shard.
        """
        try:
            reply = await _HEARTBEAT(
                self._client, keys=[self._key], args=[self.member, int(self._ttl * 1000), "beat"]
            )
        except Exception as exc:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                # A refused script (an ACL without EVALSHA, say) never heals;
                # a transient error does. Both leave the worker reading all.
                log = logger.warning if is_transient(exc) else logger.error
                log("Worker heartbeat of %s failed (%s: %s); reading every shard until it "
                    "succeeds", self._key, error_kind(exc), exc)
        else:
            if self._failures:
                logger.info("Worker heartbeat of %s works again", self._key)
            self._failures = 0
            self._members = sorted(m.decode() if isinstance(m, bytes) else str(m)
                                   for m in reply or ())
            self._last_beat = time.monotonic()
        if self._members is None or time.monotonic() - self._last_beat > self._ttl:
            return None
        return self._members

    async def leave(self, timeout: float = 2.0) -> None:
        """Take this member out of the set, so the others read its shards at once.

        Best effort: if it fails, the member expires after ``ttl``.
        """
        try:
            await asyncio.wait_for(
                _HEARTBEAT(self._client, keys=[self._key],
                           args=[self.member, int(self._ttl * 1000), "leave"]),
                timeout,
            )
        except Exception as exc:  # incl. the timeout; the member expires
            logger.info("Could not leave the worker set %s (%r); it expires in %.0f s",
                        self._key, exc, self._ttl)


__all__ = ["Assignment", "Membership", "assign"]
