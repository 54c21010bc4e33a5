"""Metrics: the spec table, the broker counters and the scrape-time queue collector.

Queue-state tests run against the real 3+3 cluster and compare what the
collector reports with XLEN / XPENDING / XINFO read directly. The
multiprocess test runs a real ``taskiq worker --workers 2``.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import eventually, make_message, take
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import RedisCluster

from taskiq_redis_cluster import ClusterStreamBroker, PlanStore, ShardPlan
from taskiq_redis_cluster._metrics import (
    METRIC_PREFIX,
    METRICS,
    MULTIPROC_ENV,
    PrometheusEvents,
    QueueCollector,
    QueueStateReader,
    dead_letter_reason,
    default_events,
    metrics_registry,
    reference_table,
    scrape_once,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "metrics.md"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def parse(text: str) -> dict[str, Metric]:
    """Exposition text -> families by name (raises if the text does not parse)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(families: dict[str, Metric], family: str, **match: str) -> dict[str, float]:
    """``{shard: value}`` of the samples of ``family`` whose labels include ``match``."""
    found: dict[str, float] = {}
    metric = families.get(family)
    for sample in metric.samples if metric else ():
        if all(sample.labels.get(k) == v for k, v in match.items()):
            found[sample.labels.get("shard", "")] = sample.value
    return found


