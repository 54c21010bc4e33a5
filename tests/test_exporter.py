"""The HTTP side of the metrics: exporter, in-worker server, CLI, real Prometheus.

The Prometheus test runs the Debian ``prometheus`` binary (installed with
apt-get when missing and we are root; skipped with a reason otherwise) on
loopback with a 1 s scrape interval against the ``exporter`` command, and
compares what Prometheus stored with XLEN / XPENDING.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import eventually, make_message
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import RedisCluster
from taskiq import AckableMessage, InMemoryBroker

from taskiq_redis_cluster import ClusterStreamBroker, InvalidOptionError, PlanStore
from taskiq_redis_cluster._metrics import (
    METRIC_PREFIX,
    METRICS,
    MULTIPROC_ENV,
    MetricsServer,
    PrometheusEvents,
    QueueCollector,
    QueueSnapshot,
    QueueStateReader,
    run_exporter,
    start_metrics_server,
)
from taskiq_redis_cluster._metrics._exporter import BasicAuth, TLSFiles

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


def _request(url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, str]:
    """Status and body of a GET, errors included (urllib raises for 4xx)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, **kwargs) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_server_serves_metrics_and_healthz_only() -> None:
    registry = CollectorRegistry()
    PrometheusEvents(registry=registry).published("jobs", 0, 3)
    with MetricsServer(registry, port=0) as server:
        base = f"http://127.0.0.1:{server.port}"
        status, body = _request(base + "/metrics")
        assert status == 200
        assert _samples(body, METRIC_PREFIX + "published_total", queue="jobs") == {"": 3}
        assert _request(base + "/healthz") == (200, "ok\n")
        # prometheus_client alone answers every path with the metrics.
        for path in ("/", "/other", "/metrics/x", "/favicon.ico", "/healthz/x"):
            status, body = _request(base + path)
            assert status == 404, path
            assert "published_total" not in body


