"""Side-by-side benchmark: our brokers against taskiq-redis's cluster brokers.

Used by ``scripts/bench.py`` (:mod:`.cli` only parses arguments and prints).
A dev tool: it needs taskiq-redis, a dev dependency, so it is not shipped in
the wheel. One run measures, on one cluster and with
unique queue names:

* ``ours-stream`` (:class:`ClusterStreamBroker`) against
  ``theirs-stream`` (taskiq-redis's ``RedisStreamClusterBroker``), and
* ``ours-list`` (:class:`ClusterListQueueBroker`) against ``theirs-list``
  (taskiq-redis's ``ListQueueClusterBroker``).

How it measures (docs/performance.md has the long version):

* Producers and workers are separate processes. Each broker gets one
  producer subprocess (its event loop never sees another broker), driven by
  JSON lines on stdin/stdout. Workers are real ``taskiq worker`` processes
  running an app module generated into a temp dir; its tasks record what
  happened in process memory and a background flusher writes that to a file
  every 50 ms, so measuring costs no Redis commands.
* Per broker, in order: kick rounds into an idle queue (kick throughput,
  load spread from ``INFO commandstats`` deltas per master, and Redis memory
  of the resulting backlog, both as a ``used_memory`` delta and as
  ``MEMORY USAGE`` of the queue's keys); one worker drains the backlog
  (memory after done, after a trim interval); end-to-end rounds with one,
  then two worker processes already running (first kick to last
  completion); latency rounds at a fixed rate; for the stream brokers, crash
  recovery (SIGKILL of a worker process holding tasks, time until they run
  again).
* Every throughput/latency/spread figure is the median over ``rounds``;
  memory and the backlog drain are one measurement over the whole backlog.
* Planner time and exporter-scrape time are medians over ``rounds`` too;
  :func:`bench_scrape` is the one place to change when the exporter does.

Nothing here prints: :func:`run_bench` returns a JSON-able report and
:func:`format_report` renders the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode

from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker
from taskiq_redis_cluster._connection import connect, redact_url
from taskiq_redis_cluster._errors import DevClusterError
from taskiq_redis_cluster._keys import DEFAULT_PREFIX, ShardKeys
from taskiq_redis_cluster._planner import QueueSpec, plan_queue
from taskiq_redis_cluster._planstore import PlanStore
from taskiq_redis_cluster._topology import Topology

logger = logging.getLogger("taskiq_redis_cluster.bench")

#: Broker kinds, in the order they run and are shown.
BROKERS = ("ours-stream", "theirs-stream", "ours-list", "theirs-list")
LABELS = {
    "ours-stream": "ClusterStreamBroker",
    "theirs-stream": "taskiq_redis.RedisStreamClusterBroker",
    "ours-list": "ClusterListQueueBroker",
    "theirs-list": "taskiq_redis.ListQueueClusterBroker",
}
#: ``family -> (ours, theirs)``: the pairs whose ratios are reported.
PAIRS = {"stream": ("ours-stream", "theirs-stream"), "list": ("ours-list", "theirs-list")}

APP_MODULE = "tqrc_bench_app"
#: This package's import name and the directory it is imported from: the
#: producer and worker processes import the harness from the same place.
_PACKAGE = __name__.rpartition(".")[0]
_IMPORT_ROOT = Path(__file__).resolve().parents[_PACKAGE.count(".") + 1]
_ENV = "TQRC_BENCH_"
_FLUSH_INTERVAL = 0.05
_POLL = 0.02

APP_SOURCE = '''\
"""Worker app of the taskiq-redis-cluster benchmark (generated; safe to delete).

The broker is chosen by TQRC_BENCH_* environment variables. The tasks only
record what happened in this process; a background flusher writes that to a
file every 50 ms, so measuring costs no Redis commands.
"""

import asyncio
import time

from {package}.harness import Recorder, broker_from_env

broker = broker_from_env()
recorder = Recorder.from_env(broker)


@broker.task(task_name="bench.warm")
async def warm(kicked_at: float) -> None:
    recorder.warm_done()


@broker.task(task_name="bench.noop")
async def noop(kicked_at: float) -> None:
    recorder.noop_done()


@broker.task(task_name="bench.latency")
async def latency(kicked_at: float, round_no: int) -> None:
    recorder.latency(round_no, time.time() - kicked_at)


@broker.task(task_name="bench.slow")
async def slow(kicked_at: float, token: int) -> None:
    if recorder.slow_mode():
        recorder.slow_started()
        await asyncio.sleep(300)
    else:
        recorder.rerun()
'''


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run does; :meth:`make` fills in the mode defaults.

    :param quick: the CI mode (fewer tasks and rounds; under two minutes).
    :param rounds: rounds per figure; each figure is the median.
    :param scale: multiplies every task count and the latency duration.
    :param url: use this cluster instead of starting a local one.
    :param brokers: which of :data:`BROKERS` to run.
    """

    quick: bool = False
    rounds: int = 5
    scale: float = 1.0
    url: str | None = None
    brokers: tuple[str, ...] = BROKERS
    kick_total: int = 20_000
    concurrency: int = 64
    latency_rate: float = 200.0
    latency_seconds: float = 5.0
    idle_timeout_ms: int = 5_000
    trim_interval: float = 0.5
    xread_block_ms: int = 1_000
    recovery_tasks: int = 20
    recovery_rounds: int = 3
    recovery_wait: float = 15.0
    planner_shards: int = 1024
    planner_masters: int = 64
    scrape_queues: int = 3
    scrape_shards: int = 12

    @classmethod
    def make(
        cls,
        *,
        quick: bool = False,
        rounds: int | None = None,
        scale: float = 1.0,
        url: str | None = None,
        brokers: Sequence[str] | None = None,
    ) -> BenchConfig:
        """The full or quick configuration, with overrides."""
        base = cls(
            quick=quick,
            rounds=3 if quick else 5,
            kick_total=3_000 if quick else 20_000,
            latency_seconds=1.5 if quick else 5.0,
            recovery_rounds=1 if quick else 3,
            recovery_wait=10.0 if quick else 15.0,
        )
        chosen = tuple(brokers) if brokers else BROKERS
        unknown = sorted(set(chosen) - set(BROKERS))
        if unknown:
            raise ValueError(f"unknown broker kinds {unknown}; choose from {list(BROKERS)}")
        if scale <= 0:
            raise ValueError("scale must be > 0")
        return replace(
            base,
            rounds=max(1, rounds if rounds is not None else base.rounds),
            scale=scale,
            url=url,
            brokers=tuple(b for b in BROKERS if b in chosen),
        )

    def count(self, value: float, minimum: int = 1) -> int:
        """``value`` times :attr:`scale`, rounded, at least ``minimum``."""
        return max(minimum, round(value * self.scale))


