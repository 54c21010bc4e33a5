"""Delayed tasks: moving them from a shard's delayed set into its queue.

A kick with a ``delay`` label is held in the shard's delayed set (a sorted
set in the shard's slot, scored by its due time in the master's clock) by
the broker's kick script (``stream_kick_controlled.lua``, which marks a
member with its priority lane if it has one, or ``list_kick_controlled.lua``).
Every listening worker runs one :class:`DelayedPromoter` per shard it reads;
it runs the broker's promote script (``stream_promote_delayed.lua``, or
``list_promote_delayed.lua`` from :func:`list_promoter`), which adds what is
due to the stream (or pushes it to the list) and removes it from the set in
one atomic step, so any number of workers may run it at once and each
message still reaches the queue exactly once.

No polling storm: a promoter sleeps until the earliest due time the script
reported (the set's first score), at least ``min_interval`` and at most
``max_sleep``, plus a random jitter, so workers do not wake together. While
nothing is due, each worker sends one short script per shard every
``max_sleep`` seconds; the cap bounds how late a task is that was kicked,
with a delay shorter than the cap, while every promoter slept.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster

from .._keys import ShardKeys
from .._redis import AutoPipeline, LuaScript, RetryPolicy, error_kind, is_transient, load_script

logger = logging.getLogger(__name__)

_PROMOTE = load_script("stream_promote_delayed")
_PROMOTE_LIST = load_script("list_promote_delayed")


@dataclass(frozen=True)
class PromoterTiming:
    """How a promoter paces itself (seconds; ``batch`` in messages).

    :param max_sleep: longest sleep between two looks at the set.
    :param min_interval: shortest sleep after a look that moved less than
        a full batch (so many workers waking on one due time cost little).
    :param jitter: a random share of this is added to every sleep.
    :param batch: most messages one script call moves; a full batch is
        followed at once by the next.
    """

    max_sleep: float = 0.5
    min_interval: float = 0.05
    jitter: float = 0.05
    batch: int = 200


class DelayedPromoter:
    """Moves the due delayed messages of one shard into its queue, forever.

    By default into the shard's stream (and priority lanes); ``script`` and
    ``script_keys`` name another promote script, such as the list broker's
    (see :func:`list_promoter`). Such a script takes the batch size as its
    first argument and answers ``{moved, next due ms or -1, now ms}``, with
    ``moved`` -1 when its target is missing.

    :param client: the broker's auto-pipeline for commands that never WAIT
        (or its cluster client).
    :param keys: the shard's keys.
    :param trim: XADD trim arguments (``MAXLEN ~ n``) or none.
    :param lanes: the shard's priority lanes; a delayed message goes to
        the lane its kick asked for.
    :param on_moved: called with the number of messages each call moved.
    :param script: the promote script (default: the stream's).
    :param script_keys: its keys (default: the shard's stream, delayed set
        and the streams of its priority lanes).
    :param retry: the backoff after a failed step (the broker's policy).
    """

    def __init__(
        self,
        client: AutoPipeline | RedisCluster,
        keys: ShardKeys,
        trim: tuple[Any, ...] = (),
        *,
        lanes: int = 1,
        timing: PromoterTiming | None = None,
        on_moved: Callable[[int], None] | None = None,
        script: LuaScript | None = None,
        script_keys: Sequence[str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()
        self.keys = keys
        self.timing = timing or PromoterTiming()
        self._script = script or _PROMOTE
        self._args: list[Any] = [self.timing.batch, *trim]
        self._keys = (
            list(script_keys) if script_keys is not None
            else [keys.stream, keys.delayed, *keys.lanes(lanes)[1:]]
        )
        self._on_moved = on_moved
        self._random = random.Random()
        self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return after its current step.

        Cancelling alone is not enough: redis-py 8.1 can lose a cancel that
        lands during a command, and the loop would then go on, reopening
        connections on a client that is being closed.
        """
        self._stopping = True

    async def step(self) -> float:
        """Move what is due once; return how long to sleep before the next step."""
        timing = self.timing
        reply = await self._script(self._client, keys=self._keys, args=self._args)
        moved, next_due, now = int(reply[0]), int(reply[1]), int(reply[2])
        if moved > 0 and self._on_moved is not None:
            self._on_moved(moved)
        if moved >= timing.batch:
            return 0.0  # more may be due right now
        if moved < 0:
            # The stream is gone: its reader recreates it (NOGROUP path);
            # the delayed messages wait in the set meanwhile. (A list needs
            # no such wait: LPUSH creates it.)
            wait = timing.max_sleep
        elif next_due < 0:
            wait = timing.max_sleep
        else:
            wait = min(timing.max_sleep, max(timing.min_interval, (next_due - now) / 1000))
        return wait + self._random.random() * timing.jitter

    async def run(self) -> None:
        """Promote until stopped; errors are logged and retried, never raised."""
        failures = 0
        while not self._stopping:
            try:
                wait = await self.step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                # Transient errors (failover, slot move) heal by themselves;
                # anything else is worth an error once, then quieter.
                if is_transient(exc):
                    log = logger.debug if failures > 1 else logger.info
                else:
                    log = logger.error if failures in (1, 10) else logger.debug
                log("Promoting delayed tasks of %s failed (%s: %s); retrying",
                    self.keys.delayed, error_kind(exc), exc)
                wait = self._retry.delay(failures)
            if wait > 0 and not self._stopping:
                await asyncio.sleep(wait)


def list_promoter(
    client: AutoPipeline | RedisCluster,
    keys: ShardKeys,
    *,
    timing: PromoterTiming | None = None,
    on_moved: Callable[[int], None] | None = None,
    retry: RetryPolicy | None = None,
) -> DelayedPromoter:
    """A promoter that pushes the due tasks of ``keys.delayed`` to ``keys.list``.

    A list has no lanes; a due task is pushed at the producing end, like a
    new kick, so it queues behind what already waits (FIFO).
    """
    return DelayedPromoter(
        client, keys, timing=timing, on_moved=on_moved, script=_PROMOTE_LIST,
        script_keys=[keys.list, keys.delayed], retry=retry,
    )


def start_promoter(promoter: DelayedPromoter) -> asyncio.Task[None]:
    """Run ``promoter`` for as long as the calling task (a shard reader) lives.

    The promoter is cancelled when the reader ends, however it ends (stop,
    error, cancel), so a reader restarted by the supervisor never leaves a
    second promoter behind. The reader's done-callback also holds the only
    reference the promoter's task needs until then.
    """
    reader = asyncio.current_task()
    task = asyncio.create_task(promoter.run(), name=f"tqrc-promoter-{promoter.keys.tag}")
    if reader is not None:
        reader.add_done_callback(lambda _: stop_promoter(promoter, task))
    return task


def stop_promoter(promoter: DelayedPromoter, task: asyncio.Task[None]) -> None:
    """Stop ``promoter`` (its loop and its task); await ``task`` to know it ended."""
    promoter.stop()
    task.cancel()


class Promoters:
    """A broker's running promoters (one per shard reader), so that its
    shutdown can stop them and wait for them."""

    def __init__(self) -> None:
        self._running: dict[asyncio.Task[None], DelayedPromoter] = {}

    def __len__(self) -> int:
        """How many are running."""
        return len(self._running)

    def start(self, promoter: DelayedPromoter) -> None:
        """:func:`start_promoter`, remembered until its task ends."""
        task = start_promoter(promoter)
        self._running[task] = promoter
        task.add_done_callback(self._running.pop)

    async def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every promoter and wait for them.

        They end with their readers, but a reader that was cancelled may
        leave its promoter mid-command: waiting keeps any of them from
        touching the client after it is closed.
        """
        for task, promoter in list(self._running.items()):
            stop_promoter(promoter, task)
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)


__all__ = [
    "DelayedPromoter",
    "PromoterTiming",
    "Promoters",
    "list_promoter",
    "start_promoter",
    "stop_promoter",
]
