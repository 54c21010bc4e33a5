"""Fault-injection harness: real workers, a real cluster, real faults.

Shared by ``scripts/chaos.py`` and the fault tests; a dev tool run from a
checkout, not part of the installed package. One *scenario* runs like this:

1. the cluster is healed, a fresh queue name is chosen;
2. ``N`` ``taskiq worker`` processes start (``--workers 1`` each, own
   process group), their broker built by :func:`worker_broker` from
   ``TQRC_CHAOS_*`` environment variables;
3. a producer in this process kicks a fixed number of tasks at a fixed
   rate and records the outcome of each kick: *acked* (``kick`` returned),
   *failed* (:class:`KickFailedError`: certainly not enqueued) or *unknown*
   (any other exception, or no answer within ``kick_timeout``);
4. part-way through, the scenario injects its fault (kill or stop a
   worker, fail over, kill or stop a master, delete a stream, reshard, ...)
   and undoes it where that is part of the fault;
5. the harness waits (bounded) until every acked task has run, then
   compares the kicks with the execution ledger.

Each task writes ``"<task id> <unix time>\\n"`` with one ``O_APPEND`` write
to a file of its worker process (``exec-<pid>.log``): the ledger lives
outside the cluster under test, so a fault cannot corrupt it.

The report per scenario: lost = acked - executed, duplicates = executions
beyond the first, phantoms = executed but never kicked (an unknown-outcome
kick that ran is not a phantom), unknown outcomes, recovery times, and
worker deaths (a worker that exits without the scenario killing it, or a
worker child that taskiq's process manager had to restart).

Everything is bounded: task counts, rates, every wait, and each scenario as
a whole; every process started here is stopped in ``finally`` blocks
(whole process groups).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

from redis.asyncio import RedisCluster
from taskiq import AsyncBroker, TaskiqEvents, TaskiqMessage, TaskiqState

from taskiq_redis_cluster._errors import ConfigurationError, KickFailedError
from taskiq_redis_cluster._keys import ShardKeys, slot_of
from taskiq_redis_cluster._redis import connect
from taskiq_redis_cluster.testing import DevCluster, NodeStatus, throwaway_cluster

logger = logging.getLogger(__name__)

#: This package's import name and the directory it is imported from: the
#: ``taskiq worker`` processes import :func:`worker_broker` from the same
#: place (the harness is not installed, so they get it on PYTHONPATH).
_PACKAGE = __name__.rpartition(".")[0]
_IMPORT_ROOT = Path(__file__).resolve().parents[_PACKAGE.count(".") + 1]

#: Name under which the worker registers the ledger task.
TASK_NAME = "tqrc_chaos:record"
#: ``ours`` is ClusterStreamBroker, ``ours-list`` ClusterListQueueBroker and
#: ``taskiq-redis`` its RedisStreamClusterBroker (for comparison).
BROKERS = ("ours", "taskiq-redis", "ours-list")
#: Brokers that keep a task across a worker crash (the fault scenarios).
STREAM_BROKERS = ("ours", "taskiq-redis")
#: Bounds of ``taskiq worker`` shutdown the fault scenarios use, so that a
#: stuck worker cannot stretch a scenario; rolling-restart uses taskiq's own.
WORKER_ARGS = ("--shutdown-timeout", "3", "--wait-tasks-timeout", "2")
_ENV = "TQRC_CHAOS_"
_EVENTS_FILE = "workers.log"
_POLL = 0.25


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosConfig:
    """Bounds and knobs of one harness run (every scenario uses them).

    :param tasks: tasks kicked per scenario.
    :param rate: kicks per second.
    :param workers: worker processes (``taskiq worker --workers 1`` each).
    :param broker: ``"ours"`` (ClusterStreamBroker) or ``"taskiq-redis"``
        (its RedisStreamClusterBroker, for comparison).
    :param wait_replicas: ``wait_replicas`` of the producer (scenarios may
        override it, e.g. ``master-kill-wait1``).
    :param idle_timeout: ms before a worker reclaims another's pending task.
    :param xread_block: ms one XREADGROUP blocks.
    :param task_sleep: seconds each task sleeps before writing the ledger.
    :param task_sleep_max: if set, each task sleeps between ``task_sleep``
        and this, spread by a hash of its id (so a worker finishes its
        in-flight tasks at different times, as real ones do).
    :param fault_after: seconds after the first kick when the fault starts
        (``None``: a third of the kick window).
    :param kick_timeout: seconds after which a kick counts as unknown.
    :param drain_timeout: seconds to wait for every acked task after the
        kicks and the fault ended (``None``: derived from idle_timeout).
    :param settle: seconds to keep watching for duplicates once all is done.
    :param shards: shard count of each scenario's queue (``None``: default).
    :param drain_stall: end the drain early once no task ran for this many
        seconds (``None``: wait the whole ``drain_timeout``).
    :param worker_args: extra ``taskiq worker`` options.
    :param defaulted: fields the user left at their default, which a
        scenario may set to its own (see :meth:`given`).
    """

    tasks: int = 400
    rate: float = 50.0
    workers: int = 3
    broker: str = "ours"
    wait_replicas: int = 0
    idle_timeout: int = 2_000
    xread_block: int = 500
    task_sleep: float = 0.2
    fault_after: float | None = None
    kick_timeout: float = 20.0
    drain_timeout: float | None = None
    settle: float = 1.5
    shards: int | None = None
    task_sleep_max: float | None = None
    drain_stall: float | None = None
    worker_args: tuple[str, ...] = WORKER_ARGS
    defaulted: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.broker not in BROKERS:
            raise ConfigurationError(message=f"broker must be one of {', '.join(BROKERS)}")
        if self.tasks < 1 or self.rate <= 0 or self.workers < 1:
            raise ConfigurationError(message="tasks, rate and workers must be positive")
        if self.task_sleep_max is not None and self.task_sleep_max < self.task_sleep:
            raise ConfigurationError(message="task_sleep_max must not be below task_sleep")

    @classmethod
    def given(cls, **values: Any) -> ChaosConfig:
        """A config of ``values``; every other field may take a scenario's default.

        What the command line builds: ``--tasks 3000`` is kept, an option
        left out lets e.g. rolling-restart use its own size and task length.
        """
        names = {f.name for f in fields(cls)} - {"defaulted"}
        return cls(**values, defaulted=frozenset(names - values.keys()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the knobs."""
        out = asdict(self)
        out["defaulted"] = sorted(self.defaulted)
        return out

    @property
    def kick_window(self) -> float:
        """Seconds the producer needs for all kicks at ``rate``."""
        return self.tasks / self.rate

    @property
    def fault_at(self) -> float:
        """Seconds after the first kick when the fault is injected."""
        if self.fault_after is not None:
            return self.fault_after
        return max(1.0, self.kick_window / 3)

    @property
    def effective_drain_timeout(self) -> float:
        """Drain bound: several reclaim cycles, at least 30 s."""
        if self.drain_timeout is not None:
            return self.drain_timeout
        return max(30.0, 6 * self.idle_timeout / 1000 + 15.0)


