"""``ClusterListQueueBroker``: sharded Redis lists (at most once).

Shard planning, kick retries and the fair per-shard readers come from
``_broker``; this module only says how a message is pushed to and popped
from one shard's list.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._autopipeline import AutoPipeline, Unroutable
from ._broker import ShardedBroker, Sink
from ._events import BrokerEvents
from ._keys import ShardKeys
from ._options import ListOptions, resolve_options
from ._planner import Shard
from ._retry import RetryPolicy, error_kind, is_transient

logger = logging.getLogger("taskiq_redis_cluster")


class ClusterListQueueBroker(ShardedBroker):
    """Sharded list broker for Redis Cluster.

    Delivery is **at most once**, as with taskiq-redis's ``ListQueueBroker``:
    a task popped by a worker that then crashes is gone. Use
    :class:`ClusterStreamBroker` when tasks must survive worker crashes.

    Shards (default: 4 per master) are spread evenly over the masters; kicks
    go round-robin, or by the ``partition_key`` label, and every worker pops
    from every shard with one reader each, so no shard starves.
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
        """Create the broker; no I/O happens until ``startup()``.

        Other :class:`ListOptions` fields may be passed as keywords; any
        remaining keyword goes to redis-py.
        """
        options = resolve_options(
            ListOptions, options, kwargs,
            max_connection_pool_size=max_connection_pool_size, queue_name=queue_name,
        )
        super().__init__(url, options, events=events, retry=retry)

    def _blocking_seconds(self) -> float:
        return self.options.brpop_timeout

    def _make_pipeline(self, client: Any) -> AutoPipeline:
        return AutoPipeline(client, max_batch=self.options.max_batch)

    def _write_command(self, keys: ShardKeys) -> tuple[str, tuple[Any, ...]]:
        return keys.list, ("LPUSH", keys.list)

    async def _pop(self, key: str) -> Any:
        """BRPOP one message, straight to the shard's node (redis-py's path on redirects)."""
        assert self._pipeline is not None
        timeout = self.options.brpop_timeout
        try:
            return await self._pipeline.call(key, "BRPOP", key, timeout)
        except Unroutable:
            return await self.client.brpop([key], timeout=timeout)

    async def _read_shard(
        self, shard: Shard, *, draining: bool, sink: Sink, count: int, stop: asyncio.Event
    ) -> None:
        key = ShardKeys(self.options.prefix, shard.tag).list
        failures = 0
        while not stop.is_set():
            try:
                popped = await self._pop(key)
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
                logger.warning("Popping %s failed (%s); retry in %.2fs", key, exc, delay)
                await self.retry.sleep(delay)
                continue
            if popped:
                data = popped[1]
                await sink(data.encode() if isinstance(data, str) else data)
