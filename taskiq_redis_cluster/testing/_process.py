"""A throwaway Redis Cluster on loopback, for development and tests.

:class:`DevCluster` starts ``redis-server`` processes (one per node) on
``127.0.0.1``, forms a cluster out of them and stops exactly those processes
again::

    async with DevCluster(masters=3, replicas=1, base_port=7100, directory=tmp) as c:
        client = await connect(c.url)

Node ``i`` listens on ``base_port + i`` and uses the Redis default cluster bus
port ``base_port + i + 10000``. Node ``i < masters`` starts as a master; the
remaining nodes replicate the masters round-robin.

Everything a node needs lives in ``directory/PORT``: its ``redis.conf``
(written by the launcher, mode 0600 because it may hold a password), its
``nodes-PORT.conf``, its append-only files, its log ``redis.log`` and two pid
files: ``redis.pid`` (written by Redis) and ``node.pid`` (written by the
launcher right after the start, so a node that dies early can still be
found). ``directory/devcluster.json`` records the launch options so the
``cluster status``/``cluster down`` commands can find the cluster again.

Stopping never trusts a pid file blindly: a pid is only signalled when
``/proc/PID`` shows a ``redis-server`` of that port (or with that node
directory as its working directory), so an unrelated process that reused the
pid, or the standalone Redis on 6379, is never touched.

The fault helpers (:meth:`DevCluster.kill_node`, :meth:`DevCluster.pause_node`,
:meth:`DevCluster.failover`, :meth:`DevCluster.migrate_slot`, ...) exist for
chaos tests; :meth:`DevCluster.heal` undoes them well enough for a session
fixture to be reused.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from ._errors import (
    ClusterFormationError,
    ConfigurationError,
    DevClusterError,
    PortBusyError,
    RedisServerMissingError,
)

__all__ = [
    "DevCluster",
    "Node",
    "NodeStatus",
    "TLSConfig",
    "check_redis_server",
    "find_free_base_port",
    "format_slots",
    "kill_from_pid_files",
    "stop_directory",
]

logger = logging.getLogger("taskiq_redis_cluster.devcluster")

SLOTS = 16384
BUS_PORT_OFFSET = 10000
STATE_FILE = "devcluster.json"
_MIN_VERSION = (7, 0)
#: Seconds between two polls of the nodes while waiting for a state.
_POLL_INTERVAL = 0.1
#: Seconds a node gets to exit after SIGTERM before it gets SIGKILL.
_TERM_GRACE = 5.0
_KILL_GRACE = 5.0
_ADMIN_TIMEOUT = 2.0


@dataclass(frozen=True)
class TLSConfig:
    """Certificate files for a TLS cluster (PEM paths).

    The nodes use them for clients, the cluster bus and replication; clients
    may connect without a certificate of their own (``tls-auth-clients
    optional``).
    """

    cert_file: Path
    key_file: Path
    ca_cert_file: Path


@dataclass(frozen=True)
class Node:
    """One node process of a :class:`DevCluster`.

    ``pid`` is ``None`` while the process is not running. A restart gives the
    node a new pid, so take a fresh value from :attr:`DevCluster.nodes` or
    :meth:`DevCluster.node_for_port` instead of keeping an old one.
    """

    host: str
    port: int
    pid: int | None
    node_dir: Path

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeStatus:
    """What :meth:`DevCluster.status` reports about one node."""

    host: str
    port: int
    up: bool
    node_id: str | None = None
    role: str = "unknown"  #: "master", "replica" or "unknown"
    master_id: str | None = None
    master_address: str | None = None
    slots: tuple[tuple[int, int], ...] = ()

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass
class _Entry:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    link_connected: bool
    slots: tuple[tuple[int, int], ...]
    open_slots: tuple[str, ...] = field(default=())

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def is_failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def _parse_nodes(text: str) -> list[_Entry]:
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        addr = parts[1].split(",", 1)[0].split("@", 1)[0]
        host, _, port_text = addr.rpartition(":")
        slots: list[tuple[int, int]] = []
        open_slots: list[str] = []
        for item in parts[8:]:
            if item.startswith("["):
                open_slots.append(item)
            elif "-" in item:
                lo, hi = item.split("-", 1)
                slots.append((int(lo), int(hi)))
            else:
                slots.append((int(item), int(item)))
        entries.append(
            _Entry(
                node_id=parts[0],
                host=host,
                port=int(port_text) if port_text.isdigit() else 0,
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                link_connected=parts[7] == "connected",
                slots=tuple(sorted(slots)),
                open_slots=tuple(open_slots),
            )
        )
    return entries


def _parse_kv(text: str) -> dict[str, str]:
    result = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            result[key] = value
    return result


def _text(reply: Any) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


def _conf_quote(value: str) -> str:
    """Quote ``value`` for redis.conf (parsed by Redis's ``sdssplitargs``)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ord(ch) < 128:
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
    return '"' + "".join(out) + '"'


def _merge_ranges(slots: Iterable[int]) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return tuple(ranges)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Redis sets SO_REUSEADDR too, so a port only held by TIME_WAIT
        # sockets counts as free, as it would for Redis.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux default
    return lo, hi


def find_free_base_port(count: int, host: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """Pick a random base port for ``count`` nodes.

    The base is drawn from 20000..39000 so that concurrent test sessions
    rarely collide; ports ``base .. base+count-1`` and their cluster bus ports
    (``+10000``) are checked to be free right now. Bases whose ports stay out
    of the kernel's ephemeral range are preferred, because an outgoing
    connection can grab a port in that range between this check and the
    node's start.

    :raises DevClusterError: if no free range is found in ``attempts`` tries.
    """
    rng = random.SystemRandom()
    eph_lo, eph_hi = _ephemeral_range()

    def outside(lo: int, hi: int) -> bool:
        return hi < eph_lo or lo > eph_hi

    bases = range(20000, 39001)
    safe = [
        b
        for b in bases
        if outside(b, b + count - 1)
        and outside(b + BUS_PORT_OFFSET, b + BUS_PORT_OFFSET + count - 1)
    ]
    pool: Sequence[int] = safe if len(safe) >= 100 else bases
    for _ in range(attempts):
        base = rng.choice(pool)
        ports = [base + i for i in range(count)]
        if all(_port_free(host, p) and _port_free(host, p + BUS_PORT_OFFSET) for p in ports):
            return base
    raise DevClusterError(message=f"found no {count} free ports on {host} in {attempts} tries")


def check_redis_server(redis_server: str = "redis-server") -> tuple[str, tuple[int, ...]]:
    """Return the resolved path and version of ``redis_server``.

    :raises RedisServerMissingError: if it is missing, not runnable or older
        than 7.0.
    """
    path = shutil.which(redis_server)
    if path is None:
        raise RedisServerMissingError(reason=f"{redis_server} not found")
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RedisServerMissingError(reason=f"{path} cannot be run ({exc})") from None
    match = re.search(r"v=(\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise RedisServerMissingError(reason=f"{path} does not report a Redis version")
    version = tuple(int(x) for x in match.groups(default="0"))
    if version[:2] < _MIN_VERSION:
        shown = ".".join(map(str, version))
        raise RedisServerMissingError(reason=f"{path} is Redis {shown}, older than 7.0")
    return path, version


# --------------------------------------------------------------------------
# Process handling (synchronous: also used from atexit handlers)
# --------------------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X")


def _is_our_redis(pid: int, port: int, node_dir: Path) -> bool:
    """True if ``pid`` is a redis-server serving ``port`` from ``node_dir``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"redis-server" not in cmdline and b"redis" not in cmdline.split(b"\0", 1)[0]:
        return False
    if f":{port} ".encode() in cmdline + b" " or f":{port}\0".encode() in cmdline + b"\0":
        return True
    if str(node_dir / "redis.conf").encode() in cmdline:
        return True
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return Path(cwd) == node_dir.resolve()


@dataclass
class _Victim:
    port: int
    node_dir: Path
    pid: int
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_alive(self.pid)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _terminate(victims: Sequence[_Victim], term_grace: float, kill_grace: float) -> list[int]:
    """SIGTERM, then SIGKILL after ``term_grace``; returns pids still alive."""
    for v in victims:
        _signal(v.pid, signal.SIGTERM)
        # A paused node would keep the SIGTERM pending forever.
        _signal(v.pid, signal.SIGCONT)
    pending = list(victims)
    for grace, sig in ((term_grace, signal.SIGKILL), (kill_grace, None)):
        deadline = time.monotonic() + grace
        for _ in range(int(grace / 0.05) + 2):
            pending = [v for v in pending if v.alive()]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        pending = [v for v in pending if v.alive()]
        if not pending or sig is None:
            break
        for v in pending:
            logger.warning("Node %d (pid %d) ignored SIGTERM; sending SIGKILL", v.port, v.pid)
            _signal(v.pid, sig)
    return [v.pid for v in pending if v.alive()]


def _node_dirs(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        if child.name.isdigit() and child.is_dir():
            found.append((int(child.name), child))
    return sorted(found)


def _victims_from_pid_files(directory: Path, ports: Iterable[int] | None = None) -> list[_Victim]:
    wanted = set(ports) if ports is not None else None
    victims = []
    for port, node_dir in _node_dirs(directory):
        if wanted is not None and port not in wanted:
            continue
        seen: set[int] = set()
        for name in ("node.pid", "redis.pid"):
            pid = _read_pid(node_dir / name)
            if pid is None or pid in seen or pid == os.getpid():
                continue
            seen.add(pid)
            if _is_our_redis(pid, port, node_dir):
                victims.append(_Victim(port, node_dir, pid))
            else:
                logger.debug("Pid file %s: pid %d is not our redis-server", node_dir / name, pid)
    return victims


def _remove_pid_files(node_dir: Path) -> None:
    for name in ("node.pid", "redis.pid"):
        with contextlib.suppress(FileNotFoundError):
            (node_dir / name).unlink()


def stop_directory(directory: Path | str, ports: Iterable[int] | None = None) -> list[int]:
    """Stop the nodes recorded by pid files under ``directory``.

    Only pids that ``/proc`` shows to be a ``redis-server`` of that node are
    signalled (SIGTERM, then SIGKILL after a bounded wait). ``ports`` limits
    the nodes considered. Returns the ports that were stopped.
    """
    directory = Path(directory)
    victims = _victims_from_pid_files(directory, ports)
    left = _terminate(victims, _TERM_GRACE, _KILL_GRACE)
    if left:
        raise DevClusterError(message=f"could not stop redis-server pids {left}")
    for port, node_dir in _node_dirs(directory):
        if ports is None or port in set(ports):
            _remove_pid_files(node_dir)
    return sorted({v.port for v in victims})


def kill_from_pid_files(directory: Path | str) -> None:
    """Last-resort cleanup for ``atexit``: SIGKILL every node of ``directory``.

    Never raises; pids are verified as in :func:`stop_directory`.
    """
    try:
        victims = _victims_from_pid_files(Path(directory))
        for v in victims:
            _signal(v.pid, signal.SIGKILL)
        _terminate(victims, 0.0, _KILL_GRACE)
    except Exception:  # atexit must not raise
        logger.debug("kill_from_pid_files(%s) failed", directory, exc_info=True)


# --------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------

NodeRef = Node | int


class DevCluster:
    """A local Redis Cluster made of ``redis-server`` processes.

    Use it as an async context manager (starts, and always stops), or call
    :meth:`start` and :meth:`stop` yourself; :meth:`stop` is idempotent.

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
            raise ConfigurationError(message="masters must be >= 1 and replicas >= 0")
        if masters > SLOTS:
            raise ConfigurationError(message=f"at most {SLOTS} masters")
        count = masters * (1 + replicas)
        if not (base_port >= 1 and base_port + count - 1 + BUS_PORT_OFFSET <= 65535):
            raise ConfigurationError(
                message=f"base port {base_port} leaves no room for {count} nodes and bus ports"
            )
        if username is not None and (not username or any(c.isspace() for c in username)):
            raise ConfigurationError(message="the ACL user name must be non-empty, no spaces")
        if username is not None and not password:
            raise ConfigurationError(message="an ACL user (--username) needs a password")
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

    # ---- construction from a directory (CLI) -----------------------------

    @classmethod
    def from_directory(cls, directory: Path | str) -> DevCluster:
        """Rebuild the launcher of a cluster started earlier in ``directory``.

        :raises DevClusterError: if ``directory`` holds no launcher state.
        """
        path = Path(directory) / STATE_FILE
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

    def _write_state(self) -> None:
        state = {
            "masters": self.masters_count,
            "replicas": self.replicas_count,
            "base_port": self.base_port,
            "node_timeout_ms": self.node_timeout_ms,
            "host": self.host,
            "username": self.username,
            "password": self.password,
            "tls": {
                "cert_file": str(self.tls.cert_file),
                "key_file": str(self.tls.key_file),
                "ca_cert_file": str(self.tls.ca_cert_file),
            }
            if self.tls
            else None,
            "redis_server": self.redis_server,
        }
        _write_private(self.directory / STATE_FILE, json.dumps(state, indent=2) + "\n")

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

    def _client(self, port: int, timeout: float = _ADMIN_TIMEOUT) -> Redis:
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

    async def _cmd(self, port: int, *args: Any, timeout: float = _ADMIN_TIMEOUT) -> Any:
        async with self._client(port, timeout) as client:
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def _view(self, port: int) -> list[_Entry]:
        return _parse_nodes(_text(await self._cmd(port, "CLUSTER", "NODES")))

    async def _info(self, port: int, *args: str) -> dict[str, str]:
        return _parse_kv(_text(await self._cmd(port, *args)))

    async def _any_view(self) -> tuple[int, list[_Entry]]:
        errors = []
        for port in self._live_ports():
            try:
                return port, await self._view(port)
            except (RedisError, OSError) as exc:
                errors.append(f"{port}: {exc}")
        raise DevClusterError(message=f"no node answers CLUSTER NODES ({'; '.join(errors)})")

    def _entry_node(self, entry: _Entry) -> Node:
        if entry.port in self._ports:
            return self.node_for_port(entry.port)
        raise DevClusterError(message=f"node {entry.host}:{entry.port} is not ours")

    # ---- lifecycle --------------------------------------------------------

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
        self._server_path, _ = await asyncio.to_thread(check_redis_server, self.redis_server)
        for port in self._ports:
            for p in (port, port + BUS_PORT_OFFSET):
                if not _port_free(self.host, p):
                    raise PortBusyError(host=self.host, port=p)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_state()
        try:
            for port in self._ports:
                self._prepare_node_dir(port)
                self._spawn(port)
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

    async def stop(self) -> None:
        """Stop every node this cluster started (idempotent).

        Pid files are consulted too, so nodes of the same directory started
        by another process (``cluster up``) are stopped as well.
        """
        victims: dict[int, _Victim] = {}
        for port, proc in self._procs.items():
            victims[proc.pid] = _Victim(port, self._node_dir(port), proc.pid, proc)
        for v in _victims_from_pid_files(self.directory, self._ports):
            victims.setdefault(v.pid, v)
        left = await asyncio.to_thread(_terminate, list(victims.values()), _TERM_GRACE, _KILL_GRACE)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0)
        self._procs.clear()
        self._paused.clear()
        for port in self._ports:
            _remove_pid_files(self._node_dir(port))
        if left:
            raise DevClusterError(message=f"could not stop redis-server pids {left}")
        if victims:
            logger.debug("Stopped %d redis-server node(s) in %s", len(victims), self.directory)

    def _prepare_node_dir(self, port: int) -> None:
        node_dir = self._node_dir(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        # A fresh cluster: forget what an earlier run in this directory left.
        for name in (f"nodes-{port}.conf", "dump.rdb", "node.pid", "redis.pid"):
            with contextlib.suppress(FileNotFoundError):
                (node_dir / name).unlink()
        shutil.rmtree(node_dir / "appendonlydir", ignore_errors=True)
        _write_private(node_dir / "redis.conf", self._config(port))
        (node_dir / "redis.log").write_bytes(b"")

    def _config(self, port: int) -> str:
        node_dir = self._node_dir(port)
        lines = [
            "# Written by taskiq_redis_cluster.devcluster; rewritten on every start.",
            f"bind {self.host}",
            "daemonize no",
            f"dir {_conf_quote(str(node_dir))}",
            f"pidfile {_conf_quote(str(node_dir / 'redis.pid'))}",
            'logfile ""',
            "cluster-enabled yes",
            f"cluster-config-file nodes-{port}.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            f"cluster-port {port + BUS_PORT_OFFSET}",
            "cluster-replica-validity-factor 0",
            # A restarted killed master must come back with its data.
            "appendonly yes",
            'save ""',
            # Bound the shutdown wait for lagging replicas (default 10 s).
            "shutdown-timeout 2",
        ]
        if self.tls is None:
            lines.append(f"port {port}")
        else:
            lines += [
                "port 0",
                f"tls-port {port}",
                f"tls-cert-file {_conf_quote(str(self.tls.cert_file))}",
                f"tls-key-file {_conf_quote(str(self.tls.key_file))}",
                f"tls-ca-cert-file {_conf_quote(str(self.tls.ca_cert_file))}",
                "tls-cluster yes",
                "tls-replication yes",
                "tls-auth-clients optional",
            ]
        if self.password is None:
            lines.append("protected-mode no")
        else:
            lines.append(f"requirepass {_conf_quote(self.password)}")
            lines.append(f"masterauth {_conf_quote(self.password)}")
            if self.username is not None:
                lines.append(
                    f"user {self.username} on {_conf_quote('>' + self.password)} ~* &* +@all"
                )
                lines.append(f"masteruser {self.username}")
        return "\n".join(lines) + "\n"

    def _spawn(self, port: int) -> None:
        assert self._server_path is not None
        node_dir = self._node_dir(port)
        with open(node_dir / "redis.log", "ab") as log:
            proc = subprocess.Popen(
                [self._server_path, str(node_dir / "redis.conf")],
                cwd=node_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[port] = proc
        self._paused.discard(port)
        (node_dir / "node.pid").write_text(f"{proc.pid}\n")
        logger.debug("Started redis-server on port %d (pid %d)", port, proc.pid)

    def _log_tail(self, port: int, lines: int = 3) -> str:
        try:
            text = (self._node_dir(port) / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return " | ".join(tail)

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

    def _check_alive(self, ports: Iterable[int]) -> None:
        for port in ports:
            proc = self._procs.get(port)
            if proc is not None and proc.poll() is not None:
                if "Address already in use" in self._log_tail(port, lines=20):
                    # Taken between our check and the start (another session).
                    raise PortBusyError(host=self.host, port=port)
                raise ClusterFormationError(
                    reason=f"redis-server on port {port} exited with code {proc.returncode}: "
                    f"{self._log_tail(port)}"
                )

    async def _wait_ping(self, ports: Sequence[int], timeout: float) -> None:
        async def check() -> str | None:
            self._check_alive(ports)
            for port in ports:
                try:
                    await self._cmd(port, "PING", timeout=0.5)
                except (RedisError, OSError) as exc:
                    return f"{self.host}:{port} does not answer PING ({exc})"
            return None

        await self._wait("all nodes answering PING", check, timeout)

    async def _form(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.form_timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        await self._wait_ping(self._ports, left())
        ids = {p: _text(await self._cmd(p, "CLUSTER", "MYID")) for p in self._ports}
        masters = self._ports[: self.masters_count]
        for i, port in enumerate(self._ports):
            # Distinct epochs up front, as redis-cli does, so that nodes need
            # no epoch-collision rounds before the slot map settles.
            with contextlib.suppress(ResponseError):
                await self._cmd(port, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for i, port in enumerate(masters):
            lo = i * SLOTS // len(masters)
            hi = (i + 1) * SLOTS // len(masters) - 1
            await self._cmd(port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
        first = self._ports[0]
        for port in self._ports[1:]:
            await self._cmd(first, "CLUSTER", "MEET", self.host, port)
            await self._cmd(port, "CLUSTER", "MEET", self.host, first)
        count = len(self._ports)

        id_set = set(ids.values())

        async def all_known_ids() -> str | None:
            self._check_alive(self._ports)
            for port in self._ports:
                view = await self._view(port)
                seen = {e.node_id for e in view if "handshake" not in e.flags}
                if not id_set <= seen:
                    return f"{self.host}:{port} knows {len(seen & id_set)} of {count} nodes"
            return None

        await self._wait("all nodes meeting each other", all_known_ids, left())
        replica_ports = self._ports[self.masters_count :]
        wanted = {rp: ids[masters[i % len(masters)]] for i, rp in enumerate(replica_ports)}

        async def replicated() -> str | None:
            self._check_alive(self._ports)
            for rp, master_id in wanted.items():
                me = next(e for e in await self._view(rp) if "myself" in e.flags)
                if me.master_id != master_id:
                    try:
                        await self._cmd(rp, "CLUSTER", "REPLICATE", master_id)
                    except ResponseError as exc:
                        return f"{self.host}:{rp} cannot replicate yet ({exc})"
                    return f"{self.host}:{rp} told to replicate {master_id}"
            return None

        if wanted:
            await self._wait("replicas attached", replicated, left())
        await self.wait_healthy(timeout=left())

    # ---- health -----------------------------------------------------------

    async def _health_problem(self) -> str | None:
        live = self._live_ports()
        if not live:
            return "no node is running"
        total = len(self._ports)
        views: dict[int, list[_Entry]] = {}
        for port in live:
            info = await self._info(port, "CLUSTER", "INFO")
            addr = f"{self.host}:{port}"
            if info.get("cluster_state") != "ok":
                return f"{addr} reports cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_slots_assigned") != str(SLOTS):
                return f"{addr} has {info.get('cluster_slots_assigned')} slots assigned"
            if info.get("cluster_known_nodes") != str(total):
                return f"{addr} knows {info.get('cluster_known_nodes')} of {total} nodes"
            views[port] = await self._view(port)
        live_set = set(live)
        maps = {}
        for port, view in views.items():
            for e in view:
                if e.open_slots:
                    return f"{self.host}:{e.port} has open slots {e.open_slots}"
                if e.port in live_set and e.is_failing:
                    return f"{self.host}:{port} flags {e.port} as {sorted(e.flags)}"
                if e.port in live_set and "myself" not in e.flags and not e.link_connected:
                    return f"{self.host}:{port} has no link to {e.port}"
            maps[port] = sorted((e.node_id, e.slots) for e in view if e.is_master and e.slots)
        ref_port = live[0]
        for port, slot_map in maps.items():
            if slot_map != maps[ref_port]:
                return f"{self.host}:{port} and {ref_port} disagree on the slot map"
        ref = views[ref_port]
        if self.replicas_count > 0:
            for master in (e for e in ref if e.is_master and e.slots):
                reps = [
                    e
                    for e in ref
                    if e.master_id == master.node_id and not e.is_failing and e.port in live_set
                ]
                if not reps:
                    return f"master {master.host}:{master.port} has no live replica"
        for e in ref:
            if e.is_master or e.port not in live_set:
                continue
            info = await self._info(e.port, "INFO", "replication")
            if info.get("role") != "slave":
                return f"{self.host}:{e.port} is listed as a replica but says {info.get('role')}"
            if info.get("master_link_status") != "up":
                return f"replica {self.host}:{e.port} has master_link_status down"
            if info.get("master_sync_in_progress") != "0":
                return f"replica {self.host}:{e.port} is still syncing"
        return None

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until the running, unpaused nodes form a healthy cluster.

        Healthy means: ``cluster_state:ok`` on every such node, all 16384
        slots assigned, every node known to all, no failing flags or open
        slots, one slot map everywhere, every master (with replicas
        configured) has a live replica, and every replica's link is up and
        not syncing.

        :raises ClusterFormationError: on timeout, with the last problem seen.
        """
        await self._wait("a healthy cluster", self._health_problem, timeout)

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

    async def status(self) -> list[NodeStatus]:
        """One :class:`NodeStatus` per configured node (live data)."""
        views: dict[int, list[_Entry]] = {}
        for port in self._ports:
            with contextlib.suppress(RedisError, OSError):
                views[port] = await self._view(port)
        by_id: dict[str, _Entry] = {}
        by_port: dict[int, _Entry] = {}
        for port, view in views.items():
            for e in view:
                if "myself" in e.flags:
                    by_port[port] = e
                by_id.setdefault(e.node_id, e)
        for view in views.values():
            for e in view:
                by_port.setdefault(e.port, e)
        result = []
        for port in self._ports:
            entry = by_port.get(port)
            if entry is None:
                result.append(NodeStatus(self.host, port, up=port in views))
                continue
            master = by_id.get(entry.master_id) if entry.master_id else None
            role = "master" if entry.is_master else "replica" if entry.master_id else "unknown"
            result.append(
                NodeStatus(
                    host=self.host,
                    port=port,
                    up=port in views,
                    node_id=entry.node_id,
                    role=role,
                    master_id=entry.master_id,
                    master_address=f"{master.host}:{master.port}" if master else None,
                    slots=entry.slots,
                )
            )
        return result

    # ---- topology queries -------------------------------------------------

    async def masters(self) -> list[Node]:
        """Masters that own slots and are not failing, from live CLUSTER NODES."""
        _, view = await self._any_view()
        return [
            self._entry_node(e)
            for e in sorted(view, key=lambda e: e.port)
            if e.is_master and e.slots and not e.is_failing
        ]

    async def replicas(self) -> list[Node]:
        """Replicas that are not failing, from live CLUSTER NODES."""
        _, view = await self._any_view()
        return [
            self._entry_node(e)
            for e in sorted(view, key=lambda e: e.port)
            if not e.is_master and e.master_id and not e.is_failing
        ]

    async def master_of_slot(self, slot: int) -> Node:
        """The master currently owning ``slot``."""
        _, view = await self._any_view()
        for e in view:
            if e.is_master and any(lo <= slot <= hi for lo, hi in e.slots):
                return self._entry_node(e)
        raise DevClusterError(message=f"slot {slot} is not covered")

    async def master_of_key(self, key: str | bytes) -> Node:
        """The master currently owning ``key``'s slot."""
        raw = key.encode() if isinstance(key, str) else key
        return await self.master_of_slot(key_slot(raw))

    async def replica_of(self, master: NodeRef) -> Node:
        """A live replica of ``master`` (the first by port)."""
        port = self._port(master)
        _, view = await self._any_view()
        by_port = {e.port: e for e in view}
        if port not in by_port:
            raise DevClusterError(message=f"node {port} is unknown to the cluster")
        master_id = by_port[port].node_id
        for e in sorted(view, key=lambda e: e.port):
            if e.master_id == master_id and not e.is_failing and e.port in self._live_ports():
                return self._entry_node(e)
        raise DevClusterError(message=f"master {self.host}:{port} has no live replica")

    # ---- fault helpers ----------------------------------------------------

    async def kill_node(self, node: NodeRef) -> None:
        """SIGKILL the node (no shutdown, no AOF flush beyond what the OS has)."""
        port = self._port(node)
        proc = self._procs.get(port)
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        await asyncio.to_thread(proc.wait, _KILL_GRACE)
        self._paused.discard(port)
        _remove_pid_files(self._node_dir(port))
        logger.info("Killed node %d", port)

    async def pause_node(self, node: NodeRef) -> None:
        """SIGSTOP the node: it stays up but stops answering."""
        port = self._port(node)
        proc = self._procs.get(port)
        if proc is None or proc.poll() is not None:
            raise DevClusterError(message=f"node {port} is not running")
        proc.send_signal(signal.SIGSTOP)
        self._paused.add(port)
        logger.info("Paused node %d", port)

    async def resume_node(self, node: NodeRef) -> None:
        """SIGCONT a paused node."""
        port = self._port(node)
        proc = self._procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        self._paused.discard(port)
        logger.info("Resumed node %d", port)

    async def restart_node(self, node: NodeRef, *, timeout: float | None = None) -> None:
        """Start the node's process again with the same config and data.

        A node that still runs (or is paused) is SIGKILLed first. Returns once
        the node answers PING, reports ``cluster_state:ok`` and no other live
        node flags it as failing.
        """
        port = self._port(node)
        timeout = self.form_timeout if timeout is None else timeout
        if self._running(port):
            await self.kill_node(port)
        if self._server_path is None:
            self._server_path, _ = await asyncio.to_thread(check_redis_server, self.redis_server)
        self._spawn(port)
        await self._wait_ping([port], timeout)

        async def rejoined() -> str | None:
            self._check_alive([port])
            info = await self._info(port, "CLUSTER", "INFO")
            if info.get("cluster_state") != "ok":
                return f"{self.host}:{port} reports cluster_state:{info.get('cluster_state')}"
            for other in self._live_ports():
                for e in await self._view(other):
                    if e.port == port and e.is_failing:
                        return f"{self.host}:{other} flags {port} as {sorted(e.flags)}"
            return None

        await self._wait(f"node {port} rejoining", rejoined, timeout)
        logger.info("Restarted node %d", port)

    async def failover(
        self, replica_node: NodeRef, force: bool = False, *, timeout: float | None = None
    ) -> None:
        """Promote ``replica_node`` with ``CLUSTER FAILOVER [FORCE]``.

        Returns when it reports the master role and the live nodes agree on
        a slot map with ``cluster_state:ok``.
        """
        port = self._port(replica_node)
        timeout = self.form_timeout if timeout is None else timeout
        args: list[Any] = ["CLUSTER", "FAILOVER"] + (["FORCE"] if force else [])
        loop = asyncio.get_running_loop()
        # A manual failover gives up after 5 s inside Redis; ask again then.
        next_request = 0.0

        async def promoted() -> str | None:
            nonlocal next_request
            role = (await self._info(port, "INFO", "replication")).get("role")
            if role != "master":
                if loop.time() >= next_request:
                    next_request = loop.time() + 6.0
                    try:
                        await self._cmd(port, *args)
                    except ResponseError as exc:
                        return f"CLUSTER FAILOVER refused: {exc}"
                return f"{self.host}:{port} is still a {role}"
            maps = set()
            for other in self._live_ports():
                info = await self._info(other, "CLUSTER", "INFO")
                if info.get("cluster_state") != "ok":
                    return f"{self.host}:{other} reports cluster_state:{info.get('cluster_state')}"
                view = await self._view(other)
                me = [e for e in view if e.port == port]
                if not me or not me[0].is_master:
                    return f"{self.host}:{other} does not see {port} as master yet"
                maps.add(tuple(sorted((e.node_id, e.slots) for e in view if e.is_master)))
            if len(maps) > 1:
                return "the live nodes disagree on the slot map"
            return None

        await self._wait(f"failover to {port}", promoted, timeout)
        logger.info("Node %d is now a master", port)

    async def migrate_slot(
        self, slot: int, target_master: NodeRef, *, batch: int = 100, timeout_ms: int = 5000
    ) -> None:
        """Move ``slot`` and its keys to ``target_master`` by hand.

        The documented protocol: ``SETSLOT IMPORTING`` on the target,
        ``MIGRATING`` on the source, ``GETKEYSINSLOT`` + ``MIGRATE`` in
        batches, then ``SETSLOT NODE`` on the target, the source and the
        other masters. While it runs, clients get ASK/TRYAGAIN and follow
        them, so it is safe under load. Returns when every live node sees the
        target as the owner.
        """
        if not 0 <= slot < SLOTS:
            raise DevClusterError(message=f"slot {slot} is outside 0..{SLOTS - 1}")
        target = self._port(target_master)
        _, view = await self._any_view()
        by_port = {e.port: e for e in view}
        owner = next(
            (e for e in view if e.is_master and any(lo <= slot <= hi for lo, hi in e.slots)),
            None,
        )
        if owner is None:
            raise DevClusterError(message=f"slot {slot} is not covered")
        dst = by_port.get(target)
        if dst is None or not dst.is_master:
            raise DevClusterError(message=f"node {target} is not a master")
        if owner.port == target:
            return
        source = owner.port
        await self._cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", owner.node_id)
        await self._cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst.node_id)
        auth: list[Any] = []
        if self.password is not None:
            auth = (
                ["AUTH2", self.username, self.password]
                if self.username
                else ["AUTH", self.password]
            )
        moved = 0
        # Keys only leave the source (new keys go to the target via ASK), so
        # this ends; the bound guards against a misbehaving server.
        for _ in range(SLOTS * 100):
            keys = await self._cmd(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            await self._cmd(
                source,
                "MIGRATE",
                self.host,
                target,
                "",
                0,
                timeout_ms,
                *auth,
                "KEYS",
                *keys,
                timeout=timeout_ms / 1000 + _ADMIN_TIMEOUT,
            )
            moved += len(keys)
        else:
            raise DevClusterError(message=f"slot {slot} kept receiving keys; migration stuck")
        # Target first, so the slot is never without an owner that knows it.
        await self._cmd(target, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)
        await self._cmd(source, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)
        for e in view:
            if e.is_master and e.port not in (source, target) and e.port in self._live_ports():
                with contextlib.suppress(RedisError, OSError):
                    await self._cmd(e.port, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)

        async def settled() -> str | None:
            for port in self._live_ports():
                for e in await self._view(port):
                    if e.open_slots:
                        return f"{self.host}:{e.port} still has open slots {e.open_slots}"
                    owns = any(lo <= slot <= hi for lo, hi in e.slots)
                    if owns and e.node_id != dst.node_id:
                        return f"{self.host}:{port} still maps slot {slot} to {e.port}"
            return None

        await self._wait(f"slot {slot} owned by {target}", settled, self.form_timeout)
        logger.info("Moved slot %d (%d keys) from %d to %d", slot, moved, source, target)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (may hold a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def format_slots(slots: Sequence[tuple[int, int]]) -> str:
    """``0-5460,6000`` style text for slot ranges."""
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in slots) or "-"


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