# --------------------------------------------------------------------------
# Worker side: the broker factory ``taskiq worker`` imports
# --------------------------------------------------------------------------


def make_broker(
    kind: str,
    url: str,
    queue: str,
    *,
    idle_timeout: int,
    xread_block: int,
    wait_replicas: int = 0,
    shards: int | None = None,
) -> AsyncBroker:
    """The broker under test, configured the same in workers and producer."""
    if kind == "ours":
        from taskiq_redis_cluster._brokers import ClusterStreamBroker

        extra: dict[str, Any] = {}
        if shards is not None:
            extra["shards"] = shards
        return ClusterStreamBroker(
            url,
            queue_name=queue,
            idle_timeout=idle_timeout,
            xread_block=xread_block,
            wait_replicas=wait_replicas,
            plan_poll_interval=0.5,
            **extra,
        )
    if kind == "taskiq-redis":
        from taskiq_redis import RedisStreamClusterBroker

        # Its defaults, except the block time (the same as ours) and a sane
        # pool size; taskiq-redis has neither reclaiming nor WAIT.
        broker: AsyncBroker = RedisStreamClusterBroker(
            url, queue_name=queue, xread_block=xread_block, max_connection_pool_size=1000
        )
        return broker
    if kind == "ours-list":
        from taskiq_redis_cluster._brokers import ClusterListQueueBroker

        extra = {} if shards is None else {"shards": shards}
        return ClusterListQueueBroker(url, queue_name=queue, plan_poll_interval=0.5, **extra)
    raise ConfigurationError(message=f"unknown broker {kind!r}")


def task_sleep(task_id: str, base: float, spread: float) -> float:
    """Seconds the task ``task_id`` sleeps: ``base`` plus a share of ``spread``.

    The share comes from a hash of the id, so a rerun (or a redelivery)
    of the same task sleeps as long.
    """
    return base + spread * (zlib.crc32(task_id.encode()) % 1001) / 1000


def _append(path: Path, line: str) -> None:
    # One write() of a short line with O_APPEND: atomic between processes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def worker_broker() -> AsyncBroker:
    """Broker factory for ``taskiq worker chaos.harness:worker_broker``.

    Reads ``TQRC_CHAOS_URL``, ``_QUEUE``, ``_BROKER``, ``_DIR``, ``_SLEEP``,
    ``_SLEEP_MAX``, ``_IDLE_TIMEOUT``, ``_XREAD_BLOCK``, ``_SHARDS`` and
    ``_WORKER``; registers
    the ledger task and records the process start (and, once the broker
    started, readiness) in ``DIR/workers.log``.
    """
    env = os.environ
    directory = Path(env[_ENV + "DIR"])
    label = env.get(_ENV + "WORKER", "?")
    sleep = float(env.get(_ENV + "SLEEP", "0"))
    sleep_max_text = env.get(_ENV + "SLEEP_MAX", "")
    spread = max(0.0, float(sleep_max_text) - sleep) if sleep_max_text else 0.0
    shards_text = env.get(_ENV + "SHARDS", "")
    broker = make_broker(
        env.get(_ENV + "BROKER", "ours"),
        env[_ENV + "URL"],
        env[_ENV + "QUEUE"],
        idle_timeout=int(env.get(_ENV + "IDLE_TIMEOUT", "2000")),
        xread_block=int(env.get(_ENV + "XREAD_BLOCK", "500")),
        shards=int(shards_text) if shards_text else None,
    )
    pid = os.getpid()
    events = directory / _EVENTS_FILE
    _append(events, f"start {label} {pid} {time.time():.6f}\n")
    ledger = os.open(directory / f"exec-{pid}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def record(task_id: str) -> None:
        if sleep > 0 or spread > 0:
            await asyncio.sleep(task_sleep(task_id, sleep, spread))
        os.write(ledger, f"{task_id} {time.time():.6f}\n".encode())

    def ready(state: TaskiqState) -> None:
        _append(events, f"ready {label} {pid} {time.time():.6f}\n")

    broker.register_task(record, task_name=TASK_NAME)
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, ready)
    return broker


# --------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One run of the ledger task."""

    task_id: str
    at: float
    pid: int


def read_executions(directory: Path) -> list[Execution]:
    """Every execution recorded under ``directory``, oldest first."""
    found: list[Execution] = []
    for path in directory.glob("exec-*.log"):
        pid = int(path.stem.split("-", 1)[1])
        with contextlib.suppress(OSError):
            text = path.read_text()
            # A line still being written has no newline yet; skip it.
            for line in text.splitlines(keepends=True):
                if not line.endswith("\n"):
                    continue
                task_id, _, at = line.strip().partition(" ")
                if task_id:
                    found.append(Execution(task_id, float(at or 0), pid))
    found.sort(key=lambda e: e.at)
    return found


def read_worker_events(directory: Path) -> list[tuple[str, str, int, float]]:
    """``(kind, worker label, pid, time)`` lines of ``workers.log``."""
    rows: list[tuple[str, str, int, float]] = []
    with contextlib.suppress(OSError):
        for line in (directory / _EVENTS_FILE).read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                rows.append((parts[0], parts[1], int(parts[2]), float(parts[3])))
    return rows


