"""Worker side: the generated app module, broker selection and the recorder.

Everything here runs inside the ``taskiq worker`` processes the bench starts
(and the producer, which imports the same app module to kick its tasks).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from redis.asyncio import RedisCluster

from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker

from .config import ENV_PREFIX

_FLUSH_INTERVAL = 0.05

APP_SOURCE = '''\
"""Worker app of the taskiq-redis-cluster benchmark (generated; safe to delete).

The broker is chosen by TQRC_BENCH_* environment variables. The tasks only
record what happened in this process; a background flusher writes that to a
file every 50 ms, so measuring costs no Redis commands.
"""

import asyncio
import time

from {package}.worker import Recorder, broker_from_env

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


@broker.task(task_name="bench.ping")
async def ping(kicked_at: float, round_no: int) -> None:
    await recorder.ping()


@broker.task(task_name="bench.incr")
async def incr(kicked_at: float, round_no: int) -> None:
    await recorder.incr()


@broker.task(task_name="bench.slow")
async def slow(kicked_at: float, token: int) -> None:
    if recorder.slow_mode():
        recorder.slow_started()
        await asyncio.sleep(300)
    else:
        recorder.rerun()
'''


def broker_from_env() -> Any:
    """Build the broker named by ``TQRC_BENCH_BROKER`` (see :data:`BROKERS`).

    ``IDLE_MS`` and ``TRIM_INTERVAL`` left unset (the ``scale`` phase) mean
    the broker's defaults.
    """
    kind = os.environ[ENV_PREFIX + "BROKER"]
    url = os.environ[ENV_PREFIX + "URL"]
    queue = os.environ[ENV_PREFIX + "QUEUE"]
    block_ms = int(os.environ.get(ENV_PREFIX + "XREAD_BLOCK_MS", "1000"))
    if kind == "ours-stream":
        housekeeping: dict[str, Any] = {}
        if ENV_PREFIX + "IDLE_MS" in os.environ:
            housekeeping["idle_timeout"] = int(os.environ[ENV_PREFIX + "IDLE_MS"])
        if ENV_PREFIX + "TRIM_INTERVAL" in os.environ:
            housekeeping["trim_interval"] = float(os.environ[ENV_PREFIX + "TRIM_INTERVAL"])
        return ClusterStreamBroker(url, queue_name=queue, xread_block=block_ms, **housekeeping)
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

    def __init__(
        self,
        stats_dir: Path,
        slow_flag: Path | None,
        url: str | None = None,
        incr_key: str | None = None,
    ) -> None:
        self.stats_dir = stats_dir
        self.slow_flag = slow_flag
        # The ``scale`` phase's tasks INCR this key with a cluster client of
        # their own, connected at startup (not inside a measured window).
        self.url = url
        self.incr_key = incr_key
        self._redis: RedisCluster | None = None
        self.warm = 0
        self.pings = 0
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
        flag = os.environ.get(ENV_PREFIX + "SLOW_FLAG")
        recorder = cls(
            Path(os.environ[ENV_PREFIX + "STATS"]),
            Path(flag) if flag else None,
            url=os.environ.get(ENV_PREFIX + "URL"),
            incr_key=os.environ.get(ENV_PREFIX + "INCR_KEY"),
        )
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

    async def ping(self) -> None:
        """The readiness check: this process consumes (and has its INCR connection)."""
        if self._redis is not None and self.incr_key is not None:
            await self._redis.incr(self.incr_key + ":ping")
        self.pings += 1
        self._dirty = True

    async def incr(self) -> None:
        """One INCR, then counted like a no-op task."""
        assert self._redis is not None, "no INCR client (TQRC_BENCH_INCR_KEY unset)"
        assert self.incr_key is not None
        await self._redis.incr(self.incr_key)
        self.noop_done()

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
            "pings": self.pings,
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
        if self.incr_key is not None and self.url is not None:
            self._redis = RedisCluster.from_url(self.url)
            await self._redis.initialize()
        self.ready_at = time.time()
        self.flush()
        self._flusher = asyncio.get_running_loop().create_task(self._loop())

    async def _on_shutdown(self, state: Any) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.flush()
        if self._redis is not None:
            await self._redis.aclose()
