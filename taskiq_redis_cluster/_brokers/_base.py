"""The sharded broker logic, written once.

:class:`ShardedBroker` owns everything the stream and list brokers share:
the lifecycle guard, the one cluster client, the plan (created on first use
and followed through rebalancer epochs), shard choice for kicks, retrying a
kick only when it certainly was not applied, and the listen loop that runs
one reader per shard of this worker's share (``_assign``) and stops readers
whose shard left the plan or the share.

A concrete broker supplies the data-structure specific part through four
small methods: ``_write_command`` (the command that writes a message to a
shard),
``_read_shard`` (a long-running reader feeding a sink), and optionally
``_after_startup`` / ``_before_close``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from abc import abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from redis.asyncio import RedisCluster
from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from .._errors import KickFailedError, KickOutcomeUnknownError
from .._events import NULL_EVENTS, BrokerEvents
from .._keys import ShardKeys, slot_of, workers_key
from .._lifecycle import OwnedClient
from .._options import QueueOptions
from .._planning import PlanFollower, PlanStore, QueueSpec, Shard, ShardPlan, read_topology
from .._redis import (
    AutoPipeline,
    CommandFailure,
    ConnectionOptions,
    Outcome,
    Reply,
    RetryPolicy,
    error_kind,
    master_trouble,
    redact_url,
    retry_policy,
    validate_url,
    write_outcome,
)
from .._serialization import MessageFormatter
from ._assign import Membership, assign
from ._buffer import ListenBuffer
from ._routing import FailingShards

logger = logging.getLogger(__name__)

#: Label that pins all tasks with the same value to one shard (keeps order).
PARTITION_KEY_LABEL = "partition_key"
#: Label that makes a kick idempotent; its key lives in the shard it picks.
DEDUP_KEY_LABEL = "dedup_key"
#: Labels that pin a task to one shard, in the order they are looked at:
#: ordering and deduplication both depend on every kick of a key landing on
#: the same shard, so such kicks never move to another shard.
ROUTING_LABELS = (PARTITION_KEY_LABEL, DEDUP_KEY_LABEL)

class Sink:
    """What a shard reader passes messages to: the listen buffer of one ``listen()``.

    ``await sink(message, lane)`` (lane 0 unless the broker has priority
    lanes) waits while the buffer has no room for the lane; a put that is
    cancelled while waiting records its message as unsent, for
    ``_release``. :meth:`offer` is the no-wait path a reader takes first:
    a busy worker hands out every message through it, without the two
    coroutines per message of the waiting path.
    """

    __slots__ = ("_buffer", "unsent")

    def __init__(self, buffer: ListenBuffer[AckableMessage | bytes]) -> None:
        self._buffer = buffer
        #: Read from Redis but never handed out (a put cancelled while waiting).
        self.unsent: list[AckableMessage | bytes] = []

    def offer(self, item: AckableMessage | bytes, lane: int = 0) -> bool:
        """Put ``item`` now if its lane has room; False (nothing done) if it would wait."""
        buffer = self._buffer
        if buffer.full(lane):
            return False
        buffer.put_nowait(item, lane)
        return True

    async def __call__(self, item: AckableMessage | bytes, lane: int = 0) -> None:
        try:
            await self._buffer.put(item, lane)
        except asyncio.CancelledError:
            self.unsent.append(item)
            raise


def routing_key(message: BrokerMessage) -> str | None:
    """The key that pins ``message`` to one shard, or None for a free kick."""
    labels = message.labels
    for label in ROUTING_LABELS:
        value = labels.get(label)
        if value is not None and value != "":
            return str(value)
    return None


def random_task_id() -> str:
    """A random UUID4 as 32 hex digits, the format of taskiq's default ids.

    taskiq's default builds a ``uuid.UUID`` object per task, a tenth of the
    CPU of a kick here; the same bits straight from ``os.urandom`` cost a
    quarter of that. ``broker.with_id_generator(...)`` still overrides it.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


