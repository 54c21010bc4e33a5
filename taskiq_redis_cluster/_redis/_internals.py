"""The ONE module that touches redis-py's private or undocumented names.

Everything else in the package uses redis-py's public API, or these small
functions. Each says which internal it wraps and why the public API is not
enough. redis-py may change any of them in a minor release: pyproject.toml
bounds redis-py's major version, and tests/test_redis_internals.py checks
every name below on the installed redis-py (and that no other module of the
package uses them), so an incompatible upgrade fails there, by name, instead
of deep inside a broker.

What we use, and where:

* ``RedisCluster._initialize`` (flag "reload the slot map before the next
  command"): :func:`must_reinitialize`, :func:`mark_node_failed`;
* ``RedisCluster.nodes_manager`` with ``get_node_from_slot``,
  ``move_node_to_end_of_cached_nodes`` and ``initialize``:
  :func:`node_for_slot`, :func:`mark_node_failed`, :func:`reinitialize_nodes`;
* ``ClusterNode.acquire_connection`` / ``disconnect_if_needed`` / ``release``
  and ``Connection._reader`` / ``Connection._writer`` (the asyncio streams of
  a connected connection): :func:`exchange`;
* ``redis._parsers.base.BaseParser.parse_error`` (error reply text to
  redis-py's exception class): :func:`parse_error`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Protocol

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout

    def _push_back(scope: Any, when: float) -> None:
        scope.reschedule(when)

else:  # redis-py depends on async-timeout (4.0.3 or later) below 3.11.3
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found]

    def _push_back(scope: Any, when: float) -> None:
        scope.update(when)


logger = logging.getLogger(__name__)

_READ_SIZE = 65536
# A payload above this is written in pieces of this size, so the timeout can
# be pushed back after each piece the server took (see exchange).
_WRITE_PIECE = 1 << 20


def parse_error(message: str) -> RedisError:
    """The exception redis-py raises for the error reply ``message``.

    Wraps ``redis._parsers.base.BaseParser.parse_error``: the fast path
    parses replies with hiredis, and building errors with redis-py's own
    table makes MOVED, ASK, TRYAGAIN, NOSCRIPT... the same classes on both
    paths. No public function maps an error text to its class.
    """
    error: RedisError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def must_reinitialize(client: RedisCluster) -> bool:
    """True while ``client`` must reload its slot map before the next command.

    Reads ``RedisCluster._initialize``, which redis-py sets after a MOVED or a
    failed node and clears once the map is reloaded. While it is set the
    cached slot map may name a dead or former owner, so the fast path leaves
    routing to redis-py. No public accessor exists.
    """
    return bool(client._initialize)


def node_for_slot(client: RedisCluster, slot: int) -> ClusterNode | None:
    """The master that ``client``'s slot map gives for ``slot``; None if unknown.

    Wraps ``client.nodes_manager.get_node_from_slot``: the public
    ``get_node_from_key`` hashes the key again on every call, and the fast
    path caches slots per key. It raises while the map is being rebuilt;
    that is None here (the caller then lets redis-py route).
    """
    try:
        return client.nodes_manager.get_node_from_slot(slot)
    except Exception:  # slot map being rebuilt or slot uncovered
        return None


def mark_node_failed(client: RedisCluster, node: ClusterNode) -> None:
    """Make ``client`` reload its slot map before its next command, trying ``node`` last.

    What redis-py does itself when a command on its own path hits a dead
    node (``nodes_manager.move_node_to_end_of_cached_nodes`` and
    ``_initialize = True``). The fast path writes around that path, so it
    must do the same, or a producer-only process would keep writing to a
    dead master after its replica took over.
    """
    client.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
    client._initialize = True


async def reinitialize_nodes(client: RedisCluster) -> None:
    """Reload ``client``'s slot map now, from the cluster.

    Wraps ``client.nodes_manager.initialize()``. Sharded pub/sub needs a
    fresh map to learn that its channel's slot moved (a failover sends no
    MOVED to a subscriber); the public ``RedisCluster.initialize()`` is a
    no-op once the client is initialized.
    """
    await client.nodes_manager.initialize()


class ReplySink(Protocol):
    """What :func:`exchange` feeds the bytes it reads to (see ``_hiredis.Replies``)."""

    def feed(self, data: bytes) -> bool:
        """Take received bytes; True once every expected reply is in."""

    def clean(self) -> bool:
        """After the last reply: True unless bytes nobody asked for are left."""


async def exchange(
    node: ClusterNode, payload: bytes, sink: ReplySink, written: list[bool]
) -> None:
    """Write ``payload`` on one of ``node``'s pooled connections; feed replies to ``sink``.

    Uses ``ClusterNode.acquire_connection``/``disconnect_if_needed``/
    ``release`` and the connection's ``_reader``/``_writer`` streams. The
    connection (connect, AUTH, HELLO, TLS) is redis-py's; only the bytes of
    this batch bypass its per-command encoder and parser, whose awaited
    calls and timeout contexts cost more CPU than the commands themselves.
    The public ``Connection.send_packed_command``/``read_response`` parse one
    reply per awaited call and apply one deadline to each. Nothing is retried
    here, and nothing is rerouted: the bytes go to ``node``, on one
    connection, which is what ``WAIT`` after a write needs.

    The sink keeps the replies parsed so far, so after a failure the caller
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

    :raises redis.exceptions.TimeoutError: no progress within the timeout.
    :raises redis.exceptions.ConnectionError: connection lost or not RESP.
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
                if sink.feed(data):
                    break
                # Progress: only now push the deadline back, so the common
                # case (every reply in the first read) never reschedules.
                if timeout is not None:
                    _push_back(scope, loop.time() + timeout)
        if not sink.clean():
            # Every reply is in, so the batch stands; only the connection
            # cannot be trusted for the next exchange.
            logger.debug(
                "Unexpected bytes after the last reply from %s:%s; dropping the connection",
                connection.host, connection.port,
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
