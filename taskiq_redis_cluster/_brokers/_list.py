"""``ClusterListQueueBroker``: sharded Redis lists.

Shard planning, kick retries and the fair per-shard readers come from
``_base`` (``ShardedBroker``); this module says how a message is pushed to and
popped from one shard's list, and how popped messages go back.

Two delivery modes:

- default, **at most once**: BRPOP. A graceful stop hands every message that
  was popped but never given to taskiq back to the consuming end of its
  list, in popped order; only a crash loses them (at most ``prefetch`` plus
  one per shard, plus the tasks taskiq was running or holding).
- ``reliable=True``, **at least once**: BLMOVE into this consumer's
  processing list, in the shard's slot; taskiq's ack removes the message
  (LREM). A heartbeat key per consumer and shard, refreshed by a background
  task, says the consumer is alive; when it expires, any reader of the shard
  moves the dead consumer's processing list back to the shard (one Lua
  script, all keys one hash tag). This is Sidekiq's "super_fetch" pattern.

Task controls, in both modes (labels parsed in ``_controls``): a
``dedup_key`` kick sets its marker and pushes in one script on the key's
shard; a ``delay`` kick waits in the shard's delayed set, and every reader
runs a promoter (``_delayed``) that pushes due tasks to the producing end
of its list, like a new kick. ``priority`` is not implemented: it needs a
list per lane and a fair pop over them (a BRPOP over several lists is
strict priority and would starve the lower ones).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import RedisCluster
from taskiq import AckableMessage, BrokerMessage

from .._events import BrokerEvents
from .._keys import ShardKeys
from .._lifecycle import check_client_kwargs
from .._options import ListOptions, resolve_options
from .._planning import Shard
from .._redis import (
    AutoPipeline,
    Reply,
    RetryPolicy,
    Unroutable,
    error_kind,
    is_transient,
    load_script,
    redis_value,
)
from ._base import ShardedBroker, Sink, StopSignal
from ._controls import TaskControls, kick_controlled, read_controls
from ._delayed import Promoters, list_promoter

logger = logging.getLogger(__name__)

# The shard's Lua scripts (all keys share the shard's tag; see scripts/*.lua).
_HAND_BACK = load_script("list_hand_back")
_RELIABLE_HAND_BACK = load_script("list_reliable_hand_back")
_RETIRE = load_script("list_retire")
_KICK_CONTROLLED = load_script("list_kick_controlled")

#: Most messages one hand-back script call pushes (Lua's unpack() limit is ~8000).
_HAND_BACK_CHUNK = 1000
#: Seconds a hand-back marker lives: longer than any retry sequence.
_MARKER_TTL = 300


class ClusterListQueueBroker(ShardedBroker):
    """Sharded list broker for Redis Cluster.

    By default delivery is **at most once**, as with taskiq-redis's
    ``ListQueueBroker``: a task popped by a worker that then crashes is gone.
    A graceful stop (SIGTERM to ``taskiq worker``) loses nothing: messages
    popped but not started go back to the front of their shard, in order.
    ``reliable=True`` makes it **at least once** (see the module docstring);
    :class:`ClusterStreamBroker` adds dead-lettering and delivery counts.

    Shards (default: 4 per master) are spread evenly over the masters; kicks
    go round-robin, or by the ``partition_key`` label, and every worker pops
    from every shard with one reader each, so no shard starves.

    The ``delay`` and ``dedup_key`` (``dedup_ttl``) labels work as with
    :class:`ClusterStreamBroker`; a due delayed task joins the back of its
    shard's list. The ``priority`` label is ignored (see docs/brokers.md).
    """

    options: ListOptions

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int | None = None,
        *,
        options: ListOptions | None = None,
        events: BrokerEvents | None = None,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the broker; no I/O happens until it starts.

        ``url``, ``queue_name``, ``max_connection_pool_size`` and the
        remaining keywords (for redis-py's ``RedisCluster``) are those of
        taskiq-redis's ``ListQueueClusterBroker``. Other :class:`ListOptions`
        fields may be passed as keywords.

        :raises InvalidOptionError: for a keyword the cluster client does
            not take.
        """
        options = resolve_options(
            ListOptions, options, kwargs,
            max_connection_pool_size=max_connection_pool_size, queue_name=queue_name,
        )
        check_client_kwargs(options.connection.extra)
        super().__init__(url, options, events=events, retry=retry)
        # Popped but not yet handed to taskiq, by id() of what went to the
        # listen buffer (the entry keeps the object, so the id stays unique):
        # the shard's keys, the shard index and the pop's sequence number.
        self._unhanded: dict[int, tuple[ShardKeys, int, int, AckableMessage | bytes]] = {}
        # Popped by a reader after its listen began closing, never buffered.
        self._unread: list[AckableMessage | bytes] = []
        self._pops = itertools.count()
        # The shard scripts bound to the client: called as (keys=, args=).
        self._scripts: dict[str, Callable[..., Awaitable[Any]]] = {}
        # Reliable mode: shards where this consumer has a processing list, and
        # the task that keeps its heartbeats alive until shutdown.
        self._registered: dict[str, tuple[ShardKeys, int]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        # Running delayed-task promoters (one per shard reader), so that
        # shutdown can wait for them.
        self._promoters = Promoters()

    def _blocking_seconds(self) -> float:
        return self.options.brpop_timeout

    def _make_pipeline(self, client: Any) -> AutoPipeline:
        return AutoPipeline(client, max_batch=self.options.max_batch)

    def _member_name(self) -> str:
        return self.options.consumer_name

    def _prefetch(self) -> int:
        return self.options.prefetch

    async def _after_startup(self, client: RedisCluster) -> None:
        self._scripts = {
            "hand_back": functools.partial(_HAND_BACK, client),
            "reliable_hand_back": functools.partial(_RELIABLE_HAND_BACK, client),
            "retire": functools.partial(_RETIRE, client),
        }

    def _write_command(self, keys: ShardKeys) -> tuple[str, tuple[Any, ...]]:
        return keys.list, ("LPUSH", keys.list)

    # --------------------------------------------------------- task controls
    def _controls(self, message: BrokerMessage) -> TaskControls | None:
        """The ``delay``/``dedup_key`` a message asks for; None for a plain LPUSH.

        ``priority`` is not read: this broker has no lanes.

        :raises InvalidOptionError: for a bad ``delay`` or ``dedup_ttl``.
        """
        return read_controls(message.labels, dedup_ttl=self.options.dedup_ttl)

    async def _write_controlled(
        self, pipeline: AutoPipeline, shard: Shard, message: BrokerMessage, controls: Any
    ) -> Reply:
        """Delay and/or deduplicate a kick in one atomic script on its shard (see the hook)."""
        assert isinstance(controls, TaskControls)
        keys = ShardKeys(self.options.prefix, shard.tag)
        return await kick_controlled(pipeline, _KICK_CONTROLLED, keys.list, keys, message,
                                     controls)

    # ------------------------------------------------------------------- pop
    async def _pop(self, keys: ShardKeys) -> bytes | None:
        """Pop one message, straight to the shard's node (redis-py's path on redirects).

        Default mode: BRPOP. Reliable mode: BLMOVE into this consumer's
        processing list, so the message is never only in this process.
        """
        assert self._pipeline is not None
        timeout = self.options.brpop_timeout
        if self.options.reliable:
            processing = keys.processing(self.options.consumer_name)
            try:
                reply = await self._pipeline.call(
                    keys.list, "BLMOVE", keys.list, processing, "RIGHT", "LEFT", timeout
                )
            except Unroutable:
                reply = await self.client.execute_command(
                    "BLMOVE", keys.list, processing, "RIGHT", "LEFT", timeout
                )
            return _as_bytes(reply) if reply is not None else None
        try:
            popped = await self._pipeline.call(keys.list, "BRPOP", keys.list, timeout)
        except Unroutable:
            popped = await self.client.brpop([keys.list], timeout=timeout)
        return _as_bytes(popped[1]) if popped else None

    async def _read_shard(
        self, shard: Shard, *, draining: bool, sink: Sink, count: int, stop: StopSignal,
        housekeeper: bool,
    ) -> None:
        keys = ShardKeys(self.options.prefix, shard.tag)
        assert self._pipeline is not None
        if housekeeper:
            # Due delayed tasks of this shard go into its list while it is
            # read. Its script goes in the kick pipeline's batches (no WAIT).
            promoter = list_promoter(self._pipeline, keys, retry=self.retry)
            self._promoters.start(promoter)
        reliable = self.options.reliable
        recovers = reliable and housekeeper
        next_recovery = 0.0
        if reliable:
            await self._register(keys, shard.index)
            # Readers of all workers start at different moments; the jitter
            # keeps their recovery passes from lining up anyway.
            next_recovery = time.monotonic() + random.uniform(0, self.options.recovery_interval)
        failures = 0
        while not stop.is_set():
            try:
                if recovers and time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + self.options.recovery_interval
                    await self._recover(keys, shard.index)
                data = await self._pop(keys)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop.is_set():
                    return
                if not is_transient(exc):
                    raise
                failures += 1
                self.events.retried(error_kind(exc))
                delay = self.retry.delay(failures)
                logger.warning("Popping %s failed (%s); retry in %.2fs", keys.list, exc, delay)
                await self.retry.sleep(delay)
                continue
            if data is None:
                continue
            item: AckableMessage | bytes = data
            if reliable:
                item = AckableMessage(
                    data=data, ack=functools.partial(self._ack, keys, shard.index, data)
                )
            # Registered before the first await, so that whatever becomes of
            # the sink call, the message is either handed out or handed back.
            self._unhanded[id(item)] = (keys, shard.index, next(self._pops), item)
            if stop.closing:
                # The listen is closing: nobody will take this message from
                # the buffer, so it goes straight back. (A shard that only
                # left the plan still hands out what its reader popped.)
                self._unread.append(item)
                return
            if not sink.offer(item, 0):
                await sink(item, 0)

    # ---------------------------------------------------------- hand back
    def _handed_out(self, message: AckableMessage | bytes) -> None:
        self._unhanded.pop(id(message), None)

    async def _release(self, messages: list[AckableMessage | bytes]) -> None:
        """Put messages popped but not given to taskiq back, as if never popped.

        Per shard, one script pushes them to the consuming (right) end, last
        popped first, so the next pop returns the first popped again and the
        shard's order is as before. Retried on transient errors; a failure
        after the retries loses the messages in the default mode (logged with
        the count); in reliable mode they stay in the processing list, which
        ``shutdown()`` or heartbeat recovery moves back.
        """
        unread, self._unread = self._unread, []
        per_shard: dict[str, tuple[ShardKeys, int, list[tuple[int, bytes]]]] = {}
        for message in [*messages, *unread]:
            meta = self._unhanded.pop(id(message), None)
            if meta is None:
                continue  # already handed back (a message is in both lists at most once)
            keys, index, seq, item = meta
            group = per_shard.setdefault(keys.tag, (keys, index, []))
            group[2].append((seq, _payload(item)))
        for keys, _index, popped in per_shard.values():
            # Last popped first: RPUSH appends left to right, and the right
            # end is popped first, so the first popped must be pushed last.
            payloads = [data for _, data in sorted(popped, reverse=True)]
            try:
                moved = await self._hand_back(keys, payloads)
            except Exception as exc:
                if self.options.reliable:
                    logger.warning(
                        "Could not hand back %d unstarted messages of %s (%r); they go back "
                        "at shutdown, or when this consumer's heartbeat expires",
                        len(payloads), keys.list, exc,
                    )
                else:
                    logger.error("Could not hand back %d unstarted messages of %s (%r); "
                                 "they are lost", len(payloads), keys.list, exc)
                continue
            logger.info("Handed back %d unstarted messages to %s", moved, keys.list)

    async def _hand_back(self, keys: ShardKeys, payloads: list[bytes]) -> int:
        moved = 0
        for start in range(0, len(payloads), _HAND_BACK_CHUNK):
            chunk = payloads[start : start + _HAND_BACK_CHUNK]
            if self.options.reliable:
                script = self._scripts["reliable_hand_back"]
                call_keys = [keys.list, keys.processing(self.options.consumer_name)]
                args: list[Any] = list(chunk)
            else:
                script = self._scripts["hand_back"]
                # One token per chunk, made once: every retry carries it.
                call_keys = [keys.list, keys.handback(uuid.uuid4().hex)]
                args = [_MARKER_TTL, *chunk]
            reply = int(await self._idempotent(
                functools.partial(script, keys=call_keys, args=args)
            ))
            # Reliable: how many were still in the processing list. Default:
            # the list's length, or -1 when an earlier attempt whose reply
            # was lost had pushed the chunk already; pushed either way.
            moved += max(0, reply) if self.options.reliable else len(chunk)
        return moved

    # ------------------------------------------------------- reliable mode
    async def _ack(self, keys: ShardKeys, index: int, data: bytes) -> None:
        """taskiq's ack: the message leaves this consumer's processing list.

        A failure after retries is logged, not raised: the message stays in
        the processing list and runs again once this consumer is gone (at
        least once).
        """
        processing = keys.processing(self.options.consumer_name)
        try:
            await self._idempotent(functools.partial(self._command, processing,
                                                     "LREM", processing, 1, data))
        except Exception as exc:
            logger.warning("Could not ack a message of %s (%r); it runs again after this "
                           "consumer stops", processing, exc)
            return
        self.events.acked(self.queue_name, index)

    async def _command(self, key: str, *args: Any) -> Any:
        assert self._pipeline is not None
        return await redis_value(self._pipeline.execute(key, *args))

    async def _register(self, keys: ShardKeys, index: int) -> None:
        """Announce this consumer on the shard before its first BLMOVE there.

        The heartbeat comes first: a consumer in the set without one would
        look dead to others' recovery, which is harmless for an empty
        processing list but not for a full one.
        """
        consumer = self.options.consumer_name
        ttl_ms = int(self.options.heartbeat_ttl * 1000)
        await self._idempotent(functools.partial(
            self._command, keys.heartbeat(consumer), "SET", keys.heartbeat(consumer), 1,
            "PX", ttl_ms,
        ))
        await self._idempotent(functools.partial(
            self._command, keys.consumers, "SADD", keys.consumers, consumer,
        ))
        self._registered[keys.tag] = (keys, index)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="tqrc-list-heartbeat")

    async def _beat(self) -> None:
        """Refresh this consumer's heartbeats until shutdown, not until listen closes.

        taskiq finishes the tasks it holds after the listen closed; their
        messages must not look abandoned meanwhile.
        """
        consumer = self.options.consumer_name
        ttl_ms = int(self.options.heartbeat_ttl * 1000)
        while True:
            await asyncio.sleep(self.options.heartbeat_ttl / 3)
            for keys, _ in list(self._registered.values()):
                # SADD again too: if this consumer was presumed dead (its loop
                # stalled past the TTL) and recovered, it must be findable
                # again should it really die later.
                try:
                    await asyncio.gather(
                        self._command(keys.heartbeat(consumer), "SET",
                                      keys.heartbeat(consumer), 1, "PX", ttl_ms),
                        self._command(keys.consumers, "SADD", keys.consumers, consumer),
                    )
                except Exception as exc:
                    logger.warning("Could not refresh heartbeat %s: %r",
                                   keys.heartbeat(consumer), exc)

    async def _recover(self, keys: ShardKeys, index: int) -> None:
        """Move back the processing lists of this shard's dead consumers."""
        client = self.client
        try:
            members = await client.smembers(keys.consumers)
            for raw in members:
                consumer = raw.decode() if isinstance(raw, bytes) else str(raw)
                if consumer == self.options.consumer_name:
                    continue
                if await client.exists(keys.heartbeat(consumer)):
                    continue
                moved = int(await self._scripts["retire"](
                    keys=[keys.list, keys.processing(consumer), keys.heartbeat(consumer),
                          keys.consumers],
                    args=[consumer, 1],
                ))
                if moved > 0:
                    logger.warning("Recovered %d messages of dead consumer %s on %s",
                                   moved, consumer, keys.list)
                    self.events.reclaimed(self.queue_name, index, moved)
        except Exception as exc:  # the next pass tries again
            logger.warning("Recovery pass on %s failed: %r", keys.list, exc)

    async def _before_close(self) -> None:
        """Stop the promoters; reliable mode: stop the heartbeat, give back the unacked.

        By now taskiq has finished (or abandoned) every task it took, so what
        is left in this consumer's processing lists will never be acked here:
        tasks cut off by ``--wait-tasks-timeout``, or messages whose ack
        failed. They go back to their shards now instead of after the
        heartbeat expires.

        The delayed-task promoters go first: they end with their readers, but
        a reader that was cancelled may leave its promoter mid-command, and
        none may touch the client after it is closed.
        """
        await self._promoters.stop_all()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        consumer = self.options.consumer_name
        registered, self._registered = self._registered, {}
        for keys, index in registered.values():
            try:
                moved = int(await self._idempotent(functools.partial(
                    self._scripts["retire"],
                    keys=[keys.list, keys.processing(consumer), keys.heartbeat(consumer),
                          keys.consumers],
                    args=[consumer, 0],
                )))
            except Exception as exc:
                logger.warning("Could not retire consumer %s on %s (%r); its messages return "
                               "when its heartbeat expires", consumer, keys.list, exc)
                continue
            if moved:
                logger.warning("Gave back %d unacknowledged messages of %s to %s",
                               moved, consumer, keys.list)
                self.events.reclaimed(self.queue_name, index, moved)


def _as_bytes(data: Any) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _payload(item: AckableMessage | bytes) -> bytes:
    return item.data if isinstance(item, AckableMessage) else item
