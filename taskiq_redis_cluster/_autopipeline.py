"""Auto-pipelining: coalesce concurrent commands into one pipeline per node.

Callers ``await pipeline.execute(key, *command)`` as if they sent a single
command. Everything submitted during one event-loop tick is grouped by the
node that owns the key and sent as one pipeline per node; each caller still
gets its own result or its own exception. This is what lets one producer
process reach several times the kick rate of one round trip per kick.

The batch travels on one of redis-py's pooled connections to that node
(redis-py connects, authenticates, negotiates the protocol and does TLS),
but is packed and its replies parsed by ``_resp``, in one timeout, instead of
through redis-py's per-command encoder, awaited parser calls and timeout
contexts, which cost more CPU than the commands themselves. Replies are raw
protocol values, without redis-py's response callbacks. Redirected commands
(MOVED/ASK/TRYAGAIN, never applied) and everything sent while the client
must reload its slot map go through redis-py's ``ClusterPipeline``, which
follows redirects. :meth:`AutoPipeline.call` sends one command the same way
without batching, for blocking reads.

A failed command raises :class:`CommandFailure` to its own caller only; it
records whether the command may have reached the server, which decides
whether a write can be retried safely.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from redis._parsers.base import BaseParser
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import AskError, ClusterDownError, DataError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._resp import ErrorReply, ProtocolError, ReplyReader, pack_commands

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # redis-py depends on async-timeout below 3.11.3
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found]

logger = logging.getLogger("taskiq_redis_cluster")

_READ_SIZE = 65536
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
    _pending: list[_Item] = field(default_factory=list)
    _scheduled: bool = False
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: dict[str, int] = field(default_factory=dict)

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
        try:
            return self.client.nodes_manager.get_node_from_slot(slot)
        except Exception:  # slot map being rebuilt: let redis-py route it
            return None

    async def call(self, key: str, *args: Any) -> Any:
        """Send one command now, on its own pooled connection; return the raw reply.

        For commands that must not wait for a batch, such as blocking reads.
        The reply is the raw protocol value (see ``_resp``), without
        redis-py's response callbacks.

        :raises Unroutable: take redis-py's path instead (nothing was applied).
        :raises redis.exceptions.RedisError: as redis-py would raise it.
        """
        node = self._node_of(key)
        if node is None or self.client._initialize:
            raise Unroutable(key)
        try:
            reply = (await _exchange(node, pack_commands((args,)), 1, [False]))[0]
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._node_failed(node)
            raise
        if isinstance(reply, ErrorReply):
            error = BaseParser.parse_error(reply.message)  # type: ignore[no-untyped-call]
            if isinstance(error, (MovedError, AskError, TryAgainError)):
                raise Unroutable(key) from error
            if isinstance(error, (ClusterDownError, RedisConnectionError)):
                self._node_failed(node)
            raise error
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
        # Every group goes at once, even with a batch to the same node still
        # in flight. Holding later commands until the previous batch was
        # answered made batches larger and kicks cheaper, but gave the
        # benchmark's kick-to-start latency a p99 of 20-250 ms in 13 of 30
        # rounds (2-5 ms in all 20 without); see docs/performance.md.
        for node, group_items in groups.values():
            for start in range(0, len(group_items), self.max_batch):
                task = asyncio.ensure_future(
                    self._run(node, group_items[start : start + self.max_batch])
                )
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _run(self, node: ClusterNode | None, items: Sequence[_Item]) -> None:
        # The fast path writes straight to the node that owns the keys. It
        # skips redis-py's ClusterPipeline, which routes every command again
        # (slot, policy, node) and costs more CPU than the command itself.
        # A client that must re-initialize, or redirected commands, take the
        # ClusterPipeline path, which follows MOVED/ASK/TRYAGAIN.
        if node is not None and not self.client._initialize:
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
        commands: list[Sequence[Any]] = [item.args for item in items]
        wait = self.wait_replicas > 0
        if wait:
            commands.append(("WAIT", self.wait_replicas, self.wait_timeout))
        try:
            payload = pack_commands(commands)
        except TypeError:
            # A bad argument fails its own command only, and nothing of it is sent.
            items = self._drop_unpackable(items)
            if not items:
                return []
            return await self._run_on_node(node, items)
        written = [False]
        try:
            replies = await _exchange(node, payload, len(commands), written)
        except BaseException as exc:
            if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
                self._node_failed(node)
            # As in _run: once bytes may have left, the outcome is unknown
            # unless write_outcome can tell from the error itself.
            for item in items:
                if not item.future.done():
                    item.future.set_exception(CommandFailure(exc, sent=written[0]))
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return []
        replicas: int | None = None
        if wait:
            last = replies[-1]
            replicas = last if isinstance(last, int) else 0
        redirected: list[_Item] = []
        for item, result in zip(items, replies, strict=False):
            if item.future.done():
                continue
            if isinstance(result, ErrorReply):
                error = BaseParser.parse_error(result.message)  # type: ignore[no-untyped-call]
                if isinstance(error, (MovedError, AskError, TryAgainError)):
                    # Not applied: the slot moved or is moving. Safe to resend.
                    redirected.append(item)
                    continue
                if isinstance(error, (ClusterDownError, RedisConnectionError)):
                    self._node_failed(node)
                item.future.set_exception(CommandFailure(error, sent=True))
            else:
                item.future.set_result(Reply(result, replicas))
        # Redirected writes are resent without WAIT (their node is not known
        # yet), so with wait_replicas they report 0 replicas: enqueued, but
        # not confirmed, which is what a ReplicationTimeoutError says.
        return redirected

    @staticmethod
    def _drop_unpackable(items: Sequence[_Item]) -> list[_Item]:
        kept: list[_Item] = []
        for item in items:
            try:
                pack_commands((item.args,))
            except TypeError as exc:
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
        self.client.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
        self.client._initialize = True

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


async def _exchange(
    node: ClusterNode, payload: bytes, count: int, written: list[bool]
) -> list[Any]:
    """Write ``payload`` on one of ``node``'s pooled connections, read ``count`` replies.

    The connection (connect, AUTH, HELLO, TLS) is redis-py's; only the bytes
    of this batch bypass its per-command encoder and parser. Any failure
    drops the connection, since its stream position is then unknown.
    ``written[0]`` turns True once bytes may have reached the server.
    """
    connection = node.acquire_connection()
    try:
        await node.disconnect_if_needed(connection)
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        if connection.health_check_interval:
            await connection.check_health()  # type: ignore[no-untyped-call]
        writer, reader = connection._writer, connection._reader
        assert writer is not None
        assert reader is not None
        replies: list[Any] = []
        parser = ReplyReader()
        async with _timeout(connection.socket_timeout):
            written[0] = True
            writer.write(payload)
            await writer.drain()
            while len(replies) < count:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise RedisConnectionError(
                        f"Connection closed by {connection.host}:{connection.port}"
                    )
                parser.feed(data)
                replies += parser.replies(count - len(replies))
        if parser.buffered:
            raise ProtocolError(f"{parser.buffered} unexpected bytes after the replies")
        return replies
    except BaseException as exc:
        await connection.disconnect(nowait=True)
        where = f"{connection.host}:{connection.port}"
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            raise RedisTimeoutError(f"Timeout reading from {where}") from None
        if isinstance(exc, ProtocolError):
            raise RedisConnectionError(f"Protocol error from {where}: {exc}") from None
        if isinstance(exc, OSError):
            raise RedisConnectionError(f"Error while talking to {where}: {exc}") from exc
        raise
    finally:
        node.release(connection)