# --------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------


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
        env = {**os.environ, **self._env, **(extra_env or {}), _ENV + "WORKER": label}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_IMPORT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        log = open(self.directory / f"worker-{label}.log", "w")  # noqa: SIM115 - closed in stop_all
        command = [
            sys.executable, "-m", "taskiq", "worker",
            f"{_PACKAGE}.harness:worker_broker",
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
        for _ in range(int(timeout / _POLL) + 2):
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
            await asyncio.sleep(_POLL)
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


# --------------------------------------------------------------------------
# Producer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Kick:
    """Outcome of one kick: ``acked``, ``failed`` or ``unknown``."""

    task_id: str
    started: float
    finished: float
    outcome: str
    error: str = ""


def _message(broker: AsyncBroker, task_id: str) -> Any:
    msg = TaskiqMessage(task_id=task_id, task_name=TASK_NAME, labels={}, args=[task_id], kwargs={})
    return broker.formatter.dumps(msg)


async def _kick(broker: AsyncBroker, task_id: str, timeout: float) -> Kick:
    started = time.time()
    outcome, error = "acked", ""
    try:
        await asyncio.wait_for(broker.kick(_message(broker, task_id)), timeout)
    except KickFailedError as exc:
        outcome, error = "failed", _short_error(exc)
    except asyncio.TimeoutError:
        outcome, error = "unknown", f"no answer within {timeout:.0f}s"
    except Exception as exc:  # every other error: the XADD may have happened
        outcome, error = "unknown", _short_error(exc)
    return Kick(task_id, started, time.time(), outcome, error)


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"


async def produce(
    broker: AsyncBroker,
    ids: Sequence[str],
    rate: float,
    kick_timeout: float,
    *,
    record: list[Kick] | None = None,
    stop_after: int | None = None,
    stop: asyncio.Event | None = None,
) -> list[Kick]:
    """Kick ``ids`` at a fixed ``rate``; each kick runs concurrently and is bounded.

    ``record``, if given, receives each kick as it finishes (progress for
    a scenario that looks at the backlog while the producer runs). With
    ``stop_after``, kicking ends after that many ids once ``stop`` is set
    (at once without ``stop``); the rest of ``ids`` is an upper bound.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []

    def done(task: asyncio.Future[Kick]) -> None:
        if record is not None and not task.cancelled():
            record.append(task.result())

    for i, task_id in enumerate(ids):
        if stop_after is not None and i >= stop_after and (stop is None or stop.is_set()):
            break
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(_kick(broker, task_id, kick_timeout))
        task.add_done_callback(done)
        tasks.append(task)
    return list(await asyncio.gather(*tasks))


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """What one scenario measured, and which acceptance checks failed."""

    name: str
    broker: str
    wait_replicas: int
    rate: float = 0.0  #: kicks per second actually used
    status: str = "ok"  #: ok, fail, skipped, error
    reason: str = ""
    kicked: int = 0
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    executed: int = 0  #: distinct task ids that ran
    executions: int = 0  #: runs in total
    lost: int = 0
    destroyed: int = 0  #: acked before the fault deleted them (stream DEL)
    dead_lettered: int | None = None  #: entries in the dead-letter streams (ours only)
    queued_end: int | None = None  #: still queued in Redis at the end (never delivered)
    pending_end: int | None = None  #: delivered, never acked, at the end (streams)
    duplicates: int = 0
    phantoms: int = 0
    unknown_executed: int = 0
    resume_s: float | None = None
    stall_s: float | None = None
    done_s: float | None = None
    worker_exits: list[str] = field(default_factory=list)
    child_restarts: int = 0
    duration_s: float = 0.0
    bound_s: float = 0.0
    lost_sample: list[str] = field(default_factory=list)
    kick_errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    #: The knobs this scenario ran with (after its own defaults).
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Counts:
    """Set arithmetic over kicks and executions (see :func:`analyse`)."""

    acked: int
    failed: int
    unknown: int
    executed: int
    executions: int
    lost: frozenset[str]
    destroyed: frozenset[str]
    duplicates: int
    phantoms: frozenset[str]
    unknown_executed: int
    resume_s: float | None
    stall_s: float | None
    done_s: float | None


def analyse(
    kicks: Sequence[Kick],
    executions: Sequence[Execution],
    *,
    fault_start: float | None = None,
    fault_end: float | None = None,
    destroyed_before: float | None = None,
) -> Counts:
    """Compare kicks with executions.

    * lost: acked but never executed;
    * destroyed: lost ids whose kick started before ``destroyed_before``
      (the fault deleted them, e.g. a DEL of the stream): not counted as lost;
    * duplicates: executions beyond the first per id;
    * phantoms: executed ids that were neither acked nor unknown;
    * resume_s: from ``fault_end`` to the first execution after it;
    * stall_s: the longest gap without executions from ``fault_start`` to
      the last execution;
    * done_s: from ``fault_start`` until every acked task had run once.
    """
    acked = {k.task_id for k in kicks if k.outcome == "acked"}
    unknown = {k.task_id for k in kicks if k.outcome == "unknown"}
    failed = {k.task_id for k in kicks if k.outcome == "failed"}
    started = {k.task_id: k.started for k in kicks}
    runs = Counter(e.task_id for e in executions)
    first: dict[str, float] = {}
    for e in executions:
        first[e.task_id] = min(e.at, first.get(e.task_id, e.at))
    missing = acked - runs.keys()
    destroyed = frozenset(
        t
        for t in missing
        if destroyed_before is not None and started.get(t, 0.0) < destroyed_before
    )
    times = sorted(e.at for e in executions)
    resume = stall = done = None
    if fault_end is not None:
        after = [t for t in times if t >= fault_end]
        resume = after[0] - fault_end if after else None
    if fault_start is not None and times:
        points = [fault_start] + [t for t in times if t >= fault_start]
        stall = max((b - a for a, b in itertools.pairwise(points)), default=0.0)
        if not missing - destroyed:
            last = max((first[t] for t in acked if t in first), default=fault_start)
            done = max(0.0, last - fault_start)
    return Counts(
        acked=len(acked),
        failed=len(failed),
        unknown=len(unknown),
        executed=len(runs),
        executions=sum(runs.values()),
        lost=frozenset(missing - destroyed),
        destroyed=destroyed,
        duplicates=sum(n - 1 for n in runs.values()),
        phantoms=frozenset(runs.keys() - acked - unknown),
        unknown_executed=len(unknown & runs.keys()),
        resume_s=resume,
        stall_s=stall,
        done_s=done,
    )


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


@dataclass
class ScenarioContext:
    """What a scenario's ``inject`` function works with."""

    cluster: DevCluster
    pool: WorkerPool
    admin: RedisCluster
    config: ChaosConfig
    queue: str
    url: str
    #: Stream keys of the queue (one per shard; one for taskiq-redis).
    stream_keys: list[str]
    #: The stream the fault is aimed at (its master, its slot, ...).
    target_key: str
    workdir: Path
    fault_start: float | None = None
    fault_end: float | None = None
    destroyed_before: float | None = None
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    #: Kicks that finished so far (the producer appends as it goes).
    kicks: list[Kick] = field(default_factory=list)

    def fault(self, what: str) -> None:
        """Mark the start of the fault."""
        self.fault_start = time.time()
        logger.info("Fault: %s", what)
        self.notes.append(what)

    def recovered(self, what: str = "") -> None:
        """Mark the end of the fault (it is lifted, or the cluster recovered)."""
        self.fault_end = time.time()
        if what:
            logger.info("Recovered: %s", what)
            self.notes.append(what)

    @property
    def node_timeout(self) -> float:
        """The cluster's node timeout in seconds."""
        return self.cluster.node_timeout_ms / 1000


Inject = Callable[[ScenarioContext], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """One fault.

    :param loss_allowed: lost acked kicks are reported, not a failure
        (``"no-wait"``: only when the run has ``wait_replicas == 0``).
    :param wait_replicas: overrides the run's ``wait_replicas``.
    :param needs_rebalancer: ``ours`` needs the ``rebalance`` command.
    :param ours_only: skipped for taskiq-redis (needs WAIT or the rebalancer).
    :param resume_bound: executions must resume within this many seconds
        after the fault is lifted.
    :param brokers: the brokers the scenario applies to; the list broker
        delivers at most once, so a crash loses its tasks by design and only
        graceful scenarios run on it.
    :param defaults: values for the :class:`ChaosConfig` fields the user
        left at their default (``ChaosConfig.defaulted``).
    :param no_dead_letters: a dead-lettered entry is a failure.
    :param kick_through_fault: the producer does not stop after ``tasks``
        kicks while the fault lasts (up to ``_KICK_CAP`` times as many), so
        a slow fault still meets a backlog.
    """

    name: str
    summary: str
    inject: Inject
    wait_replicas: int | None = None
    loss_allowed: str = ""
    needs_rebalancer: bool = False
    ours_only: bool = False
    resume_bound: float | None = None
    #: Kicks are spread over at least this many seconds (the rate is lowered
    #: if needed), so that load continues through and after the fault.
    min_kick_window: float = 8.0
    brokers: tuple[str, ...] = STREAM_BROKERS
    defaults: Mapping[str, Any] = field(default_factory=dict)
    no_dead_letters: bool = False
    kick_through_fault: bool = False

    def configure(self, config: ChaosConfig) -> ChaosConfig:
        """``config`` with this scenario's defaults and overrides applied."""
        own = {k: v for k, v in self.defaults.items() if k in config.defaulted}
        if own:
            config = replace(config, **own)
        if self.wait_replicas is not None:
            config = replace(config, wait_replicas=self.wait_replicas)
        if config.kick_window < self.min_kick_window:
            config = replace(config, rate=config.tasks / self.min_kick_window)
        return config


async def pending_entries(
    admin: RedisCluster, stream_keys: Iterable[str], group: str = "taskiq"
) -> int:
    """Entries delivered but not yet acknowledged, over ``stream_keys``.

    ``taskiq`` is the default consumer group of both brokers. Streams that
    cannot be read (missing, node down) count as 0.
    """
    total = 0
    for key in stream_keys:
        with contextlib.suppress(Exception):
            total += int((await admin.xpending(key, group))["pending"])
    return total


async def _worker_kill(ctx: ScenarioContext) -> None:
    in_flight = await pending_entries(ctx.admin, ctx.stream_keys)
    ctx.fault(f"SIGKILL worker w0 ({in_flight} entries pending over all workers)")
    ctx.pool.kill(0)
    await asyncio.sleep(0.5)
    index = ctx.pool.start()
    ctx.recovered(f"replacement worker w{index} started")
    await ctx.pool.wait_ready([index], 60)


async def _worker_stop(ctx: ScenarioContext) -> None:
    pause = ctx.config.idle_timeout / 1000 + 2.0
    ctx.fault(f"SIGSTOP worker w0 for {pause:.1f}s (> idle_timeout)")
    ctx.pool.pause(0)
    try:
        await asyncio.sleep(pause)
    finally:
        ctx.pool.resume(0)
    ctx.recovered("SIGCONT worker w0")


async def _failover(ctx: ScenarioContext) -> None:
    master = await ctx.cluster.master_of_key(ctx.target_key)
    replica = await ctx.cluster.replica_of(master)
    ctx.fault(f"CLUSTER FAILOVER: {replica.port} takes over from {master.port}")
    await ctx.cluster.failover(replica)
    ctx.recovered(f"{replica.port} is master")


async def _wait_new_master(ctx: ScenarioContext, old_port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _POLL) + 2):
        with contextlib.suppress(Exception):
            node = await ctx.cluster.master_of_key(ctx.target_key)
            if node.port != old_port:
                return node.port
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL)
    raise TimeoutError(f"no replica took over from {old_port} within {timeout:.0f}s")


