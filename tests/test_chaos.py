"""The fault-injection harness (scripts/chaos/) and its CI subset.

The CI subset runs real ``taskiq worker`` processes against a cluster of
this module's own (the faults are destructive): worker SIGKILL, CLUSTER
FAILOVER, DEL of a shard's stream, and SIGKILL of a master with and without
``wait_replicas=1``. These are also the issue-4 acceptance checks for the
stream DEL, failover and master kill under load; tests/test_stream_faults.py
has the remaining ones (50 tasks in flight, slot migration, XADD spread).

The quick rolling restart (issue 13) runs both the stream and the list
broker: three workers at taskiq's default 100 concurrent tasks, each
SIGTERMed and restarted in turn while a backlog waits; nothing acked may be
lost, and the stream dead-letters nothing.

Every test is bounded: small task counts, short idle_timeout, and each
scenario has its own time bound which the harness enforces.

The harness is a dev tool under scripts/ (like the bench), so it is imported
from there; the installed CLI must not offer it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import chaos

from taskiq_redis_cluster.testing import DevCluster

ROOT = Path(__file__).resolve().parent.parent
# The chaos harness is a dev tool under scripts/, not part of the installed package.
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from chaos.config import ChaosConfig  # noqa: E402
from chaos.harness import _drain, chaos_cluster, run_scenario  # noqa: E402
from chaos.ledger import Execution  # noqa: E402
from chaos.producer import KINDS, Kick, kick_kind  # noqa: E402
from chaos.report import ScenarioResult, analyse, by_kind, format_table  # noqa: E402
from chaos.scenarios import CI_SCENARIOS, SCENARIOS, skip_reason  # noqa: E402
from chaos.worker import task_sleep  # noqa: E402

#: Small and quick: about 10-15 s per scenario on 2 cores.
CI_CONFIG = ChaosConfig(
    tasks=240, rate=30.0, workers=2, idle_timeout=2000, xread_block=500, task_sleep=0.1
)


#: Quick rolling restart: at least 4000 tasks (the full run: 15000) at
#: 1000/s, more while the restarts last (the producer kicks until the last
#: replacement is up). About 25-35 s per broker on 2 cores.
ROLLING_QUICK = {"tasks": 4000, "fault_after": 1.0, "drain_stall": 10.0}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chaos_cluster_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[DevCluster]:
    """A 3+3 cluster of this module only, on free ports."""
    async with chaos_cluster(tmp_path_factory.mktemp("chaos-cluster")) as cluster:
        yield cluster


# ------------------------------------------------------------------ pure


def _kick(task_id: str, outcome: str = "acked", at: float = 0.0) -> Kick:
    return Kick(task_id, at, at + 0.01, outcome)


def test_analyse_counts_lost_duplicates_and_phantoms() -> None:
    kicks = [
        _kick("a"), _kick("b"), _kick("c"), _kick("u", "unknown"), _kick("v", "unknown"),
        _kick("f", "failed"),
    ]  # fmt: skip
    runs = [
        Execution("a", 10.0, 1), Execution("a", 11.0, 2),  # duplicate
        Execution("b", 12.0, 1),
        Execution("u", 13.0, 1),  # unknown outcome that ran: not a phantom
        Execution("f", 14.0, 1),  # "certainly not enqueued" but ran: phantom
        Execution("zzz", 15.0, 1),  # never kicked: phantom
    ]  # fmt: skip
    counts = analyse(kicks, runs, fault_start=9.0, fault_end=11.5)
    assert counts.acked == 3
    assert counts.unknown == 2
    assert counts.failed == 1
    assert counts.lost == frozenset({"c"})
    assert counts.duplicates == 1
    assert counts.phantoms == frozenset({"f", "zzz"})
    assert counts.unknown_executed == 1
    assert counts.executed == 5
    assert counts.executions == 6
    assert counts.resume_s == pytest.approx(0.5)
    assert counts.stall_s == pytest.approx(1.0)
    assert counts.done_s is None  # "c" never ran


def test_analyse_excludes_tasks_the_fault_deleted() -> None:
    kicks = [_kick("old", at=1.0), _kick("new", at=5.0), _kick("later", at=6.0)]
    runs = [Execution("later", 7.0, 1)]
    counts = analyse(kicks, runs, fault_start=4.0, fault_end=4.0, destroyed_before=4.5)
    assert counts.destroyed == frozenset({"old"})
    assert counts.lost == frozenset({"new"})


def test_kick_mix_has_every_kind_with_short_delays_and_lanes() -> None:
    kinds = [kick_kind(f"t-{i:06d}") for i in range(2000)]
    share = {kind: sum(k == kind for k, _ in kinds) / len(kinds) for kind in KINDS}
    assert share == pytest.approx(
        {"plain": 3 / 8, "priority": 1 / 4, "delayed": 1 / 4, "delayed+priority": 1 / 8},
        abs=0.04,
    )
    delays = [labels["delay"] for _, labels in kinds if "delay" in labels]
    assert 0.2 <= min(delays) < 0.3
    assert 1.4 < max(delays) <= 1.5
    # Priorities 1-9: lanes 1 and 2 with the broker's defaults (lane 0 is plain).
    assert {labels["priority"] for _, labels in kinds if "priority" in labels} == set(range(1, 10))
    assert kick_kind("t-000001") == kinds[1]  # fixed by the id


def test_counts_by_kind_and_the_table_line() -> None:
    kicks = [
        Kick("p", 0.0, 0.1, "acked"),
        Kick("d", 0.0, 0.1, "acked", kind="delayed", delay=1.0),
        Kick("q", 0.0, 0.1, "acked", kind="priority"),
        Kick("x", 0.0, 0.1, "failed", kind="priority"),
    ]
    runs = [Execution("p", 1.0, 1), Execution("q", 1.0, 1)]
    counts = analyse(kicks, runs)
    kinds = by_kind(kicks, runs, counts.lost)
    assert kinds == {
        "plain": {"kicked": 1, "acked": 1, "executed": 1, "lost": 0},
        "priority": {"kicked": 2, "acked": 1, "executed": 1, "lost": 0},
        "delayed": {"kicked": 1, "acked": 1, "executed": 0, "lost": 1},
    }
    assert kicks[1].due == pytest.approx(1.1)
    result = ScenarioResult("worker-kill", "ours", 0, kinds=kinds)
    assert "worker-kill [ours] by kind: plain 1/1 ran, 0 lost; priority 1/1 ran, 0 lost; " \
        "delayed 0/1 ran, 1 lost" in format_table([result])


async def test_drain_waits_for_the_last_delayed_task_to_come_due(tmp_path: Path) -> None:
    # A stall bound alone would give up before a delayed task is due.
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _drain(tmp_path, {"late"}, timeout=5.0, stall=0.2, not_before=time.time() + 1.0)
    assert loop.time() - started >= 1.0
    started = loop.time()
    await _drain(tmp_path, {"late"}, timeout=5.0, stall=0.2)
    assert loop.time() - started < 1.0


def _check_kinds(result: ScenarioResult) -> None:
    """The stream broker's mix: every kind kicked, none lost, none left delayed."""
    assert set(result.kinds) == set(KINDS), result.kinds
    assert all(c["lost"] == 0 for c in result.kinds.values()), result.kinds
    assert result.delayed_end == 0