# --------------------------------------------------------------------------
# Worker side: broker selection and the recorder (run inside taskiq workers)
# --------------------------------------------------------------------------


def broker_from_env() -> Any:
    """Build the broker named by ``TQRC_BENCH_BROKER`` (see :data:`BROKERS`)."""
    kind = os.environ[_ENV + "BROKER"]
    url = os.environ[_ENV + "URL"]
    queue = os.environ[_ENV + "QUEUE"]
    idle_ms = int(os.environ.get(_ENV + "IDLE_MS", "5000"))
    block_ms = int(os.environ.get(_ENV + "XREAD_BLOCK_MS", "1000"))
    trim = float(os.environ.get(_ENV + "TRIM_INTERVAL", "0.5"))
    if kind == "ours-stream":
        return ClusterStreamBroker(
            url,
            queue_name=queue,
            idle_timeout=idle_ms,
            xread_block=block_ms,
            trim_interval=trim,
        )
    if kind == "ours-list":
        return ClusterListQueueBroker(url, queue_name=queue)
    try:
        from taskiq_redis import ListQueueClusterBroker, RedisStreamClusterBroker
    except ImportError as exc:  # a dev dependency, not a runtime one
        raise RuntimeError("the benchmark needs taskiq-redis: pip install taskiq-redis") from exc
    if kind == "theirs-stream":
        # It has no idle_timeout: its cluster broker never reclaims.
        return RedisStreamClusterBroker(url, queue_name=queue, xread_block=block_ms)
    if kind == "theirs-list":
        return ListQueueClusterBroker(url, queue_name=queue)
    raise ValueError(f"unknown broker kind {kind!r}")


class Recorder:
    """Counts what the bench tasks did in one worker process.

    The counters live in memory; a background task writes them to
    ``w-PID.json`` (atomically) and appends latency samples to
    ``lat-PID.txt`` in the stats directory every 50 ms, so recording a
    completion costs a few attribute updates and no Redis command.
    """

    def __init__(self, stats_dir: Path, slow_flag: Path | None) -> None:
        self.stats_dir = stats_dir
        self.slow_flag = slow_flag
        self.warm = 0
        self.done = 0
        self.first_done: float | None = None
        self.last_done: float | None = None
        self.cpu_first: float | None = None
        self.cpu_last: float | None = None
        self.slow = 0
        self.reruns = 0
        self.last_rerun: float | None = None
        self.ready_at: float | None = None
        self._samples: list[str] = []
        self._samples_total = 0
        self._dirty = True
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, broker: Any) -> Recorder:
        """A recorder for the stats dir in the environment, hooked to ``broker``."""
        flag = os.environ.get(_ENV + "SLOW_FLAG")
        recorder = cls(Path(os.environ[_ENV + "STATS"]), Path(flag) if flag else None)
        from taskiq import TaskiqEvents

        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, recorder._on_startup)
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, recorder._on_shutdown)
        return recorder

    # ---- called by the tasks
    def warm_done(self) -> None:
        self.warm += 1
        self._dirty = True

    def noop_done(self) -> None:
        now = time.time()
        # Process CPU time: a figure that noise from other processes barely moves.
        cpu = time.process_time()
        if self.first_done is None:
            self.first_done = now
            self.cpu_first = cpu
        self.last_done = now
        self.cpu_last = cpu
        self.done += 1
        self._dirty = True

    def latency(self, round_no: int, seconds: float) -> None:
        self._samples.append(f"{round_no} {seconds:.6f}\n")
        self._samples_total += 1
        self._dirty = True

    def slow_mode(self) -> bool:
        return self.slow_flag is not None and self.slow_flag.exists()

    def slow_started(self) -> None:
        self.slow += 1
        self._dirty = True
        # Report a held task at once: the controller kills this process next.
        self.flush()

    def rerun(self) -> None:
        self.reruns += 1
        self.last_rerun = time.time()
        self._dirty = True

    # ---- flushing
    def flush(self) -> None:
        """Write the counters (and new latency samples) to the stats dir."""
        pid = os.getpid()
        if self._samples:
            with open(self.stats_dir / f"lat-{pid}.txt", "a") as fh:
                fh.write("".join(self._samples))
            self._samples.clear()
        state = {
            "pid": pid,
            "ready_at": self.ready_at,
            "warm": self.warm,
            "done": self.done,
            "first_done": self.first_done,
            "last_done": self.last_done,
            "cpu_first": self.cpu_first,
            "cpu_last": self.cpu_last,
            "samples": self._samples_total,
            "slow": self.slow,
            "reruns": self.reruns,
            "last_rerun": self.last_rerun,
        }
        path = self.stats_dir / f"w-{pid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
        self._dirty = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL)
            if self._dirty:
                self.flush()

    async def _on_startup(self, state: Any) -> None:
        self.ready_at = time.time()
        self.flush()
        self._flusher = asyncio.get_running_loop().create_task(self._loop())

    async def _on_shutdown(self, state: Any) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.flush()


