"""Which shards a free kick should avoid right now.

A queue's shards sit on every master, so when one master fails the others
still take writes. A kick without a routing key (``partition_key``,
``dedup_key``) may go to any shard, so instead of waiting through retries on
a shard whose master just refused or dropped a write, it goes to a healthy
shard at once. A kick with a routing key keeps its shard: order and
deduplication depend on it.

:class:`FailingShards` remembers, for a short cool-down, the shards whose
master failed a write in a way that proves nothing was written (a refused
connection, CLUSTERDOWN, TRYAGAIN, ...), together with every other shard on
the same master. When the cool-down ends, the next free kick to such a shard
is the probe: if the master is back, or its replica was promoted and the
slot map reloaded, the shard takes traffic again; if not, the mark is
renewed with a longer cool-down (up to a cap) and the kick moves on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class FailingShards:
    """Shard tags to route free kicks around, each until its cool-down ends.

    :param cooldown: seconds a first failure keeps a shard out of rotation;
        each failed probe doubles it, up to ``max_cooldown``.
    :param clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        cooldown: float = 0.5,
        max_cooldown: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cooldown = cooldown
        self._max = max_cooldown
        self._clock = clock
        # tag -> (until, cool-down used); empty in the normal case, so the
        # hot path pays one truth test.
        self._until: dict[str, tuple[float, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._until)

    def mark(self, tags: Iterable[str]) -> None:
        """Keep ``tags`` out of rotation; a tag marked again waits longer."""
        now = self._clock()
        for tag in tags:
            previous = self._until.get(tag)
            wait = self._cooldown if previous is None else min(self._max, previous[1] * 2)
            self._until[tag] = (now + wait, wait)

    def failing(self, tag: str) -> bool:
        """True while ``tag`` is cooling down.

        An expired mark is kept (so a failed probe doubles the cool-down)
        until :meth:`recovered` clears it.
        """
        entry = self._until.get(tag)
        return entry is not None and self._clock() < entry[0]

    def recovered(self, tag: str) -> None:
        """A write to ``tag`` succeeded: forget it."""
        if self._until:
            self._until.pop(tag, None)