def test_table_lists_every_result_and_its_violations() -> None:
    ok = ScenarioResult("failover", "ours", 0, kicked=10, acked=10, executed=10)
    bad = ScenarioResult(
        "stream-del",
        "taskiq-redis",
        0,
        status="fail",
        lost=3,
        violations=["3 acknowledged kicks lost"],
    )
    table = format_table([ok, bad])
    lines = table.splitlines()
    assert lines[0].startswith("| scenario")
    assert any("failover" in line and "| ours" in line for line in lines)
    assert "stream-del [taskiq-redis]: 3 acknowledged kicks lost" in table
    assert json.loads(json.dumps(bad.to_dict()))["lost"] == 3


def test_skip_reasons() -> None:
    theirs = ChaosConfig(broker="taskiq-redis")
    assert skip_reason(SCENARIOS["master-kill-wait1"], theirs) is not None
    assert skip_reason(SCENARIOS["failover"], theirs) is None
    assert set(CI_SCENARIOS) <= set(SCENARIOS)
    # The list broker loses a crashed worker's tasks by design: only the
    # graceful scenario runs on it.
    lists = ChaosConfig(broker="ours-list")
    assert skip_reason(SCENARIOS["worker-kill"], lists) is not None
    assert skip_reason(SCENARIOS["rolling-restart"], lists) is None