# --------------------------------------------------------------------------
# Producer subprocess (python -c "...; producer_main()")
# --------------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def producer_main() -> None:
    """Entry point of a producer subprocess: JSON requests on stdin, replies on stdout."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_producer())


async def _producer() -> None:
    app = importlib.import_module(APP_MODULE)
    broker = app.broker
    concurrency = int(os.environ.get(_ENV + "CONCURRENCY", "64"))
    await broker.startup()
    try:
        # Warm-up: open the connection pools (and initialize a lazily
        # created cluster client) before anything is measured.
        await app.warm.kiq(time.time())
        await asyncio.gather(*(app.warm.kiq(time.time()) for _ in range(concurrency)))
        _emit({"ready": True, "warm": concurrency + 1})
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                reply = await _handle(app, request)
            except Exception as exc:  # reported to the controller, which fails the run
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            _emit(reply)
    finally:
        await broker.shutdown()


async def _handle(app: Any, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "kick":
        task = getattr(app, request["task"])
        return await kick_many(
            lambda i: task.kiq(time.time(), *request.get("args", [])),
            int(request["count"]),
            int(request["concurrency"]),
        )
    if op == "slow":
        count = int(request["count"])
        return await kick_many(lambda i: app.slow.kiq(time.time(), i), count, count)
    if op == "rate":
        round_no = int(request["round"])
        return await kick_at_rate(
            lambda: app.latency.kiq(time.time(), round_no),
            float(request["rate"]),
            float(request["seconds"]),
        )
    raise ValueError(f"unknown op {op!r}")


async def kick_many(
    kick: Callable[[int], Awaitable[Any]], count: int, concurrency: int
) -> dict[str, Any]:
    """Kick ``count`` tasks from ``concurrency`` coroutines; returns timings.

    Each coroutine takes the next number and kicks until none are left, so
    exactly ``concurrency`` kicks are in flight at any time.
    """
    numbers = iter(range(count))
    errors: list[str] = []

    async def worker() -> None:
        for i in numbers:
            try:
                await kick(i)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    first = time.time()
    start = time.perf_counter()
    cpu_start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {
        "count": count,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "first_kick": first,
        "elapsed": elapsed,
        "tps": count / elapsed if elapsed > 0 else 0.0,
        "cpu_us_per_kick": cpu / count * 1e6,
    }


async def kick_at_rate(
    kick: Callable[[], Awaitable[Any]], rate: float, seconds: float
) -> dict[str, Any]:
    """Kick at a fixed ``rate`` for ``seconds``; a slow kick never delays the next."""
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * seconds))
    pending: set[asyncio.Task[Any]] = set()
    errors = 0
    start = loop.time()
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(kick())
        pending.add(task)
        task.add_done_callback(pending.discard)
    results = await asyncio.gather(*pending, return_exceptions=True)
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return {"count": count, "errors": errors, "elapsed": loop.time() - start}


# --------------------------------------------------------------------------
# Controller: processes
# --------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path


class _Processes:
    """Every process group the bench started, so all of them can be ended.

    Children run in their own session (process group), so a terminal
    Ctrl-C reaches only the controller, which then ends them here; a group
    is only ever signalled through the pid of a process we spawned.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[_Child] = []

    async def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str], *, pipes: bool = False
    ) -> _Child:
        log = self.log_dir / f"{name}.log"
        # The child inherits the descriptor; opening a local file is instant.
        fh = log.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipes else fh,
                stderr=fh,
                start_new_session=True,
            )
        finally:
            fh.close()
        child = _Child(name, proc, log)
        self._children.append(child)
        return child

    async def stop(self, child: _Child, grace: float = 4.0) -> None:
        """SIGTERM the child's group, SIGKILL it after ``grace`` seconds (0: at once)."""
        if child.proc.returncode is None and grace > 0:
            _signal_group(child.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), grace)
            except asyncio.TimeoutError:
                logger.debug("%s ignored SIGTERM for %.1fs; killing it", child.name, grace)
        # Forked taskiq children may outlive their parent: end the group.
        _signal_group(child.proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(child.proc.wait(), 5.0)
        if child in self._children:
            self._children.remove(child)

    async def stop_all(self) -> None:
        children, self._children = list(self._children), []
        for child in children:
            _signal_group(child.proc.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 5.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_ = stat.rsplit(")", 1)[-1].split()
    return int(fields_[1]) if len(fields_) > 1 else None


class _Producer:
    """A producer subprocess speaking JSON lines."""

    def __init__(self, child: _Child) -> None:
        self.child = child

    async def read(self, timeout: float) -> dict[str, Any]:
        stdout = self.child.proc.stdout
        assert stdout is not None
        line = await asyncio.wait_for(stdout.readline(), timeout)
        if not line:
            raise BenchError(f"producer {self.child.name} exited; see {self.child.log}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchError(f"producer {self.child.name}: {reply['error']}")
        return reply

    async def request(self, timeout: float, **request: Any) -> dict[str, Any]:
        stdin = self.child.proc.stdin
        assert stdin is not None
        stdin.write((json.dumps(request) + "\n").encode())
        await stdin.drain()
        return await self.read(timeout)

    async def quit(self) -> None:
        stdin = self.child.proc.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                stdin.write(b'{"op": "quit"}\n')
                await stdin.drain()
                stdin.close()


class BenchError(Exception):
    """The benchmark could not complete (a child failed, a wait timed out)."""


# --------------------------------------------------------------------------
# Controller: reading worker stats
# --------------------------------------------------------------------------


@dataclass
class _Stats:
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def total(self, key: str, exclude: set[int] | None = None) -> int:
        return sum(
            int(w.get(key) or 0)
            for pid, w in self.workers.items()
            if not exclude or pid not in exclude
        )

    def total_float(self, key: str) -> float:
        return sum(float(w.get(key) or 0.0) for w in self.workers.values())

    def latest(self, key: str) -> float | None:
        values = [float(w[key]) for w in self.workers.values() if w.get(key) is not None]
        return max(values) if values else None

    def earliest(self, key: str) -> float | None:
        values = [float(w[key]) for w in self.workers.values() if w.get(key) is not None]
        return min(values) if values else None


def _read_stats(stats_dir: Path) -> _Stats:
    stats = _Stats()
    for path in stats_dir.glob("w-*.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            stats.workers[int(data["pid"])] = data
    return stats


def _read_latencies(stats_dir: Path, round_no: int) -> list[float]:
    values: list[float] = []
    prefix = f"{round_no} "
    for path in stats_dir.glob("lat-*.txt"):
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                if line.startswith(prefix):
                    values.append(float(line.split()[1]))
    return values


async def _wait_for(
    what: str, check: Callable[[], bool], timeout: float, child: _Child | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if child is not None and child.proc.returncode is not None:
            raise BenchError(f"{child.name} exited while waiting for {what}; see {child.log}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(_POLL)


# --------------------------------------------------------------------------
# Controller: cluster measurements
# --------------------------------------------------------------------------


def _as_info(reply: Any) -> dict[str, Any]:
    """INFO as a dict, whether redis-py parsed it (maybe keyed by node) or not."""
    if isinstance(reply, bytes | str):
        text = reply.decode() if isinstance(reply, bytes) else reply
        result: dict[str, Any] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                result[key] = value
        return result
    if isinstance(reply, dict) and len(reply) == 1:
        (only,) = reply.values()
        if isinstance(only, dict | bytes | str):
            return _as_info(only)
    return dict(reply)


async def _info(client: RedisCluster, node: ClusterNode, section: str) -> dict[str, Any]:
    reply = await client.execute_command("INFO", section, target_nodes=node)
    return _as_info(reply)


async def memory(client: RedisCluster) -> int:
    """``used_memory`` summed over the masters."""
    used = 0
    for node in client.get_primaries():
        info = await _info(client, node, "memory")
        used += int(info["used_memory"])
        logger.debug(
            "memory of %s: used %s, clients %s, backlog %s, overhead %s",
            node.name,
            info.get("used_memory"),
            info.get("mem_clients_normal"),
            info.get("mem_replication_backlog"),
            info.get("used_memory_overhead"),
        )
    return used


async def key_memory(client: RedisCluster, keys: Sequence[str]) -> int:
    """``MEMORY USAGE key SAMPLES 0`` summed over ``keys`` (missing keys count 0).

    Exact for the queue's own data, and blind to client buffers and other
    keys, unlike a ``used_memory`` delta.
    """
    total = 0
    for key in keys:
        total += int(await client.memory_usage(key, samples=0) or 0)
    return total


async def prime_replication_backlogs(client: RedisCluster, run_id: str) -> None:
    """Fill every master's replication backlog before memory is measured.

    The backlog grows with the first writes up to ``repl-backlog-size`` and
    stays there; without this, whichever broker writes to a master first
    would be charged up to that size (1 MB by default) per master.
    """
    for node in client.get_primaries():
        info = await _info(client, node, "replication")
        size = int(info.get("repl_backlog_size", 1 << 20)) + (256 << 10)
        for i in range(100_000):
            key = f"bench-{run_id}-prime{i}"
            owner = client.get_node_from_key(key)
            if owner is not None and owner.name == node.name:
                break
        await client.set(key, b"x" * size)
        await client.unlink(key)


def _per_100k(delta: int, tasks: int) -> int:
    return max(0, round(delta * 100_000 / tasks)) if tasks > 0 else 0


async def command_calls(client: RedisCluster) -> dict[str, int]:
    """Commands executed so far per master (INFO commandstats, minus INFO itself)."""
    calls: dict[str, int] = {}
    for node in client.get_primaries():
        stats = await _info(client, node, "commandstats")
        total = 0
        for name, value in stats.items():
            if not str(name).startswith("cmdstat_") or str(name) == "cmdstat_info":
                continue
            if isinstance(value, dict):
                total += int(value.get("calls", 0))
            else:
                for part in str(value).split(","):
                    key, _, number = part.partition("=")
                    if key == "calls":
                        total += int(number)
        calls[node.name] = total
    return calls


def spread(before: dict[str, int], after: dict[str, int]) -> tuple[float, dict[str, int]]:
    """Max/mean of the per-master call deltas (1.0 = perfectly even)."""
    deltas = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    values = list(deltas.values())
    mean = sum(values) / len(values) if values else 0.0
    return (max(values) / mean if mean > 0 else 0.0), deltas


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


# --------------------------------------------------------------------------
# Pure and isolated measurements: planner, exporter scrape
# --------------------------------------------------------------------------


def bench_planner(shards: int, masters: int, rounds: int) -> dict[str, Any]:
    """Time ``plan_queue`` for ``shards`` shards over ``masters`` equal masters."""
    per = 16384 // masters
    mapping = {
        f"{i:040x}": [(i * per, 16383 if i == masters - 1 else (i + 1) * per - 1)]
        for i in range(masters)
    }
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        plan = plan_queue(Topology.from_slot_map(mapping), QueueSpec(f"planbench{r}", shards))
        times.append((time.perf_counter() - start) * 1000)
        assert len(plan.shards) == shards
    return {"shards": shards, "masters": masters, "ms": _median(times), "rounds_ms": times}


async def _scrape_equivalent(client: RedisCluster, streams: Sequence[str], group: str) -> None:
    """What an exporter scrape costs in Redis: one cluster pipeline over all shards."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, group)
        pipe.xlen(stream)
    await pipe.execute()


async def bench_scrape(
    client: RedisCluster, url: str, run_id: str, queues: int, shards: int, rounds: int
) -> dict[str, Any]:
    """Time one metrics scrape of ``queues`` stream queues with ``shards`` shards each.

    This is the swap point for the exporter. ``ms`` times
    ``taskiq_redis_cluster._exporter.scrape_once`` (read and render) when
    that exists (see :func:`_exporter_scrape`); ``equivalent_ms`` always
    times the bare Redis work of a scrape (XINFO GROUPS + XPENDING summary +
    XLEN per shard stream in one cluster pipeline), and is used for ``ms``
    when there is no exporter. ``source`` says which.
    """
    names = [f"bench-{run_id}-scrape{i}" for i in range(queues)]
    streams: list[str] = []
    group = "taskiq"
    for name in names:
        broker = ClusterStreamBroker(url, queue_name=name, shards=shards)
        await broker.startup()
        try:
            plan = await broker.current_plan()
            for shard in plan.shards:
                stream = shard.keys(broker.options.prefix).stream
                streams.append(stream)
                await client.xadd(stream, {b"data": b"x"})
                with contextlib.suppress(Exception):  # BUSYGROUP on a re-run
                    await client.xgroup_create(stream, group, id="0")
        finally:
            await broker.shutdown()

    async def equivalent() -> None:
        await _scrape_equivalent(client, streams, group)

    async def timed(fn: Callable[[], Awaitable[Any]]) -> list[float]:
        await fn()  # warm the connections
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            await fn()
            times.append((time.perf_counter() - start) * 1000)
        return times

    equivalent_times = await timed(equivalent)
    exporter = _exporter_scrape(client, names)
    if exporter is None:
        source = "equivalent: XINFO GROUPS + XPENDING + XLEN per shard, one cluster pipeline"
        times = equivalent_times
    else:
        source = "taskiq_redis_cluster._exporter.scrape_once (read + render)"
        times = await timed(exporter)
    return {
        "queues": queues,
        "shards_per_queue": shards,
        "streams": len(streams),
        "source": source,
        "ms": _median(times),
        "rounds_ms": times,
        "equivalent_ms": _median(equivalent_times),
        "queue_names": names,
    }


def _exporter_scrape(
    client: RedisCluster, queues: Sequence[str]
) -> Callable[[], Awaitable[Any]] | None:
    """The exporter's ``scrape_once`` as a no-argument coroutine, if it exists."""
    try:
        module = importlib.import_module("taskiq_redis_cluster._exporter")
    except ImportError:
        return None
    scrape_once = getattr(module, "scrape_once", None)
    if scrape_once is None:
        return None

    async def run() -> Any:
        return await scrape_once(client, list(queues))

    return run


# --------------------------------------------------------------------------
# Controller: one broker
# --------------------------------------------------------------------------


class _Bench:
    """Runs every phase for each broker kind on one cluster."""

    def __init__(
        self, cfg: BenchConfig, url: str, client: RedisCluster, work: Path, procs: _Processes
    ) -> None:
        self.cfg = cfg
        self.url = url
        self.client = client
        self.work = work
        self.procs = procs
        self.run_id = uuid.uuid4().hex[:8]
        self.app_dir = work / "app"
        self.app_dir.mkdir(parents=True, exist_ok=True)
        (self.app_dir / f"{APP_MODULE}.py").write_text(APP_SOURCE.replace("{package}", _PACKAGE))
        self.queues: list[str] = []
        # Seconds to let memory settle before it is read: Redis shrinks the
        # query buffers of clients idle for 2 s. Quick runs read sooner.
        self._settle = 1.0 if cfg.quick else 2.2

    def _env(
        self, kind: str, queue: str, stats: Path, slow_flag: Path | None = None
    ) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.app_dir), str(_IMPORT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(
            {
                _ENV + "BROKER": kind,
                _ENV + "URL": self.url,
                _ENV + "QUEUE": queue,
                _ENV + "STATS": str(stats),
                _ENV + "IDLE_MS": str(self.cfg.idle_timeout_ms),
                _ENV + "XREAD_BLOCK_MS": str(self.cfg.xread_block_ms),
                _ENV + "TRIM_INTERVAL": str(self.cfg.trim_interval),
                _ENV + "CONCURRENCY": str(self.cfg.concurrency),
            }
        )
        if slow_flag is not None:
            env[_ENV + "SLOW_FLAG"] = str(slow_flag)
        else:
            env.pop(_ENV + "SLOW_FLAG", None)
        return env

    async def _producer(self, name: str, env: dict[str, str]) -> _Producer:
        code = f"from {_PACKAGE}.harness import producer_main; producer_main()"
        child = await self.procs.spawn(name, [sys.executable, "-c", code], env, pipes=True)
        producer = _Producer(child)
        await producer.read(timeout=60.0)  # "ready"
        return producer

    async def _worker(self, name: str, env: dict[str, str], stats_dir: Path) -> _Child:
        before = set(_read_stats(stats_dir).workers)
        argv = [
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            f"{APP_MODULE}:broker",
            "--workers",
            "1",
            "--log-level",
            "WARNING",
            "--shutdown-timeout",
            "2",
        ]
        child = await self.procs.spawn(name, argv, env)

        def ready() -> bool:
            return bool(set(_read_stats(stats_dir).workers) - before)

        await _wait_for(f"worker {name} to start", ready, 60.0, child)
        # WORKER_STARTUP runs just before the listen loop begins.
        await asyncio.sleep(0.3)
        return child

    async def run_broker(self, kind: str) -> dict[str, Any]:
        """Every phase for one broker kind, on a queue of its own."""
        short = kind.replace("ours-", "o").replace("theirs-", "t")
        queue = f"bench-{self.run_id}-{short}"
        self.queues.append(queue)
        stats_dir = self.work / f"stats-{kind}"
        stats_dir.mkdir()
        env = self._env(kind, queue, stats_dir)
        result: dict[str, Any] = {"label": LABELS[kind], "queue": queue}
        producer = await self._producer(f"{kind}-producer", env)
        workers: list[_Child] = []
        try:
            # Same settling time before the baseline as before each reading.
            await asyncio.sleep(self._settle)
            memory_before = await memory(self.client)
            result.update(await self._kick_phase(kind, queue, producer, memory_before))
            result.update(
                await self._drain_phase(
                    kind,
                    env,
                    stats_dir,
                    workers,
                    memory_before,
                    int(result["memory_tasks"]),
                    queue,
                )
            )
            n = self.cfg.count(self.cfg.kick_total, minimum=self.cfg.concurrency)
            logger.info("%s: end to end, 1 worker, %d rounds", kind, self.cfg.rounds)
            rounds = [
                await self._e2e_round(producer, stats_dir, n, workers)
                for _ in range(self.cfg.rounds)
            ]
            result.update(e2e_1w_tps=_median(rounds), e2e_1w_tps_rounds=rounds)
            workers.append(await self._worker(f"{kind}-w2", env, stats_dir))
            logger.info("%s: end to end, 2 workers, %d rounds", kind, self.cfg.rounds)
            rounds = [
                await self._e2e_round(producer, stats_dir, n, workers)
                for _ in range(self.cfg.rounds)
            ]
            result.update(e2e_2w_tps=_median(rounds), e2e_2w_tps_rounds=rounds)
            result.update(await self._latency_phase(kind, producer, stats_dir))
            # Nothing is in flight any more: no need for a graceful stop.
            await asyncio.gather(*(self.procs.stop(w, grace=0) for w in workers))
            workers.clear()
            if kind.endswith("-stream"):
                result.update(await self._recovery(kind, queue, producer))
            else:
                result.update(
                    recovery_s=None,
                    recovery_rounds=[],
                    recovery_note="n/a: list brokers are at most once",
                )
        finally:
            for w in workers:
                await self.procs.stop(w, grace=0)
            await producer.quit()
            await self.procs.stop(producer.child, grace=10.0)
        return result

    async def _queue_keys(self, kind: str, queue: str) -> list[str]:
        """The Redis keys that hold ``queue``'s tasks for broker ``kind``."""
        if kind.startswith("theirs-"):
            return [queue]
        plan = await PlanStore(self.client).load(queue)
        if plan is None:
            return []
        keys = [ShardKeys(DEFAULT_PREFIX, shard.tag) for shard in plan.all_shards()]
        if kind == "ours-list":
            return [k.list for k in keys]
        return [name for k in keys for name in (k.stream, k.dead)]

    async def _kick_phase(
        self, kind: str, queue: str, producer: _Producer, before: int
    ) -> dict[str, Any]:
        """Kick rounds into an idle queue: throughput, load spread, queued memory."""
        cfg = self.cfg
        n = cfg.count(cfg.kick_total, minimum=cfg.concurrency)
        logger.info("%s: kick throughput, %d rounds of %d kicks", kind, cfg.rounds, n)
        kicks: list[float] = []
        kick_cpu: list[float] = []
        spreads: list[float] = []
        per_master: list[dict[str, int]] = []
        errors = 0
        for _ in range(cfg.rounds):
            calls_before = await command_calls(self.client)
            reply = await producer.request(
                60.0 + n / 50, op="kick", task="noop", count=n, concurrency=cfg.concurrency
            )
            calls_after = await command_calls(self.client)
            kicks.append(float(reply["tps"]))
            kick_cpu.append(float(reply["cpu_us_per_kick"]))
            errors += int(reply["errors"])
            ratio, deltas = spread(calls_before, calls_after)
            spreads.append(ratio)
            per_master.append(deltas)
            if reply["errors"]:
                logger.warning(
                    "%s: %d kicks failed, first: %s", kind, reply["errors"], reply["first_error"]
                )
        backlog = n * cfg.rounds - errors
        await asyncio.sleep(self._settle)
        queued = await memory(self.client) - before
        keys = await key_memory(self.client, await self._queue_keys(kind, queue))
        median_spread = _median(spreads) or 0.0
        closest = min(range(len(spreads)), key=lambda i: abs(spreads[i] - median_spread))
        return {
            "kick_tps": _median(kicks),
            "kick_tps_rounds": kicks,
            "kick_cpu_us_per_kick": _median(kick_cpu),
            "kick_errors": errors,
            "spread_max_mean": median_spread,
            "spread_rounds": spreads,
            "ops_per_master": per_master[closest],
            "memory_tasks": backlog,
            "memory_queued_bytes": max(0, queued),
            "memory_queued_per_100k_bytes": _per_100k(queued, backlog),
            "keys_queued_per_100k_bytes": _per_100k(keys, backlog),
        }

    async def _drain_phase(
        self,
        kind: str,
        env: dict[str, str],
        stats_dir: Path,
        workers: list[_Child],
        memory_before: int,
        backlog: int,
        queue: str,
    ) -> dict[str, Any]:
        """One worker drains the kick-phase backlog; memory once all is done."""
        logger.info("%s: one worker drains %d queued tasks", kind, backlog)
        workers.append(await self._worker(f"{kind}-w1", env, stats_dir))
        await _wait_for(
            f"{kind} backlog drain",
            lambda: _read_stats(stats_dir).total("done") >= backlog,
            60.0 + backlog / 25,
            workers[0],
        )
        stats = _read_stats(stats_dir)
        first, last = stats.earliest("first_done"), stats.latest("last_done")
        cpu = stats.total_float("cpu_last") - stats.total_float("cpu_first")
        # Our stream broker trims acknowledged entries every trim_interval,
        # when its blocked read returns: wait for two such passes.
        settle = self._settle
        if kind == "ours-stream":
            settle = max(settle, 2 * self.cfg.trim_interval + self.cfg.xread_block_ms / 1000)
        await asyncio.sleep(settle)
        done = max(0, await memory(self.client) - memory_before)
        keys = await key_memory(self.client, await self._queue_keys(kind, queue))
        return {
            "drain_1w_tps": backlog / (last - first) if first and last and last > first else None,
            "drain_worker_cpu_us_per_task": round(cpu / backlog * 1e6, 1) if backlog else None,
            "memory_done_bytes": done,
            "keys_done_bytes": keys,
        }

    async def _latency_phase(
        self, kind: str, producer: _Producer, stats_dir: Path
    ) -> dict[str, Any]:
        """Kick-to-start latency at a fixed rate, with the workers already running."""
        cfg = self.cfg
        p50s: list[float] = []
        p99s: list[float] = []
        seconds = cfg.latency_seconds * cfg.scale
        logger.info(
            "%s: latency, %d rounds at %.0f/s for %.1fs",
            kind,
            cfg.rounds,
            cfg.latency_rate,
            seconds,
        )
        for r in range(cfg.rounds):
            reply = await producer.request(
                seconds + 60.0, op="rate", round=r, rate=cfg.latency_rate, seconds=seconds
            )
            expected = int(reply["count"]) - int(reply["errors"])

            def arrived(r: int = r, expected: int = expected) -> bool:
                return len(_read_latencies(stats_dir, r)) >= expected

            await _wait_for(f"{kind} latency round {r}", arrived, 30.0 + seconds)
            samples = _read_latencies(stats_dir, r)
            p50s.append(percentile(samples, 50) * 1000)
            p99s.append(percentile(samples, 99) * 1000)
        return {
            "latency_p50_ms": _median(p50s),
            "latency_p99_ms": _median(p99s),
            "latency_p50_ms_rounds": p50s,
            "latency_p99_ms_rounds": p99s,
            "latency_rate": cfg.latency_rate,
            "latency_seconds": seconds,
        }

    async def _e2e_round(
        self, producer: _Producer, stats_dir: Path, n: int, workers: Sequence[_Child]
    ) -> float:
        base = _read_stats(stats_dir).total("done")
        reply = await producer.request(
            60.0 + n / 50, op="kick", task="noop", count=n, concurrency=self.cfg.concurrency
        )
        expected = base + n - int(reply["errors"])

        def finished() -> bool:
            return _read_stats(stats_dir).total("done") >= expected

        await _wait_for("end-to-end round", finished, 60.0 + n / 50)
        for w in workers:
            if w.proc.returncode is not None:
                raise BenchError(f"{w.name} exited; see {w.log}")
        last = _read_stats(stats_dir).latest("last_done")
        assert last is not None
        elapsed = last - float(reply["first_kick"])
        return n / elapsed if elapsed > 0 else 0.0

    async def _recovery(self, kind: str, queue: str, producer: _Producer) -> dict[str, Any]:
        """SIGKILL a worker process holding tasks; time until they run again.

        The killed process is the forked child of a ``taskiq worker``, whose
        process manager starts a replacement within about a second, as in
        production. The slow-mode flag file is removed before the kill, so
        the replacement runs the redelivered tasks at once.
        """
        cfg = self.cfg
        k = cfg.recovery_tasks
        stats_dir = self.work / f"stats-{kind}-recovery"
        stats_dir.mkdir()
        flag = self.work / f"slow-{kind}"
        env = self._env(kind, queue, stats_dir, slow_flag=flag)
        times: list[float] = []
        never = False
        logger.info("%s: recovery, %d rounds of %d held tasks", kind, cfg.recovery_rounds, k)
        flag.touch()
        worker = await self._worker(f"{kind}-recovery", env, stats_dir)
        try:
            for _ in range(cfg.recovery_rounds):
                flag.touch()
                before = _read_stats(stats_dir)
                await producer.request(60.0, op="slow", count=k)
                held_goal = before.total("slow") + k
                await _wait_for(
                    f"{kind} workers to hold {k} tasks",
                    lambda goal=held_goal: _read_stats(stats_dir).total("slow") >= goal,  # type: ignore[misc]
                    30.0,
                    worker,
                )
                held = _read_stats(stats_dir)
                victims = [
                    pid
                    for pid, w in held.workers.items()
                    if int(w.get("slow") or 0) > int(before.workers.get(pid, {}).get("slow") or 0)
                ]
                flag.unlink()
                reruns_before = held.total("reruns")
                killed_at = time.time()
                for pid in victims:
                    # Only a direct child of the taskiq worker we started.
                    if _parent_of(pid) == worker.proc.pid:
                        os.kill(pid, signal.SIGKILL)
                    else:
                        raise BenchError(f"pid {pid} is not a child of {worker.name}")

                def recovered(base: int = reruns_before) -> bool:
                    return _read_stats(stats_dir).total("reruns") >= base + k

                try:
                    await _wait_for(f"{kind} recovery", recovered, cfg.recovery_wait, worker)
                except BenchError:
                    if worker.proc.returncode is not None:
                        raise
                    never = True
                    break
                last = _read_stats(stats_dir).latest("last_rerun")
                assert last is not None
                times.append(last - killed_at)
        finally:
            await self.procs.stop(worker)
        if never:
            got = _read_stats(stats_dir).total("reruns")
            return {
                "recovery_s": None,
                "recovery_rounds": times,
                "recovery_note": f"never (0 of {k} held tasks ran again within "
                f"{cfg.recovery_wait:.0f}s after SIGKILL; {got} reruns in total)",
            }
        return {
            "recovery_s": _median(times),
            "recovery_rounds": times,
            "recovery_note": f"all {k} held tasks ran again",
        }

    async def cleanup(self) -> None:
        """Delete every key of this run (only needed on a cluster we did not start)."""
        store = PlanStore(self.client)
        for queue in self.queues:
            with contextlib.suppress(Exception):
                await store.delete(queue)
        pattern = f"*bench-{self.run_id}-*"
        for node in self.client.get_primaries():
            keys = [
                k async for k in self.client.scan_iter(match=pattern, count=1000, target_nodes=node)
            ]
            for key in keys:
                with contextlib.suppress(Exception):
                    await self.client.unlink(key)


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, Python and platform, for the report."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_mb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_total_mb": mem_mb,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _ratio(ours: Any, theirs: Any) -> float | None:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or theirs <= 0:
        return None
    return round(ours / theirs, 3)


#: Metrics compared ours/theirs, with the direction that is better.
RATIO_METRICS = (
    ("kick_tps", "higher"),
    ("e2e_1w_tps", "higher"),
    ("e2e_2w_tps", "higher"),
    ("drain_1w_tps", "higher"),
    ("kick_cpu_us_per_kick", "lower"),
    ("drain_worker_cpu_us_per_task", "lower"),
    ("latency_p50_ms", "lower"),
    ("latency_p99_ms", "lower"),
    ("spread_max_mean", "lower"),
    ("memory_queued_per_100k_bytes", "lower"),
    ("memory_done_bytes", "lower"),
    ("keys_queued_per_100k_bytes", "lower"),
    ("keys_done_bytes", "lower"),
)


def ratios(brokers: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``ours / theirs`` per metric for each family both sides of which ran."""
    out: dict[str, dict[str, float | None]] = {}
    for family, (ours, theirs) in PAIRS.items():
        if ours in brokers and theirs in brokers:
            out[family] = {
                m: _ratio(brokers[ours].get(m), brokers[theirs].get(m)) for m, _ in RATIO_METRICS
            }
    return out


def targets(report: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The throughput/spread/recovery targets and whether this run met them."""
    out: list[dict[str, Any]] = []
    stream = report["ratios"].get("stream", {})

    def add(name: str, goal: str, value: Any, met: bool | None) -> None:
        out.append({"name": name, "target": goal, "value": value, "met": met})

    kick = stream.get("kick_tps")
    add(
        "kick throughput vs RedisStreamClusterBroker",
        ">= 3.0x",
        kick,
        None if kick is None else kick >= 3.0,
    )
    e2e = stream.get("e2e_1w_tps")
    add(
        "end-to-end (1 worker) vs RedisStreamClusterBroker",
        ">= 1.5x",
        e2e,
        None if e2e is None else e2e >= 1.5,
    )
    for kind in ("ours-stream", "ours-list"):
        value = report["brokers"].get(kind, {}).get("spread_max_mean")
        add(
            f"load spread max/mean ({kind})",
            "<= 1.10",
            value,
            None if value is None else value <= 1.10,
        )
    ours = report["brokers"].get("ours-stream", {})
    if ours:
        idle = cfg.idle_timeout_ms / 1000
        # Reclaim passes run every idle/4 s, and the replacement process
        # needs about a second to be started by taskiq's process manager.
        bound = idle + max(0.2, min(30.0, idle / 4)) + 2.0
        value = ours.get("recovery_s")
        add(
            "recovery after SIGKILL (ours-stream)",
            f"<= {bound:.2f}s (idle_timeout {idle:g}s)",
            value,
            None if value is None else value <= bound,
        )
    return out


def _drop_node_data(work: Path) -> None:
    """Keep a failed run's logs, not its nodes' data files."""
    for data in work.glob("cluster/*/appendonlydir"):
        shutil.rmtree(data, ignore_errors=True)


async def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark and return the report (JSON-able dict).

    Starts a local 3-master, 3-replica cluster on free ports unless
    ``cfg.url`` is given, and always stops it (and every child process),
    also on errors and Ctrl-C.

    :raises BenchError: a child process failed or a wait timed out.
    """
    from taskiq_redis_cluster.devcluster import DevCluster, find_free_base_port

    wall_start = time.time()
    load_start = _loadavg()
    work = Path(tempfile.mkdtemp(prefix="tqrc-bench-"))
    procs = _Processes(work)
    cluster: DevCluster | None = None
    ok = False
    try:
        if cfg.url is None:
            cluster = DevCluster(
                masters=3, replicas=1, base_port=find_free_base_port(6), directory=work / "cluster"
            )
            logger.info(
                "Starting a local cluster on ports %d..%d", cluster.base_port, cluster.base_port + 5
            )
            await cluster.start()
            url = cluster.url
        else:
            url = cfg.url
        client = await connect(url)
        bench = _Bench(cfg, url, client, work, procs)
        try:
            masters = len(client.get_primaries())
            await prime_replication_backlogs(client, bench.run_id)
            brokers: dict[str, dict[str, Any]] = {}
            for kind in cfg.brokers:
                brokers[kind] = await bench.run_broker(kind)
            logger.info("Planner and scrape timings")
            planner = bench_planner(cfg.planner_shards, cfg.planner_masters, cfg.rounds)
            scrape = await bench_scrape(
                client, url, bench.run_id, cfg.scrape_queues, cfg.scrape_shards, cfg.rounds
            )
            bench.queues.extend(scrape.pop("queue_names"))
        finally:
            await procs.stop_all()
            if cfg.url is not None:
                # Someone else's cluster: leave no keys behind, even on Ctrl-C.
                try:
                    await asyncio.wait_for(bench.cleanup(), 60.0)
                except Exception as exc:
                    logger.warning("Could not delete every bench key: %r", exc)
            await client.aclose()
        report: dict[str, Any] = {
            "meta": {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(wall_start)),
                "mode": "quick" if cfg.quick else "full",
                "config": {k: v for k, v in asdict(cfg).items() if k != "url"},
                "cluster": (
                    f"local DevCluster, {masters} masters + {masters} replicas"
                    if cluster is not None
                    else f"external {redact_url(url)}"
                ),
                "masters": masters,
                "machine": machine_info(),
                "loadavg_start": load_start,
                "loadavg_end": _loadavg(),
                "duration_s": None,
            },
            "brokers": brokers,
            "planner": planner,
            "scrape": scrape,
        }
        report["ratios"] = ratios(brokers)
        report["targets"] = targets(report, cfg)
        report["meta"]["duration_s"] = round(time.time() - wall_start, 1)
        ok = True
        return report
    finally:
        await procs.stop_all()
        if cluster is not None:
            try:
                await cluster.stop()
            except DevClusterError as exc:
                logger.error("Could not stop the bench cluster: %s", exc)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _drop_node_data(work)
            logger.warning("Bench failed or was interrupted; logs kept in %s", work)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "mb":
        return f"{value / 1e6:.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    return f"{value:.2f}"


_ROWS = (
    ("kick throughput (tasks/s)", "kick_tps", "int"),
    ("end-to-end, 1 worker (tasks/s)", "e2e_1w_tps", "int"),
    ("end-to-end, 2 workers (tasks/s)", "e2e_2w_tps", "int"),
    ("backlog drain, 1 worker (tasks/s) *", "drain_1w_tps", "int"),
    ("producer CPU per kick (us)", "kick_cpu_us_per_kick", "f"),
    ("worker CPU per task, drain (us) *", "drain_worker_cpu_us_per_task", "f"),
    ("latency p50 (ms)", "latency_p50_ms", "f"),
    ("latency p99 (ms)", "latency_p99_ms", "f"),
    ("load spread max/mean", "spread_max_mean", "f"),
    ("memory per 100k queued (MB) *", "memory_queued_per_100k_bytes", "mb"),
    ("memory after done (MB) *", "memory_done_bytes", "mb"),
    ("queue keys per 100k queued (MB) *", "keys_queued_per_100k_bytes", "mb"),
    ("queue keys after done (MB) *", "keys_done_bytes", "mb"),
    ("recovery after SIGKILL (s)", "recovery_s", "f"),
)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what the CLI prints)."""
    brokers = report["brokers"]
    families = [(f, pair) for f, pair in PAIRS.items() if any(k in brokers for k in pair)]
    header = ["metric"]
    for family, (ours, theirs) in families:
        header += [ours, theirs, f"{family} ours/theirs"]
    rows = [header]
    for title, key, kind in _ROWS:
        row = [title]
        for family, (ours, theirs) in families:
            a = brokers.get(ours, {})
            b = brokers.get(theirs, {})
            cells = []
            for side in (a, b):
                value = side.get(key)
                if key == "recovery_s" and value is None and side:
                    note = str(side.get("recovery_note", ""))
                    cells.append("never" if note.startswith("never") else "n/a")
                else:
                    cells.append(_fmt(value, kind))
            row += [*cells, _fmt(report["ratios"].get(family, {}).get(key), "x")]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meta = report["meta"]
    planner = report["planner"]
    scrape = report["scrape"]
    lines += [
        "",
        "* one measurement over the whole kick-phase backlog, not a median of rounds",
        f"planner: {planner['shards']} shards over {planner['masters']} masters: "
        f"{_fmt(planner['ms'], 'f')} ms",
        f"exporter scrape, {scrape['queues']} queues x {scrape['shards_per_queue']} shards: "
        f"{_fmt(scrape['ms'], 'f')} ms ({scrape['source']})",
        "",
        "targets:",
    ]
    for t in report["targets"]:
        state = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else value)
        lines.append(f"  {t['name']}: {shown} (target {t['target']}): {state}")
    machine = meta["machine"]
    lines += [
        "",
        f"{meta['mode']} run, {meta['config']['rounds']} rounds, {meta['date']}, "
        f"{meta['duration_s']}s; {meta['cluster']}",
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_total_mb']} MB; "
        f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}",
    ]
    return "\n".join(lines)
