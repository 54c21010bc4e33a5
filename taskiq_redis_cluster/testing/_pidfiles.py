"""Finding and stopping our ``redis-server`` processes through their pid files.

Every node directory ``directory/PORT`` holds two pid files: ``redis.pid``
(written by Redis) and ``node.pid`` (written by the launcher right after the
start, so a node that dies early can still be found).

Stopping never trusts a pid file blindly: a pid is only signalled when
``/proc/PID`` shows a ``redis-server`` of that port (or with that node
directory as its working directory), so an unrelated process that reused the
pid, or the standalone Redis on 6379, is never touched.

Synchronous on purpose: :func:`kill_from_pid_files` runs from ``atexit``,
where no event loop is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._errors import DevClusterError

__all__ = [
    "KILL_GRACE",
    "TERM_GRACE",
    "Victim",
    "kill_from_pid_files",
    "remove_pid_files",
    "stop_directory",
    "terminate",
    "victims_from_pid_files",
]

logger = logging.getLogger(__name__)

#: Seconds a node gets to exit after SIGTERM before it gets SIGKILL.
TERM_GRACE = 5.0
#: Seconds a SIGKILLed node gets to disappear before we give up on it.
KILL_GRACE = 5.0
_PID_FILES = ("node.pid", "redis.pid")


def _read_pid(path: Path) -> int | None:
    try:
        content = path.read_text().strip()
    except OSError:
        return None
    return int(content) if content.isdigit() else None


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
class Victim:
    """A node process about to be stopped.

    ``popen`` is set when this process started it: its ``poll()`` also reaps
    the child, which a ``/proc`` look-up cannot do.
    """

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


def terminate(victims: Sequence[Victim], term_grace: float, kill_grace: float) -> list[int]:
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


def victims_from_pid_files(directory: Path, ports: Iterable[int] | None = None) -> list[Victim]:
    """The live redis-server processes the pid files under ``directory`` name."""
    wanted = set(ports) if ports is not None else None
    victims = []
    for port, node_dir in _node_dirs(directory):
        if wanted is not None and port not in wanted:
            continue
        seen: set[int] = set()
        for name in _PID_FILES:
            pid = _read_pid(node_dir / name)
            if pid is None or pid in seen or pid == os.getpid():
                continue
            seen.add(pid)
            if _is_our_redis(pid, port, node_dir):
                victims.append(Victim(port, node_dir, pid))
            else:
                logger.debug("Pid file %s: pid %d is not our redis-server", node_dir / name, pid)
    return victims


def remove_pid_files(node_dir: Path) -> None:
    """Forget a stopped node's pids, so a later stop cannot hit a reused pid."""
    for name in _PID_FILES:
        with contextlib.suppress(FileNotFoundError):
            (node_dir / name).unlink()


def stop_directory(directory: Path | str, ports: Iterable[int] | None = None) -> list[int]:
    """Stop the nodes recorded by pid files under ``directory``.

    Only pids that ``/proc`` shows to be a ``redis-server`` of that node are
    signalled (SIGTERM, then SIGKILL after a bounded wait). ``ports`` limits
    the nodes considered. Returns the ports that were stopped.
    """
    directory = Path(directory)
    victims = victims_from_pid_files(directory, ports)
    left = terminate(victims, TERM_GRACE, KILL_GRACE)
    if left:
        raise DevClusterError(message=f"could not stop redis-server pids {left}")
    for port, node_dir in _node_dirs(directory):
        if ports is None or port in set(ports):
            remove_pid_files(node_dir)
    return sorted({v.port for v in victims})


def kill_from_pid_files(directory: Path | str) -> None:
    """Last-resort cleanup for ``atexit``: SIGKILL every node of ``directory``.

    Never raises; pids are verified as in :func:`stop_directory`.
    """
    try:
        victims = victims_from_pid_files(Path(directory))
        for v in victims:
            _signal(v.pid, signal.SIGKILL)
        terminate(victims, 0.0, KILL_GRACE)
    except Exception:  # atexit must not raise
        logger.debug("kill_from_pid_files(%s) failed", directory, exc_info=True)
