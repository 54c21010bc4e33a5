"""The dev cluster as one object, and a start-and-always-stop helper.

:class:`DevCluster` composes the seams: process control
(:mod:`._process`), formation (:mod:`._formation`), health and topology
(:mod:`._health`) and faults (:mod:`._faults`). What lives here is what
crosses them: starting (launch, then form), healing (undo faults, then wait
for health) and rebuilding a launcher from its directory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from .._errors import ClusterFormationError, DevClusterError, PortBusyError
from ._faults import Faults
from ._formation import Formation
from ._model import STATE_FILE, TLSConfig
from ._pidfiles import kill_from_pid_files
from ._process import find_free_base_port

__all__ = ["DevCluster", "throwaway_cluster"]

logger = logging.getLogger(__name__)


class DevCluster(Formation, Faults):
    """A local Redis Cluster made of ``redis-server`` processes.

    Use it as an async context manager (starts, and always stops), or call
    :meth:`start` and :meth:`stop` yourself; :meth:`stop` is idempotent::

        async with DevCluster(masters=3, replicas=1, base_port=7100, directory=tmp) as c:
            client = await connect(c.url)

    :param masters: number of masters (slots are split evenly between them).
    :param replicas: replicas per master.
    :param base_port: node ``i`` listens on ``base_port + i``.
    :param node_timeout_ms: ``cluster-node-timeout``; failover takes about
        two of these.
    :param directory: where node directories, logs and pid files go.
    :param username: optional ACL user created on every node (needs a
        password); replication also authenticates as this user.
    :param password: optional password (``requirepass`` and the ACL user's).
    :param tls: serve TLS only (clients, cluster bus and replication).
    :param redis_server: the ``redis-server`` executable (name or path).
    :param form_timeout: seconds to wait for the cluster to become healthy.
    """

    @staticmethod
    def state_file(directory: Path | str) -> Path:
        """Where a cluster started in ``directory`` keeps its launch options.

        :meth:`start` writes it before it launches a node;
        :meth:`from_directory` reads it.
        """
        return Path(directory) / STATE_FILE

    @classmethod
    def from_directory(cls, directory: Path | str) -> DevCluster:
        """Rebuild the launcher of a cluster started earlier in ``directory``.

        :raises DevClusterError: if ``directory`` holds no launcher state.
        """
        path = cls.state_file(directory)
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DevClusterError(message=f"no dev cluster state in {path}: {exc}") from None
        tls = state.get("tls")
        return cls(
            masters=int(state["masters"]),
            replicas=int(state["replicas"]),
            base_port=int(state["base_port"]),
            node_timeout_ms=int(state["node_timeout_ms"]),
            directory=directory,
            host=str(state["host"]),
            username=state.get("username"),
            password=state.get("password"),
            tls=TLSConfig(**{k: Path(v) for k, v in tls.items()}) if tls else None,
            redis_server=str(state.get("redis_server", "redis-server")),
        )

    async def __aenter__(self) -> DevCluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every node, form the cluster and wait until it is healthy.

        :raises RedisServerMissingError: ``redis-server`` missing or < 7.0.
        :raises PortBusyError: a node or bus port is in use (checked before
            anything is started).
        :raises ClusterFormationError: the cluster was not healthy within
            ``form_timeout``; every started node has been stopped.
        """
        if self._procs:
            raise DevClusterError(message="this DevCluster is already started")
        await self._preflight()
        try:
            self._spawn_all()
            await self._form()
        except BaseException as exc:
            # Leave nothing running, whatever went wrong (also Ctrl-C).
            await self.stop()
            if isinstance(exc, (DevClusterError, asyncio.CancelledError, KeyboardInterrupt)):
                raise
            if isinstance(exc, Exception):
                raise ClusterFormationError(reason=f"{type(exc).__name__}: {exc}") from exc
            raise
        logger.info("Redis Cluster ready on %s:%d..%d", self.host, self._ports[0], self._ports[-1])

    async def heal(self, timeout: float | None = None) -> None:
        """Resume paused nodes, restart dead ones, then :meth:`wait_healthy`.

        Roles are not restored: a killed master that was failed over comes
        back as a replica of its successor.
        """
        timeout = self.form_timeout if timeout is None else timeout
        for port in list(self._paused):
            await self.resume_node(port)
        dead = [p for p in self._ports if not self._running(p)]
        for port in dead:
            await self.restart_node(port, timeout=timeout)
        await self.wait_healthy(timeout=timeout)


@contextlib.asynccontextmanager
async def throwaway_cluster(
    directory: Path | str,
    *,
    masters: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = 1500,
    base_port: int | None = None,
    attempts: int = 3,
) -> AsyncIterator[DevCluster]:
    """A started :class:`DevCluster` that is always stopped afterwards.

    Without ``base_port`` it picks free ports, and picks again when another
    process takes them between the check and the start (a given port is
    final). An ``atexit`` hook kills the nodes from their pid files should
    the process exit without running the ``finally`` block.
    """
    directory = Path(directory)
    fallback = functools.partial(kill_from_pid_files, directory)
    atexit.register(fallback)
    cluster: DevCluster | None = None
    tries = 1 if base_port is not None else attempts
    try:
        for attempt in range(tries):
            cluster = DevCluster(
                masters=masters,
                replicas=replicas,
                node_timeout_ms=node_timeout_ms,
                base_port=(
                    base_port
                    if base_port is not None
                    else find_free_base_port(masters * (1 + replicas))
                ),
                directory=directory,
            )
            try:
                await cluster.start()
                break
            except PortBusyError:
                if attempt == tries - 1:
                    raise
        assert cluster is not None
        yield cluster
    finally:
        try:
            if cluster is not None:
                await cluster.stop()
        finally:
            kill_from_pid_files(directory)
            atexit.unregister(fallback)
