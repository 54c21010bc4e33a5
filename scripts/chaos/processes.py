"""Processes the harness starts: ``taskiq worker`` groups and one-shot commands.

Every process runs in its own process group, signals go to whole groups,
and only to groups started here; everything is reaped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .config import ENV_PREFIX, POLL, WORKER_ARGS, ChaosConfig
from .ledger import read_worker_events

logger = logging.getLogger(__name__)


#: This package's import name and the directory it is imported from: the
#: ``taskiq worker`` processes import :func:`.worker.worker_broker` from the
#: same place (the harness is not installed, so they get it on PYTHONPATH).
_PACKAGE = __name__.rpartition(".")[0]
_IMPORT_ROOT = Path(__file__).resolve().parents[_PACKAGE.count(".") + 1]


@dataclass
class _Worker:
    label: str
    proc: subprocess.Popen[bytes]
    log: TextIO
    expected_exit: bool = False
    paused: bool = False
    exit_seen: float | None = None


class WorkerPool:
    """``taskiq worker`` processes, each in its own process group.

    Signals go to the whole group (taskiq's manager and its child), and
    only to groups this pool started; :meth:`terminate` is the exception.
    ``worker_args`` are extra ``taskiq worker`` options.
    """

    def __init__(
        self, directory: Path, env: dict[str, str], worker_args: Sequence[str] = WORKER_ARGS
    ) -> None:
        self.directory = directory
        self._env = env
        self._args = list(worker_args)
        self._workers: list[_Worker] = []
        self._atexit_registered = False

    def _kill_all_now(self) -> None:
        # Last resort (atexit) if stop_all() never ran: no worker outlives us.
        for index in range(len(self._workers)):
            self._signal(index, signal.SIGCONT)
            self._signal(index, signal.SIGKILL)

    @property
    def labels(self) -> list[str]:
        """Labels of every worker started so far."""
        return [w.label for w in self._workers]

    def start(self, extra_env: dict[str, str] | None = None) -> int:
        """Start one worker; returns its index."""
        index = len(self._workers)
        label = f"w{index}"
        env = {**os.environ, **self._env, **(extra_env or {}), ENV_PREFIX + "WORKER": label}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_IMPORT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        log = open(self.directory / f"worker-{label}.log", "w")  # noqa: SIM115 - closed in stop_all
        command = [
            sys.executable, "-m", "taskiq", "worker",
            f"{_PACKAGE}.worker:worker_broker",
            "--workers", "1",
            "--log-level", "WARNING",
            *self._args,
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                command,
                env=env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._workers.append(_Worker(label, proc, log))
        if not self._atexit_registered:
            atexit.register(self._kill_all_now)
            self._atexit_registered = True
        logger.info("Started worker %s (pid %d)", label, proc.pid)
        return index

    def _signal(self, index: int, sig: signal.Signals) -> None:
        worker = self._workers[index]
        # The group id is the leader's pid (start_new_session); it stays valid
        # while any member lives, also after the leader died.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.proc.pid, sig)

    def kill(self, index: int) -> None:
        """SIGKILL the worker's whole process group (a crash)."""
        self._workers[index].expected_exit = True
        self._signal(index, signal.SIGCONT)
        self._signal(index, signal.SIGKILL)
        logger.info("SIGKILLed worker %s", self._workers[index].label)

    async def terminate(self, index: int, timeout: float) -> int | None:
        """SIGTERM the worker as a deployment stops it; its exit code.

        Only the ``taskiq worker`` process gets the signal, as ``docker
        stop`` or Kubernetes send it to a container's main process: taskiq's
        process manager then asks its child to shut down. Waits (bounded)
        until the whole process group is gone; returns None, after a
        SIGKILL of the group, if it did not go within ``timeout``.
        """
        worker = self._workers[index]
        worker.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        logger.info("SIGTERMed worker %s", worker.label)
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            if worker.proc.poll() is not None and not self._group_alive(index):
                return worker.proc.returncode
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        logger.warning("Worker %s did not stop within %.0fs of SIGTERM", worker.label, timeout)
        self._signal(index, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(worker.proc.wait, 10)
        return None

    def _group_alive(self, index: int) -> bool:
        try:
            os.killpg(self._workers[index].proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def child_pid(self, index: int) -> int | None:
        """Pid of the worker's task-running child (the ledger's ``exec-<pid>``)."""
        label = self._workers[index].label
        pids = [pid for kind, lbl, pid, _ in read_worker_events(self.directory) if lbl == label]
        return pids[-1] if pids else None

    def pause(self, index: int) -> None:
        """SIGSTOP the worker's process group."""
        self._workers[index].paused = True
        self._signal(index, signal.SIGSTOP)
        logger.info("SIGSTOPped worker %s", self._workers[index].label)

    def resume(self, index: int) -> None:
        """SIGCONT the worker's process group."""
        self._signal(index, signal.SIGCONT)
        self._workers[index].paused = False
        logger.info("SIGCONTed worker %s", self._workers[index].label)

    def unexpected_exits(self) -> list[str]:
        """Workers that exited without the scenario killing them."""
        now = time.time()
        dead = []
        for w in self._workers:
            if w.proc.poll() is not None and not w.expected_exit:
                if w.exit_seen is None:
                    w.exit_seen = now
                    logger.warning("Worker %s exited with code %s", w.label, w.proc.returncode)
                dead.append(f"{w.label} (exit {w.proc.returncode})")
        return dead

    def child_restarts(self) -> int:
        """Worker children that taskiq's process manager had to start again."""
        starts = Counter(
            label for kind, label, _, _ in read_worker_events(self.directory) if kind == "start"
        )
        return sum(max(0, n - 1) for n in starts.values())

    async def wait_ready(self, indexes: Iterable[int], timeout: float) -> None:
        """Wait until the workers' brokers started (bounded).

        :raises TimeoutError: if one is not ready within ``timeout``.
        """
        wanted = {self._workers[i].label for i in indexes}
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / POLL) + 2):
            ready = {
                label for kind, label, _, _ in read_worker_events(self.directory) if kind == "ready"
            }
            if wanted <= ready:
                return
            dead = [
                w.label for w in self._workers if w.label in wanted and w.proc.poll() is not None
            ]
            if dead or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        raise TimeoutError(
            f"workers {sorted(wanted - ready)} not ready within {timeout:.0f}s "
            f"(see worker-*.log in {self.directory})"
        )

    async def stop_all(self, grace: float = 8.0) -> None:
        """SIGTERM every group, then SIGKILL what is left; reap everything."""
        for index, w in enumerate(self._workers):
            if w.proc.poll() is None:
                self._signal(index, signal.SIGCONT)
                self._signal(index, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _ in range(int(grace / 0.1) + 2):
            if all(w.proc.poll() is not None for w in self._workers):
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        for index in range(len(self._workers)):
            # Also when the leader is gone: an orphaned child may remain.
            self._signal(index, signal.SIGKILL)
        for w in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(w.proc.wait, 10)
            w.log.close()
        if self._atexit_registered:
            atexit.unregister(self._kill_all_now)
            self._atexit_registered = False


def worker_env(url: str, queue: str, directory: Path, config: ChaosConfig) -> dict[str, str]:
    """Environment for :func:`worker_broker` (see :class:`WorkerPool`)."""
    return {
        ENV_PREFIX + "URL": url,
        ENV_PREFIX + "QUEUE": queue,
        ENV_PREFIX + "BROKER": config.broker,
        ENV_PREFIX + "DIR": str(directory),
        ENV_PREFIX + "SLEEP": str(config.task_sleep),
        ENV_PREFIX + "SLEEP_MAX": ""
        if config.task_sleep_max is None
        else str(config.task_sleep_max),
        ENV_PREFIX + "IDLE_TIMEOUT": str(config.idle_timeout),
        ENV_PREFIX + "XREAD_BLOCK": str(config.xread_block),
        ENV_PREFIX + "SHARDS": "" if config.shards is None else str(config.shards),
    }


def sleep_env(seconds: float) -> dict[str, str]:
    """Extra worker environment that overrides the task's sleep."""
    return {ENV_PREFIX + "SLEEP": str(seconds), ENV_PREFIX + "SLEEP_MAX": ""}


async def run_process(
    command: Sequence[str],
    timeout: float,
    log_path: Path,
    *,
    kill_after: float | None = None,
    kill_when: Callable[[], bool] | None = None,
) -> int | None:
    """Run ``command`` in its own process group; returns its exit code.

    The group is SIGKILLed after ``kill_after`` seconds, or as soon as
    ``kill_when()`` is true (polled every 50 ms), or at ``timeout``; the
    return value is then None. The process is always reaped.
    """
    proc = _spawn_group(command, log_path)
    try:
        limit = timeout if kill_after is None else min(timeout, kill_after)
        deadline = time.monotonic() + limit
        for _ in range(int(limit / 0.05) + 2):
            if proc.poll() is not None or time.monotonic() >= deadline:
                break
            if kill_when is not None and kill_when():
                break
            await asyncio.sleep(0.05)
        return proc.poll()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, 10)


def _spawn_group(command: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new process group, output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
