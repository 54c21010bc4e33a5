"""Calls sent to the master of one slot, with no redirect followed by redis-py.

Some operations must reach one node themselves rather than through redis-py's
routed path: a plan swap and its ``WAIT`` on one connection (``send_batch``),
or ``CLUSTER GETKEYSINSLOT``, which is never redirected and answers a stale
caller with nothing. :func:`on_slot_master` runs such a call and recovers from
what Redis Cluster answers instead of running it, as :func:`~._retry.recovery`
classifies it:

* ``MOVED``, a lost connection, a stale slot map: find the slot's master
  again through the routed path (which learns the new owner), after the
  policy's delay unless the answer was ``MOVED`` (the new owner is known);
* ``ASK``: send the call once more to the node named, with ``ASKING``, or,
  where ``follow_ask`` is off, wait like ``TRYAGAIN``;
* ``TRYAGAIN`` and ``LOADING``: wait the policy's delay and try the same
  master again; ``READONLY``, ``CLUSTERDOWN`` and other transient answers:
  find the slot's master again after the delay;
* ``NOSCRIPT``: try again with the script's body (``EVAL``);
* anything else is raised.

Waits are the :class:`~._retry.RetryPolicy`'s, and the policy's attempt count
bounds the whole call; the last error is raised when it runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import AskError, MovedError, RedisError, SlotNotCoveredError

from ._retry import Recovery, RetryPolicy, error_kind, recovery

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Where and how one attempt of a pinned call is sent.

    :param node: the node to send to, alone.
    :param asking: the attempt must start with ``ASKING`` (it follows ``ASK``).
    :param use_eval: send a script's body (``EVAL``), after ``NOSCRIPT``.
    """

    node: ClusterNode
    asking: bool = False
    use_eval: bool = False


async def on_slot_master(
    client: RedisCluster,
    key: str,
    send: Callable[[Target], Awaitable[T]],
    policy: RetryPolicy,
    *,
    follow_ask: bool = True,
) -> T:
    """Run ``send`` against the master of ``key``'s slot until it answers.

    ``send`` raises the error Redis answered (for a batch: the reply of the
    command that failed). Whether a failed attempt ran is the caller's
    concern: ``send`` must be safe to repeat.

    :raises RedisError: a non-transient error of the command, or the last
        error once ``policy.attempts`` attempts have failed.
    """
    node: ClusterNode | None = None
    asking = use_eval = False
    last: BaseException | None = None
    for attempt in range(1, policy.attempts + 1):
        if node is None:
            node = await _owner(client, key, reload=attempt > 1)
            if node is None:
                last = SlotNotCoveredError(f"no master known for the slot of {key!r}")
                await policy.sleep(policy.delay(attempt))
                continue
        try:
            return await send(Target(node, asking, use_eval))
        except (RedisError, OSError) as exc:
            last, asking = exc, False
            action = recovery(exc)
            logger.debug("Call on the master of %r: %s (%s)", key, error_kind(exc), action.value)
            if action is Recovery.RAISE or (action is Recovery.EVAL and use_eval):
                raise
            if action is Recovery.EVAL:
                use_eval = True  # nothing ran; EVAL also caches the script there
            elif action is Recovery.FOLLOW and follow_ask and isinstance(exc, AskError):
                node = client.get_node(host=exc.host, port=exc.port)
                asking = node is not None
            elif action is Recovery.REROUTE:
                node = None
                if not isinstance(exc, MovedError):
                    await policy.sleep(policy.delay(attempt))
            else:  # WAIT, or an ASK not followed: the slot is migrating
                await policy.sleep(policy.delay(attempt))
    assert last is not None
    raise last


async def _owner(client: RedisCluster, key: str, *, reload: bool) -> ClusterNode | None:
    """The master that ``client`` thinks serves ``key``'s slot.

    With ``reload``, a routed one-key read first lets redis-py learn the slot's
    owner (it follows ``MOVED`` and reloads its map after a connection error).
    """
    if reload:
        try:
            await client.execute_command("EXISTS", key)
        except (RedisError, OSError) as exc:
            logger.debug("Routed read of %r failed: %s", key, error_kind(exc))
    try:
        return client.get_node_from_key(key)
    except RedisError:
        return None


__all__ = ["Target", "on_slot_master"]
