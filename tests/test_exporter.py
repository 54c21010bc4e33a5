"""The HTTP side of the metrics: exporter, in-worker server, CLI, real Prometheus.

The Prometheus test runs the Debian ``prometheus`` binary (installed with
apt-get when missing and we are root; skipped with a reason otherwise) on
loopback with a 1 s scrape interval against the ``exporter`` command, and
compares what Prometheus stored with XLEN / XPENDING.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_message
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import RedisCluster
from taskiq import AckableMessage, InMemoryBroker

from taskiq_redis_cluster import ClusterStreamBroker, PlanStore
from taskiq_redis_cluster._metrics import (
    METRIC_PREFIX,
    METRICS,
    MULTIPROC_ENV,
    MetricsServer,
    PrometheusEvents,
    run_exporter,
    start_metrics_server,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
_FORMATTER = InMemoryBroker().formatter


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _samples(text: str, name: str, **match: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                found[sample.labels.get("shard", "")] = sample.value
    return found


@pytest.fixture
async def queue_with_work(cluster_url: str, unique_name: str) -> str:
    """30 entries on 3 shards; 5 handed to a consumer and not acknowledged."""
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=3, xread_block=200)
    await broker.startup()
    try:
        await asyncio.gather(*(broker.kick(make_message(f"e{i}")) for i in range(30)))
        gen = broker.listen()
        taken = 0
        async for msg in gen:
            assert isinstance(msg, AckableMessage)
            taken += 1
            if taken == 5:
                break
        await gen.aclose()
    finally:
        await broker.shutdown()
    return unique_name


async def _truth(client: RedisCluster, queue: str) -> tuple[dict[str, int], dict[str, int]]:
    """XLEN and XPENDING per shard index, read directly."""
    plan = await PlanStore(client).load(queue)
    assert plan is not None
    lengths: dict[str, int] = {}
    pending: dict[str, int] = {}
    for shard in plan.shards:
        stream = shard.keys("tqrc").stream
        lengths[str(shard.index)] = await client.xlen(stream)
        pending[str(shard.index)] = (await client.xpending(stream, "taskiq"))["pending"]
    return lengths, pending


# --------------------------------------------------------------------------
# in-process servers
# --------------------------------------------------------------------------


@pytest.mark.cluster
async def test_exporter_serves_queue_state_over_http(
    cluster_url: str, cluster_client: RedisCluster, queue_with_work: str
) -> None:
    ready: asyncio.Future[MetricsServer] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_exporter(cluster_url, port=0, stop=stop, on_ready=ready.set_result)
    )
    try:
        server = await asyncio.wait_for(ready, 20)
        assert server.host == "127.0.0.1"
        text = await asyncio.to_thread(_get, server.url)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    lengths, pending = await _truth(cluster_client, queue_with_work)
    q = {"queue": queue_with_work}
    assert _samples(text, METRIC_PREFIX + "stream_length", **q) == lengths
    assert _samples(text, METRIC_PREFIX + "group_pending", **q, group="taskiq") == pending
    assert sum(lengths.values()) == 30
    assert sum(pending.values()) >= 5


def test_start_metrics_server_serves_broker_counters() -> None:
    registry = CollectorRegistry()
    events = PrometheusEvents(registry=registry)
    events.published("jobs", 0, 7)
    events.acked("jobs", 0, 5)
    server = start_metrics_server(0, registry=registry)
    assert server is not None
    try:
        text = _get(server.url)
        assert _samples(text, METRIC_PREFIX + "published_total", queue="jobs") == {"": 7}
        assert _samples(text, METRIC_PREFIX + "acked_total", queue="jobs") == {"": 5}
        # Another worker of the pool finds the port taken.
        assert start_metrics_server(server.port, registry=registry, if_port_in_use="skip") is None
        with pytest.raises(OSError, match="in use"):
            start_metrics_server(server.port, registry=registry)
    finally:
        server.close()
        server.close()  # safe twice


# --------------------------------------------------------------------------
# compose/ files
# --------------------------------------------------------------------------


def _known_series() -> set[str]:
    names = {s.name for s in METRICS}
    for spec in METRICS:
        if spec.kind == "histogram":
            names |= {spec.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btaskiq_redis_cluster_[a-z_]+", expr))


def test_dashboard_and_alerts_use_declared_metrics() -> None:
    dashboard = json.loads((COMPOSE / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(dashboard["panels"]) >= 6
    used = set().union(*(_metric_names(e) for e in exprs))
    for wanted in (
        "group_lag",
        "group_pending",
        "group_oldest_pending_idle_seconds",
        "master_shards",
        "reclaimed_total",
        "nogroup_recoveries_total",
    ):
        assert METRIC_PREFIX + wanted in used, wanted
    assert used <= _known_series(), used - _known_series()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

    rules = yaml.safe_load((COMPOSE / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    for rule in alerts:
        assert _metric_names(rule["expr"]) <= _known_series(), rule["alert"]
        assert rule["annotations"]["action"].strip(), rule["alert"]
    exprs_by_alert = {r["alert"]: r for r in alerts}
    assert "deriv(" in exprs_by_alert["TaskiqRedisClusterLagGrowing"]["expr"]
    assert exprs_by_alert["TaskiqRedisClusterUnbalancedPlan"]["for"] == "15m"


@pytest.fixture(scope="session")
def promtool_dir() -> Path:
    """Directory with ``prometheus`` and ``promtool`` (apt-get installed if missing)."""
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(
                "prometheus is not installed and cannot be (needs root and apt-get): "
                "apt-get install -y prometheus"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
        result = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        if result.returncode != 0:
            subprocess.run(
                ["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False
            )
            result = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        if result.returncode != 0 or shutil.which("prometheus") is None:
            pytest.skip(f"apt-get install prometheus failed: {result.stderr[-500:]!r}")
    found = shutil.which("prometheus")
    assert found is not None
    return Path(found).parent


def test_promtool_accepts_the_compose_files(promtool_dir: Path) -> None:
    promtool = str(promtool_dir / "promtool")
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        out = subprocess.run(
            [promtool, *args], cwd=COMPOSE, capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout


# --------------------------------------------------------------------------
# the CLI exporter scraped by a real Prometheus
# --------------------------------------------------------------------------


def _write_counters(prom_dir: Path, queue: str, acked: int) -> None:
    """A separate process in multiprocess mode counts ``acked`` acks (files in prom_dir)."""
    code = textwrap.dedent(
        f"""
        from taskiq_redis_cluster._metrics import PrometheusEvents
        PrometheusEvents().acked({queue!r}, 0, {acked})
        """
    )
    env = {**os.environ, MULTIPROC_ENV: str(prom_dir)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


async def _start(args: list[str], log: Path, **kwargs: Any) -> asyncio.subprocess.Process:
    with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            *args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except asyncio.TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode is not None
    return proc.returncode


async def _wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except OSError:
            last = None
        if last:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.mark.cluster
async def test_prometheus_scrapes_the_cli_exporter(
    promtool_dir: Path,
    cluster_url: str,
    cluster_client: RedisCluster,
    queue_with_work: str,
    tmp_path: Path,
) -> None:
    prom_dir = tmp_path / "multiproc"
    prom_dir.mkdir()
    _write_counters(prom_dir, queue_with_work, 11)
    exporter_port, prometheus_port = _free_port(), _free_port()
    exporter = await _start(
        [
            sys.executable,
            "-m",
            "taskiq_redis_cluster._cli._main",
            "exporter",
            "--url",
            cluster_url,
            "--queue",
            queue_with_work,
            "--port",
            str(exporter_port),
        ],
        tmp_path / "exporter.log",
        env={**os.environ, MULTIPROC_ENV: str(prom_dir)},
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "tqrc",
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    }
                ],
            }
        )
    )
    prometheus = await _start(
        [
            str(promtool_dir / "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        tmp_path / "prometheus.log",
    )
    api = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query="

    async def query(expr: str) -> dict[str, float]:
        body = json.loads(await asyncio.to_thread(_get, api + urllib.parse.quote(expr), 5.0))
        assert body["status"] == "success"
        return {r["metric"].get("shard", ""): float(r["value"][1]) for r in body["data"]["result"]}

    try:
        await _wait_for(
            lambda: asyncio.to_thread(_get, f"http://127.0.0.1:{exporter_port}/metrics", 5.0),
            30,
            "the exporter",
        )
        q = f'queue="{queue_with_work}"'
        lengths = await _wait_for(
            lambda: query(f"{METRIC_PREFIX}stream_length{{{q}}}"), 45, "a scraped sample"
        )
        pending = await query(f'{METRIC_PREFIX}group_pending{{{q},group="taskiq"}}')
        acked = await query(f"{METRIC_PREFIX}acked_total{{{q}}}")
    finally:
        prometheus_rc = await _stop(prometheus)
        exporter_rc = await _stop(exporter)
    true_lengths, true_pending = await _truth(cluster_client, queue_with_work)
    assert lengths == {k: float(v) for k, v in true_lengths.items()}
    assert pending == {k: float(v) for k, v in true_pending.items()}
    assert acked == {"": 11.0}  # the worker counters from the multiprocess dir
    assert exporter_rc == 0, (tmp_path / "exporter.log").read_text()[-2000:]
    assert prometheus_rc == 0, (tmp_path / "prometheus.log").read_text()[-2000:]


def test_cli_exporter_reports_an_unreachable_cluster(tmp_path: Path) -> None:
    port = _free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskiq_redis_cluster._cli._main",
            "exporter",
            "--url",
            f"redis://user:s3cret@127.0.0.1:{port}",
            "--port",
            str(_free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "error:" in out.stderr
    assert "s3cret" not in out.stderr + out.stdout
