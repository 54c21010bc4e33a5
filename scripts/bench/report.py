"""The report: ours/theirs ratios, the targets, and the plain-text tables."""

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


#: Scale-phase figures compared ours/theirs at each W (all: lower is better).
SCALE_RATIO_METRICS = (
    ("idle_cpu_ms_per_s", "lower"),
    ("idle_cpu_hottest_master_ms_per_s", "lower"),
    ("load_cpu_us_per_task", "lower"),
    ("load_cpu_hottest_master_us_per_task", "lower"),
    ("latency_p50_ms", "lower"),
    ("latency_p99_ms", "lower"),
)


def _pair_ratios(
    ours: dict[str, Any], theirs: dict[str, Any], metrics: tuple[tuple[str, str], ...]
) -> dict[str, float | None]:
    return {m: _ratio(ours.get(m), theirs.get(m)) for m, _ in metrics}


def ratios(brokers: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``ours / theirs`` per metric for each family both sides of which ran."""
    out: dict[str, dict[str, float | None]] = {}
    for family, (ours, theirs) in PAIRS.items():
        if ours in brokers and theirs in brokers:
            out[family] = _pair_ratios(brokers[ours], brokers[theirs], RATIO_METRICS)
    return out


def scale_ratios(scale: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``ours / theirs`` per scale metric, by W (a string, as in ``points``)."""
    ours, theirs = PAIRS["stream"]
    return {
        w: _pair_ratios(point[ours], point[theirs], SCALE_RATIO_METRICS)
        for w, point in scale["points"].items()
        if ours in point and theirs in point
    }


def _target(name: str, goal: str, value: Any, met: bool | None) -> dict[str, Any]:
    return {"name": name, "target": goal, "value": value, "met": met}


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def scale_targets(scale: dict[str, Any], latency_rate: float) -> list[dict[str, Any]]:
    """The scale phase's targets, judged at the largest W (W=32 in a full run).

    Idle Redis CPU at most 2x theirs; Redis CPU per task at most 1.3x ours
    at the smallest W and below theirs; latency p50 and p99 at most theirs,
    at every W (the value is the worst ratio over the Ws).
    """
    ours = PAIRS["stream"][0]
    ws = sorted(scale["points"], key=int)
    lo, hi = ws[0], ws[-1]
    at_hi = scale["ratios"].get(hi, {})
    idle = at_hi.get("idle_cpu_ms_per_s")
    growth = None
    if lo != hi:
        growth = _ratio(
            scale["points"][hi].get(ours, {}).get("load_cpu_us_per_task"),
            scale["points"][lo].get(ours, {}).get("load_cpu_us_per_task"),
        )
    per_task = at_hi.get("load_cpu_us_per_task")
    out = [
        _target(
            f"idle Redis CPU at W={hi} vs RedisStreamClusterBroker",
            "<= 2.0x",
            idle,
            _at_most(idle, 2.0),
        ),
        _target(
            f"Redis CPU per task at W={hi} vs W={lo} (ours-stream)",
            "<= 1.3x",
            growth,
            _at_most(growth, 1.3),
        ),
        _target(
            f"Redis CPU per task at W={hi} vs RedisStreamClusterBroker",
            "< 1.0x",
            per_task,
            None if per_task is None else per_task < 1.0,
        ),
    ]
    for p in ("p50", "p99"):
        values = [scale["ratios"].get(w, {}).get(f"latency_{p}_ms") for w in ws]
        worst = None if None in values else max(v for v in values if v is not None)
        out.append(
            _target(
                f"latency {p} at {latency_rate:g}/s vs RedisStreamClusterBroker (worst W)",
                "<= 1.0x",
                worst,
                _at_most(worst, 1.0),
            )
        )
    return out


def targets(report: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The targets of the phases that ran, and whether this run met them."""
    out = _broker_targets(report, cfg) if "brokers" in cfg.phases else []
    if report.get("scale"):
        out += scale_targets(report["scale"], cfg.latency_rate)
    return out


def _broker_targets(report: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The throughput/spread/recovery targets of the ``brokers`` phase."""
    out: list[dict[str, Any]] = []
    stream = report["ratios"].get("stream", {})

    def add(name: str, goal: str, value: Any, met: bool | None) -> None:
        out.append(_target(name, goal, value, met))

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


def _table(rows: list[list[str]]) -> list[str]:
    """Aligned columns (the first left, the rest right), a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _broker_lines(report: dict[str, Any]) -> list[str]:
    """The ``brokers`` phase: the table, planner and scrape, the paired rounds."""
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
    lines = _table(rows)
    lines.append("")
    lines.append("* one measurement over the whole kick-phase backlog, not a median of rounds")
    planner = report.get("planner")
    scrape = report.get("scrape")
    if planner:
        lines.append(
            f"planner: {planner['shards']} shards over {planner['masters']} masters: "
            f"{_fmt(planner['ms'], 'f')} ms"
        )
    if scrape:
        lines.append(
            f"exporter scrape, {scrape['queues']} queues x {scrape['shards_per_queue']} shards: "
            f"{_fmt(scrape['ms'], 'f')} ms ({scrape['source']})"
        )
    for family, pair in report.get("paired", {}).items():
        shown = ", ".join(
            f"{_fmt(r['ours_tps'], 'int')}/{_fmt(r['theirs_tps'], 'int')}" for r in pair["rounds"]
        )
        lines.append(
            f"end-to-end, 1 worker, paired rounds ({family}, ours/theirs tasks/s): {shown}; "
            f"median ratio {_fmt(pair['ratio'], 'x')}"
        )
    return lines


def _scale_rows(load_rate: float, latency_rate: float) -> tuple[tuple[str, str, str], ...]:
    return (
        ("idle Redis CPU, all nodes (ms/s)", "idle_cpu_ms_per_s", "f"),
        ("idle Redis CPU, hottest master (ms/s)", "idle_cpu_hottest_master_ms_per_s", "f"),
        (f"Redis CPU per task at {load_rate:,.0f}/s (us)", "load_cpu_us_per_task", "f"),
        ("  the same, hottest master (us)", "load_cpu_hottest_master_us_per_task", "f"),
        (f"latency p50 at {latency_rate:,.0f}/s (ms)", "latency_p50_ms", "f"),
        (f"latency p99 at {latency_rate:,.0f}/s (ms)", "latency_p99_ms", "f"),
        ("blocked clients per worker process", "blocked_per_worker", "f"),
        ("connected clients, all nodes", "connected_clients", "int"),
        ("start of the W processes (s)", "start_s", "f"),
    )


def _scale_lines(scale: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The ``scale`` phase: a block of rows per W, one column per broker."""
    kinds = list(scale["brokers"])
    paired = len(kinds) == 2
    header = ["W", "metric", *kinds] + (["ours/theirs"] if paired else [])
    rows = [header]
    for w in sorted(scale["points"], key=int):
        point = scale["points"][w]
        for i, (title, key, kind) in enumerate(
            _scale_rows(cfg["scale_load_rate"], cfg["latency_rate"])
        ):
            row = [w if i == 0 else "", title]
            row += [_fmt(point.get(k, {}).get(key), kind) for k in kinds]
            if paired:
                row.append(_fmt(scale["ratios"].get(w, {}).get(key), "x"))
            rows.append(row)
    settings = scale["settings"]
    base = scale["baseline"]
    pinged = [
        f"W={w} {k}: {point[k]['pinged']}"
        for w, point in scale["points"].items()
        for k in kinds
        if point[k]["pinged"] < int(w)
    ]
    lines = [
        "scale: W worker processes per broker, each a `taskiq worker --workers 1`",
        "",
        *_table(rows),
        "",
        f"idle: {cfg['scale_idle_seconds']:g}s window after {cfg['scale_settle_seconds']:g}s "
        f"settling; load: {settings['load_tasks']:,} tasks of one INCR at "
        f"{cfg['scale_load_rate']:,.0f}/s, idle share subtracted; latency: "
        f"{cfg['rounds']} rounds of {settings['latency_seconds']:g}s at "
        f"{cfg['latency_rate']:,.0f}/s (median)",
        f"xread_block {settings['xread_block_ms']} ms for both, {settings['broker_options']}; "
        f"baseline without workers: {_fmt(base['idle_cpu_ms_per_s'], 'f')} ms/s all nodes, "
        f"{_fmt(base['idle_cpu_hottest_master_ms_per_s'], 'f')} hottest master, "
        f"{base['connected_clients']} clients",
    ]
    if pinged:
        lines.append("worker processes that ran no ping in time: " + ", ".join(pinged))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables (what the CLI prints)."""
    meta = report["meta"]
    lines: list[str] = []
    if report["brokers"]:
        lines += _broker_lines(report)
    if report.get("scale"):
        lines += ([""] if lines else []) + _scale_lines(report["scale"], meta["config"])
    lines += ["", "targets:"]
    for t in report["targets"]:
        state = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else value)
        lines.append(f"  {t['name']}: {shown} (target {t['target']}): {state}")
    machine = meta["machine"]
    phases = "+".join(meta.get("phases", ["brokers"]))
    lines += [
        "",
        f"{meta['mode']} run ({phases}), {meta['config']['rounds']} rounds, {meta['date']}, "
        f"{meta['duration_s']}s; {meta['cluster']}",
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_total_mb']} MB; "
        f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}",
    ]
    return "\n".join(lines)