def test_scenario_defaults_fill_only_what_was_left_out() -> None:
    rolling = SCENARIOS["rolling-restart"]
    # From the command line: --tasks was given, the rest is the scenario's.
    config = rolling.configure(ChaosConfig.given(tasks=3000))
    assert (config.tasks, config.rate, config.workers) == (3000, 1000.0, 3)
    assert (config.task_sleep, config.task_sleep_max) == (0.2, 0.5)
    assert config.idle_timeout == 600_000
    assert config.worker_args == ()  # taskiq's own worker defaults
    # Built in code: every value is kept.
    direct = rolling.configure(ChaosConfig(tasks=50, rate=20.0))
    assert (direct.tasks, direct.rate, direct.idle_timeout) == (50, 20.0, 2000)
    # Scenarios without defaults keep the generic ones.
    assert SCENARIOS["failover"].configure(ChaosConfig.given()).tasks == 400


def test_task_sleep_spreads_by_task_id() -> None:
    sleeps = [task_sleep(f"t{i}", 0.2, 0.3) for i in range(500)]
    assert all(0.2 <= s <= 0.5 for s in sleeps)
    assert max(sleeps) - min(sleeps) > 0.25
    assert task_sleep("t1", 0.2, 0.3) == sleeps[1]  # a redelivery sleeps as long


def test_installed_cli_has_no_chaos_command(capsys: pytest.CaptureFixture[str]) -> None:
    # The suite is a dev tool (taskiq-redis, worker subprocesses, a cluster
    # of its own): a plain install must not offer it. ``main`` is the
    # console script's entry point (pyproject.toml).
    from taskiq_redis_cluster._cli import main as installed_main

    with pytest.raises(SystemExit) as exited:
        installed_main(["chaos", "--all"])
    assert exited.value.code == 2
    assert "invalid choice: 'chaos'" in capsys.readouterr().err


def test_cli_rejects_unknown_scenarios() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--scenario", "nope"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown scenario" in proc.stderr


# -------------------------------------------------------------- CI subset


def _check_common(result: ScenarioResult) -> None:
    print()
    print(format_table([result]))
    print("notes:", "; ".join(result.notes), "| kick errors:", result.kick_errors)
    assert result.status != "error", result.reason
    assert result.duration_s <= result.bound_s
    assert result.kicked == CI_CONFIG.tasks
    assert result.phantoms == 0
    assert result.worker_exits == []
    assert result.child_restarts == 0
    assert result.acked > 0


@pytest.mark.parametrize("name", [
    # A master kill takes over 15 s: the cluster must notice and fail over.
    pytest.param(n, marks=pytest.mark.slow) if n.startswith("master-kill") else n
    for n in CI_SCENARIOS if n != "master-kill"
])
@chaos(timeout=120)
async def test_ci_scenario_loses_nothing(
    name: str, chaos_cluster_fixture: DevCluster, tmp_path: Path
) -> None:
    result = await run_scenario(chaos_cluster_fixture, SCENARIOS[name], CI_CONFIG, tmp_path)
    _check_common(result)
    assert result.lost == 0, result.lost_sample
    _check_kinds(result)
    assert result.status == "ok", result.violations


