"""The listen buffer: what a worker read from Redis and taskiq has not taken yet.

Shard readers put messages in; ``listen()`` takes them out for taskiq, which
asks for one whenever it has room for another task. A message carries its
priority lane (0 for a queue without priorities, and for the list broker).

Order (the priority rule, stated in docs/brokers.md):

* a message of the highest non-empty lane goes first, first in first out
  within a lane;
* except every ``fairness``-th message taken, which is the one that has
  waited longest here, whatever its lane. While higher lanes are busy, a
  lower lane still gets at least one message in ``fairness``: slower, never
  stopped.

Room: lane 0 and the higher lanes are two classes of ``capacity`` messages
each, so a full buffer of ordinary messages never keeps a priority message
out (its reader would stall behind them), and a burst of priority messages
never stops the ordinary lane from being read. A put waits while its class
is full, as ``asyncio.Queue.put`` waits. A waiting put is woken once a
quarter of its class is free again, not at every free slot: the reader then
hands over a run of messages per wake-up instead of one, which cost a busy
worker a reader resumption for every task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ListenBuffer(Generic[T]):
    """Bounded, lane-ordered buffer between shard readers and ``listen()``.

    :param capacity: most messages of each class (lane 0; lanes above 0).
    :param lanes: number of lanes (lane numbers are ``0 .. lanes-1``).
    :param fairness: every ``fairness``-th get takes the oldest message.
    """

    def __init__(self, capacity: int, lanes: int = 1, fairness: int = 10) -> None:
        if capacity < 1 or lanes < 1 or fairness < 2:
            raise ValueError("capacity and lanes must be >= 1, fairness >= 2")
        self.capacity = capacity
        self.fairness = fairness
        # Free room in a class at which a waiting put is woken (see above).
        self._refill = max(1, capacity // 4)
        # Per lane: (arrival number, message), oldest first.
        self._lanes: list[deque[tuple[int, T]]] = [deque() for _ in range(lanes)]
        self._size = 0
        self._high = 0  # messages in lanes above 0
        self._arrivals = 0
        self._taken = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        # Putters waiting for room, per class (0: lane 0, 1: higher lanes).
        self._putters: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(), deque()
        )

    def __len__(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0

    def full(self, lane: int = 0) -> bool:
        """Whether a put to ``lane`` would wait."""
        if lane == 0:
            return self._size - self._high >= self.capacity
        return self._high >= self.capacity

    async def put(self, item: T, lane: int = 0) -> None:
        """Add ``item`` to ``lane``, waiting while the lane's class is full.

        :raises ValueError: for a lane this buffer does not have.
        """
        if not 0 <= lane < len(self._lanes):
            raise ValueError(f"no lane {lane} (lanes 0..{len(self._lanes) - 1})")
        waiters = self._putters[lane > 0]
        while self.full(lane):
            waiter = asyncio.get_running_loop().create_future()
            waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                # Woken and then cancelled: pass the wake-up on.
                if not self.full(lane):
                    _wake(waiters)
                raise
        self.put_nowait(item, lane)

    def put_nowait(self, item: T, lane: int = 0) -> None:
        """Add ``item`` whatever the room (for messages that must not wait)."""
        self._lanes[lane].append((self._arrivals, item))
        self._arrivals += 1
        self._size += 1
        if lane:
            self._high += 1
        _wake(self._getters)

    def get_nowait(self) -> T:
        """Take the next message by the priority rule.

        :raises asyncio.QueueEmpty: when the buffer is empty.
        """
        if self._size == 0:
            raise asyncio.QueueEmpty
        lanes = self._lanes
        if self._high == 0:
            lane = 0  # no priority message: plain FIFO, the common case
        else:
            self._taken += 1
            if self._taken % self.fairness == 0:
                lane = min((n for n in range(len(lanes)) if lanes[n]), key=lambda n: lanes[n][0][0])
            else:
                lane = next(n for n in range(len(lanes) - 1, -1, -1) if lanes[n])
        _, item = lanes[lane].popleft()
        self._size -= 1
        if lane:
            self._high -= 1
            used = self._high
        else:
            used = self._size - self._high
        if self.capacity - used >= self._refill:
            _wake(self._putters[lane > 0])
        return item

    async def get(self) -> T:
        """Take the next message, waiting for one."""
        while self._size == 0:
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._getters.remove(waiter)
                if self._size:
                    _wake(self._getters)
                raise
        return self.get_nowait()


def _wake(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


__all__ = ["ListenBuffer"]