async def _master_kill(ctx: ScenarioContext) -> None:
    master = await ctx.cluster.master_of_key(ctx.target_key)
    ctx.fault(f"SIGKILL master {master.port}")
    await ctx.cluster.kill_node(master)
    new = await _wait_new_master(ctx, master.port, 20 * ctx.node_timeout + 20)
    ctx.recovered(f"replica {new} promoted")
    await ctx.cluster.restart_node(master.port)
    ctx.notes.append(f"{master.port} restarted (now a replica)")


async def _master_stop(ctx: ScenarioContext) -> None:
    master = await ctx.cluster.master_of_key(ctx.target_key)
    ctx.fault(f"SIGSTOP master {master.port} (> node timeout)")
    await ctx.cluster.pause_node(master)
    try:
        new = await _wait_new_master(ctx, master.port, 20 * ctx.node_timeout + 20)
        ctx.notes.append(f"replica {new} promoted")
        await asyncio.sleep(1.0)
    finally:
        await ctx.cluster.resume_node(master)
    ctx.recovered(f"SIGCONT {master.port}")


async def _stream_del(ctx: ScenarioContext) -> None:
    ctx.fault(f"DEL {ctx.target_key}")
    await ctx.admin.delete(ctx.target_key)
    # Kicks that started before this moment may have been deleted with the
    # stream: they are "destroyed", not lost.
    ctx.destroyed_before = time.time()
    ctx.recovered()


async def _slot_migrate(ctx: ScenarioContext) -> None:
    slot = slot_of(ctx.target_key)
    master = await ctx.cluster.master_of_key(ctx.target_key)
    other = next(m for m in await ctx.cluster.masters() if m.port != master.port)
    ctx.fault(f"MIGRATE slot {slot} from {master.port} to {other.port}")
    await ctx.cluster.migrate_slot(slot, other)
    ctx.recovered(f"slot {slot} owned by {other.port}")


