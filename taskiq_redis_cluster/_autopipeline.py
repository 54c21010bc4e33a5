"""Auto-pipelining: coalesce concurrent commands into one pipeline per node.

Callers ``await pipeline.execute(key, *command)`` as if they sent a single
command. Everything submitted during one event-loop tick is grouped by the
node that owns the key and sent as one pipeline per node; each caller still
gets its own result or its own exception. This is what lets one producer
process reach several times the kick rate of one round trip per kick.

A failed command raises :class:`CommandFailure` to its own caller only; it
records whether the command may have reached the server, which decides
whether a write can be retried safely.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("taskiq_redis_cluster")


class CommandFailure(Exception):
    """Raised to a caller whose command failed inside an auto-pipeline.

    :ivar error: the original redis-py exception.
    :ivar sent: False only when the command certainly never left the client.
    """

    def __init__(self, error: BaseException, *, sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.sent = sent


@dataclass(frozen=True)
class Reply:
    """Result of one command, plus the replica count WAIT reported for it."""

    value: Any
    replicas: int | None = None


@dataclass
class _Item:
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

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        groups: dict[str, tuple[ClusterNode | None, list[_Item]]] = {}
        for item in pending:
            try:
                node = self.client.get_node_from_key(item.key)
            except Exception:  # slot map being rebuilt: let the pipeline route it
                node = None
            name = node.name if node is not None else ""
            groups.setdefault(name, (node, []))[1].append(item)
        for node, items in groups.values():
            for start in range(0, len(items), self.max_batch):
                task = asyncio.ensure_future(self._run(node, items[start : start + self.max_batch]))
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
        commands = [PipelineCommand(i, *item.args) for i, item in enumerate(items)]
        wait = self.wait_replicas > 0
        if wait:
            commands.append(
                PipelineCommand(len(items), "WAIT", self.wait_replicas, self.wait_timeout)
            )
        try:
            await node.execute_pipeline(commands)
        except BaseException as exc:
            if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
                self._node_failed(node)
            # As in _run: a failure of the whole pipeline leaves the outcome
            # unknown unless write_outcome can tell from the error itself.
            for item in items:
                if not item.future.done():
                    item.future.set_exception(CommandFailure(exc, sent=True))
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return []
        replicas: int | None = None
        if wait:
            last = commands[-1].result
            replicas = int(last) if isinstance(last, int) else 0
        redirected: list[_Item] = []
        for item, command in zip(items, commands, strict=False):
            result = command.result
            if item.future.done():
                continue
            if isinstance(result, (MovedError, AskError, TryAgainError)):
                # Not applied: the slot moved or is moving. Safe to resend.
                redirected.append(item)
            elif isinstance(result, BaseException):
                if isinstance(result, (ClusterDownError, RedisConnectionError,
                                       RedisTimeoutError)):
                    self._node_failed(node)
                item.future.set_exception(CommandFailure(result, sent=True))
            else:
                item.future.set_result(Reply(result, replicas))
        # Redirected writes are resent without WAIT (their node is not known
        # yet), so with wait_replicas they report 0 replicas: enqueued, but
        # not confirmed, which is what a ReplicationTimeoutError says.
        return redirected

    def _node_failed(self, node: ClusterNode) -> None:
        # redis-py does this itself on its normal path: a node that failed
        # makes the client reload the slot map before the next command. The
        # fast path must do the same, or a producer-only process would keep
        # writing to a dead master after its replica took over.
        self.client.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
        self.client._initialize = True

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every submitted command has been answered."""
        for _ in range(3):
            if self._scheduled:
                await asyncio.sleep(0)
            if not self._inflight:
                return
            await asyncio.wait(set(self._inflight), timeout=timeout)