def _declared(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """family -> (type, label names) from exposition text (labels of the samples)."""
    result: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue  # prometheus_client's creation timestamps of counters/histograms
        labels: set[str] = set()
        for sample in family.samples:
            labels.update(k for k in sample.labels if k not in ("le", "quantile"))
        result[family.name] = (family.type, tuple(sorted(labels)))
    return result


async def _shard_streams(client: RedisCluster, queue: str) -> ShardPlan:
    plan = await PlanStore(client).load(queue)
    assert plan is not None
    return plan


# --------------------------------------------------------------------------
# the spec is the single source of truth
# --------------------------------------------------------------------------


def test_names_are_prefixed_in_base_units_and_labels_stay_small() -> None:
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert spec.name.startswith(METRIC_PREFIX), spec.name
        assert re.fullmatch(r"[a-z_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert not re.search(r"_(ms|milliseconds|minutes)(_|$)", spec.name), spec.name
        if not spec.optional:
            assert not {"consumer", "pid", "task_id", "tag"} & set(spec.labels), spec.name


def test_docs_table_is_generated_from_the_specs() -> None:
    text = DOC.read_text()
    start = text.index("<!-- metrics-table:start -->") + len("<!-- metrics-table:start -->")
    end = text.index("<!-- metrics-table:end -->")
    assert text[start:end].strip() == reference_table(), (
        "docs/metrics.md is out of date; paste the output of "
        "python -c 'from taskiq_redis_cluster._metrics import reference_table as t; print(t())'"
    )
    # And every row names a declared metric with its declared type and labels.
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \| ([^|]*) \|", text, re.MULTILINE)
    declared = {s.name: (s.kind, tuple(s.labels)) for s in METRICS}
    assert len(rows) == len(METRICS)
    for name, kind, labels in rows:
        assert declared[name] == (kind, tuple(re.findall(r"`(\w+)`", labels))), name


def test_prometheus_events_expose_exactly_the_declared_metrics() -> None:
    registry = CollectorRegistry()
    events = PrometheusEvents(registry=registry)
    events.published("q", 0, 3)
    events.publish_error("q", "timeout")
    events.rerouted("q", 4)
    events.acked("q", 1, 2)
    events.reclaimed("q", 2)
    events.dead_lettered("q", 0, "unknown task 'app")
    events.nogroup_recovered("q", 0)
    events.retried("moved")
    events.rebalance_moved("q", "done")
    events.rebalance_copied("q", 5)
    events.rebalance_swept("q", 1)
    events.rebalance_queue_done("q")
    with events.track_rebalance():
        pass
    declared = _declared(generate_latest(registry).decode())
    expected = {
        s.family: (s.kind, tuple(sorted(s.labels)))
        for s in METRICS
        if s.source in ("broker", "rebalancer")
    }
    assert declared == expected
    assert registry.get_sample_value(METRIC_PREFIX + "published_total", {"queue": "q"}) == 3
    assert registry.get_sample_value(METRIC_PREFIX + "acked_total", {"queue": "q"}) == 2
    assert (
        registry.get_sample_value(
            METRIC_PREFIX + "dead_lettered_total", {"queue": "q", "reason": "unknown_task"}
        )
        == 1
    )
    assert registry.get_sample_value(METRIC_PREFIX + "rebalance_in_progress") == 0
    assert registry.get_sample_value(METRIC_PREFIX + "rebalance_duration_seconds_count") == 1


def test_rebalancer_events_and_runs_are_counted() -> None:
    import dataclasses

    from taskiq_redis_cluster import _rebalance
    from taskiq_redis_cluster._rebalance import RebalanceEvent

    # The rebalancer's own enum, whatever its name (annotations are strings).
    kind_field = next(f for f in dataclasses.fields(RebalanceEvent) if f.name == "kind")
    EventKind = getattr(_rebalance, str(kind_field.type))
    registry = CollectorRegistry()
    events = PrometheusEvents(registry=registry)
    kinds = [
        EventKind.PLANNED,
        EventKind.SWITCHED,
        EventKind.FINALIZED,
        EventKind.FINALIZED,
        EventKind.REVERTED,
        EventKind.QUEUE_DONE,
    ]
    for kind in kinds:
        events.rebalance_event(RebalanceEvent(kind=kind, queue="q"))
    moves = METRIC_PREFIX + "rebalance_moves_total"
    assert registry.get_sample_value(moves, {"queue": "q", "result": "done"}) == 2
    assert registry.get_sample_value(moves, {"queue": "q", "result": "reverted"}) == 1
    stamp = registry.get_sample_value(
        METRIC_PREFIX + "last_successful_rebalance_timestamp_seconds", {"queue": "q"}
    )
    assert stamp is not None
    assert abs(stamp - time.time()) < 60

    def failing_run() -> None:
        with events.track_rebalance():
            assert registry.get_sample_value(METRIC_PREFIX + "rebalance_in_progress") == 1
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_run()
    assert registry.get_sample_value(METRIC_PREFIX + "rebalance_in_progress") == 0
    assert registry.get_sample_value(METRIC_PREFIX + "rebalance_duration_seconds_count") == 1


def test_free_text_reasons_become_a_small_label_set() -> None:
    assert dead_letter_reason("max deliveries exceeded (5)") == "max_deliveries"
    assert dead_letter_reason("unknown task 'my.module") == "unknown_task"
    assert dead_letter_reason("not a taskiq message") == "malformed"
    assert dead_letter_reason("missing 'data' field") == "malformed"
    assert dead_letter_reason("entry deleted from the stream") == "deleted"
    assert dead_letter_reason("something new") == "other"
    registry = CollectorRegistry()
    events = PrometheusEvents(registry=registry)
    events.retried("Weird Kind With Spaces And A Very Long Name Indeed")
    events.retried("moved")
    kinds = {s.labels["kind"] for s in registry.collect() for s in s.samples if "kind" in s.labels}
    assert kinds == {"other", "moved"}


def test_nothing_is_created_or_registered_at_import() -> None:
    code = textwrap.dedent(
        """
        from prometheus_client import REGISTRY
        import taskiq_redis_cluster._metrics._events as m
        import taskiq_redis_cluster._metrics._exporter
        assert m._SHARED_METRICS._value is None and m._DEFAULT_EVENTS._value is None
        events = m.default_events()
        assert m.default_events() is events
        assert m.PrometheusEvents().registry is events.registry
        assert m.metrics_registry() is events.registry
        names = [n for n in REGISTRY._names_to_collectors if n.startswith("taskiq_redis")]
        assert names == [], names
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------
# the layers of the _metrics/ folder
# --------------------------------------------------------------------------

PACKAGE = ROOT / "taskiq_redis_cluster"
#: The modules of _metrics/, lowest first; each may import only those before it.
METRICS_LAYERS = ("_specs", "_events", "_reader", "_collector", "_exporter")
#: Module (or folder) names that hold brokers, which metrics must not depend on.
BROKER_MODULES = frozenset({"_broker", "_brokers", "_stream", "_list", "_pubsub"})


def _module_file(parts: tuple[str, ...]) -> Path | None:
    """The file of a module of the package named by its parts under the package."""
    for path in (
        PACKAGE.joinpath(*parts).with_suffix(".py"),
        PACKAGE.joinpath(*parts, "__init__.py"),
    ):
        if parts and path.is_file():
            return path
    return None


def _package_imports(path: Path) -> set[tuple[str, ...]]:
    """The package's own modules that ``path`` imports, as parts under the package."""
    folder = path.relative_to(PACKAGE).parts[:-1]
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):
            base = folder[: len(folder) - node.level + 1]
            if node.module:
                found.add((*base, *node.module.split(".")))
            for alias in node.names if not node.module else ():
                # `from . import x`: the submodule x, or a name of the folder's __init__.
                found.add((*base, alias.name) if _module_file((*base, alias.name)) else base)
            continue
        else:
            continue
        prefix = "taskiq_redis_cluster."
        found.update(tuple(n[len(prefix) :].split(".")) for n in names if n.startswith(prefix))
    return found


def test_metrics_modules_import_downward_only() -> None:
    folder = PACKAGE / "_metrics"
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert modules == set(METRICS_LAYERS)  # a new module must take its place in the layers
    for rank, name in enumerate(METRICS_LAYERS):
        siblings = {
            # Importing the folder itself would run its __init__, which imports every layer.
            parts[1] if len(parts) > 1 else "__init__"
            for parts in _package_imports(folder / f"{name}.py")
            if parts[:1] == ("_metrics",)
        }
        assert siblings <= set(METRICS_LAYERS[:rank]), (name, siblings)


def test_metrics_reach_no_broker_module() -> None:
    start = ("_metrics",)
    parent: dict[tuple[str, ...], tuple[str, ...]] = {start: ()}
    todo = [start]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        imported = _package_imports(path) if path else set()
        # Importing a submodule runs its folders' __init__ too; not the root's,
        # which imports everything and is no layer's dependency.
        reached = {parts[:i] for parts in imported for i in range(1, len(parts) + 1)}
        for parts in reached - parent.keys():
            parent[parts] = module
            todo.append(parts)
    chains = []
    for module in parent:
        if BROKER_MODULES & set(module):
            chain = [module]
            while parent[chain[-1]]:
                chain.append(parent[chain[-1]])
            chains.append(" <- ".join(".".join(parts) for parts in chain))
    assert not chains, chains


def test_metrics_registry_reads_the_multiprocess_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    registry = metrics_registry()
    assert registry is not default_events().registry
    assert list(registry.collect()) == []  # an empty dir: no process wrote yet
    monkeypatch.delenv(MULTIPROC_ENV)
    assert metrics_registry() is default_events().registry


# --------------------------------------------------------------------------
# scrape-time queue state against the real cluster
# --------------------------------------------------------------------------


@pytest.fixture
async def loaded_queue(cluster_url: str, cluster_client: RedisCluster, unique_name: str) -> str:
    """A queue with entries, some delivered and unacknowledged, some acked, some new."""
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=4, xread_block=200)
    await broker.startup()
    try:
        await asyncio.gather(*(broker.kick(make_message(f"a{i}")) for i in range(40)))
        got = await take(broker, 8, ack=False)
        for msg in got[:3]:
            await msg.ack()  # type: ignore[misc]
    finally:
        await broker.shutdown()
    # New entries no consumer has seen: positive lag.
    producer = ClusterStreamBroker(cluster_url, queue_name=unique_name)
    await producer.startup()
    try:
        await asyncio.gather(*(producer.kick(make_message(f"b{i}")) for i in range(12)))
    finally:
        await producer.shutdown()
    return unique_name


@pytest.mark.cluster
async def test_scrape_reports_what_xlen_and_xpending_show(
    cluster_client: RedisCluster, loaded_queue: str
) -> None:
    text, duration = await scrape_once(cluster_client, [loaded_queue])
    assert duration > 0
    families = parse(text)
    plan = await _shard_streams(cluster_client, loaded_queue)
    q = {"queue": loaded_queue}
    lengths = values(families, METRIC_PREFIX + "stream_length", **q, state="active")
    pending = values(families, METRIC_PREFIX + "group_pending", **q, group="taskiq")
    lag = values(families, METRIC_PREFIX + "group_lag", **q, group="taskiq")
    lag_seconds = values(families, METRIC_PREFIX + "group_lag_seconds", **q, group="taskiq")
    assert set(lengths) == {str(s.index) for s in plan.shards}
    for shard in plan.shards:
        stream = shard.keys("tqrc").stream
        i = str(shard.index)
        assert lengths[i] == await cluster_client.xlen(stream)
        summary = await cluster_client.xpending(stream, "taskiq")
        assert pending[i] == summary["pending"]
        (group,) = await cluster_client.xinfo_groups(stream)
        assert lag[i] == group["lag"]
        assert (lag_seconds[i] > 0) == (group["lag"] > 0)
    assert sum(lengths.values()) == 52
    assert sum(pending.values()) >= 5  # taken, plus prefetched ones released at shutdown
    assert sum(lag.values()) >= 12
    epoch = values(families, METRIC_PREFIX + "plan_epoch", **q)
    assert epoch == {"": plan.epoch}
    masters = [
        s
        for s in families[METRIC_PREFIX + "master_shards"].samples
        if s.labels["queue"] == loaded_queue and s.labels["state"] == "active"
    ]
    assert sum(s.value for s in masters) == 4
    assert len(masters) == 3  # every slot-serving master, zero included


@pytest.mark.cluster
async def test_scrape_declares_exactly_the_exporter_specs(
    cluster_client: RedisCluster, loaded_queue: str
) -> None:
    for per_consumer in (False, True):
        text, _ = await scrape_once(cluster_client, [loaded_queue], per_consumer=per_consumer)
        declared = _declared(text)
        expected = {
            s.family: (s.kind, tuple(sorted(s.labels)))
            for s in METRICS
            if s.source == "exporter" and (per_consumer or not s.optional)
        }
        # scrape_errors_total has no sample when nothing failed: no labels seen.
        declared[METRIC_PREFIX + "scrape_errors"] = ("counter", ("reason",))
        assert declared == expected


@pytest.mark.cluster
async def test_all_queues_by_default_and_missing_queue_is_an_error(
    cluster_client: RedisCluster, loaded_queue: str, unique_name: str
) -> None:
    text, _ = await scrape_once(cluster_client)
    assert values(parse(text), METRIC_PREFIX + "plan_epoch", queue=loaded_queue)
    missing = unique_name + "-none"
    text, _ = await scrape_once(cluster_client, [missing])
    families = parse(text)
    errors = values(families, METRIC_PREFIX + "scrape_errors", reason="no_plan")
    assert errors == {"": 1}
    assert not values(families, METRIC_PREFIX + "stream_length", queue=missing)


@pytest.mark.cluster
async def test_oldest_pending_age_grows_until_another_worker_reclaims(
    cluster_url: str, cluster_client: RedisCluster, unique_name: str
) -> None:
    # A "crashed" worker: takes every entry, never acks, goes away.
    crashed = ClusterStreamBroker(
        cluster_url, queue_name=unique_name, shards=3, xread_block=200, consumer_name="crashed"
    )
    await crashed.startup()
    try:
        await asyncio.gather(*(crashed.kick(make_message(f"c{i}")) for i in range(6)))
        await take(crashed, 6, ack=False)
    finally:
        await crashed.shutdown()
    reader = QueueStateReader(cluster_client, queues=[unique_name])
    name = METRIC_PREFIX + "group_oldest_pending_idle_seconds"

    async def oldest() -> tuple[float, float]:
        snapshot = await reader.read()
        assert snapshot.errors == []
        ages = [v for _, v in snapshot.samples.items(name)]
        pending = [v for _, v in snapshot.samples.items(METRIC_PREFIX + "group_pending")]
        return max(ages), sum(pending)

    seen = []
    for _ in range(3):
        seen.append(await oldest())
        await asyncio.sleep(0.3)
    assert [p for _, p in seen] == [6, 6, 6]
    ages = [a for a, _ in seen]
    assert ages[0] < ages[1] < ages[2], ages

    registry = CollectorRegistry()
    rescuer = ClusterStreamBroker(
        cluster_url,
        queue_name=unique_name,
        idle_timeout=1000,
        xread_block=200,
        events=PrometheusEvents(registry=registry),
    )
    await rescuer.startup()
    try:
        got = await take(rescuer, 6, ack=True)
        assert len(got) == 6
        async def nothing_pending() -> bool:
            return await oldest() == (0, 0)

        await eventually(nothing_pending, "no entry pending", 15, interval=0.1)
        assert await oldest() == (0, 0)
    finally:
        await rescuer.shutdown()
    assert registry.get_sample_value(METRIC_PREFIX + "reclaimed_total", {"queue": unique_name}) == 6
    assert registry.get_sample_value(METRIC_PREFIX + "acked_total", {"queue": unique_name}) == 6


@pytest.mark.cluster
async def test_trimmed_undelivered_entries_are_flagged(
    cluster_client: RedisCluster, unique_name: str, cluster_url: str
) -> None:
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=1, xread_block=200)
    await broker.startup()
    try:
        await broker.kick(make_message("t0"))
        await take(broker, 1, ack=True)
        for i in range(5):
            await broker.kick(make_message(f"t{i + 1}"))
    finally:
        await broker.shutdown()
    plan = await _shard_streams(cluster_client, unique_name)
    stream = plan.shards[0].keys("tqrc").stream
    reader = QueueStateReader(cluster_client, queues=[unique_name])
    flag = METRIC_PREFIX + "group_undelivered_trimmed"
    labels = (unique_name, "0", "active", "taskiq")
    before = await reader.read()
    assert before.samples.value(flag, labels) == 0
    assert before.samples.value(METRIC_PREFIX + "group_lag", labels) == 5
    # What maxlen= does: drop entries nobody has received yet.
    await cluster_client.xtrim(stream, maxlen=2, approximate=False)
    after = await reader.read()
    assert after.samples.value(flag, labels) == 1
    assert after.samples.value(METRIC_PREFIX + "stream_length", labels[:3]) == 2


