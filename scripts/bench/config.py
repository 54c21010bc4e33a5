"""What a benchmark run does: the broker kinds and :class:`BenchConfig`."""

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