async def _majority_down(ctx: ScenarioContext) -> None:
    masters = await ctx.cluster.masters()
    first = await ctx.cluster.master_of_key(ctx.target_key)
    victims = [first] + [m for m in masters if m.port != first.port]
    victims = victims[: len(masters) // 2 + 1]
    pause = 3 * ctx.node_timeout + 2.0
    ports = [v.port for v in victims]
    ctx.fault(f"SIGSTOP masters {ports} for {pause:.1f}s (majority down)")
    try:
        for v in victims:
            await ctx.cluster.pause_node(v)
        await asyncio.sleep(pause)
    finally:
        for v in victims:
            await ctx.cluster.resume_node(v)
    ctx.recovered(f"SIGCONT {ports}")


#: A scenario that kicks through its fault kicks at most this many times
#: ``tasks``.
_KICK_CAP = 6

#: Seconds a SIGTERMed worker may take to stop: taskiq waits for its
#: in-flight tasks (no limit by default; ours last at most a few seconds),
#: then gives the broker's shutdown 5 s.
_STOP_BOUND = 45.0


async def _backlog(ctx: ScenarioContext) -> tuple[int, int, int]:
    """``(not run, queued, pending)``: acked kicks so far that have not run
    yet, and the queue's state in Redis."""
    acked = {k.task_id for k in list(ctx.kicks) if k.outcome == "acked"}
    ran = {e.task_id for e in read_executions(ctx.workdir)}
    queued, pending = await queue_depth(ctx.admin, ctx.config.broker, ctx.stream_keys)
    return len(acked - ran), queued, pending


def _tracebacks(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").count("Traceback")
    return 0


async def _rolling_restart(ctx: ScenarioContext) -> None:
    """SIGTERM each worker in turn, start its replacement, wait until it is up."""
    pool = ctx.pool
    originals = list(range(len(pool.labels)))
    ctx.fault(f"rolling restart of {len(originals)} workers under a backlog")
    for index in originals:
        label = pool.labels[index]
        backlog, queued, pending = await _backlog(ctx)
        if backlog == 0:
            # Nothing to hand back: the restart would prove nothing.
            ctx.violations.append(
                f"no backlog when {label} got SIGTERM (raise the task count or the rate)"
            )
        child = pool.child_pid(index)
        began = time.time()
        code = await pool.terminate(index, _STOP_BOUND)
        stopped = time.time() - began
        finished = sum(1 for e in read_executions(ctx.workdir) if e.pid == child and e.at >= began)
        if code is None:
            ctx.violations.append(f"{label} did not stop within {_STOP_BOUND:.0f}s of SIGTERM")
        elif code != 0:
            ctx.violations.append(f"{label} exited with code {code} after SIGTERM")
        errors = _tracebacks(pool.directory / f"worker-{label}.log")
        replacement = pool.start()
        await pool.wait_ready([replacement], 90)
        ctx.notes.append(
            f"{label}: SIGTERM with {backlog} acked tasks not run yet ({queued} queued, "
            f"{pending} pending in Redis); {finished} finished after it; exit {code} after "
            f"{stopped:.1f}s{f'; {errors} tracebacks in its log' if errors else ''}; "
            f"{pool.labels[replacement]} up after {time.time() - began:.1f}s"
        )
    ctx.recovered(f"all {len(originals)} workers restarted")


def rebalancer_available() -> bool:
    """True when the ``rebalance`` command is installed."""
    import importlib.util

    return importlib.util.find_spec("taskiq_redis_cluster._cli._cmd_rebalance") is not None


async def _run_process(
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


def _owner(statuses: Sequence[NodeStatus], slot: int) -> NodeStatus | None:
    for s in statuses:
        if s.role == "master" and s.up and any(lo <= slot <= hi for lo, hi in s.slots):
            return s
    return None


async def _reshard_under_load(ctx: ScenarioContext) -> None:
    """``redis-cli --cluster reshard`` of the fewest slots that move a shard."""
    statuses = await ctx.cluster.status()
    best: tuple[int, NodeStatus, int] | None = None
    for key in ctx.stream_keys:
        slot = slot_of(key)
        owner = _owner(statuses, slot)
        if owner is None:
            continue
        # redis-cli takes the source's lowest slots first.
        offset = sum(min(hi, slot) - lo + 1 for lo, hi in owner.slots if lo <= slot)
        if best is None or offset < best[0]:
            best = (offset, owner, slot)
    if best is None:
        raise RuntimeError("no master owns the queue's streams")
    count, source, slot = best
    target = next(
        s for s in statuses if s.role == "master" and s.up and s.slots and s.port != source.port
    )
    ctx.fault(
        f"redis-cli --cluster reshard: {count} slots (up to {slot}) {source.port} -> {target.port}"
    )
    rc = await _run_process(
        [
            "redis-cli",
            "--cluster",
            "reshard",
            f"{ctx.cluster.host}:{source.port}",
            "--cluster-from",
            str(source.node_id),
            "--cluster-to",
            str(target.node_id),
            "--cluster-slots",
            str(count),
            "--cluster-yes",
        ],
        timeout=240,
        log_path=ctx.workdir / "reshard.log",
    )
    if rc != 0:
        ctx.violations.append(f"redis-cli reshard exited with {rc} (see reshard.log)")


def _rebalance_command(ctx: ScenarioContext, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "taskiq_redis_cluster._cli._main", "rebalance", "apply",
        "--url", ctx.url, "--queue", ctx.queue, *extra,
    ]  # fmt: skip


async def _rebalance(ctx: ScenarioContext, timeout: float = 120.0) -> None:
    # A killed rebalancer may leave a lease behind; retry until it expires.
    deadline = time.monotonic() + timeout
    rc: int | None = None
    for attempt in range(1, 31):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        rc = await _run_process(
            _rebalance_command(ctx), timeout=left, log_path=ctx.workdir / "rebalance.log"
        )
        if rc == 0:
            ctx.notes.append(f"rebalance apply ok (attempt {attempt})")
            return
        await asyncio.sleep(2.0)
    ctx.violations.append(f"rebalance apply did not succeed (last exit {rc}; see rebalance.log)")


async def _reshard(ctx: ScenarioContext) -> None:
    await _reshard_under_load(ctx)
    if ctx.config.broker == "ours":
        await _rebalance(ctx)
    ctx.recovered("reshard (and rebalance) done")


async def _rebalancer_kill(ctx: ScenarioContext) -> None:
    await _reshard_under_load(ctx)
    log_path = ctx.workdir / "rebalance.log"
    log_path.write_bytes(b"")

    def mid_move() -> bool:
        # The rebalancer logs "switched to <new tag>" once producers write to
        # the new shard while the old one still drains: the middle of a move.
        with contextlib.suppress(OSError):
            return b"switched to" in log_path.read_bytes()
        return False

    began = time.monotonic()
    rc = await _run_process(
        # A short lease, so the rerun does not wait 30 s for the dead one's.
        _rebalance_command(ctx, "--lease-ttl", "10"),
        timeout=60,
        kill_after=10.0,
        kill_when=mid_move,
        log_path=log_path,
    )
    waited = time.monotonic() - began
    if rc is not None:
        ctx.notes.append(f"rebalancer finished before the kill (exit {rc})")
    else:
        where = "mid-move (after a switch)" if mid_move() else "before any switch"
        ctx.notes.append(f"rebalancer SIGKILLed {where}, {waited:.1f}s after its start")
    await _rebalance(ctx)
    ctx.recovered("rebalance completed after the kill")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "worker-kill",
            "SIGKILL a worker with tasks in flight, start a replacement",
            _worker_kill,
        ),
        Scenario(
            "worker-stop",
            "SIGSTOP a worker longer than idle_timeout, then SIGCONT",
            _worker_stop,
            min_kick_window=12.0,
        ),
        Scenario("failover", "CLUSTER FAILOVER of a shard's master", _failover),
        Scenario(
            "rolling-restart",
            "SIGTERM each worker in turn and restart it, under a backlog",
            _rolling_restart,
            brokers=BROKERS,
            no_dead_letters=True,
            kick_through_fault=True,
            min_kick_window=0.0,
            # A deployment's settings, not the fault scenarios' short ones:
            # taskiq's default worker options (100 concurrent tasks, no limit
            # on the wait for them), the broker's own idle_timeout and block
            # time, so that a task a stopping worker failed to hand back
            # stays pending past the end and counts as lost instead of being
            # reclaimed a few seconds later. The producer outruns the
            # workers (3 x 100 slots / 0.35 s mean = at most ~860 tasks/s)
            # and kicks until the last replacement is up, so a backlog
            # remains through all three restarts however long they take.
            defaults={
                "tasks": 15_000,
                "rate": 1_000.0,
                "workers": 3,
                "task_sleep": 0.2,
                "task_sleep_max": 0.5,
                "idle_timeout": 600_000,
                "xread_block": 2_000,
                "worker_args": (),
                "fault_after": 2.0,
                "drain_timeout": 90.0,
                "drain_stall": 15.0,
            },
        ),
        Scenario(
            "master-kill",
            "SIGKILL a shard's master; its replica takes over",
            _master_kill,
            loss_allowed="no-wait",
            min_kick_window=12.0,
        ),
        Scenario(
            "master-kill-wait1",
            "master-kill with wait_replicas=1",
            _master_kill,
            wait_replicas=1,
            ours_only=True,
            min_kick_window=12.0,
        ),
        Scenario(
            "master-stop",
            "SIGSTOP a shard's master longer than the node timeout",
            _master_stop,
            min_kick_window=12.0,
        ),
        Scenario("stream-del", "DEL a shard's stream under load", _stream_del),
        Scenario("slot-migrate", "MIGRATE a shard's slot to another master", _slot_migrate),
        Scenario(
            "reshard",
            "redis-cli --cluster reshard, then our rebalancer",
            _reshard,
            needs_rebalancer=True,
            min_kick_window=30.0,
        ),
        Scenario(
            "rebalancer-kill",
            "reshard, SIGKILL the rebalancer mid-move, rerun it",
            _rebalancer_kill,
            needs_rebalancer=True,
            ours_only=True,
            min_kick_window=45.0,
        ),
        Scenario(
            "majority-down",
            "SIGSTOP a majority of masters past the node timeout",
            _majority_down,
            resume_bound=60.0,
            min_kick_window=16.0,
        ),
    )
}