class StopSignal(asyncio.Event):
    """Tells a shard reader to stop, and why.

    Set alone, the shard left the plan while the listen goes on: the reader
    stops reading but hands out what it already read, since a live worker
    holds those entries. With ``closing`` the listen itself is closing: the
    reader returns at once and leaves the rest for ``_release``, which gives
    it back to other workers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closing = False


class _Reader:
    """A shard reader task, the signal that asks it to stop, and its role."""

    def __init__(self, task: asyncio.Task[None], stop: StopSignal, *, housekeeper: bool) -> None:
        self.task = task
        self._stop = stop
        self.housekeeper = housekeeper

    def stop(self, *, closing: bool) -> None:
        """Ask the reader to return after its current read.

        Not a cancel: a blocking read cancelled after the server answered
        would leave the entries it delivered pending, unseen, for a whole
        ``idle_timeout``. A read ends within its block time.
        """
        self._stop.closing = self._stop.closing or closing
        self._stop.set()

    def failure(self) -> BaseException | None:
        if not self.task.done() or self.task.cancelled():
            return None
        return self.task.exception()


class ShardedBroker(AsyncBroker):
    """Base of the sharded queue brokers; not used directly."""

    def __init__(
        self,
        url: str,
        options: QueueOptions,
        *,
        events: BrokerEvents | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__()
        # Both are taskiq's defaults made cheaper; with_id_generator() and
        # with_formatter() still replace them.
        self.id_generator = random_task_id
        self.formatter = MessageFormatter(self)
        validate_url(url)
        self.url = url
        self.options = options
        self.events = events or NULL_EVENTS
        self.retry = retry_policy(retry)
        self._owned = OwnedClient(type(self).__name__)
        self._lifecycle = self._owned.lifecycle
        self._pipeline: AutoPipeline | None = None
        self._follower: PlanFollower | None = None
        self._round_robin = itertools.count()
        self._failing = FailingShards()
        # Per plan: for each shard, the routing key and the write command
        # without the message, so a kick builds no key strings.
        self._targets: tuple[ShardPlan | None, list[tuple[Shard, str, tuple[Any, ...]]]] = (
            None, [],
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={redact_url(self.url)!r}, "
            f"queue_name={self.options.queue_name!r})"
        )

    # ----------------------------------------------------------------- state
    @property
    def client(self) -> RedisCluster:
        """The broker's cluster client (only while running)."""
        return self._owned.get("client access")

    @property
    def queue_name(self) -> str:
        """Logical queue name."""
        return self.options.queue_name

    async def current_plan(self) -> ShardPlan:
        """The plan in force, re-read cheaply when the epoch changes.

        Starts the broker first if it was not started yet.
        """
        if not self._lifecycle.running:
            await self._lifecycle.ensure_started(self.startup, "current_plan()")
        assert self._follower is not None
        return await self._follower.current()

    @property
    def redis(self) -> RedisCluster:
        """The broker's cluster client, under taskiq-redis's attribute name.

        Read-only and only while running (:class:`LifecycleError` otherwise):
        the broker owns the client and closes it in ``shutdown()``, so do not
        close it yourself, and keep it for single-key commands (the queue's
        own keys are sharded; see ``docs/brokers.md``).
        """
        return self._owned.get("redis")

    # ------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        """Connect, load or create the queue's plan, then run taskiq's startup.

        Optional for producers: the first ``kick()``, ``listen()`` or
        ``current_plan()`` starts the broker. After such a lazy start this
        does nothing.

        :raises LifecycleError: if called twice, or after ``shutdown()``.
        :raises NotAClusterError: if the URL is not a cluster node.
        """
        await self._lifecycle.start(self._start)

    async def _start(self) -> None:
        client = await self._owned.open(self.url, self._connection_options())
        try:
            self._pipeline = self._make_pipeline(client)
            store = PlanStore(client, prefix=self.options.prefix)
            await self.retry.call(lambda: self._ensure_plan(client, store))
            self._follower = PlanFollower(
                store, self.options.queue_name, poll_interval=self.options.plan_poll_interval
            )
            await self._after_startup(client)
            await super().startup()
        except BaseException:
            await self._owned.abort()
            raise
        self._lifecycle.started()

    async def _ensure_plan(self, client: RedisCluster, store: PlanStore) -> ShardPlan:
        existing = await store.load(self.options.queue_name)
        if existing is not None:
            return existing
        topology = await read_topology(client)
        owning = sum(1 for m in topology.masters if m.slots)
        shards = self.options.shards or max(1, owning) * self.options.shards_per_master
        return await store.get_or_create(
            topology, QueueSpec(name=self.options.queue_name, shards=shards)
        )

    async def shutdown(self) -> None:
        """Run taskiq's shutdown, let pending writes and acks through, close.

        Safe to call twice, and on a broker that never started. A start in
        progress (a first kick racing this call) is let finish first, so its
        client is closed and taskiq's shutdown runs.
        """
        await self._lifecycle.wait_for_start()
        if self._lifecycle.running:
            # Shutdown handlers may still kick tasks, so they run first.
            await super().shutdown()
        await self._owned.close(before=self._flush)

    async def _flush(self) -> None:
        await self._before_close()
        if self._pipeline is not None:
            await self._pipeline.drain()

    def _make_pipeline(self, client: RedisCluster) -> AutoPipeline:
        return AutoPipeline(client)

    def _connection_options(self) -> ConnectionOptions:
        # Our own retries replace redis-py's so an XADD is never re-sent when
        # its outcome is unknown (see _redis/_retry.py).
        options = replace(self.options.connection, retries=0)
        # A blocked read must not look like a dead server.
        floor = self._blocking_seconds() + 5.0
        if options.socket_timeout < floor:
            options = replace(options, socket_timeout=floor)
        return options

    def _blocking_seconds(self) -> float:
        """Longest time one blocking read of a reader may wait."""
        return 0.0

    async def _after_startup(self, client: RedisCluster) -> None:
        """Hook: extra startup work of a concrete broker."""

    async def _before_close(self) -> None:
        """Hook: flush buffers before the client closes."""

    # ------------------------------------------------------------------ kick
    def _shard_index(self, plan: ShardPlan, routing: str | None) -> int:
        # A routed kick keeps its shard (order, dedup); a free one avoids
        # shards whose master is failing.
        if routing is not None:
            return slot_of(routing) % len(plan.shards)
        return self._free_index(plan)

    def _targets_of(self, plan: ShardPlan) -> list[tuple[Shard, str, tuple[Any, ...]]]:
        cached_plan, targets = self._targets
        if cached_plan is not plan:
            prefix = self.options.prefix
            targets = [
                (shard, *self._write_command(ShardKeys(prefix, shard.tag)))
                for shard in plan.shards
            ]
            self._targets = (plan, targets)
        return targets

    async def kick(self, message: BrokerMessage) -> None:
        """Enqueue ``message`` on one shard of the queue.

        A kick is retried only when the error proves the write was not
        applied (redirect, cluster down, failed connect).

        :raises LifecycleError: after ``shutdown()`` (before ``startup()`` the
            first kick starts the broker).
        :raises KickFailedError: the task was certainly not enqueued.
        :raises KickOutcomeUnknownError: the connection broke after sending;
            the task may be enqueued. Retrying may duplicate it.
        :raises ReplicationTimeoutError: enqueued, but ``wait_replicas`` were
            not reached in time.
        """
        if not self._lifecycle.running:
            await self._lifecycle.ensure_started(self.startup, "kick()")
        follower, pipeline = self._follower, self._pipeline
        assert follower is not None
        assert pipeline is not None
        plan = follower.fresh() or await follower.current()
        routing = routing_key(message)
        index = self._shard_index(plan, routing)
        # Task controls (delay, dedup, priority) take a script or another
        # key; a kick without labels pays one truth test and keeps the
        # cached command.
        controls = self._controls(message) if message.labels else None
        attempt = 0
        while True:
            attempt += 1
            shard, key, command = self._targets_of(plan)[index]
            try:
                if controls is None:
                    reply = await pipeline.submit(key, *command, message.message)
                else:
                    reply = await self._write_controlled(pipeline, shard, message, controls)
            except CommandFailure as failure:
                outcome = write_outcome(failure.error, sent=failure.sent)
                kind = error_kind(failure.error)
                if outcome is Outcome.NOT_APPLIED and attempt < self.retry.attempts:
                    self.events.retried(kind)
                    if routing is None and master_trouble(failure.error):
                        # Nothing was written, and any shard will do: go to
                        # one whose master is not failing instead of waiting.
                        self._mark_failing(plan, shard)
                        rerouted = self._free_index(plan)
                        if not self._failing.failing(plan.shards[rerouted].tag):
                            self.events.rerouted(self.queue_name, shard.index)
                            index = rerouted
                            continue
                        index = rerouted
                    await self.retry.sleep(self.retry.delay(attempt))
                    continue
                self.events.publish_error(self.queue_name, kind)
                if outcome is Outcome.UNKNOWN:
                    raise KickOutcomeUnknownError(
                        queue=self.queue_name, reason=f"{kind}: {failure.error}"
                    ) from failure.error
                raise KickFailedError(
                    queue=self.queue_name, reason=f"{kind}: {failure.error}"
                ) from failure.error
            if not self._landed(reply):
                plan = await self._shard_missing(plan, shard, attempt)
                index %= len(plan.shards)
                continue
            if self._failing:
                self._failing.recovered(shard.tag)
            self._check_reply(message, reply)
            self.events.published(self.queue_name, shard.index)
            return

    def _free_index(self, plan: ShardPlan) -> int:
        """Round robin over the shards, skipping those cooling down.

        When every shard is cooling down, the next one in turn is used: the
        kick then waits and retries there as before.
        """
        count = len(plan.shards)
        index = next(self._round_robin) % count
        if not self._failing:
            return index
        for _ in range(count):
            if not self._failing.failing(plan.shards[index].tag):
                return index
            index = next(self._round_robin) % count
        return index

    def _mark_failing(self, plan: ShardPlan, shard: Shard) -> None:
        """Cool down ``shard`` and every shard of the plan on the same master."""
        assert self._pipeline is not None
        node = self._pipeline.node_name(self._targets_of(plan)[shard.index][1])
        tags = [shard.tag]
        if node is not None:
            tags += [
                s.tag for s, key, _ in self._targets_of(plan)
                if s.tag != shard.tag and self._pipeline.node_name(key) == node
            ]
        self._failing.mark(tags)

    async def _shard_missing(self, plan: ShardPlan, shard: Shard, attempt: int) -> ShardPlan:
        """The write found no key for ``shard`` and wrote nothing: where to retry.

        A shard's key vanishes in two ways. The rebalancer retired the shard
        and cleaned it up, while this process still held the old plan: the
        plan is re-read and the kick goes to the shard's new tag, so a kick
        can never succeed into a stream nobody reads. Or the key of a live
        shard was deleted (DEL, flush, a restart without persistence): it is
        recreated as readers would recreate it, and the kick is sent again.
        """
        assert self._follower is not None
        if attempt >= self.retry.attempts:
            self.events.publish_error(self.queue_name, "shard_missing")
            raise KickFailedError(
                queue=self.queue_name,
                reason=f"shard {shard.tag} has no key after {attempt} attempts",
            )
        try:
            fresh = await self._follower.refresh()
        except Exception as exc:
            self.events.publish_error(self.queue_name, error_kind(exc))
            raise KickFailedError(
                queue=self.queue_name,
                reason=f"shard {shard.tag} is gone and the plan could not be re-read: {exc}",
            ) from exc
        if any(s.tag == shard.tag for s in fresh.shards):
            logger.warning("Shard %s of %s lost its key; recreating it", shard.tag,
                           self.queue_name)
            await self._recreate_shard(ShardKeys(self.options.prefix, shard.tag))
        else:
            logger.info("Shard %s of %s was retired; kicking to the plan of epoch %d",
                        shard.tag, self.queue_name, fresh.epoch)
        return fresh

    async def dedup_task_id(
        self, dedup_key: str, *, partition_key: str | None = None
    ) -> str | None:
        """The task id that holds ``dedup_key``, or None once its TTL ran out.

        That is the task that was queued; a duplicate kick's own task id
        never gets a result. Pass the ``partition_key`` the kicks carried, if
        any: it, not the dedup key, picks their shard (``ROUTING_LABELS``).
        """
        plan = await self.current_plan()
        routing = partition_key if partition_key not in (None, "") else dedup_key
        shard = plan.shards[self._shard_index(plan, str(routing))]
        marker = ShardKeys(self.options.prefix, shard.tag).dedup(str(dedup_key))
        value = await self._idempotent(lambda: self.client.get(marker))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def _landed(self, reply: Reply) -> bool:
        """Hook: False when the write was refused because the shard's key is gone."""
        return True

    async def _recreate_shard(self, keys: ShardKeys) -> None:
        """Hook: recreate a live shard whose key vanished, as its readers would."""

    def _check_reply(self, message: BrokerMessage, reply: Reply) -> None:
        """Hook: inspect a successful write (e.g. the WAIT replica count)."""

    def _controls(self, message: BrokerMessage) -> Any:
        """Hook: the task controls ``message``'s labels ask for, or None.

        None keeps the plain, cached write command. A broker without task
        controls leaves their labels alone, as before they existed.

        :raises InvalidOptionError: for a control label with a bad value.
        """
        return None

    async def _write_controlled(
        self, pipeline: AutoPipeline, shard: Shard, message: BrokerMessage, controls: Any
    ) -> Reply:
        """Hook: write ``message`` to ``shard`` as ``controls`` (from ``_controls``) say.

        Its reply is judged like the plain write's: ``_landed`` (nil when the
        shard's key is gone), then ``_check_reply``. A duplicate (its
        ``dedup_key`` was kicked within the TTL) writes nothing and is not an
        error: the kick returns normally, as the first one did, and
        :meth:`dedup_task_id` tells the task id whose result to look for. A
        retry (``_retries`` label) of the task that holds the key is queued.

        :raises CommandFailure: as the auto-pipeline raises it.
        """
        raise NotImplementedError(f"{type(self).__name__} has no task controls")

    @abstractmethod
    def _write_command(self, keys: ShardKeys) -> tuple[str, tuple[Any, ...]]:
        """The routing key and the command that writes a message to the shard.

        The message bytes are appended as the command's last argument. Called
        once per shard and plan, not per kick.
        """

    # ---------------------------------------------------------------- listen
    async def listen(self) -> AsyncGenerator[AckableMessage | bytes, None]:
        """Yield messages from this worker's share of the plan's shards, fairly.

        The listening workers share the shards out (see ``_assign``; with
        one worker, or ``shard_assignment=False``, it reads them all). One
        reader per shard (and per draining shard during a rebalance) feeds a
        small bounded buffer, so no shard starves and a worker never holds
        more than about ``prefetch`` unprocessed messages.
        """
        if not self._lifecycle.running:
            await self._lifecycle.ensure_started(self.startup, "listen()")
        assert self._follower is not None
        lanes, fairness = self._lanes()
        buffer: ListenBuffer[AckableMessage | bytes] = ListenBuffer(
            self._prefetch(), lanes, fairness
        )
        sink = Sink(buffer)
        unsent = sink.unsent

        readers: dict[str, _Reader] = {}
        # Readers of shards that left the plan, still handing out what they
        # read; a closing listen stops and waits for them like the others.
        retired: list[_Reader] = []
        membership = (
            Membership(self.client, workers_key(self.options.prefix, self.queue_name),
                       self._member_name(), self.options.worker_ttl)
            if self.options.shard_assignment else None
        )
        supervisor = asyncio.create_task(self._supervise(readers, retired, sink, membership))
        getter: asyncio.Future[AckableMessage | bytes] | None = None
        try:
            while True:
                if not buffer.empty() and not supervisor.done():
                    # Fast path: a message is ready; no future and no wait().
                    item = buffer.get_nowait()
                else:
                    getter = asyncio.ensure_future(buffer.get())
                    done, _ = await asyncio.wait(
                        {getter, supervisor}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter not in done:
                        # The supervisor only ends by raising: surface its error.
                        supervisor.result()
                        continue
                    item, getter = getter.result(), None
                self._handed_out(item)
                yield item
        finally:
            supervisor.cancel()
            if membership is not None:
                # First, so the other workers take this one's shards over
                # while its readers finish their last reads.
                await membership.leave()
            everyone = [*readers.values(), *retired]
            for reader in everyone:
                reader.stop(closing=True)
            # Readers finish their current read (at most its block time) and
            # return; one blocked handing over a message is freed by draining
            # the buffer. Only a reader stuck beyond that is cancelled.
            pending: set[asyncio.Task[None]] = {supervisor, *(r.task for r in everyone)}
            deadline = time.monotonic() + self._blocking_seconds() + 5.0
            while pending and time.monotonic() < deadline:
                while not buffer.empty():
                    unsent.append(buffer.get_nowait())
                _, pending = await asyncio.wait(pending, timeout=0.1)
            if pending:
                logger.warning("%d readers of %s did not stop in time; cancelling them",
                               len(pending), self.queue_name)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
            if getter is not None:
                if getter.done() and not getter.cancelled():
                    unsent.append(getter.result())
                getter.cancel()
            while not buffer.empty():
                unsent.append(buffer.get_nowait())
            # Always called: readers may hold read entries of their own.
            await self._release(unsent)

    def _handed_out(self, message: AckableMessage | bytes) -> None:
        """Hook: ``message`` is being given to taskiq."""

    async def _release(self, messages: list[AckableMessage | bytes]) -> None:
        """Hook: hand back what was read but never given to taskiq.

        ``messages`` were in the listen buffer (maybe none); a broker may
        also hold entries its readers read but had not passed on yet.
        """

    def _prefetch(self) -> int:
        return 100

    def _lanes(self) -> tuple[int, int]:
        """Hook: (priority lanes, fairness) of the listen buffer; see ``_buffer``."""
        return 1, 10

    @abstractmethod
    def _member_name(self) -> str:
        """This worker's name in the queue's worker set (its consumer name)."""

    async def _supervise(
        self, readers: dict[str, _Reader], retired: list[_Reader], sink: Sink,
        membership: Membership | None,
    ) -> None:
        """Keep one reader per shard tag this worker reads (active or draining).

        Which tags those are, and which of them this worker keeps house for,
        :func:`assign` says from ``membership``'s heartbeat (see ``_assign``);
        without ``membership`` (``shard_assignment=False``), every tag. A
        reader whose tag left this worker's share, or whose housekeeping
        role changed, stops reading but first hands out what it holds (see
        :class:`StopSignal`); it waits in ``retired`` until it has.
        """
        assert self._follower is not None
        opts = self.options
        interval = opts.heartbeat_interval if membership is not None else opts.plan_poll_interval
        share: tuple[int, int] | None = None
        while True:
            try:
                plan = await self._follower.current()
            except Exception as exc:
                logger.warning("Cannot refresh the plan of %s: %s", self.queue_name, exc)
                await asyncio.sleep(interval)
                continue
            shards = {s.tag: (s, False) for s in plan.shards}
            shards.update({s.tag: (s, True) for s in plan.draining})
            members = await membership.beat() if membership is not None else None
            role = assign(list(shards), members,
                          membership.member if membership is not None else "")
            if membership is not None and share != (len(role.reads), len(members or ())):
                share = (len(role.reads), len(members or ()))
                logger.info(
                    "Reading %d of the %d shards of %s (%s)", len(role.reads), len(shards),
                    self.queue_name,
                    f"{len(members)} listening workers" if members is not None
                    else "worker set unknown: reading all",
                )
            retired[:] = [r for r in retired if not r.task.done()]
            for tag in list(readers):
                if tag not in role.reads or readers[tag].housekeeper != (tag in role.keeps_house):
                    logger.debug("Shard %s of %s left this worker's share (or changed role); "
                                 "stopping its reader", tag, self.queue_name)
                    leaving = readers.pop(tag)
                    leaving.stop(closing=False)
                    retired.append(leaving)
            per_shard = max(1, -(-self._prefetch() // max(1, len(role.reads))))
            for tag in sorted(role.reads):
                shard, draining = shards[tag]
                reader = readers.get(tag)
                if reader is not None and not reader.task.done():
                    continue
                if reader is not None and reader.failure() is not None:
                    logger.error("Reader of shard %s of %s died: %r; restarting",
                                 tag, self.queue_name, reader.failure())
                stop = StopSignal()
                housekeeper = tag in role.keeps_house
                task = asyncio.create_task(
                    self._read_shard(shard, draining=draining, sink=sink, count=per_shard,
                                     stop=stop, housekeeper=housekeeper),
                    name=f"tqrc-reader-{tag}",
                )
                readers[tag] = _Reader(task, stop, housekeeper=housekeeper)
            await asyncio.sleep(interval)

    @abstractmethod
    async def _read_shard(
        self, shard: Shard, *, draining: bool, sink: Sink, count: int, stop: StopSignal,
        housekeeper: bool,
    ) -> None:
        """Read ``shard`` until ``stop`` is set, passing messages to ``sink``.

        Only a ``housekeeper`` runs the shard's timers (delayed-task
        promotion, recovery of crashed workers' entries, trims): each shard
        has one among the listening workers (see ``_assign``).

        Readers must return once ``stop`` is set, also from their error
        handlers: on Python 3.11 a cancellation that races a socket timeout
        can surface as a TimeoutError, which a retry loop would swallow.
        What a reader read before ``stop`` is handed to ``sink`` unless
        ``stop.closing`` is set (see :class:`StopSignal`).
        """

    # ------------------------------------------------------------- utilities
    async def _idempotent(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run an idempotent Redis operation with retries, counting them."""
        return await self.retry.call(fn, on_retry=lambda exc: self.events.retried(error_kind(exc)))
