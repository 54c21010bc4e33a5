"""``ClusterStreamBroker``: the sharded Redis Streams broker.

Only what is specific to streams lives here; shard planning, plan epochs,
kick retries and the per-shard reader supervision are in ``_base``.

Per shard (all keys share the shard's hash tag, so its Lua scripts,
``_redis/scripts/stream_*.lua``, are legal on a cluster):

* kick: ``XADD stream NOMKSTREAM * data <message>`` through the
  auto-pipeline; a kick never creates a stream, so one into a shard the
  rebalancer retired is refused (nil) and retried on the current plan;
* read: ``XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS stream >``;
* ack: ``XACK`` of every id acked in the same tick, one command per shard;
* crash recovery: ``XAUTOCLAIM`` of entries idle for ``idle_timeout``;
  entries delivered more than ``max_deliveries`` times, and entries that are
  not taskiq messages, go to the dead-letter stream with a reason;
* memory: ``XTRIM MINID`` below the oldest entry that is still pending or
  not yet delivered to some group, so only acknowledged work is removed;
* NOGROUP/UNBLOCKED: the group is recreated at id ``0`` (never ``$``), so a
  vanished stream replays instead of skipping tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError
from taskiq import AckableMessage, BrokerMessage

from .._errors import InvalidOptionError, ReplicationTimeoutError
from .._events import BrokerEvents
from .._keys import MAX_LANES, ShardKeys
from .._lifecycle import check_client_kwargs
from .._options import StreamOptions, resolve_options
from .._planning import Shard
from .._redis import (
    AutoPipeline,
    CommandFailure,
    Reply,
    RetryPolicy,
    Unroutable,
    error_kind,
    is_transient,
    load_script,
    redis_value,
)
from .._serialization import MessageFormatter
from ._base import ShardedBroker, Sink, StopSignal
from ._controls import TaskControls, kick_controlled, read_controls
from ._delayed import DelayedPromoter, Promoters
from ._lease import Lease, LeaseRenewer, TaskStartWatcher

logger = logging.getLogger(__name__)

_DATA = b"data"

# The shard's Lua scripts (all keys share the shard's tag; see scripts/*.lua).
_SAFE_TRIM = load_script("stream_safe_trim")
_DEAD_LETTER = load_script("stream_dead_letter")
_REMOVE_STALE_CONSUMERS = load_script("stream_remove_stale_consumers")
_RENEW_LEASES = load_script("stream_lease_renew")
_KICK_CONTROLLED = load_script("stream_kick_controlled")

@dataclass
class _AckBatcher:
    """Merges the acks of a short window into one XACK per shard stream.

    taskiq finishes tasks one by one, so acks rarely share an event-loop
    tick; batching per tick sent one XACK per task. Acks wait ``window``
    seconds (or until ``max_batch`` are pending) and go as a few XACKs per
    shard. :meth:`add` only queues: waiting for the XACK's reply cost each
    task a future and a wake-up, and told taskiq nothing it acts on. An
    XACK that still fails after retries is logged; its entries stay pending
    and are redelivered after ``idle_timeout`` (at least once, never lost).
    """

    pipeline: AutoPipeline
    group: str
    broker: ClusterStreamBroker
    window: float = 0.005
    max_batch: int = 512
    _pending: dict[str, tuple[int, list[bytes]]] = field(default_factory=dict)
    _count: int = 0
    _timer: asyncio.TimerHandle | None = None
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)

    def add(self, stream: str, shard: int, entry_id: bytes) -> None:
        """Queue the ack of ``entry_id``; it is sent within ``window`` seconds."""
        batch = self._pending.get(stream)
        if batch is None:
            batch = self._pending[stream] = (shard, [])
        batch[1].append(entry_id)
        self._count += 1
        if self._count >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._count = 0
        pending, self._pending = self._pending, {}
        if not pending:
            return
        task = asyncio.ensure_future(self._send_batch(pending))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send_batch(self, batch: dict[str, tuple[int, list[bytes]]]) -> None:
        """One XACK per stream, all in one go; a failed one takes the retrying path.

        The first attempt skips the retry policy's machinery, which cost
        more CPU than the XACK itself; errors are rare, and ``_send`` then
        retries transient ones and handles NOGROUP as before.
        """
        sent = [
            (stream, shard, ids, self.pipeline.submit(stream, "XACK", stream, self.group, *ids))
            for stream, (shard, ids) in batch.items()
        ]
        await asyncio.wait([future for *_, future in sent])
        retries = []
        for stream, shard, ids, future in sent:
            error = None if future.cancelled() else future.exception()
            if not future.cancelled() and error is None:
                self.broker.events.acked(self.broker.queue_name, shard, len(ids))
                continue
            if isinstance(error, CommandFailure) and is_transient(error.error):
                self.broker.events.retried(error_kind(error.error))
            retries.append(self._send(stream, shard, ids))
        if retries:
            await asyncio.gather(*retries)

    async def _send(self, stream: str, shard: int, ids: list[bytes]) -> None:
        try:
            await self.broker._idempotent(
                lambda: redis_value(self.pipeline.execute(stream, "XACK", stream, self.group, *ids))
            )
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                # The group vanished with its pending list; the reader recreates
                # it at 0, so these entries are delivered again (duplicates,
                # never loss). Nothing is left to acknowledge.
                logger.warning("XACK on %s found no group (%s); entries will be redelivered",
                               stream, exc)
            else:
                self._failed(stream, ids, exc)
            return
        except Exception as exc:
            self._failed(stream, ids, exc)
            return
        self.broker.events.acked(self.broker.queue_name, shard, len(ids))

    @staticmethod
    def _failed(stream: str, ids: list[bytes], exc: BaseException) -> None:
        logger.warning(
            "Could not acknowledge %d entries of %s (%r); they stay pending and are "
            "redelivered after idle_timeout", len(ids), stream, exc,
        )

    async def drain(self, timeout: float = 5.0) -> None:
        if self._pending:
            self._flush()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)


class _EntryAck:
    """The ``ack`` of one handed-out entry: queue its XACK, end its lease.

    An object rather than a closure so that the hand-out point can find the
    entry's lease from the message.
    """

    __slots__ = ("acks", "entry_id", "lease", "leases", "shard", "stream")

    def __init__(
        self,
        acks: _AckBatcher,
        stream: str,
        shard: int,
        entry_id: bytes,
        lease: Lease | None,
        leases: LeaseRenewer | None,
    ) -> None:
        self.acks = acks
        self.stream = stream
        self.shard = shard
        self.entry_id = entry_id
        self.lease = lease
        self.leases = leases

    async def __call__(self) -> None:
        self.acks.add(self.stream, self.shard, self.entry_id)
        if self.lease is not None and self.leases is not None:
            self.leases.end(self.lease)


class ClusterStreamBroker(ShardedBroker):
    """Sharded Redis Streams broker for Redis Cluster (at-least-once).

    The queue is split into shards (default: 4 per master) whose hash tags
    the planner spreads evenly over the masters. Kicks are auto-pipelined per
    node; every worker process reads every shard through one consumer group,
    acks in batches, reclaims the work of crashed workers after
    ``idle_timeout`` ms and dead-letters poison messages.

    Migrating from taskiq-redis is a change of import: the constructor takes
    ``url`` first and the keyword names of ``RedisStreamBroker``.

    Example::

        broker = ClusterStreamBroker("redis://127.0.0.1:7000", queue_name="jobs")

    Delivery is at least once: a task may run twice (after a crash, a
    failover, or a lost consumer group) but an acknowledged kick is not
    lost, except for writes that were not yet replicated when their master
    died; ``wait_replicas=1`` narrows that window (see docs/guarantees.md).
    """

    options: StreamOptions
    #: Renews the entries this worker holds; created at the first read.
    _leases: LeaseRenewer | None = None

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int | None = None,
        consumer_group_name: str = "taskiq",
        consumer_name: str | None = None,
        consumer_id: str | None = None,
        mkstream: bool = True,
        xread_block: int = 2_000,
        maxlen: int | None = None,
        approximate: bool = True,
        additional_streams: Mapping[str, str] | None = None,
        *,
        idle_timeout: int = 600_000,
        xread_count: int = 100,
        unacknowledged_batch_size: int = 100,
        unacknowledged_lock_timeout: float | None = None,
        options: StreamOptions | None = None,
        events: BrokerEvents | None = None,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the broker; no I/O happens until it starts.

        The positional order and the keyword names are those of
        taskiq-redis's ``RedisStreamClusterBroker``; the keywords its
        single-node ``RedisStreamBroker`` adds (``idle_timeout``,
        ``xread_count``, ``unacknowledged_batch_size``,
        ``unacknowledged_lock_timeout``) are keyword-only. Other
        :class:`StreamOptions` fields (for example ``wait_replicas``,
        ``max_deliveries``, ``shards``) may be passed as keywords, and any
        remaining keyword goes to redis-py's ``RedisCluster`` (for example
        ``ssl_ca_certs``). ``options=`` replaces all of them. The
        differences are listed, with their reasons, in docs/brokers.md:

        ``consumer_id`` is accepted for compatibility but groups are always
        created at ``0``: starting at ``$`` silently skips queued tasks.
        ``mkstream`` is accepted: every shard's stream is always created.
        ``unacknowledged_lock_timeout`` is accepted and unused: reclaiming
        needs no lock because XAUTOCLAIM is atomic. ``additional_streams``
        raises :class:`InvalidOptionError`: use one broker per queue.
        """
        if additional_streams:
            raise InvalidOptionError(
                option="additional_streams", reason="is not supported: use one broker per queue"
            )
        if consumer_id not in (None, "0", "$"):
            raise InvalidOptionError(
                option="consumer_id", reason="must be '0' or '$' (groups start at 0)"
            )
        del mkstream, unacknowledged_lock_timeout  # see docstring
        values: dict[str, Any] = {
            "queue_name": queue_name,
            "consumer_group_name": consumer_group_name,
            "idle_timeout": idle_timeout,
            "xread_block": xread_block,
            "xread_count": xread_count,
            "unacknowledged_batch_size": unacknowledged_batch_size,
            "maxlen": maxlen,
            "approximate": approximate,
        }
        if consumer_name is not None:
            values["consumer_name"] = consumer_name
        options = resolve_options(
            StreamOptions, options, kwargs,
            max_connection_pool_size=max_connection_pool_size, **values,
        )
        check_client_kwargs(options.connection.extra)
        super().__init__(url, options, events=events, retry=retry)
        self._acks: _AckBatcher | None = None
        # Commands that never WAIT (acks, housekeeping scripts, XAUTOCLAIM),
        # auto-pipelined per node. The kick pipeline may end each batch with
        # WAIT, which these must not pay for (see _after_startup).
        self._plain: AutoPipeline | None = None
        # The shard scripts bound to the client: called as (keys=, args=).
        self._scripts: dict[str, Callable[..., Awaitable[Any]]] = {}
        # Entries delivered to the listen buffer, by id() of their message, so
        # that the ones taskiq never received can be released at shutdown.
        self._unhanded: dict[int, tuple[str, bytes]] = {}
        # Entries a cancelled reader had read but not yet passed on.
        self._unread: list[tuple[str, bytes]] = []
        # Running delayed-task promoters (one per shard reader), so that
        # shutdown can wait for them.
        self._promoters = Promoters()

    # ------------------------------------------------------------ lifecycle
    def _blocking_seconds(self) -> float:
        return self.options.xread_block / 1000

    def _make_pipeline(self, client: RedisCluster) -> AutoPipeline:
        return AutoPipeline(
            client,
            max_batch=self.options.max_batch,
            wait_replicas=self.options.wait_replicas,
            wait_timeout=self.options.wait_timeout,
        )

    async def _after_startup(self, client: RedisCluster) -> None:
        # Every shard's stream exists with its group from the start. Kicks
        # never create a stream (NOMKSTREAM), so without this the first kick
        # to each shard of a new queue would be refused and sent twice.
        assert self._follower is not None
        plan = await self._follower.current()
        prefix = self.options.prefix
        await asyncio.gather(*(
            self._ensure_group(stream, client)
            for s in plan.shards
            for stream in ShardKeys(prefix, s.tag).lanes(self.options.priority_lanes)
        ))
        # Acks never WAIT: losing an ack only causes a redelivery. Nor does
        # housekeeping, which goes through the same pipeline: through
        # redis-py's cluster client each script cost a worker several times
        # its own time, a few times per shard every second, and held up the
        # shard's reader meanwhile.
        plain = self._plain = AutoPipeline(client, max_batch=self.options.max_batch)
        self._acks = _AckBatcher(
            plain, self.options.consumer_group_name, self, max_batch=self.options.max_batch
        )
        self._scripts = {
            "trim": functools.partial(_SAFE_TRIM, plain),
            "stale": functools.partial(_REMOVE_STALE_CONSUMERS, plain),
            "dead": functools.partial(_DEAD_LETTER, plain),
        }

    def _handed_out(self, message: AckableMessage | bytes) -> None:
        self._unhanded.pop(id(message), None)
        if self._leases is not None and isinstance(message, AckableMessage):
            ack = message.ack
            if isinstance(ack, _EntryAck) and ack.lease is not None:
                self._leases.handed_out(ack.lease, message.data)

    async def _release(self, messages: list[AckableMessage | bytes]) -> None:
        """Make read-but-unprocessed entries reclaimable by other workers now.

        ``messages`` are the listen buffer's; readers that stopped mid-batch
        left theirs in ``_unread``.
        """
        by_stream: dict[str, list[bytes]] = {}
        unread, self._unread = self._unread, []
        formatter = self.formatter
        for message in messages:
            meta = self._unhanded.pop(id(message), None)
            if meta is not None:
                unread.append(meta)
            if isinstance(message, AckableMessage) and isinstance(formatter, MessageFormatter):
                formatter.forget(message.data)
        for stream, entry_id in unread:
            ids = by_stream.setdefault(stream, [])
            if entry_id not in ids:
                ids.append(entry_id)
        for stream, ids in by_stream.items():
            await self._release_entries(stream, ids)

    async def _release_entries(self, stream: str, ids: list[bytes]) -> None:
        """Mark ``ids`` (pending on this consumer) as idle past ``idle_timeout``.

        Redis has no "un-read", but XCLAIM with IDLE sets an entry's idle time,
        so the next XAUTOCLAIM pass of any live worker (or the rebalancer's
        move of a draining shard) takes it at once instead of after
        ``idle_timeout``: a graceful restart would otherwise delay up to
        ``xread_count`` tasks by ``idle_timeout``.
        """
        opts = self.options
        leases = self._leases
        if leases is not None:  # renewing would undo the release
            for entry_id in ids:
                lease = leases.find(stream, entry_id)
                if lease is not None:
                    leases.end(lease)
        try:
            await self._idempotent(lambda: self.client.xclaim(
                stream, opts.consumer_group_name, opts.consumer_name,
                min_idle_time=0, message_ids=list[Any](ids), idle=opts.idle_timeout + 1,
                justid=True,
            ))
        except Exception as exc:  # they are still reclaimed after idle_timeout
            logger.warning("Could not release %d entries of %s: %r", len(ids), stream, exc)
            return
        logger.info("Released %d unprocessed entries of %s for other workers", len(ids), stream)

    async def _before_close(self) -> None:
        await self._promoters.stop_all()
        if self._leases is not None:
            await self._leases.close()
        if self._acks is not None:
            await self._acks.drain()
            await self._acks.pipeline.drain()

    def _prefetch(self) -> int:
        return self.options.xread_count

    def _member_name(self) -> str:
        return self.options.consumer_name

    def _housekeeping(self) -> AutoPipeline:
        """The pipeline of commands that never WAIT (set up at startup)."""
        assert self._plain is not None
        return self._plain

    def _lanes(self) -> tuple[int, int]:
        return self.options.priority_lanes, self.options.priority_fairness

    # ----------------------------------------------------------------- kick
    def _trim_args(self) -> tuple[Any, ...]:
        if self.options.maxlen is None:
            return ()
        return ("MAXLEN", "~" if self.options.approximate else "=", self.options.maxlen)

    def _write_command(self, keys: ShardKeys) -> tuple[str, tuple[Any, ...]]:
        stream = keys.stream
        return stream, ("XADD", stream, "NOMKSTREAM", *self._trim_args(), "*", _DATA)

    def _controls(self, message: BrokerMessage) -> TaskControls | None:
        """The ``delay``/``dedup_key``/``priority`` a message asks for; None
        for a plain XADD to the shard's stream.

        :raises InvalidOptionError: for a bad ``delay``, ``dedup_ttl`` or
            ``priority``.
        """
        return read_controls(
            message.labels, dedup_ttl=self.options.dedup_ttl, lane_of=self.options.lane_of
        )

    async def _write_controlled(
        self, pipeline: AutoPipeline, shard: Shard, message: BrokerMessage, controls: Any
    ) -> Reply:
        """A priority-only kick is the plain write to its lane; else one script (see the hook)."""
        assert isinstance(controls, TaskControls)
        keys = ShardKeys(self.options.prefix, shard.tag)
        stream = keys.lane(controls.lane)
        if not controls.delay_ms and controls.dedup_key is None:
            # Only a priority: the plain write, to the lane's stream.
            return await pipeline.submit(
                stream, "XADD", stream, "NOMKSTREAM", *self._trim_args(), "*", _DATA,
                message.message,
            )
        return await kick_controlled(pipeline, _KICK_CONTROLLED, stream, keys, message, controls,
                                     controls.lane, *self._trim_args())

    def _landed(self, reply: Reply) -> bool:
        # NOMKSTREAM answers nil, writing nothing, when the stream is missing.
        return reply.value is not None

    async def _recreate_shard(self, keys: ShardKeys) -> None:
        for stream in keys.lanes(self.options.priority_lanes):
            await self._ensure_group(stream)

    def _check_reply(self, message: BrokerMessage, reply: Reply) -> None:
        wanted = self.options.wait_replicas
        if wanted and (reply.replicas or 0) < wanted:
            self.events.publish_error(self.queue_name, "replication_timeout")
            raise ReplicationTimeoutError(
                queue=self.queue_name,
                task_id=message.task_id,
                acked=reply.replicas or 0,
                wanted=wanted,
                timeout_ms=self.options.wait_timeout,
            )

    # --------------------------------------------------------------- listen
    async def _read_shard(
        self, shard: Shard, *, draining: bool, sink: Sink, count: int, stop: StopSignal,
        housekeeper: bool,
    ) -> None:
        """Read the shard's stream and its priority lanes; keep house if asked.

        One blocking XREADGROUP reads every lane (they share the shard's
        slot), so an idle shard costs one blocked read per reader. The
        housekeeping (reclaim, trim, stale consumers, delayed tasks) runs
        beside the reads, never in front of one: a task kicked during a
        reclaim pass is read at once.
        """
        keys = ShardKeys(self.options.prefix, shard.tag)
        lanes = _ShardLanes(keys, self.options.consumer_group_name, self.options.consumer_name,
                            count, self.options.xread_block, self.options.priority_lanes)
        await self._refresh_lanes(lanes)
        tasks = [asyncio.ensure_future(self._read_lanes(keys, shard, lanes, sink=sink, stop=stop))]
        if housekeeper:
            # Due delayed tasks of this shard go into its streams while it is read.
            self._promoters.start(DelayedPromoter(
                self._housekeeping(), keys, self._trim_args(),
                lanes=self.options.priority_lanes, retry=self.retry,
            ))
            tasks.append(asyncio.ensure_future(self._keep_house(keys, shard, lanes, sink, stop)))
        try:
            # Both return once stop is set; an error in the reader ends both,
            # and the supervisor restarts the shard's reader.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

    async def _priority_lanes(self, keys: ShardKeys) -> list[int]:
        """The shard's priority lanes to read, highest first.

        Those of ``priority_lanes`` and any other that exists: a producer
        configured with more lanes than this worker (a rolling deploy that
        changes the option, say) must not strand its tasks in a lane
        nobody reads.
        """
        wanted = set(range(1, self.options.priority_lanes))
        plain = self._housekeeping()

        async def existing() -> list[Any]:
            # Submitted in one tick: one batch to the shard's node.
            lanes = [keys.lane(lane) for lane in range(1, MAX_LANES)]
            return list(await asyncio.gather(
                *(redis_value(plain.submit(lane, "EXISTS", lane)) for lane in lanes)
            ))

        found = await self._idempotent(existing)
        wanted.update(lane for lane, there in enumerate(found, start=1) if there)
        return sorted(wanted, reverse=True)

    async def _refresh_lanes(self, lanes: _ShardLanes) -> None:
        """Look the shard's priority lanes up again; groups for new ones first."""
        found = await self._priority_lanes(lanes.keys)
        if found == lanes.numbers and lanes.streams:
            return
        for lane in [*found, 0]:
            stream = lanes.keys.lane(lane)
            if stream not in lanes.lane_of:
                await self._ensure_group(stream)
        lanes.use(found)

    async def _read_lanes(
        self, keys: ShardKeys, shard: Shard, lanes: _ShardLanes, *, sink: Sink, stop: StopSignal,
    ) -> None:
        """Read the shard's lanes until ``stop``, with one XREADGROUP for all of them.

        Redis answers with up to ``count`` entries of each stream, highest
        lane first. While a lane-0 entry waits for room in the listen buffer
        (a busy worker), a second reader watches the priority lanes alone
        (:class:`_PriorityWatch`): a priority task must not wait behind the
        lane-0 backlog this worker already holds.
        """
        opts = self.options
        watch = _PriorityWatch(self, keys, shard, lanes, sink, stop)
        failures = 0
        next_lookup = time.monotonic() + opts.trim_interval
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_lookup:
                        next_lookup = time.monotonic() + opts.trim_interval
                        await self._refresh_lanes(lanes)
                    rows = await self._read_new(lanes.streams, lanes.read_all, lanes.count)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if stop.is_set():
                        return
                    if not await self._read_failed(lanes.streams, shard, exc, failures + 1):
                        raise
                    failures = 0 if _lost_group(exc) else failures + 1
                    continue
                for key, entries in rows:
                    name = key.decode() if isinstance(key, bytes) else str(key)
                    await self._hand_out(keys, shard, name, lanes.lane_of.get(name, 0),
                                         [(i, e, 1) for i, e in entries], sink, stop,
                                         wait=watch.wait)
        except asyncio.CancelledError:
            watch.cancel()
            raise
        finally:
            await watch.close()

    async def _read_failed(
        self, streams: list[str], shard: Shard, exc: Exception, failures: int
    ) -> bool:
        """Recover from a failed read of ``streams``; False if ``exc`` is not for a retry.

        A lost group is recreated at 0 at once; a transient error waits the
        retry policy's delay for the ``failures``-th failure in a row.
        """
        if _lost_group(exc):
            assert isinstance(exc, ResponseError)
            await self._recover_group(streams, shard, exc)
            return True
        if not is_transient(exc):
            return False
        await self._backoff(streams[0], exc, failures)
        return True

    async def _keep_house(
        self, keys: ShardKeys, shard: Shard, lanes: _ShardLanes, sink: Sink, stop: StopSignal
    ) -> None:
        """The shard's timers, for its one housekeeper: reclaim, trim, stale consumers.

        Beside the reader, so no read waits behind a pass. A pass that
        fails is tried again after the retry policy's delay (the reader
        recovers a lost group; the next pass finds it again).
        """
        opts = self.options
        now = time.monotonic()
        next_reclaim = now  # a restarted worker picks up its crashed work first
        # Stagger trims so housekeepers of many shards do not trim together.
        next_trim = now + opts.trim_interval * (0.5 + (hash(keys.tag) % 100) / 200)
        # A consumer qualifies as stale after an hour by default: looking for
        # them at every trim (each half second in the benchmark) cost as much
        # as the trim. A quarter of the idle time, at most a minute, is soon
        # enough, and never less often than trims.
        stale_every = max(opts.trim_interval, min(60.0, opts.stale_consumer_idle / 4000))
        next_stale = next_trim
        failures = 0
        while not stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_reclaim:
                    for stream in list(lanes.streams):
                        await self._reclaim(keys, shard, stream, lanes.lane_of[stream], sink, stop)
                    next_reclaim = time.monotonic() + opts.effective_reclaim_interval
                if now >= next_trim:
                    stale = now >= next_stale
                    for stream in list(lanes.streams):
                        await self._housekeep(stream, stale=stale)
                    next_trim = time.monotonic() + opts.trim_interval
                    if stale:
                        next_stale = time.monotonic() + stale_every
                failures = 0
                wait = max(0.0, min(next_reclaim, next_trim) - time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop.is_set():
                    return
                failures += 1
                self.events.retried(error_kind(exc))
                wait = self.retry.delay(failures)
                log = logger.warning if failures in (1, 10) else logger.debug
                log("Housekeeping of shard %s failed (%s: %s); again in %.2fs", keys.tag,
                    error_kind(exc), exc, wait)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _hand_out(
        self,
        keys: ShardKeys,
        shard: Shard,
        stream: str,
        lane: int,
        entries: list[tuple[bytes, Mapping[bytes, bytes] | None, int]],
        sink: Sink,
        stop: StopSignal,
        *,
        wait: Callable[[AckableMessage, int], Awaitable[None]] | None = None,
    ) -> None:
        """Pass read ``entries`` (id, fields, deliveries) on, each on its own.

        An entry the listen buffer has no room for waits in ``wait`` (by
        default ``sink`` itself).

        No entry this worker read may wait ``idle_timeout`` for nothing: one
        that fails (its dead letter cannot be written, say) is released for
        the next reclaim pass while the rest still go out, and when the
        listen is closing the rest are left to ``_release``.

        Every entry is leased from here on (see ``_lease``): while it waits
        for room in the listen buffer behind long tasks, another worker
        reclaiming it would run it while this one also does later. Whatever
        leaves this method unhanded ends its lease through
        ``_release_entries`` (directly or through ``_release``).
        """
        leases = self._leases if self._leases is not None else self._start_leases()
        held: list[Lease | None] = [None] * len(entries)
        if leases is not None:
            for index, (entry_id, _, _) in enumerate(entries):
                lease = held[index] = Lease(stream, entry_id)
                leases.hold(lease)
        for index, (entry_id, entry, deliveries) in enumerate(entries):
            if stop.closing:
                self._unread += [(stream, e) for e, _, _ in entries[index:]]
                return
            try:
                message = self._message(stream, shard, entry_id, entry, deliveries, held[index])
                if isinstance(message, str):
                    await self._dead_letter(keys, shard, stream, entry_id, entry or {}, message,
                                            deliveries)
                    ended = held[index]
                    if ended is not None and self._leases is not None:
                        self._leases.end(ended)
                elif not sink.offer(message, lane):
                    await (wait or sink)(message, lane)
            except asyncio.CancelledError:
                self._unread += [(stream, e) for e, _, _ in entries[index:]]
                raise
            except Exception as exc:
                logger.error("Could not hand out entry %s of %s (%r); releasing it for the "
                             "next reclaim pass", entry_id.decode(), stream, exc)
                await self._release_entries(stream, [entry_id])

    async def _read_new(
        self, streams: list[str], args: tuple[Any, ...], count: int
    ) -> list[tuple[bytes | str, list[tuple[bytes, Mapping[bytes, bytes] | None]]]]:
        """One blocking XREADGROUP of new entries of ``streams`` (one shard's lanes).

        Returns (stream, entries) for each stream that had any, in the
        order Redis answered; an entry is (id, fields or None if deleted).

        It goes straight to the shard's node: redis-py's own path cost a
        quarter of a worker's CPU here (for every XREADGROUP it first asks a
        node ``COMMAND GETKEYS``, a second round trip, then parses the reply
        through an awaited call per element). While the slot map is
        reloading or the slot moved, redis-py's path follows the redirect.
        """
        assert self._pipeline is not None
        try:
            raw = await self._pipeline.call(streams[0], *args)
        except Unroutable:
            opts = self.options
            response = await self.client.xreadgroup(
                opts.consumer_group_name, opts.consumer_name, dict.fromkeys(streams, ">"),
                count=count, block=opts.xread_block,
            )
            return [(stream, [(i, dict(f) if f is not None else None) for i, f in entries])
                    for stream, entries in _stream_entries(response)]
        return _raw_stream_entries(raw)

    async def _backoff(self, stream: str, exc: BaseException, failures: int) -> None:
        kind = error_kind(exc)
        self.events.retried(kind)
        delay = self.retry.delay(failures)
        log = logger.warning if failures in (1, 10) or failures % 100 == 0 else logger.debug
        log("Reading %s failed (%s: %s); retry %d in %.2fs", stream, kind, exc, failures,
            delay)
        await self.retry.sleep(delay)

    async def _ensure_group(self, stream: str, client: RedisCluster | None = None) -> None:
        """Create the group of ``stream`` at id 0 (MKSTREAM); an existing group is fine.

        ``client`` is for startup, before the broker counts as running.
        """
        redis = client or self.client

        async def create() -> None:
            try:
                await redis.xgroup_create(
                    stream, self.options.consumer_group_name, id="0", mkstream=True
                )
            except ResponseError as exc:
                # Only BUSYGROUP means "already there"; anything else is real.
                if not str(exc).startswith("BUSYGROUP"):
                    raise

        await self._idempotent(create)

    async def _recover_group(self, streams: list[str], shard: Shard, exc: ResponseError) -> None:
        logger.warning(
            "Consumer group %s of %s is gone (%s); recreating it at id 0 so queued tasks "
            "are replayed, not skipped",
            self.options.consumer_group_name, " ".join(streams), exc,
        )
        self.events.nogroup_recovered(self.queue_name, shard.index)
        for stream in streams:  # one XREADGROUP reads them all; any may be the lost one
            await self._ensure_group(stream)

    def _message(
        self,
        stream: str,
        shard: Shard,
        entry_id: bytes,
        entry: Mapping[bytes, bytes] | None,
        deliveries: int,
        lease: Lease | None,
    ) -> AckableMessage | str:
        """The message to hand out for a read entry, or why it is dead-lettered instead."""
        if deliveries > self.options.max_deliveries:
            return f"max deliveries exceeded ({self.options.max_deliveries})"
        reason = self._malformed_reason(entry)
        if reason is not None:
            return reason
        assert entry is not None
        acks = self._acks
        assert acks is not None
        ack = _EntryAck(acks, stream, shard.index, entry_id, lease, self._leases)
        # Validated: pydantic-core checks two fields faster (1.7 us) than
        # model_construct's Python code skips the check (4.4 us). It keeps the
        # bytes object itself, which the formatter's remembered parse needs.
        message = AckableMessage(data=entry[_DATA], ack=ack)
        self._unhanded[id(message)] = (stream, entry_id)
        return message

    def _start_leases(self) -> LeaseRenewer | None:
        """The lease renewer, created at the first read (None if disabled).

        Its :class:`TaskStartWatcher` goes first among the middlewares, so a
        task's lease resumes before any other middleware's ``pre_execute``.
        """
        opts = self.options
        if not opts.renew_leases:
            return None
        leases = self._leases = LeaseRenewer(
            self._renew_leases,
            opts.effective_lease_renew_interval,
            # A handed-out entry whose task has not started after this long
            # belongs to a listen() consumer that neither runs nor acks it.
            stale_after=max(300.0, 2 * opts.idle_timeout / 1000),
        )
        watcher = TaskStartWatcher(leases)
        watcher.set_broker(self)
        self.middlewares.insert(0, watcher)
        return leases

    async def _renew_leases(self, stream: str, ids: list[bytes]) -> list[bytes]:
        """One renewal script call; the ids no longer pending on this consumer."""
        opts = self.options
        args: list[bytes | str] = [opts.consumer_group_name, opts.consumer_name, *ids]
        try:
            lost = await self._idempotent(
                lambda: _RENEW_LEASES(self._housekeeping(), keys=[stream], args=args)
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group is gone with its pending list; the
            # reader recreates the group at 0 and the entries are replayed.
            # None of them can be renewed again.
            return ids
        return list(lost or [])

    def _malformed_reason(self, entry: Mapping[bytes, bytes] | None) -> str | None:
        """Why an entry cannot be handed out, or None.

        In a worker process (``taskiq worker`` sets ``is_worker_process``)
        only a taskiq message of a known task is handed out: anything else
        would fail in every worker, again and again, so it is dead-lettered.
        Outside a worker the broker is a plain transport, as taskiq-redis's
        is: ``listen()`` yields an ``AckableMessage`` whose ``data`` is the
        raw ``data`` field, whatever it holds, and the caller decides. An
        entry without a ``data`` field has nothing to hand out and is
        dead-lettered everywhere.
        """
        if entry is None:
            return "entry deleted from the stream"
        data = entry.get(_DATA)
        if data is None:
            return "missing 'data' field"
        if not self.is_worker_process:
            return None
        formatter = self.formatter
        try:
            message = formatter.loads(message=data)
        except Exception as exc:
            return f"not a taskiq message: {type(exc).__name__}"
        if self.find_task(message.task_name) is None:
            return f"unknown task {message.task_name!r}"
        if isinstance(formatter, MessageFormatter):
            # taskiq's receiver parses the same bytes next: spare it that.
            formatter.remember(data, message)
        return None

    async def _dead_letter(
        self,
        keys: ShardKeys,
        shard: Shard,
        stream: str,
        entry_id: bytes,
        entry: Mapping[bytes, bytes],
        reason: str,
        deliveries: int,
    ) -> None:
        logger.warning("Dead-lettering entry %s of %s: %s", entry_id.decode(), stream, reason)
        flat: list[bytes | str | int] = []
        for name, value in entry.items():
            flat += [b"field:" + name, value]
        args: list[bytes | str | int] = [
            self.options.consumer_group_name,
            entry_id,
            reason,
            deliveries,
            self.options.dead_letter_maxlen,
            int(time.time() * 1000),
            *flat,
        ]
        script = self._scripts["dead"]
        await self._idempotent(lambda: script(keys=[stream, keys.dead], args=args))
        self.events.dead_lettered(self.queue_name, shard.index, reason.split(":")[0])

    async def _reclaim(
        self, keys: ShardKeys, shard: Shard, stream: str, lane: int, sink: Sink, stop: StopSignal
    ) -> None:
        """Take over entries idle longer than idle_timeout (crashed consumers).

        XAUTOCLAIM is atomic, so concurrent workers claim disjoint entries and
        no lock is needed (a lock could stick when its holder dies).
        """
        opts = self.options
        plain = self._housekeeping()
        start: bytes | str = "0-0"
        # Bounded: at most a few batches per pass, the rest waits a pass.
        for _ in range(4):
            command = ("XAUTOCLAIM", stream, opts.consumer_group_name, opts.consumer_name,
                       opts.idle_timeout, start, "COUNT", opts.unacknowledged_batch_size)
            result = await self._idempotent(
                lambda command=command: redis_value(plain.submit(stream, *command))  # type: ignore[misc]
            )
            # Raw reply: [next start, [[id, [field, value, ...]], ...], [deleted ids]].
            next_start, claimed = result[0], _raw_entries(result[1])
            if claimed:
                self.events.reclaimed(self.queue_name, shard.index, len(claimed))
                logger.info("Reclaimed %d idle entries of %s", len(claimed), stream)
                counts = await self._delivery_counts(stream, [i for i, _ in claimed])
                # An id with no count left the pending list after the claim:
                # its first worker was slow, not dead, and acknowledged it.
                await self._hand_out(
                    keys, shard, stream, lane,
                    [(i, e, counts[i]) for i, e in claimed if i in counts], sink, stop,
                )
                if stop.is_set():
                    return
            if next_start in (b"0-0", "0-0"):
                return
            start = next_start

    async def _delivery_counts(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        """The exact delivery count of each of ``ids``, by id.

        One ``XPENDING stream group id id 1`` per id, pipelined: a single
        range query over the claimed ids (even filtered by consumer) can
        fill its COUNT with this consumer's own entries that lie between
        them, and an id missing from the reply is then not known at all.
        """
        group = self.options.consumer_group_name

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
            return await pipe.execute()

        counts: dict[bytes, int] = {}
        for rows in await self._idempotent(read):
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        return counts

    async def _housekeep(self, stream: str, *, stale: bool = True) -> None:
        """Trim a shard stream's acknowledged entries; with ``stale``, drop stale consumers."""
        trim, remove = self._scripts["trim"], self._scripts["stale"]
        opts = self.options
        removed = 0
        try:
            if opts.maxlen is None:  # with maxlen, XADD already trims
                await self._idempotent(lambda: trim(keys=[stream]))
            if stale:
                removed = await self._idempotent(
                    lambda: remove(keys=[stream],
                                   args=[opts.consumer_group_name, opts.stale_consumer_idle])
                )
        except Exception as exc:  # housekeeping; the next pass retries
            logger.debug("Housekeeping of %s failed: %r", stream, exc)
            return
        if removed:
            logger.info("Removed %d stale consumers from %s", removed, stream)


def _lost_group(exc: BaseException) -> bool:
    """Whether a read failed because the stream or its group is gone."""
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return text.startswith("NOGROUP") or text.startswith("UNBLOCKED")


class _ShardLanes:
    """The streams one shard reader reads (its priority lanes, then lane 0).

    Shared by the reader, its :class:`_PriorityWatch` and the shard's
    housekeeping; the reader refreshes it (``_refresh_lanes``).
    """

    def __init__(
        self, keys: ShardKeys, group: str, consumer: str, count: int, block: int, lanes: int
    ) -> None:
        self.keys = keys
        self.count = count
        self._head = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block)
        self._top = lanes - 1  # a lane the listen buffer does not have
        self.numbers: list[int] = []
        #: Every lane's stream, highest lane first, so a read answers with
        #: the priority entries first.
        self.streams: list[str] = []
        #: The priority lanes' streams alone.
        self.priority: list[str] = []
        self.lane_of: dict[str, int] = {}
        self.read_all: tuple[Any, ...] = ()
        self.read_priority: tuple[Any, ...] = ()

    def use(self, priority_lanes: list[int]) -> None:
        """Read ``priority_lanes`` (highest first) and lane 0 from now on."""
        keys = self.keys
        self.numbers = list(priority_lanes)
        self.priority = [keys.lane(lane) for lane in priority_lanes]
        self.streams = [*self.priority, keys.stream]
        self.lane_of = {keys.lane(lane): min(lane, self._top) for lane in priority_lanes}
        self.lane_of[keys.stream] = 0
        self.read_all = self._read(self.streams)
        self.read_priority = self._read(self.priority)

    def _read(self, streams: list[str]) -> tuple[Any, ...]:
        return (*self._head, "STREAMS", *streams, *(">",) * len(streams))


class _PriorityWatch:
    """Reads a shard's priority lanes while its reader waits to hand out lane 0.

    The reader waits for room in the listen buffer only when the worker
    already holds a full lane-0 backlog; meanwhile this second read keeps
    priority tasks from waiting behind that backlog. It runs only during
    such waits (an idle worker holds one blocked read per shard); once the
    wait ends it finishes its current read, at most ``xread_block``, and
    hands out what that read returned.
    """

    def __init__(
        self, broker: ClusterStreamBroker, keys: ShardKeys, shard: Shard, lanes: _ShardLanes,
        sink: Sink, stop: StopSignal,
    ) -> None:
        self._broker = broker
        self._keys = keys
        self._shard = shard
        self._lanes = lanes
        self._sink = sink
        self._stop = stop
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def wait(self, message: AckableMessage, lane: int) -> None:
        """Wait for room for ``message`` in ``lane``, watching the priority lanes meanwhile."""
        if lane != 0 or not self._lanes.priority:
            await self._sink(message, lane)
            return
        self._waiting += 1
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        try:
            await self._sink(message, lane)
        finally:
            self._waiting -= 1

    async def _run(self) -> None:
        broker, lanes, stop = self._broker, self._lanes, self._stop
        failures = 0
        while self._waiting and not stop.is_set():
            try:
                rows = await broker._read_new(lanes.priority, lanes.read_priority, lanes.count)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop.is_set():
                    return
                failures += 1
                if not await broker._read_failed(lanes.priority, self._shard, exc, failures):
                    # The reader meets the same error on its next read and
                    # ends the shard's reader with it; this watch just stops.
                    logger.error("Watching the priority lanes of %s failed: %r",
                                 self._keys.tag, exc)
                    return
                continue
            for key, entries in rows:
                name = key.decode() if isinstance(key, bytes) else str(key)
                await broker._hand_out(self._keys, self._shard, name, lanes.lane_of.get(name, 1),
                                       [(i, e, 1) for i, e in entries], self._sink, stop)

    def cancel(self) -> None:
        """Stop at once (the reader itself was cancelled)."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        """Wait for the watch's last read (it returns within ``xread_block`` once stopped)."""
        task = self._task
        if task is None:
            return
        if not task.done():
            await asyncio.wait({task}, timeout=self._broker._blocking_seconds() + 5.0)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def _stream_entries(response: Any) -> list[tuple[Any, list[tuple[bytes, Any]]]]:
    """XREADGROUP's reply as a list of (stream, entries), whatever the protocol."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3
        return [(stream, list(entries[0] if entries and isinstance(entries[0], list)
                               else entries)) for stream, entries in response.items()]
    return [(stream, entries) for stream, entries in response]


def _raw_stream_entries(
    reply: Any,
) -> list[tuple[bytes | str, list[tuple[bytes, Mapping[bytes, bytes] | None]]]]:
    """(stream, entries) of a raw XREADGROUP reply (RESP2 or RESP3 shape)."""
    if not reply:
        return []
    # RESP3: {stream: [entry, ...]}; RESP2: [[stream, [entry, ...]], ...].
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(stream, _raw_entries(rows)) for stream, rows in pairs]


def _raw_entries(rows: Any) -> list[tuple[bytes, Mapping[bytes, bytes] | None]]:
    """(id, fields or None) of raw stream entries ``[[id, [field, value, ...]], ...]``."""
    entries: list[tuple[bytes, Mapping[bytes, bytes] | None]] = []
    for entry_id, fields in rows:
        if fields is None:  # deleted after it was added (XDEL)
            entries.append((entry_id, None))
        else:
            it = iter(fields)
            entries.append((entry_id, dict(zip(it, it, strict=False))))
    return entries