#: The bounded subset CI runs on every change.
CI_SCENARIOS = ("worker-kill", "failover", "stream-del", "master-kill", "master-kill-wait1")


def skip_reason(scenario: Scenario, config: ChaosConfig) -> str | None:
    """Why ``scenario`` cannot run with ``config`` (None: it can)."""
    if config.broker not in scenario.brokers:
        return (
            f"{scenario.name} runs on {', '.join(scenario.brokers)} only "
            "(the list broker loses a crashed worker's tasks by design)"
        )
    if scenario.ours_only and config.broker != "ours":
        return f"{scenario.name} needs features taskiq-redis lacks (WAIT / rebalancer)"
    if scenario.needs_rebalancer and config.broker == "ours" and not rebalancer_available():
        return (
            "the `taskiq-redis-cluster rebalance` command does not exist yet "
            "(taskiq_redis_cluster/_rebalance.py)"
        )
    return None


def scenario_bound(config: ChaosConfig, scenario: Scenario | None = None) -> float:
    """Upper bound in seconds of one scenario, setup and teardown included."""
    kicking = config.kick_window * (_KICK_CAP if scenario and scenario.kick_through_fault else 1)
    return 120.0 + kicking + config.kick_timeout + config.effective_drain_timeout + 300.0


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


async def run_scenario(
    cluster: DevCluster, scenario: Scenario, config: ChaosConfig, workdir: Path
) -> ScenarioResult:
    """Run one scenario against ``cluster``; never raises for a failed check."""
    config = scenario.configure(config)
    result = ScenarioResult(
        scenario.name,
        config.broker,
        config.wait_replicas,
        rate=round(config.rate, 1),
        bound_s=scenario_bound(config, scenario),
        settings=_settings(config),
    )
    reason = skip_reason(scenario, config)
    if reason is not None:
        result.status, result.reason = "skipped", reason
        logger.info("Skipping %s: %s", scenario.name, reason)
        return result
    began = time.monotonic()
    directory = workdir / f"{scenario.name}-{config.broker}-{uuid.uuid4().hex[:6]}"
    directory.mkdir(parents=True)
    logger.info(
        "Scenario %s (%s, wait_replicas=%d) in %s",
        scenario.name,
        config.broker,
        config.wait_replicas,
        directory,
    )
    try:
        await asyncio.wait_for(
            _run_body(cluster, scenario, config, directory, result), result.bound_s
        )
    except asyncio.TimeoutError:
        result.status, result.reason = "error", f"scenario exceeded its {result.bound_s:.0f}s bound"
    except Exception as exc:
        logger.exception("Scenario %s failed to run", scenario.name)
        result.status, result.reason = "error", _short_error(exc)
    result.duration_s = round(time.monotonic() - began, 1)
    if result.status == "ok" and result.violations:
        result.status = "fail"
    logger.info("Scenario %s: %s %s", scenario.name, result.status, result.violations)
    return result