def test_basic_auth_guards_metrics_but_not_healthz() -> None:
    registry = CollectorRegistry()
    PrometheusEvents(registry=registry).published("jobs", 0, 1)
    with MetricsServer(registry, port=0, auth=BasicAuth("prom", "w3b-Pw")) as server:

        def header(user: str, password: str) -> dict[str, str]:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}

        assert _request(server.url)[0] == 401
        assert _request(server.url, header("prom", "wrong"))[0] == 401
        assert _request(server.url, header("other", "w3b-Pw"))[0] == 401
        assert _request(server.url, {"Authorization": "Basic !!!"})[0] == 401
        status, body = _request(server.url, header("prom", "w3b-Pw"))
        assert status == 200
        assert "published_total" in body
        assert _request(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    assert "w3b-Pw" not in repr(BasicAuth("prom", "w3b-Pw"))


def test_tls_through_prometheus_clients_server(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; cannot make a test certificate")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", "key.pem", "-out", "cert.pem",
        ],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    registry = CollectorRegistry()
    PrometheusEvents(registry=registry).published("jobs", 0, 2)
    tls = TLSFiles(certfile=str(tmp_path / "cert.pem"), keyfile=str(tmp_path / "key.pem"))
    with MetricsServer(registry, port=0, tls=tls) as server:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        status, body = _request(server.url, context=context)
        assert status == 200
        assert _samples(body, METRIC_PREFIX + "published_total", queue="jobs") == {"": 2}
        # Plain HTTP on the TLS port gets no metrics.
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            _request(f"http://127.0.0.1:{server.port}/metrics")


class _GatedReader(QueueStateReader):
    """A real reader whose reads wait for ``gate``, so scrapes can pile up."""

    def __init__(self, *args: Any, gate: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    async def read(self) -> QueueSnapshot:
        await self.gate.wait()
        return await super().read()


@pytest.mark.cluster
async def test_twenty_concurrent_scrapes_share_one_cluster_read(
    cluster_client: RedisCluster, queue_with_work: str
) -> None:
    gate = asyncio.Event()
    reader = _GatedReader(cluster_client, queues=[queue_with_work], gate=gate, timeout=10.0)
    collector = QueueCollector(reader, asyncio.get_running_loop())
    registry = CollectorRegistry()
    registry.register(collector)
    loop = asyncio.get_running_loop()
    with (
        MetricsServer(registry, port=0) as server,
        concurrent.futures.ThreadPoolExecutor(20) as pool,
    ):
        scrapes = [loop.run_in_executor(pool, _request, server.url) for _ in range(20)]
        try:
            await eventually(
                lambda: asyncio.sleep(0, collector.waiting == 20), "20 scrapes waiting"
            )
        finally:
            gate.set()
        results = await asyncio.gather(*scrapes)
    assert collector.reads == 1
    lengths, _ = await _truth(cluster_client, queue_with_work)
    for status, body in results:
        assert status == 200
        assert _samples(body, METRIC_PREFIX + "stream_length", queue=queue_with_work) == lengths
    # The next scrape, with none in flight and no minimum interval, reads again.
    await asyncio.to_thread(collector.snapshot)
    assert collector.reads == 2


@pytest.mark.cluster
async def test_min_interval_serves_the_last_read_inside_the_window(
    cluster_client: RedisCluster, queue_with_work: str
) -> None:
    now = [1000.0]
    reader = QueueStateReader(cluster_client, queues=[queue_with_work])
    collector = QueueCollector(
        reader, asyncio.get_running_loop(), min_interval=10.0, clock=lambda: now[0]
    )
    first = await asyncio.to_thread(collector.snapshot)
    now[0] += 9.5
    again = await asyncio.to_thread(collector.snapshot)
    assert again is first
    assert collector.reads == 1
    now[0] += 1.0  # 10.5 s after the read
    fresh = await asyncio.to_thread(collector.snapshot)
    assert fresh is not first
    assert collector.reads == 2
    with pytest.raises(InvalidOptionError):
        QueueCollector(reader, asyncio.get_running_loop(), min_interval=-1)


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
    for args in (
        ["check", "rules", "alerts.yml"],
        ["check", "rules", "recording-rules.yml"],
        ["check", "config", "prometheus.yml"],
    ):
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


@pytest.mark.cluster
async def test_prometheus_scrapes_the_cli_exporter_and_records_the_queue_lag(
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
    # The URL from the environment, as operators pass it (issue 17).
    exporter = await _start(
        [
            sys.executable,
            "-m",
            "taskiq_redis_cluster._cli._main",
            "exporter",
            "--queue",
            queue_with_work,
            "--port",
            str(exporter_port),
        ],
        tmp_path / "exporter.log",
        env={**os.environ, MULTIPROC_ENV: str(prom_dir), "TQRC_URL": cluster_url},
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(COMPOSE / "recording-rules.yml")],
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
        # A server that is not up yet refuses (OSError): poll until it answers.
        await eventually(
            lambda: asyncio.to_thread(_get, f"http://127.0.0.1:{exporter_port}/metrics", 5.0),
            "the exporter",
            30,
            interval=0.25,
            ignoring=OSError,
        )
        q = f'queue="{queue_with_work}"'
        lengths = await eventually(
            lambda: query(f"{METRIC_PREFIX}stream_length{{{q}}}"), "a scraped sample", 45,
            interval=0.25, ignoring=OSError,
        )
        pending = await query(f'{METRIC_PREFIX}group_pending{{{q},group="taskiq"}}')
        acked = await query(f"{METRIC_PREFIX}acked_total{{{q}}}")
        status, _ = await asyncio.to_thread(_request, f"http://127.0.0.1:{exporter_port}/other")
        assert status == 404
        true_lengths, true_pending = await _truth(cluster_client, queue_with_work)

        # The recording rules sum the lag over the shards; a backlog raises it.
        recorded = f'queue_group:{METRIC_PREFIX}group_lag:sum{{{q},group="taskiq"}}'
        backlog = f'queue_group:{METRIC_PREFIX}backlog:sum{{{q},group="taskiq"}}'
        lag_before = await eventually(lambda: query(recorded), "the recorded lag", 30,
                                      interval=0.25, ignoring=OSError)
        true_lag = await _group_lag(cluster_client, queue_with_work)
        assert lag_before == {"": float(true_lag)}
        await _kick(cluster_url, queue_with_work, 40)

        async def raised() -> dict[str, float] | None:
            now = await query(recorded)
            return now if now.get("") == true_lag + 40 else None

        lag_after = await eventually(raised, "the recorded lag to rise by 40", 30,
                                     interval=0.25, ignoring=OSError)
        assert lag_after == {"": float(true_lag + 40)}
        # Waiting plus in progress (nothing was taken since).
        assert await query(backlog) == {"": float(true_lag + 40 + sum(true_pending.values()))}
    finally:
        prometheus_rc = await _stop(prometheus)
        exporter_rc = await _stop(exporter)
    assert lengths == {k: float(v) for k, v in true_lengths.items()}
    assert pending == {k: float(v) for k, v in true_pending.items()}
    assert acked == {"": 11.0}  # the worker counters from the multiprocess dir
    assert exporter_rc == 0, (tmp_path / "exporter.log").read_text()[-2000:]
    assert prometheus_rc == 0, (tmp_path / "prometheus.log").read_text()[-2000:]


async def _group_lag(client: RedisCluster, queue: str) -> int:
    """The group's lag summed over the shards, read directly (XINFO GROUPS)."""
    plan = await PlanStore(client).load(queue)
    assert plan is not None
    total = 0
    for shard in plan.shards:
        groups = await client.xinfo_groups(shard.keys("tqrc").stream)
        (group,) = [g for g in groups if g["name"] in (b"taskiq", "taskiq")]
        total += int(group["lag"])
    return total


async def _kick(url: str, queue: str, count: int) -> None:
    broker = ClusterStreamBroker(url, queue_name=queue, shards=3)
    await broker.startup()
    try:
        await asyncio.gather(*(broker.kick(make_message(f"more{i}")) for i in range(count)))
    finally:
        await broker.shutdown()


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