@pytest.mark.cluster
async def test_priority_lanes_count_in_the_shard_and_per_lane(
    cluster_client: RedisCluster, unique_name: str, cluster_url: str
) -> None:
    """Issue 16: lane streams take part in the per-shard metrics, and
    lane_backlog / lane_lag_seconds tell the lanes apart."""
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=1, xread_block=200)
    await broker.startup()
    try:
        # Default options: 3 lanes; priority 3 is lane 1, 9 lane 2. One entry
        # per lane delivered (what was read is left pending at shutdown).
        for labels in ({}, {"priority": 3}, {"priority": 9}):
            await broker.kick(make_message(f"read-{labels}", **labels))
        assert len(await take(broker, 3, ack=False)) == 3
    finally:
        await broker.shutdown()
    producer = ClusterStreamBroker(cluster_url, queue_name=unique_name)
    await producer.startup()
    try:  # and undelivered ones in every lane: 5, 4 and 3
        for lane, priority in ((0, 0), (1, 3), (2, 9)):
            for i in range(5 - lane):
                await producer.kick(make_message(f"p{lane}-{i}", priority=priority))
    finally:
        await producer.shutdown()
    await asyncio.sleep(0.05)  # so that the undelivered entries have an age
    keys = (await _shard_streams(cluster_client, unique_name)).shards[0].keys("tqrc")
    lengths, lags, pendings = [], [], []
    for lane in range(3):
        stream = keys.lane(lane)
        lengths.append(await cluster_client.xlen(stream))
        (group,) = await cluster_client.xinfo_groups(stream)
        lags.append(group["lag"])
        pendings.append(group["pending"])
    assert lengths == [6, 5, 4]
    assert (lags, pendings) == ([5, 4, 3], [1, 1, 1])
    snapshot = await QueueStateReader(cluster_client, queues=[unique_name]).read()
    assert snapshot.errors == []
    samples = snapshot.samples
    shard = (unique_name, "0", "active")
    group = (*shard, "taskiq")
    assert samples.value(METRIC_PREFIX + "stream_length", shard) == 15
    assert samples.value(METRIC_PREFIX + "group_lag", group) == 12
    assert samples.value(METRIC_PREFIX + "group_pending", group) == 3
    backlog = dict(samples.items(METRIC_PREFIX + "lane_backlog"))
    assert backlog == {
        (*group, str(lane)): float(lags[lane] + pendings[lane]) for lane in range(3)
    }
    ages = dict(samples.items(METRIC_PREFIX + "lane_lag_seconds"))
    assert set(ages) == {(*group, str(lane)) for lane in range(3)}
    assert all(age > 0 for age in ages.values())
    assert samples.value(METRIC_PREFIX + "group_lag_seconds", group) == max(ages.values())
    # A queue without lanes has only lane 0.
    plain = ClusterStreamBroker(
        cluster_url, queue_name=unique_name + "-plain", shards=1, priority_lanes=1
    )
    await plain.startup()
    try:
        await plain.kick(make_message("x"))
    finally:
        await plain.shutdown()
    snapshot = await QueueStateReader(cluster_client, queues=[unique_name + "-plain"]).read()
    assert [labels[-1] for labels, _ in snapshot.samples.items(METRIC_PREFIX + "lane_backlog")] == [
        "0"
    ]


