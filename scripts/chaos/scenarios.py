"""The scenarios: each fault with its acceptance rules and defaults, and which run where."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .config import BROKERS, STREAM_BROKERS, ChaosConfig
from .faults import (
    Inject,
    failover,
    majority_down,
    master_kill,
    master_stop,
    rebalancer_kill,
    reshard,
    rolling_restart,
    slot_migrate,
    stream_del,
    worker_kill,
    worker_stop,
)


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
        kicks while the fault lasts (up to ``KICK_CAP`` times as many), so
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


#: A scenario that kicks through its fault kicks at most this many times
#: ``tasks``.
KICK_CAP = 6


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "worker-kill",
            "SIGKILL a worker with tasks in flight, start a replacement",
            worker_kill,
        ),
        Scenario(
            "worker-stop",
            "SIGSTOP a worker longer than idle_timeout, then SIGCONT",
            worker_stop,
            min_kick_window=12.0,
        ),
        Scenario("failover", "CLUSTER FAILOVER of a shard's master", failover),
        Scenario(
            "rolling-restart",
            "SIGTERM each worker in turn and restart it, under a backlog",
            rolling_restart,
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
            master_kill,
            loss_allowed="no-wait",
            min_kick_window=12.0,
        ),
        Scenario(
            "master-kill-wait1",
            "master-kill with wait_replicas=1",
            master_kill,
            wait_replicas=1,
            ours_only=True,
            min_kick_window=12.0,
        ),
        Scenario(
            "master-stop",
            "SIGSTOP a shard's master longer than the node timeout",
            master_stop,
            # As with SIGKILL: writes the master acknowledged just before it
            # stopped may not have reached the replica that is promoted.
            loss_allowed="no-wait",
            min_kick_window=12.0,
        ),
        Scenario("stream-del", "DEL a shard's stream under load", stream_del),
        Scenario("slot-migrate", "MIGRATE a shard's slot to another master", slot_migrate),
        Scenario(
            "reshard",
            "redis-cli --cluster reshard, then our rebalancer",
            reshard,
            needs_rebalancer=True,
            min_kick_window=30.0,
        ),
        Scenario(
            "rebalancer-kill",
            "reshard, SIGKILL the rebalancer mid-move, rerun it",
            rebalancer_kill,
            needs_rebalancer=True,
            ours_only=True,
            min_kick_window=45.0,
        ),
        Scenario(
            "majority-down",
            "SIGSTOP a majority of masters past the node timeout",
            majority_down,
            resume_bound=60.0,
            min_kick_window=16.0,
        ),
    )
}


#: The bounded subset CI runs on every change.
CI_SCENARIOS = ("worker-kill", "failover", "stream-del", "master-kill", "master-kill-wait1")


def rebalancer_available() -> bool:
    """True when the ``rebalance`` command is installed."""
    import importlib.util

    return importlib.util.find_spec("taskiq_redis_cluster._cli._cmd_rebalance") is not None


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
        return "the `taskiq-redis-cluster rebalance` command is not installed"
    return None


def scenario_bound(config: ChaosConfig, scenario: Scenario | None = None) -> float:
    """Upper bound in seconds of one scenario, setup and teardown included."""
    kicking = config.kick_window * (KICK_CAP if scenario and scenario.kick_through_fault else 1)
    return 120.0 + kicking + config.kick_timeout + config.effective_drain_timeout + 300.0