async def _run_body(
    cluster: DevCluster,
    scenario: Scenario,
    config: ChaosConfig,
    directory: Path,
    result: ScenarioResult,
) -> None:
    await cluster.heal()
    queue = f"chaos-{scenario.name}-{uuid.uuid4().hex[:6]}"
    env = worker_env(cluster.url, queue, directory, config)
    pool = WorkerPool(directory, env, config.worker_args)
    producer = producer_broker(cluster.url, queue, config)
    admin = await connect(cluster.url)
    monitor: asyncio.Task[None] | None = None
    try:
        await producer.startup()
        keys = await stream_keys(producer, queue)
        # Dead-letter streams of the shards at the start (a reshard may
        # retire some before the end).
        dead_keys_at_start = await dead_letter_keys(producer)
        ctx = ScenarioContext(
            cluster=cluster,
            pool=pool,
            admin=admin,
            config=config,
            queue=queue,
            url=cluster.url,
            stream_keys=keys,
            target_key=keys[0],
            workdir=directory,
            worker_env=env,
        )
        indexes = [pool.start() for _ in range(config.workers)]
        await pool.wait_ready(indexes, 90)
        monitor = asyncio.ensure_future(_monitor(pool))
        fault_over = asyncio.Event()
        count = config.tasks * (_KICK_CAP if scenario.kick_through_fault else 1)
        ids = [f"{scenario.name}-{i:06d}" for i in range(count)]
        kicking = produce(
            producer, ids, config.rate, config.kick_timeout,
            record=ctx.kicks, stop_after=config.tasks, stop=fault_over,
        )  # fmt: skip
        kicks_task = asyncio.ensure_future(kicking)
        try:
            await asyncio.sleep(config.fault_at)
            try:
                await scenario.inject(ctx)
            except Exception as exc:
                logger.exception("Fault injection of %s failed", scenario.name)
                ctx.violations.append(f"fault injection failed: {_short_error(exc)}")
            finally:
                fault_over.set()
            kicks = await kicks_task
        finally:
            if not kicks_task.done():
                kicks_task.cancel()
                await asyncio.gather(kicks_task, return_exceptions=True)
        acked = {k.task_id for k in kicks if k.outcome == "acked"}
        await _drain(directory, acked, config.effective_drain_timeout, config.drain_stall)
        await asyncio.sleep(config.settle)
        result.queued_end, result.pending_end = await queue_depth(
            admin, config.broker, await stream_keys(producer, queue)
        )
        if config.broker == "ours":
            try:
                dead = set(await dead_letter_keys(producer)) | set(dead_keys_at_start)
                result.dead_lettered = await dead_letter_count(admin, dead)
            except Exception as exc:
                ctx.notes.append(f"dead letters not counted: {_short_error(exc)}")
        _fill(result, ctx, kicks, read_executions(directory), pool, scenario)
    finally:
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        await pool.stop_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.shutdown(), 20)
        with contextlib.suppress(Exception):
            await admin.aclose()


def worker_env(url: str, queue: str, directory: Path, config: ChaosConfig) -> dict[str, str]:
    """Environment for :func:`worker_broker` (see :class:`WorkerPool`)."""
    return {
        _ENV + "URL": url,
        _ENV + "QUEUE": queue,
        _ENV + "BROKER": config.broker,
        _ENV + "DIR": str(directory),
        _ENV + "SLEEP": str(config.task_sleep),
        _ENV + "SLEEP_MAX": "" if config.task_sleep_max is None else str(config.task_sleep_max),
        _ENV + "IDLE_TIMEOUT": str(config.idle_timeout),
        _ENV + "XREAD_BLOCK": str(config.xread_block),
        _ENV + "SHARDS": "" if config.shards is None else str(config.shards),
    }


def sleep_env(seconds: float) -> dict[str, str]:
    """Extra worker environment that overrides the task's sleep."""
    return {_ENV + "SLEEP": str(seconds), _ENV + "SLEEP_MAX": ""}


def producer_broker(url: str, queue: str, config: ChaosConfig) -> AsyncBroker:
    """The producer's broker for ``config`` (not started)."""
    return make_broker(
        config.broker,
        url,
        queue,
        idle_timeout=config.idle_timeout,
        xread_block=config.xread_block,
        wait_replicas=config.wait_replicas,
        shards=config.shards,
    )


async def stream_keys(producer: AsyncBroker, queue: str) -> list[str]:
    """The keys holding ``queue``'s tasks: one stream (or list) per shard, or
    taskiq-redis's one stream."""
    from taskiq_redis_cluster._brokers import ClusterListQueueBroker, ClusterStreamBroker

    if isinstance(producer, ClusterStreamBroker):
        plan = await producer.current_plan()
        return [ShardKeys(producer.options.prefix, s.tag).stream for s in plan.shards]
    if isinstance(producer, ClusterListQueueBroker):
        plan = await producer.current_plan()
        return [ShardKeys(producer.options.prefix, s.tag).list for s in plan.shards]
    return [queue]


async def dead_letter_keys(producer: AsyncBroker) -> list[str]:
    """The dead-letter streams of the producer's queue (ClusterStreamBroker only)."""
    from taskiq_redis_cluster._brokers import ClusterStreamBroker

    if not isinstance(producer, ClusterStreamBroker):
        return []
    plan = await producer.current_plan()
    prefix = producer.options.prefix
    return [ShardKeys(prefix, s.tag).dead for s in (*plan.shards, *plan.draining)]


async def dead_letter_count(admin: RedisCluster, keys: Iterable[str]) -> int:
    """Entries in the dead-letter streams ``keys`` (a missing one counts 0)."""
    total = 0
    for key in keys:
        total += int(await admin.xlen(key))
    return total


async def queue_depth(
    admin: RedisCluster, broker: str, keys: Iterable[str], group: str = "taskiq"
) -> tuple[int, int]:
    """``(queued, pending)`` over the queue's ``keys``.

    Queued: in Redis and never delivered (a list's length; a stream
    group's lag). Pending: delivered to a consumer and not acknowledged
    (streams only; lists have no such state). A key that cannot be read
    counts 0, and so does a lag Redis cannot tell (null after XDEL).
    """
    queued = pending = 0
    for key in keys:
        with contextlib.suppress(Exception):
            if broker == "ours-list":
                queued += int(await admin.llen(key))
                continue
            for info in await admin.xinfo_groups(key):
                name = info.get("name")
                if (name.decode() if isinstance(name, bytes) else name) != group:
                    continue
                pending += int(info.get("pending") or 0)
                queued += int(info.get("lag") or 0)
    return queued, pending