@pytest.mark.cluster
async def test_collector_bridges_to_the_loop_and_counts_timeouts(
    cluster_client: RedisCluster, loaded_queue: str
) -> None:
    loop = asyncio.get_running_loop()
    reader = QueueStateReader(cluster_client, queues=[loaded_queue], timeout=5.0)
    registry = CollectorRegistry()
    registry.register(QueueCollector(reader, loop))
    # prometheus_client calls collect() from another thread; this loop reads.
    text = (await asyncio.to_thread(generate_latest, registry)).decode()
    assert len(values(parse(text), METRIC_PREFIX + "stream_length", queue=loaded_queue)) == 4

    # A deadline that has passed before any reply: every part times out,
    # the output still parses and the errors accumulate over scrapes.
    hurried = QueueStateReader(cluster_client, queues=[loaded_queue], timeout=1e-9)
    collector = QueueCollector(hurried, loop)
    registry = CollectorRegistry()
    registry.register(collector)
    for expected in (1, 2):
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        families = parse(text)
        assert values(families, METRIC_PREFIX + "scrape_errors", reason="timeout")[""] >= expected
        assert not values(families, METRIC_PREFIX + "stream_length")

    # Called on the loop's own thread it must not deadlock.
    snapshot = QueueCollector(reader, loop).snapshot()
    assert snapshot.errors == ["same_loop"]


