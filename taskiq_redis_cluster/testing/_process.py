"""Process control: the ``redis-server`` binary, free ports, node directories, start and stop.

Node ``i`` listens on ``base_port + i`` and uses the Redis default cluster bus
port ``base_port + i + 10000``. Everything a node needs lives in
``directory/PORT``: its ``redis.conf`` (written here, mode 0600 because it may
hold a password), its ``nodes-PORT.conf``, its append-only files, its log
``redis.log`` and its pid files (see :mod:`._pidfiles`).
``directory/devcluster.json`` records the launch options so the ``cluster
status``/``cluster down`` commands can find the cluster again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from redis.exceptions import RedisError

from .._errors import (
    ClusterFormationError,
    DevClusterError,
    PortBusyError,
    RedisServerMissingError,
)
from ._model import BUS_PORT_OFFSET, STATE_FILE
from ._nodes import NodeSet
from ._pidfiles import (
    KILL_GRACE,
    TERM_GRACE,
    Victim,
    remove_pid_files,
    terminate,
    victims_from_pid_files,
)

__all__ = ["Processes", "check_redis_server", "find_free_base_port", "write_private"]

logger = logging.getLogger(__name__)

_MIN_VERSION = (7, 0)


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


def write_private(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` readable by the owner only (may hold a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    os.chmod(path, 0o600)


class Processes(NodeSet):
    """Start, watch and stop the node processes of a dev cluster."""

    async def _preflight(self) -> None:
        """Check everything that can fail before a single node is started."""
        self._server_path, _ = await asyncio.to_thread(check_redis_server, self.redis_server)
        for port in self._ports:
            for p in (port, port + BUS_PORT_OFFSET):
                if not _port_free(self.host, p):
                    raise PortBusyError(host=self.host, port=p)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_state()

    def _spawn_all(self) -> None:
        for port in self._ports:
            self._prepare_node_dir(port)
            self._spawn(port)

    async def stop(self) -> None:
        """Stop every node this cluster started (idempotent).

        Pid files are consulted too, so nodes of the same directory started
        by another process (``cluster up``) are stopped as well.
        """
        victims: dict[int, Victim] = {}
        for port, proc in self._procs.items():
            victims[proc.pid] = Victim(port, self._node_dir(port), proc.pid, proc)
        for v in victims_from_pid_files(self.directory, self._ports):
            victims.setdefault(v.pid, v)
        left = await asyncio.to_thread(terminate, list(victims.values()), TERM_GRACE, KILL_GRACE)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0)
        self._procs.clear()
        self._paused.clear()
        for port in self._ports:
            remove_pid_files(self._node_dir(port))
        if left:
            raise DevClusterError(message=f"could not stop redis-server pids {left}")
        if victims:
            logger.debug("Stopped %d redis-server node(s) in %s", len(victims), self.directory)

    def detach(self) -> None:
        """Leave the nodes running after this process ends (``cluster up``).

        Their pid files stay, for ``cluster down`` or a later :meth:`stop`.
        ``subprocess`` warns (``ResourceWarning``) when the handle of a child
        that still runs is collected; here the child outliving us is the
        point, so that one warning is silenced while the handles are dropped.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "subprocess .* is still running", ResourceWarning)
            self._procs.clear()
            gc.collect()

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
        write_private(self.directory / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def _prepare_node_dir(self, port: int) -> None:
        node_dir = self._node_dir(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        # A fresh cluster: forget what an earlier run in this directory left.
        for name in (f"nodes-{port}.conf", "dump.rdb", "node.pid", "redis.pid"):
            with contextlib.suppress(FileNotFoundError):
                (node_dir / name).unlink()
        shutil.rmtree(node_dir / "appendonlydir", ignore_errors=True)
        write_private(node_dir / "redis.conf", self._config(port))
        (node_dir / "redis.log").write_bytes(b"")

    def _config(self, port: int) -> str:
        node_dir = self._node_dir(port)
        lines = [
            "# Written by taskiq_redis_cluster.testing; rewritten on every start.",
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
            content = (self._node_dir(port) / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        tail = [ln.strip() for ln in content.splitlines() if ln.strip()][-lines:]
        return " | ".join(tail)

    def _check_alive(self, ports: Iterable[int]) -> None:
        """Fail fast, with the node's own words, when a node process has exited."""
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
