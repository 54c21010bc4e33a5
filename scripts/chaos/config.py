"""What a run is configured with: brokers, bounds and knobs (:class:`ChaosConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from taskiq_redis_cluster._errors import ConfigurationError

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
#: Prefix of the environment variables that configure a worker process.
ENV_PREFIX = "TQRC_CHAOS_"
#: Each worker process logs its start and readiness to this file.
EVENTS_FILE = "workers.log"
#: Seconds between two looks at a condition the harness waits for.
POLL = 0.25


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
    :param mix: ClusterStreamBroker only: besides plain kicks, kick tasks with
        a ``priority`` label (spread over the priority lanes), with a short
        ``delay`` label (0.2-1.5 s), and with both (see ``producer.kick_kind``).
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
    mix: bool = True
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