# --------------------------------------------------------------------------
# counters across `taskiq worker --workers 2`
# --------------------------------------------------------------------------

_APP = """
import os

from taskiq_redis_cluster import ClusterStreamBroker
from taskiq_redis_cluster._metrics import PrometheusEvents


broker = ClusterStreamBroker(
    os.environ["TQRC_TEST_URL"],
    queue_name=os.environ["TQRC_TEST_QUEUE"],
    xread_block=200,
    events=PrometheusEvents(),
)


@broker.task(task_name="noop")
async def noop() -> None:
    return None
"""


@pytest.fixture
def worker_dir(tmp_path: Path) -> Path:
    (tmp_path / "metrics_app.py").write_text(_APP)
    (tmp_path / "prom").mkdir()
    return tmp_path


def _multiprocess_value(path: Path, name: str, labels: dict[str, str]) -> float | None:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return registry.get_sample_value(name, labels)


@pytest.mark.cluster
async def test_counters_are_summed_over_worker_processes(
    cluster_url: str, cluster_client: RedisCluster, unique_name: str, worker_dir: Path
) -> None:
    total = 200
    prom = worker_dir / "prom"
    producer_registry = CollectorRegistry()
    producer = ClusterStreamBroker(
        cluster_url, queue_name=unique_name, events=PrometheusEvents(registry=producer_registry)
    )
    await producer.startup()  # creates the plan the workers will read
    env = {
        **os.environ,
        "PYTHONPATH": str(worker_dir),
        MULTIPROC_ENV: str(prom),
        "TQRC_TEST_URL": cluster_url,
        "TQRC_TEST_QUEUE": unique_name,
    }
    log_path = worker_dir / "worker.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            "metrics_app:broker",
            "--workers",
            "2",
            "--shutdown-timeout",
            "5",
            cwd=worker_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    acked_name = METRIC_PREFIX + "acked_total"
    labels = {"queue": unique_name}
    try:
        # Both workers must be reading before the kicks, so both get work.
        # (Redis 7.0 lists a consumer only after its first delivery, so the
        # workers' own log line is the signal.)
        def both_listening() -> bool:
            assert proc.returncode is None, log_path.read_text()[-3000:]
            return log_path.read_text().count("Listening started") >= 2

        await eventually(both_listening, "both workers listening", 60, interval=0.1)
        assert proc.returncode is None, log_path.read_text()[-3000:]
        await asyncio.sleep(0.5)  # let every shard reader reach its XREADGROUP
        await asyncio.gather(*(producer.kick(make_message(f"w{i}", "noop")) for i in range(total)))

        await eventually(lambda: (_multiprocess_value(prom, acked_name, labels) or 0) >= total,
                         f"{total} acks", 60, interval=0.2,
                         detail=lambda: log_path.read_text()[-3000:])
        await asyncio.sleep(0.5)  # an extra ack would show up now (none may)
        acked = _multiprocess_value(prom, acked_name, labels)
        assert acked == total, log_path.read_text()[-3000:]
        per_process = [
            _multiprocess_value_file(f, acked_name, labels) for f in prom.glob("counter_*.db")
        ]
        contributions = [v for v in per_process if v]
        assert len(contributions) == 2, per_process
        assert (
            producer_registry.get_sample_value(METRIC_PREFIX + "published_total", labels) == total
        )
    finally:
        await producer.shutdown()
        await _stop(proc)


def _multiprocess_value_file(path: Path, name: str, labels: dict[str, str]) -> float | None:
    for metric in MultiProcessCollector.merge([str(path)], accumulate=False):  # type: ignore[no-untyped-call]
        for sample in metric.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except asyncio.TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the workers too
            await asyncio.wait_for(proc.wait(), 10)
