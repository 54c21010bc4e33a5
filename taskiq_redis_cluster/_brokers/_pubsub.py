"""``ClusterPubSubBroker``: broadcast every task to every worker.

Uses sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis >= 7.0) on one hash-tagged
channel, so the channel lives on the one master that owns its slot. The
subscriber follows that slot: it resubscribes when the server unsubscribes
it (slot migrated), when the connection breaks (master died) and when a
periodic check of the slot map shows another owner (failover).

Pub/sub is fire-and-forget: a message published while a worker is not
subscribed (restarting, or resubscribing after a failover) is never seen by
that worker, and nothing is acknowledged or redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterPubSub
from taskiq import AsyncBroker, AsyncResultBackend, BrokerMessage

from .._errors import KickFailedError
from .._events import NULL_EVENTS, BrokerEvents
from .._keys import DEFAULT_PREFIX, broadcast_channel, validate_name
from .._lifecycle import OwnedClient, client_options
from .._redis import (
    ConnectionOptions,
    RetryPolicy,
    error_kind,
    is_transient,
    redact_url,
    reinitialize_nodes,
    retry_policy,
    validate_url,
)

logger = logging.getLogger(__name__)


class ClusterPubSubBroker(AsyncBroker):
    """Broadcast broker over sharded pub/sub (fire-and-forget).

    Every listening worker receives every task. Nothing is stored: a worker
    that is down, or resubscribing after a failover or a slot migration,
    misses what was published meanwhile.
    """

    def __init__(
        self,
        url: str,
        queue_name: str = "taskiq",
        max_connection_pool_size: int | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        owner_check_interval: float = 1.0,
        connection: ConnectionOptions | None = None,
        events: BrokerEvents | None = None,
        retry: RetryPolicy | None = None,
        task_id_generator: Callable[[], str] | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the broker; no I/O happens until it starts.

        ``url``, ``queue_name``, ``max_connection_pool_size``,
        ``task_id_generator``, ``result_backend`` and the remaining keywords
        (for redis-py) are those of taskiq-redis's ``PubSubBroker``, which
        takes the two taskiq ones positionally before ``queue_name``; here
        they are keyword-only. ``connection=`` excludes the client keywords.

        :param owner_check_interval: seconds between checks that the channel's
            slot is still on the subscribed node (bounds failover recovery).
        :raises InvalidOptionError: for a keyword redis-py's cluster client
            does not take, or ``connection=`` with client keywords.
        """
        super().__init__(result_backend=result_backend, task_id_generator=task_id_generator)
        validate_url(url)
        validate_name(queue_name, "queue")
        validate_name(prefix, "prefix")
        self.url = url
        self.queue_name = queue_name
        self.channel = broadcast_channel(prefix, queue_name)
        self.owner_check_interval = owner_check_interval
        self.connection = client_options(
            connection, kwargs, max_connections=max_connection_pool_size
        )
        self.events = events or NULL_EVENTS
        self.retry = retry_policy(retry)
        self._owned = OwnedClient(type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={redact_url(self.url)!r}, channel={self.channel!r})"

    @property
    def redis(self) -> RedisCluster:
        """The broker's cluster client, under taskiq-redis's attribute name.

        Only while running (:class:`LifecycleError` otherwise); the broker
        owns it and closes it in ``shutdown()``.
        """
        return self._owned.get("redis")

    async def startup(self) -> None:
        """Connect and run taskiq's startup.

        Optional: the first ``kick()`` or ``listen()`` starts the broker, and
        after such a lazy start this does nothing.

        :raises LifecycleError: if called twice, or after ``shutdown()``.
        """
        await self._owned.lifecycle.start(self._start)

    async def _start(self) -> None:
        await self._owned.open(self.url, self.connection)
        try:
            await super().startup()
        except BaseException:
            await self._owned.abort()
            raise
        self._owned.lifecycle.started()

    async def shutdown(self) -> None:
        """Run taskiq's shutdown and close; safe to call twice."""
        if self._owned.lifecycle.running:
            await super().shutdown()
        await self._owned.close()

    async def kick(self, message: BrokerMessage) -> None:
        """Publish ``message`` to every subscribed worker.

        SPUBLISH is retried on transient errors: a duplicate broadcast is
        preferred to a lost one. Returns even when nobody is subscribed.
        """
        client = await self._owned.ready(self.startup, "kick()")
        try:
            await self.retry.call(
                lambda: client.spublish(self.channel, message.message),
                on_retry=lambda exc: self.events.retried(error_kind(exc)),
            )
        except Exception as exc:
            self.events.publish_error(self.queue_name, error_kind(exc))
            raise KickFailedError(queue=self.queue_name, reason=str(exc)) from exc
        self.events.published(self.queue_name, 0)

    async def listen(self) -> AsyncGenerator[bytes, None]:
        """Yield every message published on the channel while subscribed."""
        await self._owned.ready(self.startup, "listen()")
        failures = 0
        while True:
            pubsub: ClusterPubSub | None = None
            try:
                pubsub, node_name = await self._subscribe()
                failures = 0
                async for data in self._receive(pubsub, node_name):
                    yield data
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                self.events.retried(error_kind(exc))
                delay = self.retry.delay(failures)
                logger.warning("Subscription to %s broke (%s); resubscribing in %.2fs",
                               self.channel, exc, delay)
                await self.retry.sleep(delay)
            finally:
                if pubsub is not None:
                    await _close_pubsub(pubsub)

    async def _subscribe(self) -> tuple[ClusterPubSub, str]:
        client = self._owned.get("listen()")
        # A fresh slot map first: after a failover the old owner is gone.
        await reinitialize_nodes(client)
        node = client.get_node_from_key(self.channel)
        if node is None:
            raise ConnectionError(f"no node owns the slot of {self.channel}")
        pubsub = client.pubsub()
        await pubsub.ssubscribe(self.channel)
        logger.info("Subscribed to %s on %s", self.channel, node.name)
        return pubsub, node.name

    async def _receive(
        self, pubsub: ClusterPubSub, node_name: str
    ) -> AsyncGenerator[bytes, None]:
        client = self._owned.get("listen()")
        next_check = time.monotonic() + self.owner_check_interval
        while True:
            message = await pubsub.get_sharded_message(
                ignore_subscribe_messages=False, timeout=min(1.0, self.owner_check_interval)
            )
            if message is not None:
                kind = message.get("type")
                if kind in (b"smessage", "smessage"):
                    yield message["data"]
                elif kind in (b"sunsubscribe", "sunsubscribe"):
                    # The server drops shard subscribers when the slot moves.
                    logger.info("Server unsubscribed %s (slot moved); resubscribing",
                                self.channel)
                    return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.owner_check_interval
                await reinitialize_nodes(client)
                owner = client.get_node_from_key(self.channel)
                if owner is None or owner.name != node_name:
                    logger.info("Slot of %s moved to %s; resubscribing", self.channel,
                                owner.name if owner else "nobody")
                    return


async def _close_pubsub(pubsub: ClusterPubSub) -> None:
    try:
        await pubsub.aclose()
    except Exception:  # the connection may already be dead
        logger.debug("Ignoring error while closing a pubsub", exc_info=True)
