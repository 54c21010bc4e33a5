"""Side-by-side benchmark: our brokers against taskiq-redis's cluster brokers.

Used by ``scripts/bench.py`` (:mod:`.cli` only parses arguments and prints).
A dev tool: it needs taskiq-redis, a dev dependency, so it is not shipped in
the wheel. This module is the controller; the other modules of the package
hold what runs elsewhere (:mod:`.worker`, :mod:`.producer`), the measurements
(:mod:`.measure`) and the report (:mod:`.report`). One run measures, on one
cluster and with unique queue names:

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
* After every broker ran: paired end-to-end rounds of the stream pair, one
  idle worker each, their rounds back to back (order alternating); the
  figure is the median of the per-pair ratios (see :meth:`_Bench.e2e_paired`).
* Every throughput/latency/spread figure is the median over ``rounds``;
  memory and the backlog drain are one measurement over the whole backlog.
* Planner time and exporter-scrape time are medians over ``rounds`` too;
  :func:`.measure.bench_scrape` is the one place to change when the
  exporter does.
* The ``scale`` phase (its own, ``--phases scale``; see
  :meth:`_Bench.run_scale`): the stream pair with W worker processes each,
  started at once: Redis CPU (``INFO CPU`` of every node) with every worker
  idle, Redis CPU per task at a paced rate of tasks doing one INCR (idle
  share subtracted), and the latency rounds above.

Phases run as :attr:`BenchConfig.phases` says: ``brokers`` is all of the
above but the scale phase.

Nothing here prints: :func:`run_bench` returns a JSON-able report and
:func:`.report.format_report` renders the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import RedisCluster

from taskiq_redis_cluster import DevClusterError
from taskiq_redis_cluster._keys import DEFAULT_PREFIX, ShardKeys
from taskiq_redis_cluster._planning._planstore import PlanStore
from taskiq_redis_cluster._redis._connection import connect, redact_url
from taskiq_redis_cluster.testing import DevCluster, find_free_base_port

from .config import APP_MODULE, ENV_PREFIX, LABELS, PAIRS, BenchConfig
from .measure import (
    bench_planner,
    bench_scrape,
    client_counts,
    command_calls,
    cpu_per_task_us,
    cpu_used,
    key_memory,
    know_every_node,
    median,
    memory,
    per_100k,
    percentile,
    prime_replication_backlogs,
    redis_cpu,
    spread,
)
from .report import ratios, scale_ratios, targets
from .worker import APP_SOURCE

logger = logging.getLogger("taskiq_redis_cluster.bench")

#: This package's import name and the directory it is imported from: the
#: producer and worker processes import the harness from the same place.
_PACKAGE = __name__.rpartition(".")[0]
_IMPORT_ROOT = Path(__file__).resolve().parents[_PACKAGE.count(".") + 1]
_POLL = 0.02


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


def _check_alive(workers: Sequence[_Child]) -> None:
    for w in workers:
        if w.proc.returncode is not None:
            raise BenchError(f"{w.name} exited; see {w.log}")


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
    what: str,
    check: Callable[[], bool],
    timeout: float,
    child: _Child | Sequence[_Child] | None = None,
) -> None:
    """Poll ``check`` until it holds; fail when it times out or a watched child exits."""
    watched = [child] if isinstance(child, _Child) else list(child or ())
    deadline = time.monotonic() + timeout
    while not check():
        for c in watched:
            if c.proc.returncode is not None:
                raise BenchError(f"{c.name} exited while waiting for {what}; see {c.log}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(_POLL)


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
        # One key for every INCR of the scale phase: hash-tagged, so it lives on
        # the same master for both brokers and every W (cleanup() matches it).
        self.incr_key = f"{{bench-{self.run_id}-incr}}:n"
        # Seconds to let memory settle before it is read: Redis shrinks the
        # query buffers of clients idle for 2 s. Quick runs read sooner.
        self._settle = 1.0 if cfg.quick else 2.2

    def _env(
        self,
        kind: str,
        queue: str,
        stats: Path,
        slow_flag: Path | None = None,
        *,
        scale: bool = False,
    ) -> dict[str, str]:
        """The environment of ``kind``'s producer and workers.

        With ``scale`` (the scale phase): the brokers' own housekeeping
        defaults (no ``IDLE_MS``/``TRIM_INTERVAL``; the short ones here are
        for the recovery and memory phases), the same ``xread_block``, and
        the key the ``incr`` task increments.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.app_dir), str(_IMPORT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(
            {
                ENV_PREFIX + "BROKER": kind,
                ENV_PREFIX + "URL": self.url,
                ENV_PREFIX + "QUEUE": queue,
                ENV_PREFIX + "STATS": str(stats),
                ENV_PREFIX + "XREAD_BLOCK_MS": str(self.cfg.xread_block_ms),
                ENV_PREFIX + "CONCURRENCY": str(self.cfg.concurrency),
            }
        )
        if scale:
            env[ENV_PREFIX + "INCR_KEY"] = self.incr_key
        else:
            env[ENV_PREFIX + "IDLE_MS"] = str(self.cfg.idle_timeout_ms)
            env[ENV_PREFIX + "TRIM_INTERVAL"] = str(self.cfg.trim_interval)
        if slow_flag is not None:
            env[ENV_PREFIX + "SLOW_FLAG"] = str(slow_flag)
        return env

    async def _producer(self, name: str, env: dict[str, str]) -> _Producer:
        code = f"from {_PACKAGE}.producer import producer_main; producer_main()"
        child = await self.procs.spawn(name, [sys.executable, "-c", code], env, pipes=True)
        producer = _Producer(child)
        await producer.read(timeout=60.0)  # "ready"
        return producer

    async def _worker(self, name: str, env: dict[str, str], stats_dir: Path) -> _Child:
        (child,) = await self._workers([name], env, stats_dir)
        return child

    async def _workers(
        self, names: Sequence[str], env: dict[str, str], stats_dir: Path
    ) -> list[_Child]:
        """Start one ``taskiq worker --workers 1`` per name, all at once; wait for all.

        Ready means WORKER_STARTUP ran in as many new processes as were
        started (each writes its stats file then). A child that exits or a
        start slower than 60 s plus 4 s per process fails the run; children
        already started stay registered, so the run's teardown ends them.
        """
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
        children = list(
            await asyncio.gather(*(self.procs.spawn(name, argv, env) for name in names))
        )

        def ready() -> bool:
            return len(set(_read_stats(stats_dir).workers) - before) >= len(names)

        what = f"worker {names[0]} to start" if len(names) == 1 else f"{len(names)} workers"
        await _wait_for(what, ready, 60.0 + 4.0 * (len(names) - 1), children)
        # WORKER_STARTUP runs just before the listen loop begins.
        await asyncio.sleep(0.3)
        return children

    def _queue(
        self, kind: str, tag: str = "", *, scale: bool = False
    ) -> tuple[str, Path, dict[str, str]]:
        """A fresh queue for ``kind`` (cleaned up at the end), its stats dir and env.

        ``tag`` tells apart the queues of one kind (paired rounds, scale points).
        """
        short = kind.replace("ours-", "o").replace("theirs-", "t")
        queue = f"bench-{self.run_id}-{tag}{short}"
        self.queues.append(queue)
        stats_dir = self.work / f"stats-{kind}{'-' + tag if tag else ''}"
        stats_dir.mkdir()
        return queue, stats_dir, self._env(kind, queue, stats_dir, scale=scale)

    async def run_broker(self, kind: str) -> dict[str, Any]:
        """Every phase for one broker kind, on a queue of its own."""
        queue, stats_dir, env = self._queue(kind)
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
            result.update(e2e_1w_tps=median(rounds), e2e_1w_tps_rounds=rounds)
            workers.append(await self._worker(f"{kind}-w2", env, stats_dir))
            logger.info("%s: end to end, 2 workers, %d rounds", kind, self.cfg.rounds)
            rounds = [
                await self._e2e_round(producer, stats_dir, n, workers)
                for _ in range(self.cfg.rounds)
            ]
            result.update(e2e_2w_tps=median(rounds), e2e_2w_tps_rounds=rounds)
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

    async def e2e_paired(self, ours: str, theirs: str) -> dict[str, Any]:
        """End to end with one worker each, the two brokers' rounds alternating.

        The per-broker end-to-end medians come from rounds minutes apart,
        and this machine's speed drifts by 15-30 % over such spans: the
        ratio of the medians moved between 1.7x and 2.5x for the same code.
        Here each pair of rounds runs back to back (which goes first
        alternates), and the figure is the median of the per-pair ratios.
        """
        sides: dict[str, tuple[_Producer, Path, list[_Child]]] = {}
        try:
            for kind in (ours, theirs):
                _, stats_dir, env = self._queue(kind, "p")
                producer = await self._producer(f"{kind}-paired-producer", env)
                sides[kind] = (producer, stats_dir, [])
                sides[kind][2].append(await self._worker(f"{kind}-paired", env, stats_dir))
            n = self.cfg.count(self.cfg.kick_total, minimum=self.cfg.concurrency)
            logger.info("%s vs %s: paired end to end, %d rounds", ours, theirs, self.cfg.rounds)
            rounds: list[dict[str, float | None]] = []
            for r in range(self.cfg.rounds):
                tps: dict[str, float] = {}
                for kind in (ours, theirs) if r % 2 == 0 else (theirs, ours):
                    producer, stats_dir, workers = sides[kind]
                    tps[kind] = await self._e2e_round(producer, stats_dir, n, workers)
                ratio = round(tps[ours] / tps[theirs], 3) if tps[theirs] > 0 else None
                rounds.append({"ours_tps": tps[ours], "theirs_tps": tps[theirs], "ratio": ratio})
            measured = [r["ratio"] for r in rounds if r["ratio"] is not None]
            return {"ours": ours, "theirs": theirs, "rounds": rounds,
                    "ratio": median(measured) if measured else None}
        finally:
            for producer, _, workers in sides.values():
                for w in workers:
                    await self.procs.stop(w, grace=0)
                await producer.quit()
                await self.procs.stop(producer.child, grace=10.0)

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
        median_spread = median(spreads) or 0.0
        closest = min(range(len(spreads)), key=lambda i: abs(spreads[i] - median_spread))
        return {
            "kick_tps": median(kicks),
            "kick_tps_rounds": kicks,
            "kick_cpu_us_per_kick": median(kick_cpu),
            "kick_errors": errors,
            "spread_max_mean": median_spread,
            "spread_rounds": spreads,
            "ops_per_master": per_master[closest],
            "memory_tasks": backlog,
            "memory_queued_bytes": max(0, queued),
            "memory_queued_per_100k_bytes": per_100k(queued, backlog),
            "keys_queued_per_100k_bytes": per_100k(keys, backlog),
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
            "latency_p50_ms": median(p50s),
            "latency_p99_ms": median(p99s),
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
        _check_alive(workers)
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
            "recovery_s": median(times),
            "recovery_rounds": times,
            "recovery_note": f"all {k} held tasks ran again",
        }

    # ---------------------------------------------------------- scale phase
    async def run_scale(self) -> dict[str, Any]:
        """The stream pair with W worker processes each, for every W of the config.

        For each W and broker (which goes first alternates, as in the
        paired rounds, so a pair is measured minutes apart at most):
        :meth:`_scale_point` on a fresh queue. Last, one idle window with no
        bench process at all: the cluster's own baseline.
        """
        cfg = self.cfg
        kinds = [k for k in PAIRS["stream"] if k in cfg.brokers]
        points: dict[str, dict[str, Any]] = {}
        for i, w in enumerate(cfg.scale_workers):
            order = kinds if i % 2 == 0 else kinds[::-1]
            done = {kind: await self._scale_point(kind, w) for kind in order}
            points[str(w)] = {kind: done[kind] for kind in kinds}
        # Last, once the cluster is warm (a fresh one is busier for a while).
        await asyncio.sleep(cfg.scale_settle_seconds)
        logger.info("scale: baseline without workers, %.0fs idle", cfg.scale_idle_seconds)
        baseline = await self._idle_window([])
        for count, by_kind in points.items():
            for point in by_kind.values():
                # What the W processes keep blocked, net of whatever else is there.
                blocked = point["blocked_clients"] - baseline["blocked_clients"]
                point["blocked_per_worker"] = round(blocked / int(count), 2)
        return {
            "brokers": kinds,
            "workers": list(cfg.scale_workers),
            "settings": {
                "xread_block_ms": cfg.xread_block_ms,
                "broker_options": "otherwise each broker's defaults",
                "load_tasks": cfg.scale_load_tasks(),
                "latency_seconds": cfg.latency_seconds * cfg.scale,
                "incr_key": self.incr_key,
            },
            "baseline": baseline,
            "points": points,
        }

    async def _scale_point(self, kind: str, w: int) -> dict[str, Any]:
        """``w`` worker processes of ``kind``: idle Redis CPU, CPU per task, latency."""
        cfg = self.cfg
        queue, stats_dir, env = self._queue(kind, f"s{w}", scale=True)
        producer = await self._producer(f"{kind}-s{w}-producer", env)
        workers: list[_Child] = []
        try:
            logger.info("scale: %s, W=%d: starting the worker processes", kind, w)
            started = time.monotonic()
            workers = await self._workers([f"{kind}-s{w}-w{i}" for i in range(w)], env, stats_dir)
            result: dict[str, Any] = {
                "workers": w,
                "queue": queue,
                "start_s": round(time.monotonic() - started, 2),
                "pinged": await self._ping_all(kind, producer, stats_dir, workers),
            }
            await asyncio.sleep(cfg.scale_settle_seconds)
            logger.info("scale: %s, W=%d: idle for %.0fs", kind, w, cfg.scale_idle_seconds)
            idle = await self._idle_window(workers)
            result.update(idle)
            result.update(await self._paced_load(kind, producer, stats_dir, workers, idle))
            result.update(await self._latency_phase(kind, producer, stats_dir))
            _check_alive(workers)
        finally:
            # Nothing in flight: SIGTERM (taskiq stops within --shutdown-timeout),
            # SIGKILL of the process group after the grace, all at once.
            await asyncio.gather(*(self.procs.stop(c, grace=3.0) for c in workers))
            await producer.quit()
            await self.procs.stop(producer.child, grace=10.0)
        return result

    async def _ping_all(
        self, kind: str, producer: _Producer, stats_dir: Path, workers: Sequence[_Child]
    ) -> int:
        """Ping tasks until every worker process ran one; returns how many did.

        A ping proves the process consumes (and opens its INCR connection).
        Blocked readers are served oldest first, and ours blocks one reader
        per shard, so each round kicks a few pings per process still missing.
        Bounded: after 30 s plus 1 s per process the run goes on with a warning.
        """
        deadline = time.monotonic() + 30.0 + len(workers)
        rate = 500.0
        round_no = 0
        while True:
            stats = _read_stats(stats_dir)
            pinged = sum(1 for w in stats.workers.values() if w.get("pings"))
            missing = len(workers) - pinged
            if missing <= 0 or time.monotonic() > deadline:
                break
            count = 4 * missing + 12
            await producer.request(
                60.0, op="rate", task="ping", round=round_no, rate=rate, seconds=count / rate
            )
            round_no += 1
            await asyncio.sleep(0.3)  # the pings run; the stats files follow within 50 ms
            _check_alive(workers)
        if missing > 0:
            logger.warning(
                "%s: %d of %d worker processes ran no ping in time; measuring anyway",
                kind,
                missing,
                len(workers),
            )
        return min(pinged, len(workers))

    async def _idle_window(self, workers: Sequence[_Child]) -> dict[str, Any]:
        """Redis CPU per second over ``scale_idle_seconds``, and the clients after it."""
        before = await redis_cpu(self.client)
        await asyncio.sleep(self.cfg.scale_idle_seconds)
        after = await redis_cpu(self.client)
        clients = await client_counts(self.client)
        _check_alive(workers)
        used = cpu_used(before, after)
        per_s = 1000.0 / used["seconds"]
        main = used["main_thread_s"]
        return {
            "idle_seconds": round(used["seconds"], 3),
            "idle_cpu_ms_per_s": round(used["all_s"] * per_s, 3),
            "idle_cpu_hottest_master_ms_per_s": round(used["hottest_master_s"] * per_s, 3),
            "idle_cpu_main_thread_ms_per_s": None if main is None else round(main * per_s, 3),
            "idle_cpu_per_node_ms_per_s": {
                n: round(v * per_s, 3) for n, v in used["per_node_s"].items()
            },
            **clients,
        }

    async def _paced_load(
        self,
        kind: str,
        producer: _Producer,
        stats_dir: Path,
        workers: Sequence[_Child],
        idle: dict[str, Any],
    ) -> dict[str, Any]:
        """Redis CPU per task at ``scale_load_rate`` tasks/s of one INCR each.

        From just before the first kick until the last task ran, minus the
        idle share (the idle window's CPU per second times that duration):
        summed over every node, and for the master that the load heated most.
        """
        cfg = self.cfg
        rate = cfg.scale_load_rate
        seconds = cfg.scale_load_tasks() / rate
        logger.info("scale: %s, W=%d: %.0f tasks/s for %.1fs", kind, len(workers), rate, seconds)
        base = _read_stats(stats_dir).total("done")
        before = await redis_cpu(self.client)
        reply = await producer.request(
            seconds + 60.0, op="rate", task="incr", round=0, rate=rate, seconds=seconds
        )
        expected = base + int(reply["count"]) - int(reply["errors"])

        def finished() -> bool:
            return _read_stats(stats_dir).total("done") >= expected

        await _wait_for(f"{kind} paced load", finished, 30.0 + seconds, workers)
        after = await redis_cpu(self.client)
        used = cpu_used(before, after)
        tasks = expected - base
        if reply["errors"]:
            logger.warning("%s: %d of %d kicks failed", kind, reply["errors"], reply["count"])
        idle_node = idle["idle_cpu_per_node_ms_per_s"]
        per_master = [
            cpu_per_task_us(v, idle_node.get(n, 0.0) / 1000, used["seconds"], tasks)
            for n, v in used["per_node_s"].items()
            if n in after.masters
        ]
        return {
            "load_rate": rate,
            "load_tasks": tasks,
            "load_kick_errors": int(reply["errors"]),
            "load_kick_seconds": round(float(reply["elapsed"]), 3),
            "load_seconds": round(used["seconds"], 3),
            "load_cpu_ms": round(used["all_s"] * 1000, 3),
            "load_cpu_us_per_task": cpu_per_task_us(
                used["all_s"], idle["idle_cpu_ms_per_s"] / 1000, used["seconds"], tasks
            ),
            "load_cpu_hottest_master_us_per_task": max(
                (v for v in per_master if v is not None), default=None
            ),
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
            brokers: dict[str, dict[str, Any]] = {}
            paired: dict[str, dict[str, Any]] = {}
            planner: dict[str, Any] | None = None
            scrape: dict[str, Any] | None = None
            scale: dict[str, Any] | None = None
            await prime_replication_backlogs(client, bench.run_id)
            if "brokers" in cfg.phases:
                for kind in cfg.brokers:
                    brokers[kind] = await bench.run_broker(kind)
                ours, theirs = PAIRS["stream"]
                if ours in brokers and theirs in brokers:
                    paired["stream"] = await bench.e2e_paired(ours, theirs)
                logger.info("Planner and scrape timings")
                planner = bench_planner(cfg.planner_shards, cfg.planner_masters, cfg.rounds)
                scrape = await bench_scrape(
                    client, url, bench.run_id, cfg.scrape_queues, cfg.scrape_shards, cfg.rounds
                )
                bench.queues.extend(scrape.pop("queue_names"))
            if "scale" in cfg.phases:
                # Redis CPU is summed over every node, replicas included.
                nodes = await know_every_node(client)
                scale = await bench.run_scale()
                scale["nodes"] = nodes
                scale["ratios"] = scale_ratios(scale)
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
                "phases": list(cfg.phases),
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
            "paired": paired,
            "planner": planner,
            "scrape": scrape,
            "scale": scale,
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