async def _monitor(pool: WorkerPool) -> None:
    # Notices (and logs) unexpected worker exits while the scenario runs.
    while True:
        pool.unexpected_exits()
        await asyncio.sleep(0.5)


async def _drain(
    directory: Path, acked: set[str], timeout: float, stall: float | None = None
) -> None:
    """Wait until every acked task ran, at most ``timeout`` seconds, and at
    most ``stall`` seconds without any new execution (if set)."""
    now = time.monotonic()
    deadline = now + timeout
    runs, last_progress = -1, now
    for _ in range(int(timeout / _POLL) + 2):
        executions = read_executions(directory)
        if acked <= {e.task_id for e in executions}:
            return
        now = time.monotonic()
        if len(executions) != runs:
            runs, last_progress = len(executions), now
        if now >= deadline or (stall is not None and now - last_progress >= stall):
            return
        await asyncio.sleep(_POLL)


def _fill(
    result: ScenarioResult,
    ctx: ScenarioContext,
    kicks: Sequence[Kick],
    executions: Sequence[Execution],
    pool: WorkerPool,
    scenario: Scenario,
) -> None:
    counts = analyse(
        kicks,
        executions,
        fault_start=ctx.fault_start,
        fault_end=ctx.fault_end,
        destroyed_before=ctx.destroyed_before,
    )
    result.kicked = len(kicks)
    result.acked, result.failed, result.unknown = counts.acked, counts.failed, counts.unknown
    result.executed, result.executions = counts.executed, counts.executions
    result.lost, result.destroyed = len(counts.lost), len(counts.destroyed)
    result.duplicates, result.phantoms = counts.duplicates, len(counts.phantoms)
    result.unknown_executed = counts.unknown_executed
    result.resume_s = _round(counts.resume_s)
    result.stall_s = _round(counts.stall_s)
    result.done_s = _round(counts.done_s)
    result.lost_sample = sorted(counts.lost)[:10]
    result.kick_errors = dict(Counter(k.error.split(":")[0] for k in kicks if k.error))
    result.worker_exits = pool.unexpected_exits()
    result.child_restarts = pool.child_restarts()
    result.notes = list(ctx.notes)
    v = list(ctx.violations)
    if result.phantoms:
        v.append(f"{result.phantoms} phantom executions")
    if result.worker_exits:
        v.append(f"worker exited: {', '.join(result.worker_exits)}")
    if result.child_restarts:
        v.append(f"{result.child_restarts} worker child restarts (crashes)")
    loss_ok = scenario.loss_allowed == "no-wait" and ctx.config.wait_replicas == 0
    if result.lost and not loss_ok:
        v.append(f"{result.lost} acknowledged kicks lost")
    if result.acked == 0:
        v.append("no kick was acknowledged")
    if scenario.no_dead_letters and result.dead_lettered:
        v.append(f"{result.dead_lettered} entries dead-lettered")
    if scenario.resume_bound is not None and (
        result.resume_s is None or result.resume_s > scenario.resume_bound
    ):
        v.append(f"executions did not resume within {scenario.resume_bound:.0f}s")
    result.violations = v


def _settings(config: ChaosConfig) -> dict[str, Any]:
    keys = ("tasks", "rate", "workers", "task_sleep", "task_sleep_max", "idle_timeout",
            "xread_block", "wait_replicas", "worker_args")  # fmt: skip
    return {k: v for k, v in config.to_dict().items() if k in keys}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def chaos_cluster(directory: Path) -> contextlib.AbstractAsyncContextManager[DevCluster]:
    """A fresh 3-master, 3-replica DevCluster on free ports, always stopped."""
    return throwaway_cluster(directory, masters=3, replicas=1, node_timeout_ms=1500)


async def run_suite(
    names: Sequence[str],
    config: ChaosConfig,
    workdir: Path,
    *,
    cluster: DevCluster | None = None,
    on_result: Callable[[ScenarioResult], None] | None = None,
) -> list[ScenarioResult]:
    """Run scenarios in order, on ``cluster`` or on a cluster of their own.

    The cluster is healed before each scenario and after the last.
    """
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ConfigurationError(
            message=f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}"
        )
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    if cluster is None:
        async with chaos_cluster(workdir / "cluster") as own:
            return await run_suite(names, config, workdir, cluster=own, on_result=on_result)
    results = []
    try:
        for name in names:
            result = await run_scenario(cluster, SCENARIOS[name], config, workdir)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        with contextlib.suppress(Exception):
            await cluster.heal()
    return results


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

_COLUMNS = (
    ("scenario", "name"),
    ("broker", "broker"),
    ("wait", "wait_replicas"),
    ("status", "status"),
    ("kicked", "kicked"),
    ("acked", "acked"),
    ("unknown", "unknown"),
    ("failed", "failed"),
    ("done", "executed"),
    ("lost", "lost"),
    ("dup", "duplicates"),
    ("dead", "dead_lettered"),
    ("phantom", "phantoms"),
    ("resume_s", "resume_s"),
    ("stall_s", "stall_s"),
    ("done_s", "done_s"),
    ("deaths", "deaths"),
    ("time_s", "duration_s"),
)


def format_table(results: Sequence[ScenarioResult]) -> str:
    """A plain-text (Markdown-compatible) table of ``results``."""
    rows = []
    for r in results:
        values = r.to_dict()
        values["deaths"] = len(r.worker_exits) + r.child_restarts
        if r.destroyed:
            values["lost"] = f"{r.lost} (+{r.destroyed} deleted)"
        rows.append(["-" if values[k] is None else str(values[k]) for _, k in _COLUMNS])
    header = [title for title, _ in _COLUMNS]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    for r in results:
        if r.reason or r.violations:
            out.append(f"{r.name} [{r.broker}]: {r.reason or '; '.join(r.violations)}")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    """Where and when a report was measured."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        redis_version = subprocess.run(
            ["redis-server", "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis_version,
    }


def write_json(path: Path, results: Sequence[ScenarioResult], config: ChaosConfig) -> None:
    """Write the report (machine, config, results) as JSON."""
    report = {
        "machine": machine_info(),
        "config": config.to_dict(),
        "results": [r.to_dict() for r in results],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
