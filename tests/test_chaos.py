"""The fault-injection harness (taskiq_redis_cluster._chaos) and its CI subset.

The CI subset runs real ``taskiq worker`` processes against a cluster of
this module's own (the faults are destructive): worker SIGKILL, CLUSTER
FAILOVER, DEL of a shard's stream, and SIGKILL of a master with and without
``wait_replicas=1``. These are also the issue-4 acceptance checks for the
stream DEL, failover and master kill under load; tests/test_stream_faults.py
has the remaining ones (50 tasks in flight, slot migration, XADD spread).

Every test is bounded: small task counts, short idle_timeout, and each
scenario has its own time bound which the harness enforces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from taskiq_redis_cluster._chaos import (
    CI_SCENARIOS,
    SCENARIOS,
    ChaosConfig,
    Execution,
    Kick,
    ScenarioResult,
    analyse,
    chaos_cluster,
    format_table,
    run_scenario,
    skip_reason,
)
from taskiq_redis_cluster.devcluster import DevCluster

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parent.parent

#: Small and quick: about 10-15 s per scenario on 2 cores.
CI_CONFIG = ChaosConfig(
    tasks=240, rate=30.0, workers=2, idle_timeout=2000, xread_block=500, task_sleep=0.1
)


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


@pytest.mark.parametrize("name", [n for n in CI_SCENARIOS if n != "master-kill"])
async def test_ci_scenario_loses_nothing(
    name: str, chaos_cluster_fixture: DevCluster, tmp_path: Path
) -> None:
    result = await run_scenario(chaos_cluster_fixture, SCENARIOS[name], CI_CONFIG, tmp_path)
    _check_common(result)
    assert result.lost == 0, result.lost_sample
    assert result.status == "ok", result.violations


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


async def test_harness_terminates_and_reports_on_taskiq_redis(
    chaos_cluster_fixture: DevCluster, tmp_path: Path
) -> None:
    # taskiq-redis's worker crashes on a deleted stream and loses tasks: the
    # harness must still end within its bound and report it.
    config = ChaosConfig(
        tasks=120, rate=30.0, workers=1, idle_timeout=2000, xread_block=500, task_sleep=0.05,
        broker="taskiq-redis", drain_timeout=8.0,
    )  # fmt: skip
    result = await run_scenario(chaos_cluster_fixture, SCENARIOS["stream-del"], config, tmp_path)
    print()
    print(format_table([result]))
    assert result.status in ("ok", "fail"), result.reason
    assert result.kicked == 120
    assert result.duration_s <= result.bound_s


def test_cli_runs_a_scenario_end_to_end(tmp_path: Path) -> None:
    # The one-command entry point: own cluster, table on stdout, JSON report,
    # exit code 0, nothing left running afterwards.
    report = tmp_path / "report.json"
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--scenario", "worker-kill",
         "--tasks", "60", "--rate", "20", "--workers", "2", "--task-sleep", "0.1",
         "--json", str(report), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=170, check=False,
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
