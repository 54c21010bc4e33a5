"""Results: kicks against executions (:func:`analyse`), the table and the JSON report."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ChaosConfig
from .ledger import Execution
from .producer import KINDS, Kick


@dataclass
class ScenarioResult:
    """What one scenario measured, and which acceptance checks failed."""

    name: str
    broker: str
    wait_replicas: int
    rate: float = 0.0  #: kicks per second actually used
    status: str = "ok"  #: ok, fail, skipped, error
    reason: str = ""
    kicked: int = 0
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    executed: int = 0  #: distinct task ids that ran
    executions: int = 0  #: runs in total
    lost: int = 0
    destroyed: int = 0  #: acked before the fault deleted them (stream DEL)
    dead_lettered: int | None = None  #: entries in the dead-letter streams (ours only)
    queued_end: int | None = None  #: still queued in Redis at the end (never delivered)
    pending_end: int | None = None  #: delivered, never acked, at the end (streams)
    delayed_end: int | None = None  #: delayed tasks never promoted, at the end (ours only)
    duplicates: int = 0
    phantoms: int = 0
    unknown_executed: int = 0
    rerouted: int | None = None  #: kicks moved off a failing master's shard (ours only)
    kick_stall_s: float | None = None  #: the longest single kick, fault included
    resume_s: float | None = None
    stall_s: float | None = None
    done_s: float | None = None
    worker_exits: list[str] = field(default_factory=list)
    child_restarts: int = 0
    duration_s: float = 0.0
    bound_s: float = 0.0
    lost_sample: list[str] = field(default_factory=list)
    kick_errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    #: The knobs this scenario ran with (after its own defaults).
    settings: dict[str, Any] = field(default_factory=dict)
    #: Per kind of kick (plain, priority, delayed, delayed+priority):
    #: kicked, acked, executed (distinct ids) and lost.
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Counts:
    """Set arithmetic over kicks and executions (see :func:`analyse`)."""

    acked: int
    failed: int
    unknown: int
    executed: int
    executions: int
    lost: frozenset[str]
    destroyed: frozenset[str]
    duplicates: int
    phantoms: frozenset[str]
    unknown_executed: int
    resume_s: float | None
    stall_s: float | None
    done_s: float | None


def by_kind(
    kicks: Sequence[Kick], executions: Sequence[Execution], lost: frozenset[str]
) -> dict[str, dict[str, int]]:
    """Kicked, acked, executed and lost per kind of kick, in :data:`KINDS` order."""
    ran = {e.task_id for e in executions}
    out: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        mine = [k for k in kicks if k.kind == kind]
        if not mine:
            continue
        acked = {k.task_id for k in mine if k.outcome == "acked"}
        out[kind] = {
            "kicked": len(mine),
            "acked": len(acked),
            "executed": len(acked & ran),
            "lost": len(acked & lost),
        }
    return out


def analyse(
    kicks: Sequence[Kick],
    executions: Sequence[Execution],
    *,
    fault_start: float | None = None,
    fault_end: float | None = None,
    destroyed_before: float | None = None,
) -> Counts:
    """Compare kicks with executions.

    * lost: acked but never executed;
    * destroyed: lost ids whose kick started before ``destroyed_before``
      (the fault deleted them, e.g. a DEL of the stream): not counted as lost;
    * duplicates: executions beyond the first per id;
    * phantoms: executed ids that were neither acked nor unknown;
    * resume_s: from ``fault_end`` to the first execution after it;
    * stall_s: the longest gap without executions from ``fault_start`` to
      the last execution;
    * done_s: from ``fault_start`` until every acked task had run once.
    """
    acked = {k.task_id for k in kicks if k.outcome == "acked"}
    unknown = {k.task_id for k in kicks if k.outcome == "unknown"}
    failed = {k.task_id for k in kicks if k.outcome == "failed"}
    started = {k.task_id: k.started for k in kicks}
    runs = Counter(e.task_id for e in executions)
    first: dict[str, float] = {}
    for e in executions:
        first[e.task_id] = min(e.at, first.get(e.task_id, e.at))
    missing = acked - runs.keys()
    destroyed = frozenset(
        t
        for t in missing
        if destroyed_before is not None and started.get(t, 0.0) < destroyed_before
    )
    times = sorted(e.at for e in executions)
    resume = stall = done = None
    if fault_end is not None:
        after = [t for t in times if t >= fault_end]
        resume = after[0] - fault_end if after else None
    if fault_start is not None and times:
        points = [fault_start] + [t for t in times if t >= fault_start]
        stall = max((b - a for a, b in itertools.pairwise(points)), default=0.0)
        if not missing - destroyed:
            last = max((first[t] for t in acked if t in first), default=fault_start)
            done = max(0.0, last - fault_start)
    return Counts(
        acked=len(acked),
        failed=len(failed),
        unknown=len(unknown),
        executed=len(runs),
        executions=sum(runs.values()),
        lost=frozenset(missing - destroyed),
        destroyed=destroyed,
        duplicates=sum(n - 1 for n in runs.values()),
        phantoms=frozenset(runs.keys() - acked - unknown),
        unknown_executed=len(unknown & runs.keys()),
        resume_s=resume,
        stall_s=stall,
        done_s=done,
    )


_COLUMNS = (
    ("scenario", "name"),
    ("broker", "broker"),
    ("wait", "wait_replicas"),
    ("status", "status"),
    ("kicked", "kicked"),
    ("acked", "acked"),
    ("unknown", "unknown"),
    ("failed", "failed"),
    ("rerouted", "rerouted"),
    ("kick_s", "kick_stall_s"),
    ("done", "executed"),
    ("lost", "lost"),
    ("dup", "duplicates"),
    ("dead", "dead_lettered"),
    ("phantom", "phantoms"),
    ("resume_s", "resume_s"),
    ("stall_s", "stall_s"),
    ("done_s", "done_s"),
    ("deaths", "deaths"),
    ("time_s", "duration_s"),
)


def format_table(results: Sequence[ScenarioResult]) -> str:
    """A plain-text (Markdown-compatible) table of ``results``."""
    rows = []
    for r in results:
        values = r.to_dict()
        values["deaths"] = len(r.worker_exits) + r.child_restarts
        if r.destroyed:
            values["lost"] = f"{r.lost} (+{r.destroyed} deleted)"
        rows.append(["-" if values[k] is None else str(values[k]) for _, k in _COLUMNS])
    header = [title for title, _ in _COLUMNS]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    for r in results:
        if len(r.kinds) > 1:
            parts = [
                f"{kind} {c['executed']}/{c['acked']} ran, {c['lost']} lost"
                for kind, c in r.kinds.items()
            ]
            out.append(f"{r.name} [{r.broker}] by kind: {'; '.join(parts)}")
    for r in results:
        if r.reason or r.violations:
            out.append(f"{r.name} [{r.broker}]: {r.reason or '; '.join(r.violations)}")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    """Where and when a report was measured."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        redis_version = subprocess.run(
            ["redis-server", "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis_version,
    }


def write_json(path: Path, results: Sequence[ScenarioResult], config: ChaosConfig) -> None:
    """Write the report (machine, config, results) as JSON."""
    report = {
        "machine": machine_info(),
        "config": config.to_dict(),
        "results": [r.to_dict() for r in results],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