@pytest.mark.slow
@chaos(timeout=120)
async def test_ci_master_kill_without_wait_reports_loss(
    chaos_cluster_fixture: DevCluster, tmp_path: Path
) -> None:
    # Without WAIT, writes a master acknowledged but had not replicated yet
    # die with it: the loss is reported, not asserted.
    result = await run_scenario(
        chaos_cluster_fixture, SCENARIOS["master-kill"], CI_CONFIG, tmp_path
    )
    _check_common(result)
    print(f"master-kill without wait_replicas: {result.lost} of {result.acked} acked lost")
    assert result.status == "ok", result.violations


@pytest.mark.slow
@chaos(timeout=120)
async def test_harness_terminates_and_reports_on_taskiq_redis(
    chaos_cluster_fixture: DevCluster, tmp_path: Path
) -> None:
    # taskiq-redis's worker crashes on a deleted stream and loses tasks: the
    # harness must still end within its bound and report it.
    config = ChaosConfig(
        tasks=60, rate=30.0, workers=1, idle_timeout=2000, xread_block=500, task_sleep=0.05,
        broker="taskiq-redis", drain_timeout=5.0,
    )  # fmt: skip
    result = await run_scenario(chaos_cluster_fixture, SCENARIOS["stream-del"], config, tmp_path)
    print()
    print(format_table([result]))
    assert result.status == "fail", (result.reason, result.violations)
    assert result.kicked == 60
    assert result.duration_s <= result.bound_s
    assert result.lost > 0 or result.worker_exits, result.violations
    assert any("lost" in v or "worker exited" in v for v in result.violations)


@pytest.mark.parametrize("broker", ["ours", "ours-list"])
@pytest.mark.slow
@chaos(timeout=120)
async def test_rolling_restart_loses_nothing(
    broker: str, chaos_cluster_fixture: DevCluster, tmp_path: Path
) -> None:
    config = ChaosConfig.given(broker=broker, **ROLLING_QUICK)
    result = await run_scenario(
        chaos_cluster_fixture, SCENARIOS["rolling-restart"], config, tmp_path
    )
    print()
    print(format_table([result]))
    print("\n".join(result.notes))
    assert result.status != "error", result.reason
    assert ROLLING_QUICK["tasks"] <= result.kicked <= 6 * ROLLING_QUICK["tasks"]
    assert result.acked == result.kicked, result.kick_errors
    assert result.settings["workers"] == 3
    assert result.settings["worker_args"] == ()  # taskiq's default: 100 concurrent tasks
    # Each of the three got SIGTERM with a backlog and was restarted (no
    # backlog, or a worker that needs SIGKILL, is a violation).
    assert sum(" SIGTERM with " in note for note in result.notes) == 3
    assert result.phantoms == 0
    assert result.worker_exits == []
    assert result.child_restarts == 0
    assert result.lost == 0, (result.lost_sample, result.queued_end, result.pending_end)
    if broker == "ours":
        assert result.dead_lettered == 0
        _check_kinds(result)
    else:
        assert set(result.kinds) == {"plain"}  # the list broker has no labels
    assert result.status == "ok", result.violations


@pytest.mark.slow
@chaos(timeout=120)
def test_cli_runs_a_scenario_end_to_end(tmp_path: Path) -> None:
    # The one-command entry point: own cluster, table on stdout, JSON report,
    # exit code 0, nothing left running afterwards.
    report = tmp_path / "report.json"
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--scenario", "worker-kill",
         "--tasks", "40", "--rate", "20", "--workers", "2", "--task-sleep", "0.1",
         "--json", str(report), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=110, check=False,  # within the 120 s above
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| worker-kill" in proc.stdout
    data = json.loads(report.read_text())
    assert data["machine"]["cores"] >= 1
    (result,) = data["results"]
    assert result["name"] == "worker-kill"
    assert result["lost"] == 0
    assert result["phantoms"] == 0
    assert not _running_pids_under(workdir)


def _running_pids_under(directory: Path) -> list[int]:
    """Live processes whose working directory is inside ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(directory)):
            found.append(int(entry.name))
    return found
