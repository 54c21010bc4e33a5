"""The node set every part of :class:`DevCluster` works on.

:class:`NodeSet` holds the launch options and the running processes, maps
ports to nodes, opens one short-lived admin connection per command and polls
for a state with a deadline. The seams of the launcher (process control,
formation, health, faults) are mixins on top of it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .._errors import ClusterFormationError, DevClusterError, InvalidOptionError
from ._model import (
    BUS_PORT_OFFSET,
    SLOTS,
    Entry,
    Node,
    NodeRef,
    TLSConfig,
    parse_kv,
    parse_nodes,
    text,
)

__all__ = ["ADMIN_TIMEOUT", "NodeSet"]

#: Socket timeout of one admin command, in seconds.
ADMIN_TIMEOUT = 2.0
#: Seconds between two polls of the nodes while waiting for a state.
_POLL_INTERVAL = 0.1


class NodeSet:
    """Launch options, node processes and admin access of one dev cluster.

    The parameters are those of :class:`DevCluster`.
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        base_port: int = 7000,
        node_timeout_ms: int = 1500,
        directory: Path | str,
        host: str = "127.0.0.1",
        username: str | None = None,
        password: str | None = None,
        tls: TLSConfig | None = None,
        redis_server: str = "redis-server",
        form_timeout: float = 60.0,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise InvalidOptionError(
                option="masters/replicas", reason="masters must be >= 1 and replicas >= 0"
            )
        if masters > SLOTS:
            raise InvalidOptionError(option="masters", reason=f"at most {SLOTS} masters")
        count = masters * (1 + replicas)
        if not (base_port >= 1 and base_port + count - 1 + BUS_PORT_OFFSET <= 65535):
            raise InvalidOptionError(
                option="base_port",
                reason=f"{base_port} leaves no room for {count} nodes and bus ports",
            )
        if username is not None and (not username or any(c.isspace() for c in username)):
            raise InvalidOptionError(option="username", reason="must be non-empty, no spaces")
        if username is not None and not password:
            raise InvalidOptionError(
                option="password", reason="an ACL user (--username) needs a password"
            )
        self.masters_count = masters
        self.replicas_count = replicas
        self.base_port = base_port
        self.node_timeout_ms = node_timeout_ms
        self.directory = Path(directory).absolute()
        self.host = host
        self.username = username
        self.password = password
        self.tls = tls
        self.redis_server = redis_server
        self.form_timeout = form_timeout
        self._ports = [base_port + i for i in range(count)]
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._paused: set[int] = set()
        self._server_path: str | None = None

    # ---- public read-only views -----------------------------------------

    @property
    def url(self) -> str:
        """``redis://[user:password@]host:base_port`` (``rediss://`` with TLS)."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            user = quote(self.username, safe="") if self.username else ""
            auth = f"{user}:{quote(self.password, safe='')}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.base_port}"

    @property
    def ports(self) -> list[int]:
        """Every node's port, masters first."""
        return list(self._ports)

    @property
    def nodes(self) -> list[Node]:
        """Every node, in port order, with its current pid."""
        return [self.node_for_port(p) for p in self._ports]

    def node_for_port(self, port: int) -> Node:
        """The :class:`Node` on ``port`` (not async)."""
        if port not in self._ports:
            raise DevClusterError(message=f"port {port} is not a node of this cluster")
        proc = self._procs.get(port)
        pid = proc.pid if proc is not None and proc.poll() is None else None
        return Node(self.host, port, pid, self._node_dir(port))

    def _node_dir(self, port: int) -> Path:
        return self.directory / str(port)

    def _port(self, node: NodeRef) -> int:
        port = node if isinstance(node, int) else node.port
        if port not in self._ports:
            raise DevClusterError(message=f"port {port} is not a node of this cluster")
        return port

    def _running(self, port: int) -> bool:
        proc = self._procs.get(port)
        return proc is not None and proc.poll() is None

    def _live_ports(self) -> list[int]:
        """Nodes that run and are not paused: those expected to answer."""
        return [p for p in self._ports if self._running(p) and p not in self._paused]

    # ---- talking to one node ---------------------------------------------

    def _client(self, port: int, timeout: float = ADMIN_TIMEOUT) -> Redis:
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs.update(
                ssl=True,
                ssl_certfile=str(self.tls.cert_file),
                ssl_keyfile=str(self.tls.key_file),
                ssl_ca_certs=str(self.tls.ca_cert_file),
                ssl_check_hostname=False,
            )
        client = Redis(
            host=self.host,
            port=port,
            username=self.username,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            protocol=2,
            **kwargs,
        )
        # Raw replies: we parse CLUSTER NODES/INFO ourselves.
        client.response_callbacks.clear()
        return client

    async def _cmd(self, port: int, *args: Any, timeout: float = ADMIN_TIMEOUT) -> Any:
        async with self._client(port, timeout) as client:
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def _view(self, port: int) -> list[Entry]:
        return parse_nodes(text(await self._cmd(port, "CLUSTER", "NODES")))

    async def _info(self, port: int, *args: str) -> dict[str, str]:
        return parse_kv(text(await self._cmd(port, *args)))

    async def _any_view(self) -> tuple[int, list[Entry]]:
        errors = []
        for port in self._live_ports():
            try:
                return port, await self._view(port)
            except (RedisError, OSError) as exc:
                errors.append(f"{port}: {exc}")
        raise DevClusterError(message=f"no node answers CLUSTER NODES ({'; '.join(errors)})")

    def _entry_node(self, entry: Entry) -> Node:
        if entry.port in self._ports:
            return self.node_for_port(entry.port)
        raise DevClusterError(message=f"node {entry.host}:{entry.port} is not ours")

    # ---- waiting for a state ----------------------------------------------

    async def _wait(
        self,
        what: str,
        check: Callable[[], Awaitable[str | None]],
        timeout: float,
        interval: float = _POLL_INTERVAL,
    ) -> None:
        """Poll ``check`` (None means done, else a reason) until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reason = "not checked yet"
        for _ in range(int(timeout / interval) + 2):
            try:
                problem = await check()
            except (RedisError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return
            reason = problem
            if loop.time() >= deadline:
                break
            await asyncio.sleep(interval)
        raise ClusterFormationError(reason=f"{what} not reached within {timeout:.0f}s: {reason}")
