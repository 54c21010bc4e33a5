"""The controller: runs scenarios (:func:`run_scenario`, :func:`run_suite`).

Shared by ``scripts/chaos.py`` (:mod:`.cli`) and the fault tests. One
*scenario* runs like this:

1. the cluster is healed, a fresh queue name is chosen;
2. ``N`` ``taskiq worker`` processes start (``--workers 1`` each, own
   process group), their broker built by :func:`.worker.worker_broker` from
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
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from taskiq_redis_cluster._errors import ConfigurationError
from taskiq_redis_cluster._redis import connect
from taskiq_redis_cluster.testing import DevCluster, throwaway_cluster

from .config import POLL, ChaosConfig
from .faults import ScenarioContext
from .ledger import Execution, read_executions
from .probes import (
    dead_letter_count,
    dead_letter_keys,
    delayed_count,
    queue_depth,
    stream_keys,
)
from .processes import WorkerPool, worker_env
from .producer import Kick, KickEvents, produce, producer_broker, short_error
from .report import ScenarioResult, analyse, by_kind
from .scenarios import KICK_CAP, SCENARIOS, Scenario, scenario_bound, skip_reason

logger = logging.getLogger(__name__)


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
        result.status, result.reason = "error", short_error(exc)
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
    kick_events = KickEvents()
    producer = producer_broker(cluster.url, queue, config, kick_events)
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
        count = config.tasks * (KICK_CAP if scenario.kick_through_fault else 1)
        ids = [f"{scenario.name}-{i:06d}" for i in range(count)]
        kicking = produce(
            producer, ids, config.rate, config.kick_timeout,
            record=ctx.kicks, stop_after=config.tasks, stop=fault_over,
            mix=config.mix and config.broker == "ours",
        )  # fmt: skip
        kicks_task = asyncio.ensure_future(kicking)
        try:
            await asyncio.sleep(config.fault_at)
            try:
                await scenario.inject(ctx)
            except Exception as exc:
                logger.exception("Fault injection of %s failed", scenario.name)
                ctx.violations.append(f"fault injection failed: {short_error(exc)}")
            finally:
                fault_over.set()
            kicks = await kicks_task
        finally:
            if not kicks_task.done():
                kicks_task.cancel()
                await asyncio.gather(kicks_task, return_exceptions=True)
        acked = {k.task_id for k in kicks if k.outcome == "acked"}
        # Delayed tasks run once due: no verdict before the last one is.
        due = max((k.due for k in kicks if k.outcome == "acked"), default=0.0)
        await _drain(
            directory, acked, config.effective_drain_timeout, config.drain_stall, not_before=due
        )
        await asyncio.sleep(config.settle)
        result.queued_end, result.pending_end = await queue_depth(
            admin, config.broker, await stream_keys(producer, queue)
        )
        if config.broker == "ours":
            try:
                dead = set(await dead_letter_keys(producer)) | set(dead_keys_at_start)
                result.dead_lettered = await dead_letter_count(admin, dead)
            except Exception as exc:
                ctx.notes.append(f"dead letters not counted: {short_error(exc)}")
            with contextlib.suppress(Exception):
                result.delayed_end = await delayed_count(producer, admin)
        _fill(result, ctx, kicks, read_executions(directory), pool, scenario)
        if config.broker != "taskiq-redis":
            result.rerouted = kick_events.rerouted_count
    finally:
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        await pool.stop_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.shutdown(), 20)
        with contextlib.suppress(Exception):
            await admin.aclose()


async def _monitor(pool: WorkerPool) -> None:
    # Notices (and logs) unexpected worker exits while the scenario runs.
    while True:
        pool.unexpected_exits()
        await asyncio.sleep(0.5)


async def _drain(
    directory: Path,
    acked: set[str],
    timeout: float,
    stall: float | None = None,
    *,
    not_before: float = 0.0,
) -> None:
    """Wait until every acked task ran, at most ``timeout`` seconds, and at
    most ``stall`` seconds without any new execution (if set); but never
    give up before the Unix time ``not_before`` (the last delayed task's
    due time) plus ``stall`` or, without it, a few seconds."""
    now = time.monotonic()
    # The wait starts counting once the last delayed task is due.
    wait_due = max(0.0, not_before - time.time())
    deadline = now + wait_due + timeout
    due_at = now + wait_due + (stall if stall is not None else 5.0)
    runs, last_progress = -1, now
    for _ in range(int((wait_due + timeout) / POLL) + 2):
        executions = read_executions(directory)
        if acked <= {e.task_id for e in executions}:
            return
        now = time.monotonic()
        if len(executions) != runs:
            runs, last_progress = len(executions), now
        stalled = stall is not None and now - last_progress >= stall
        if now >= deadline or (stalled and now >= due_at):
            return
        await asyncio.sleep(POLL)


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
    result.kick_stall_s = _round(max((k.finished - k.started for k in kicks), default=0.0))
    result.acked, result.failed, result.unknown = counts.acked, counts.failed, counts.unknown
    result.executed, result.executions = counts.executed, counts.executions
    result.lost, result.destroyed = len(counts.lost), len(counts.destroyed)
    result.duplicates, result.phantoms = counts.duplicates, len(counts.phantoms)
    result.unknown_executed = counts.unknown_executed
    result.resume_s = _round(counts.resume_s)
    result.stall_s = _round(counts.stall_s)
    result.done_s = _round(counts.done_s)
    result.lost_sample = sorted(counts.lost)[:10]
    result.kinds = by_kind(kicks, executions, counts.lost)
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
            "xread_block", "wait_replicas", "worker_args", "mix")  # fmt: skip
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
