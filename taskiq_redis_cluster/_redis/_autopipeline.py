"""Auto-pipelining: coalesce concurrent commands into one pipeline per node.

Callers ``await pipeline.execute(key, *command)`` as if they sent a single
command. Everything submitted during one event-loop tick is grouped by the
node that owns the key and sent as one pipeline per node; each caller still
gets its own result or its own exception. This is what lets one producer
process reach several times the kick rate of one round trip per kick.

The batch travels on one of redis-py's pooled connections to that node
(redis-py connects, authenticates, negotiates the protocol and does TLS),
but is packed by ``hiredis.pack_command`` and its replies parsed by a
``hiredis.Reader``, under one progress timeout, instead of through
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
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import hiredis
from redis._parsers.base import BaseParser
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

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout

    def _push_back(scope: Any, when: float) -> None:
        scope.reschedule(when)

else:  # redis-py depends on async-timeout (4.0.3 or later) below 3.11.3
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found]

    def _push_back(scope: Any, when: float) -> None:
        scope.update(when)


logger = logging.getLogger("taskiq_redis_cluster")

_READ_SIZE = 65536
# A payload above this is written in pieces of this size, so the timeout can
# be pushed back after each piece the server took (see _exchange).
_WRITE_PIECE = 1 << 20
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
        The reply is the raw protocol value (see the module docstring),
        without redis-py's response callbacks.

        :raises Unroutable: take redis-py's path instead (nothing was applied).
        :raises redis.exceptions.RedisError: as redis-py would raise it
            (``DataError`` for an argument that cannot be sent).
        """
        node = self._node_of(key)
        if node is None or self.client._initialize:
            raise Unroutable(key)
        try:
            payload = hiredis.pack_command(args)
        except (TypeError, ValueError) as exc:
            raise DataError(str(exc)) from None
        replies: list[Any] = []
        try:
            await _exchange(node, payload, 1, [False], replies)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._node_failed(node)
            raise
        reply = replies[0]
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
        replies: list[Any] = []
        failure: BaseException | None = None
        try:
            await _exchange(node, b"".join(parts), count, written, replies)
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


# What hiredis.Reader.gets() returns while a reply is incomplete. Its default,
# False, is also a RESP3 boolean reply, so it cannot be told apart.
_MORE = object()
_Push = hiredis.PushNotification


def _reader() -> hiredis.Reader:
    """A reply reader for one exchange: raw bytes, redis-py's error classes.

    Error replies come out as the exception redis-py would raise (MovedError,
    ClusterDownError, ResponseError...), built by its own ``parse_error``, so
    the fast path and redis-py's path classify errors the same way.
    """
    return hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)


def _take_replies(reader: hiredis.Reader, replies: list[Any], count: int) -> None:
    """Move the complete replies in ``reader`` to ``replies``, up to ``count`` in all.

    RESP3 push frames (``>``: keyspace invalidations, pub/sub messages) are
    out-of-band: no command asked for them, so they are skipped here and
    never counted as a reply. Nothing in this library subscribes or tracks
    keys on these pooled connections, so there is no handler to give them to.

    :raises hiredis.ProtocolError: on bytes that are not RESP.
    """
    gets = reader.gets
    while len(replies) < count:
        value = gets()
        if value is _MORE:
            return
        if value.__class__ is not _Push:
            replies.append(value)


def _only_pushes_left(reader: hiredis.Reader) -> bool:
    """Skip push frames after the last reply; False if anything else is left.

    Anything else (part of a frame, or a reply nobody asked for) means the
    next user of the connection would start mid-stream.
    """
    try:
        while reader.has_data():
            value = reader.gets()
            if value is _MORE or value.__class__ is not _Push:
                return False
    except hiredis.HiredisError:
        return False
    return True


async def _exchange(
    node: ClusterNode, payload: bytes, count: int, written: list[bool], replies: list[Any]
) -> None:
    """Write ``payload`` on one of ``node``'s pooled connections, read ``count`` replies.

    The connection (connect, AUTH, HELLO, TLS) is redis-py's; only the bytes
    of this batch bypass its per-command encoder and parser. Replies are
    appended to ``replies`` as they are parsed, so after a failure the caller
    still has those that arrived. Any failure drops the connection, since its
    stream position is then unknown. ``written[0]`` turns True once bytes may
    have reached the server.

    The socket timeout bounds the time without progress, not the whole
    exchange: it restarts whenever a piece of the payload was taken or bytes
    of the reply arrived. A 32 MB reply legitimately takes longer than a
    timeout sized for a dead server (seconds) on a slow link, and one
    deadline for the whole exchange would fail it every time, and again on
    every redelivery. A server that stops sending still fails within one
    timeout. Blocking commands are unaffected: they send nothing while they
    block, and the brokers size the socket timeout above their block time.
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
        timeout = connection.socket_timeout
        loop = asyncio.get_running_loop()
        parser = _reader()
        async with _timeout(timeout) as scope:
            written[0] = True
            if len(payload) <= _WRITE_PIECE:
                writer.write(payload)
                await writer.drain()
            else:
                view = memoryview(payload)
                for start in range(0, len(payload), _WRITE_PIECE):
                    writer.write(view[start : start + _WRITE_PIECE])
                    await writer.drain()
                    if timeout is not None:
                        _push_back(scope, loop.time() + timeout)
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise RedisConnectionError(
                        f"Connection closed by {connection.host}:{connection.port}"
                    )
                parser.feed(data)
                _take_replies(parser, replies, count)
                if len(replies) >= count:
                    break
                # Progress: only now push the deadline back, so the common
                # case (every reply in the first read) never reschedules.
                if timeout is not None:
                    _push_back(scope, loop.time() + timeout)
        if parser.has_data() and not _only_pushes_left(parser):
            # Every reply is in, so the batch stands; only the connection
            # cannot be trusted for the next exchange.
            logger.debug(
                "Unexpected bytes after %d replies from %s:%s; dropping the connection",
                count, connection.host, connection.port,
            )
            await connection.disconnect(nowait=True)
    except BaseException as exc:
        await connection.disconnect(nowait=True)
        where = f"{connection.host}:{connection.port}"
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            raise RedisTimeoutError(f"Timeout reading from {where}") from None
        if isinstance(exc, hiredis.HiredisError):
            raise RedisConnectionError(f"Protocol error from {where}: {exc}") from None
        if isinstance(exc, OSError):
            raise RedisConnectionError(f"Error while talking to {where}: {exc}") from exc
        raise
    finally:
        node.release(connection)
