"""What a benchmark run does: the broker kinds, the phases and :class:`BenchConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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

#: What a run can do. ``brokers``: every figure per broker kind, the paired
#: end-to-end rounds, the planner and scrape timings (the default run).
#: ``scale``: the stream pair with W worker processes each (Redis CPU idle and
#: per task, latency); its own phase because a full one takes about as long
#: as the ``brokers`` phase.
PHASES = ("brokers", "scale")
DEFAULT_PHASES = ("brokers",)
#: Worker process counts of the ``scale`` phase (full run, quick run).
SCALE_WORKERS = (1, 4, 16, 32)
QUICK_SCALE_WORKERS = (1, 2)
#: The most worker processes the ``scale`` phase starts for one point.
MAX_SCALE_WORKERS = 64

APP_MODULE = "tqrc_bench_app"
#: Prefix of the environment variables that configure producers and workers.
ENV_PREFIX = "TQRC_BENCH_"


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run does; :meth:`make` fills in the mode defaults.

    :param quick: the CI mode (fewer tasks and rounds; under two minutes).
    :param rounds: rounds per figure; each figure is the median.
    :param scale: multiplies every task count and the latency duration.
    :param url: use this cluster instead of starting a local one.
    :param brokers: which of :data:`BROKERS` to run.
    :param phases: which of :data:`PHASES` to run.
    :param scale_workers: the worker process counts W of the ``scale`` phase.

    The ``scale_*`` windows: every worker idle for ``scale_idle_seconds``
    (after ``scale_settle_seconds``; not scaled by :attr:`scale`), then
    ``scale_load_rate`` tasks/s for ``scale_load_seconds`` (scaled).
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
    phases: tuple[str, ...] = DEFAULT_PHASES
    scale_workers: tuple[int, ...] = SCALE_WORKERS
    scale_settle_seconds: float = 3.0
    scale_idle_seconds: float = 10.0
    scale_load_rate: float = 1000.0
    scale_load_seconds: float = 10.0

    @classmethod
    def make(
        cls,
        *,
        quick: bool = False,
        rounds: int | None = None,
        scale: float = 1.0,
        url: str | None = None,
        brokers: Sequence[str] | None = None,
        phases: Sequence[str] | None = None,
        scale_workers: Sequence[int] | None = None,
    ) -> BenchConfig:
        """The full or quick configuration, with overrides."""
        base = cls(
            quick=quick,
            rounds=3 if quick else 5,
            kick_total=3_000 if quick else 20_000,
            latency_seconds=1.5 if quick else 5.0,
            recovery_rounds=1 if quick else 3,
            recovery_wait=10.0 if quick else 15.0,
            scale_workers=QUICK_SCALE_WORKERS if quick else SCALE_WORKERS,
            scale_settle_seconds=1.0 if quick else 3.0,
            scale_idle_seconds=3.0 if quick else 10.0,
            scale_load_rate=200.0 if quick else 1000.0,
            scale_load_seconds=2.0 if quick else 10.0,
        )
        chosen = tuple(brokers) if brokers else BROKERS
        unknown = sorted(set(chosen) - set(BROKERS))
        if unknown:
            raise ValueError(f"unknown broker kinds {unknown}; choose from {list(BROKERS)}")
        if scale <= 0:
            raise ValueError("scale must be > 0")
        chosen_phases = tuple(phases) if phases else DEFAULT_PHASES
        unknown = sorted(set(chosen_phases) - set(PHASES))
        if unknown:
            raise ValueError(f"unknown phases {unknown}; choose from {list(PHASES)}")
        if "scale" in chosen_phases and not set(PAIRS["stream"]) & set(chosen):
            raise ValueError("the scale phase needs ours-stream or theirs-stream in the brokers")
        workers = tuple(sorted(set(scale_workers))) if scale_workers else base.scale_workers
        if not all(1 <= w <= MAX_SCALE_WORKERS for w in workers):
            raise ValueError(f"scale worker counts must be 1..{MAX_SCALE_WORKERS}")
        return replace(
            base,
            rounds=max(1, rounds if rounds is not None else base.rounds),
            scale=scale,
            url=url,
            brokers=tuple(b for b in BROKERS if b in chosen),
            phases=tuple(p for p in PHASES if p in chosen_phases),
            scale_workers=workers,
        )

    def count(self, value: float, minimum: int = 1) -> int:
        """``value`` times :attr:`scale`, rounded, at least ``minimum``."""
        return max(minimum, round(value * self.scale))

    def scale_load_tasks(self) -> int:
        """Tasks of one paced-load window of the ``scale`` phase (at least one second's)."""
        return self.count(
            self.scale_load_rate * self.scale_load_seconds, minimum=round(self.scale_load_rate)
        )
