"""Auto-pipelining: coalesce concurrent commands into one pipeline per node.

Callers ``await pipeline.execute(key, *command)`` as if they sent a single
command. Everything submitted during one event-loop tick is grouped by the
node that owns the key and sent as one pipeline per node; each caller still
gets its own result or its own exception. While a node has ``max_inflight``
batches unanswered (one by default), its new commands wait and go as the
next batch when one is answered: under load a batch carries a few dozen
commands instead of a few, and an idle node still gets a lone command at
once. This is what lets one producer process reach several times the kick
rate of one round trip per kick.

The batch travels on one of redis-py's pooled connections to that node
(redis-py connects, authenticates, negotiates the protocol and does TLS),
but is packed by ``hiredis.pack_command`` and its replies parsed by a
``hiredis.Reader`` (``_hiredis``), under one progress timeout
(``_internals.exchange``, the one place that touches the connection's
streams), instead of through
redis-py's per-command encoder, awaited parser calls and timeout contexts,
which cost more CPU than the commands themselves. hiredis parses in C and in
time linear in the reply size, so a message of tens of megabytes is read as
fast as the socket delivers it. Replies are raw protocol values (bytes, int,
float, bool, None, lists, dicts), without redis-py's response callbacks. Redirected commands
(MOVED/ASK/TRYAGAIN, never applied) and everything sent while the client
must reload its slot map go through redis-py's ``ClusterPipeline``, which
follows redirects. :meth:`AutoPipeline.call` sends one command the same way
without batching, for blocking reads.

Each command gets its own outcome. A failed command raises
:class:`CommandFailure` to its own caller only; it records whether the
command may have reached the server, which decides whether a write can be
retried safely. When a batch breaks off (timeout, dropped connection), the
commands whose replies were already parsed still get those replies: they
were applied, and reporting them as unknown would make a caller that
retries run them twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import hiredis
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import (
    AskError,
    ClusterDownError,
    DataError,
    MovedError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._hiredis import Replies, pack
from ._internals import exchange, mark_node_failed, must_reinitialize, node_for_slot

logger = logging.getLogger(__name__)
# Keys are shard keys, a few per queue; the bound only guards against misuse.
_SLOT_CACHE_SIZE = 4096


class CommandFailure(Exception):
    """Raised to a caller whose command failed inside an auto-pipeline.

    :ivar error: the original redis-py exception.
    :ivar sent: False only when the command certainly never left the client.
    """

    def __init__(self, error: BaseException, *, sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.sent = sent


class Unroutable(Exception):
    """:meth:`AutoPipeline.call` cannot take the fast path; use redis-py's client.

    Raised while the client must reload its slot map, or when the node
    answered MOVED/ASK/TRYAGAIN (the command was not applied), so redis-py
    can follow the redirect and learn the new owner.
    """


class Reply(NamedTuple):
    """Result of one command, plus the replica count WAIT reported for it."""

    value: Any
    replicas: int | None = None


async def redis_value(reply: Awaitable[Reply]) -> Any:
    """The value of an auto-pipelined command; its failure as redis-py's own error.

    For callers whose retry policy and error handling classify redis-py's
    exceptions (NOGROUP, connection loss) rather than :class:`CommandFailure`.
    """
    try:
        return (await reply).value
    except CommandFailure as failure:
        raise failure.error from None


class _Item(NamedTuple):
    key: str
    args: tuple[Any, ...]
    future: asyncio.Future[Reply]


@dataclass
class AutoPipeline:
    """Per-node auto-pipelining over one shared cluster client.

    :param client: initialized cluster client (owned by the caller).
    :param max_batch: most commands in one pipeline.
    :param wait_replicas: when > 0, each node's pipeline ends with
        ``WAIT wait_replicas wait_timeout`` on the same connection, so the
        count applies exactly to the writes of that pipeline.
    """

    client: RedisCluster
    max_batch: int = 512
    wait_replicas: int = 0
    wait_timeout: int = 1000
    #: Most batches in flight to one node. Commands for a node that has this
    #: many unanswered go as one batch when the first is answered (see _flush).
    max_inflight: int = 1
    _pending: list[_Item] = field(default_factory=list)
    _scheduled: bool = False
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: dict[str, int] = field(default_factory=dict)
    # Per node name: batches in flight, and the commands held for the next.
    _busy: dict[str, int] = field(default_factory=dict)
    _held: dict[str, list[_Item]] = field(default_factory=dict)
    _failed: set[str] = field(default_factory=set)  # failed while batches were in flight

    async def execute(self, key: str, *args: Any) -> Reply:
        """Send ``args`` (a full command) in the next pipeline for ``key``'s node.

        :raises CommandFailure: wrapping the redis-py error.
        """
        return await self.submit(key, *args)

    def submit(self, key: str, *args: Any) -> asyncio.Future[Reply]:
        """Like :meth:`execute`, but return the future (no coroutine, no task).

        The future fails with :class:`CommandFailure`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending.append(_Item(key, args, future))
        if not self._scheduled:
            self._scheduled = True
            # Flush on the next tick so that every caller that is ready in
            # this tick joins the same pipeline.
            loop.call_soon(self._flush)
        return future

    def _node_of(self, key: str) -> ClusterNode | None:
        slots = self._slots
        slot = slots.get(key)
        if slot is None:
            if len(slots) >= _SLOT_CACHE_SIZE:
                slots.clear()
            slot = slots[key] = self.client.keyslot(key)
        return node_for_slot(self.client, slot)  # None: let redis-py route it

    def node_name(self, key: str) -> str | None:
        """``host:port`` of the master that owns ``key`` in the cached slot map."""
        node = self._node_of(key)
        return node.name if node is not None else None

    async def call(self, key: str, *args: Any) -> Any:
        """Send one command now, on its own pooled connection; return the raw reply.

        For commands that must not wait for a batch, such as blocking reads.
        The reply is the raw protocol value (see the module docstring),
        without redis-py's response callbacks.

        :raises Unroutable: take redis-py's path instead (nothing was applied).
        :raises redis.exceptions.RedisError: as redis-py would raise it
            (``DataError`` for an argument that cannot be sent).
        """
        node = self._node_of(key)
        if node is None or must_reinitialize(self.client):
            raise Unroutable(key)
        payload = pack([args])
        replies = Replies(1)
        try:
            await exchange(node, payload, replies, [False])
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._node_failed(node)
            raise
        reply = replies.values[0]
        if isinstance(reply, RedisError):
            if isinstance(reply, (MovedError, AskError, TryAgainError)):
                raise Unroutable(key) from reply
            if isinstance(reply, (ClusterDownError, RedisConnectionError)):
                self._node_failed(node)
            raise reply
        return reply

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        groups: dict[str, tuple[ClusterNode | None, list[_Item]]] = {}
        for item in pending:
            node = self._node_of(item.key)
            name = node.name if node is not None else ""
            group = groups.get(name)
            if group is None:
                group = groups[name] = (node, [])
            group[1].append(item)
        # A node with max_inflight batches unanswered gets the new commands
        # as one batch when the first of those is answered (_landed). Under
        # load, batches grow from a few commands to a few dozen, which is
        # what a kick's CPU goes to; an idle node gets each command at once,
        # so a lone kick never waits.
        for name, (node, group_items) in groups.items():
            if node is None:
                self._launch(None, "", group_items)
                continue
            held = self._held.get(name)
            if held is not None:
                held.extend(group_items)
            elif self._busy.get(name, 0) >= self.max_inflight:
                self._held[name] = group_items
            else:
                self._launch(node, name, group_items)

    def _launch(self, node: ClusterNode | None, name: str, items: list[_Item]) -> None:
        for start in range(0, len(items), self.max_batch):
            if name:
                self._busy[name] = self._busy.get(name, 0) + 1
            task = asyncio.ensure_future(self._run(node, items[start : start + self.max_batch]))
            self._inflight.add(task)
            if name:  # before the discard, so drain() never sees a gap
                task.add_done_callback(lambda _: self._landed(name))
            task.add_done_callback(self._inflight.discard)

    def _landed(self, name: str) -> None:
        """A batch to node ``name`` was answered (or failed): send what waited for it.

        If the node failed meanwhile, what waited fails at once as never sent,
        so a kick moves to another master (or retries) without first sitting
        out a timeout of its own against the same node.
        """
        busy = self._busy.get(name, 1) - 1
        if busy > 0:
            self._busy[name] = busy
        else:
            self._busy.pop(name, None)
        held = self._held.pop(name, None)
        failed = name in self._failed
        self._failed.discard(name)
        if held is None:
            return
        if failed:
            error = RedisConnectionError(f"{name} failed while these commands waited to be sent")
            for item in held:
                if not item.future.done():
                    item.future.set_exception(CommandFailure(error, sent=False))
            return
        # Routed again, with the slot map of now: the node may have changed
        # while they waited. They are older than anything pending, so first.
        self._pending[:0] = held
        self._flush()

    async def _run(self, node: ClusterNode | None, items: Sequence[_Item]) -> None:
        # The fast path writes straight to the node that owns the keys. It
        # skips redis-py's ClusterPipeline, which routes every command again
        # (slot, policy, node) and costs more CPU than the command itself.
        # A client that must re-initialize, or redirected commands, take the
        # ClusterPipeline path, which follows MOVED/ASK/TRYAGAIN.
        if node is not None and not must_reinitialize(self.client):
            items = await self._run_on_node(node, items)
            if not items:
                return
            node = None
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.execute_command(*item.args)
        wait = self.wait_replicas > 0 and node is not None
        if wait:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout, target_nodes=node)
        try:
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            # The whole pipeline failed (connect, send, routing). Whether a
            # command reached the server is unknown unless it is a connect
            # failure, which write_outcome recognises from the error itself.
            for item in items:
                if not item.future.done():
                    item.future.set_exception(CommandFailure(exc, sent=True))
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return
        replicas: int | None = None
        if wait:
            last = results[-1]
            replicas = int(last) if isinstance(last, int) else 0
        for item, result in zip(items, results, strict=False):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(CommandFailure(result, sent=True))
            else:
                item.future.set_result(Reply(result, replicas))

    async def _run_on_node(self, node: ClusterNode, items: Sequence[_Item]) -> list[_Item]:
        """Send ``items`` as one pipeline to ``node``; return the redirected ones."""
        pack = hiredis.pack_command
        try:
            parts = [pack(item.args) for item in items]
        except (TypeError, ValueError):
            # A bad argument fails its own command only, and nothing of it is sent.
            items = self._drop_unpackable(items)
            if not items:
                return []
            return await self._run_on_node(node, items)
        count = len(parts)
        wait = self.wait_replicas > 0
        if wait:
            wait_args: tuple[Any, ...] = ("WAIT", self.wait_replicas, self.wait_timeout)
            parts.append(pack(wait_args))
            count += 1
        written = [False]
        sink = Replies(count)
        replies = sink.values
        failure: BaseException | None = None
        try:
            await exchange(node, b"".join(parts), sink, written)
        except BaseException as exc:
            failure = exc
            if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
                self._node_failed(node)
        replicas: int | None = None
        if wait and len(replies) == count:
            last = replies[-1]
            replicas = last if isinstance(last, int) else 0
        # Replies parsed before a failure are real outcomes: those commands
        # ran. Without WAIT's reply their replica count is unknown (None),
        # which the stream broker reports as enqueued but not confirmed.
        redirected: list[tuple[_Item, RedisError]] = []
        for item, result in zip(items, replies, strict=False):
            if item.future.done():
                continue
            if isinstance(result, RedisError):
                if isinstance(result, (MovedError, AskError, TryAgainError)):
                    # Not applied: the slot moved or is moving. Safe to resend.
                    redirected.append((item, result))
                    continue
                if isinstance(result, (ClusterDownError, RedisConnectionError)):
                    self._node_failed(node)
                item.future.set_exception(CommandFailure(result, sent=True))
            else:
                item.future.set_result(Reply(result, replicas))
        if failure is not None:
            # Only the commands left without a reply fail. Once bytes may have
            # left, their outcome is unknown unless write_outcome can tell
            # from the error itself (as in _run).
            for item in items[len(replies) :]:
                if not item.future.done():
                    item.future.set_exception(CommandFailure(failure, sent=written[0]))
            if isinstance(failure, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                for item, error in redirected:
                    if not item.future.done():
                        item.future.set_exception(CommandFailure(error, sent=True))
                raise failure
        # Redirected writes are resent without WAIT (their node is not known
        # yet), so with wait_replicas they report 0 replicas: enqueued, but
        # not confirmed, which is what a ReplicationTimeoutError says.
        return [item for item, _ in redirected]

    @staticmethod
    def _drop_unpackable(items: Sequence[_Item]) -> list[_Item]:
        kept: list[_Item] = []
        for item in items:
            try:
                hiredis.pack_command(item.args)
            except (TypeError, ValueError) as exc:
                # hiredis takes str, bytes, memoryview, int and float only; a
                # bool is refused (as redis-py refuses it: True would be sent
                # as 1), and a str that is not valid UTF-8 fails to encode.
                if not item.future.done():
                    item.future.set_exception(CommandFailure(DataError(str(exc)), sent=False))
            else:
                kept.append(item)
        return kept

    def _node_failed(self, node: ClusterNode) -> None:
        # redis-py does this itself on its normal path: a node that failed
        # makes the client reload the slot map before the next command. The
        # fast path must do the same, or a producer-only process would keep
        # writing to a dead master after its replica took over.
        mark_node_failed(self.client, node)
        if node.name in self._busy:
            self._failed.add(node.name)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every submitted command has been answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._scheduled:
                await asyncio.sleep(0)  # let the pending flush run
            remaining = deadline - loop.time()
            if not self._inflight or remaining <= 0:
                return
            # Answers can make callers submit more (an ack retry, say); wait for those too.
            await asyncio.wait(set(self._inflight), timeout=remaining)


async def send_batch(node: ClusterNode, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send ``commands`` as one batch on one pooled connection of ``node``.

    For a write that must be followed by ``WAIT`` on the same connection
    (redis-py's ``ClusterPipeline`` may resend ``WAIT`` elsewhere after a
    connection error). Returns one raw reply per command, in order, an error
    reply as its redis-py exception (``MovedError``, ``NoScriptError``...).
    Nothing is retried or rerouted.

    :raises DataError: for an argument that cannot be sent (nothing is sent).
    :raises redis.exceptions.ConnectionError, redis.exceptions.TimeoutError:
        the batch broke off; whether its commands ran is unknown, and the
        connection was dropped.
    """
    sink = Replies(len(commands))
    await exchange(node, pack(commands), sink, [False])
    return sink.values
