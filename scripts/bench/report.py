"""The report: ours/theirs ratios, the targets, and the plain-text table."""

from __future__ import annotations

from typing import Any

from .config import PAIRS, BenchConfig


def _ratio(ours: Any, theirs: Any) -> float | None:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or theirs <= 0:
        return None
    return round(ours / theirs, 3)


#: Metrics compared ours/theirs, with the direction that is better.
RATIO_METRICS = (
    ("kick_tps", "higher"),
    ("e2e_1w_tps", "higher"),
    ("e2e_2w_tps", "higher"),
    ("drain_1w_tps", "higher"),
    ("kick_cpu_us_per_kick", "lower"),
    ("drain_worker_cpu_us_per_task", "lower"),
    ("latency_p50_ms", "lower"),
    ("latency_p99_ms", "lower"),
    ("spread_max_mean", "lower"),
    ("memory_queued_per_100k_bytes", "lower"),
    ("memory_done_bytes", "lower"),
    ("keys_queued_per_100k_bytes", "lower"),
    ("keys_done_bytes", "lower"),
)


def ratios(brokers: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``ours / theirs`` per metric for each family both sides of which ran."""
    out: dict[str, dict[str, float | None]] = {}
    for family, (ours, theirs) in PAIRS.items():
        if ours in brokers and theirs in brokers:
            out[family] = {
                m: _ratio(brokers[ours].get(m), brokers[theirs].get(m)) for m, _ in RATIO_METRICS
            }
    return out


def targets(report: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The throughput/spread/recovery targets and whether this run met them."""
    out: list[dict[str, Any]] = []
    stream = report["ratios"].get("stream", {})

    def add(name: str, goal: str, value: Any, met: bool | None) -> None:
        out.append({"name": name, "target": goal, "value": value, "met": met})

    kick = stream.get("kick_tps")
    add(
        "kick throughput vs RedisStreamClusterBroker",
        ">= 3.0x",
        kick,
        None if kick is None else kick >= 3.0,
    )
    # The paired rounds' median ratio when they ran: the ratio of the two
    # medians compares rounds minutes apart on a machine whose speed drifts.
    paired = report.get("paired", {}).get("stream", {}).get("ratio")
    e2e = paired if paired is not None else stream.get("e2e_1w_tps")
    add(
        "end-to-end (1 worker) vs RedisStreamClusterBroker",
        ">= 2.0x" + (" (paired rounds)" if paired is not None else ""),
        e2e,
        None if e2e is None else e2e >= 2.0,
    )
    for kind in ("ours-stream", "ours-list"):
        value = report["brokers"].get(kind, {}).get("spread_max_mean")
        add(
            f"load spread max/mean ({kind})",
            "<= 1.10",
            value,
            None if value is None else value <= 1.10,
        )
    ours = report["brokers"].get("ours-stream", {})
    if ours:
        idle = cfg.idle_timeout_ms / 1000
        # Reclaim passes run every idle/4 s, and the replacement process
        # needs about a second to be started by taskiq's process manager.
        bound = idle + max(0.2, min(30.0, idle / 4)) + 2.0
        value = ours.get("recovery_s")
        add(
            "recovery after SIGKILL (ours-stream)",
            f"<= {bound:.2f}s (idle_timeout {idle:g}s)",
            value,
            None if value is None else value <= bound,
        )
    return out


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "mb":
        return f"{value / 1e6:.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    return f"{value:.2f}"


_ROWS = (
    ("kick throughput (tasks/s)", "kick_tps", "int"),
    ("end-to-end, 1 worker (tasks/s)", "e2e_1w_tps", "int"),
    ("end-to-end, 2 workers (tasks/s)", "e2e_2w_tps", "int"),
    ("backlog drain, 1 worker (tasks/s) *", "drain_1w_tps", "int"),
    ("producer CPU per kick (us)", "kick_cpu_us_per_kick", "f"),
    ("worker CPU per task, drain (us) *", "drain_worker_cpu_us_per_task", "f"),
    ("latency p50 (ms)", "latency_p50_ms", "f"),
    ("latency p99 (ms)", "latency_p99_ms", "f"),
    ("load spread max/mean", "spread_max_mean", "f"),
    ("memory per 100k queued (MB) *", "memory_queued_per_100k_bytes", "mb"),
    ("memory after done (MB) *", "memory_done_bytes", "mb"),
    ("queue keys per 100k queued (MB) *", "keys_queued_per_100k_bytes", "mb"),
    ("queue keys after done (MB) *", "keys_done_bytes", "mb"),
    ("recovery after SIGKILL (s)", "recovery_s", "f"),
)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what the CLI prints)."""
    brokers = report["brokers"]
    families = [(f, pair) for f, pair in PAIRS.items() if any(k in brokers for k in pair)]
    header = ["metric"]
    for family, (ours, theirs) in families:
        header += [ours, theirs, f"{family} ours/theirs"]
    rows = [header]
    for title, key, kind in _ROWS:
        row = [title]
        for family, (ours, theirs) in families:
            a = brokers.get(ours, {})
            b = brokers.get(theirs, {})
            cells = []
            for side in (a, b):
                value = side.get(key)
                if key == "recovery_s" and value is None and side:
                    note = str(side.get("recovery_note", ""))
                    cells.append("never" if note.startswith("never") else "n/a")
                else:
                    cells.append(_fmt(value, kind))
            row += [*cells, _fmt(report["ratios"].get(family, {}).get(key), "x")]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meta = report["meta"]
    planner = report["planner"]
    scrape = report["scrape"]
    lines += [
        "",
        "* one measurement over the whole kick-phase backlog, not a median of rounds",
        f"planner: {planner['shards']} shards over {planner['masters']} masters: "
        f"{_fmt(planner['ms'], 'f')} ms",
        f"exporter scrape, {scrape['queues']} queues x {scrape['shards_per_queue']} shards: "
        f"{_fmt(scrape['ms'], 'f')} ms ({scrape['source']})",
    ]
    for family, pair in report.get("paired", {}).items():
        shown = ", ".join(
            f"{_fmt(r['ours_tps'], 'int')}/{_fmt(r['theirs_tps'], 'int')}" for r in pair["rounds"]
        )
        lines.append(
            f"end-to-end, 1 worker, paired rounds ({family}, ours/theirs tasks/s): {shown}; "
            f"median ratio {_fmt(pair['ratio'], 'x')}"
        )
    lines += ["", "targets:"]
    for t in report["targets"]:
        state = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else value)
        lines.append(f"  {t['name']}: {shown} (target {t['target']}): {state}")
    machine = meta["machine"]
    lines += [
        "",
        f"{meta['mode']} run, {meta['config']['rounds']} rounds, {meta['date']}, "
        f"{meta['duration_s']}s; {meta['cluster']}",
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_total_mb']} MB; "
        f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}",
    ]
    return "\n".join(lines)
