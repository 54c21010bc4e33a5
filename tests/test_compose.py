"""compose/docker-compose.yml stays a consistent 6-node cluster (no Docker needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "compose" / "docker-compose.yml"


def _interpolate(text: str) -> str:
    """Resolve ``${VAR:-default}`` the way compose does with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _option(command: list[str], name: str) -> str:
    index = command.index(name)
    return _interpolate(command[index + 1])


def _redis_nodes(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][:1] == ["redis-server"]
    }


def _published(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    result = {}
    for item in svc["ports"]:
        host, container = str(item).rsplit(":", 2)[-2:]
        result[int(container)] = int(host)
    return result


def test_six_redis_nodes_with_unique_ports(compose: dict[str, Any]) -> None:
    nodes = _redis_nodes(compose)
    assert len(nodes) == 6
    ports = [int(_option(svc["command"], "--port")) for svc in nodes.values()]
    assert len(set(ports)) == 6
    for svc in nodes.values():
        assert str(svc["image"]).startswith("redis:7")


def test_every_node_is_in_cluster_mode(compose: dict[str, Any]) -> None:
    for svc in _redis_nodes(compose).values():
        assert _option(svc["command"], "--cluster-enabled") == "yes"
        assert _option(svc["command"], "--appendonly") == "yes"


def test_announced_ports_match_published_ports(compose: dict[str, Any]) -> None:
    announced_ips = set()
    for svc in _redis_nodes(compose).values():
        cmd = svc["command"]
        port = int(_option(cmd, "--port"))
        bus = int(_option(cmd, "--cluster-announce-bus-port"))
        assert int(_option(cmd, "--cluster-announce-port")) == port
        assert bus == port + 10000
        published = _published(svc)
        assert published == {port: port, bus: bus}
        announced_ips.add(_option(cmd, "--cluster-announce-ip"))
        assert str(port) in svc["healthcheck"]["test"]
    assert len(announced_ips) == 1


def test_create_lists_exactly_the_six_nodes(compose: dict[str, Any]) -> None:
    nodes = _redis_nodes(compose)
    create = compose["services"]["cluster-create"]
    assert str(create["image"]).startswith("redis:7")
    assert set(create["depends_on"]) == set(nodes)
    assert all(v["condition"] == "service_healthy" for v in create["depends_on"].values())
    script = " ".join(create["command"]) if isinstance(create["command"], list) else ""
    words = shlex.split(_interpolate(script))
    start = words.index("--cluster") + 1
    assert words[start] == "create"
    rest = words[start + 1 :]
    addresses = rest[: rest.index("--cluster-replicas")]
    assert rest[rest.index("--cluster-replicas") + 1] == "1"
    assert "--cluster-yes" in rest
    ip = {_option(svc["command"], "--cluster-announce-ip") for svc in nodes.values()}.pop()
    expected = {f"{ip}:{_option(svc['command'], '--port')}" for svc in nodes.values()}
    assert len(addresses) == 6
    assert set(addresses) == expected


def test_network_gateway_is_the_default_announce_ip(compose: dict[str, Any]) -> None:
    nodes = _redis_nodes(compose)
    ip = {_option(svc["command"], "--cluster-announce-ip") for svc in nodes.values()}.pop()
    gateways = [
        cfg.get("gateway") for net in compose["networks"].values() for cfg in net["ipam"]["config"]
    ]
    assert ip in gateways


# --------------------------------------------------------------------------
# Autoscaling files: recording rules and the KEDA example (issue 17)
# --------------------------------------------------------------------------

_DIR = COMPOSE.parent


def _declared_series() -> set[str]:
    from taskiq_redis_cluster._metrics import METRICS

    names = {s.name for s in METRICS}
    for spec in METRICS:
        if spec.kind == "histogram":
            names |= {spec.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def _recording_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((_DIR / "recording-rules.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_recording_rules_aggregate_declared_metrics_per_queue() -> None:
    rules = _recording_rules()
    records = {r["record"]: r["expr"] for r in rules}
    assert len(records) == len(rules), "a recorded name is defined twice"
    for name, expr in records.items():
        # level:metric:operation, one series per queue (and group, and
        # priority lane, where the metric has them)
        match = re.fullmatch(
            r"(queue_group_lane|queue_group|queue):taskiq_redis_cluster_[a-z_]+:(sum|max)", name
        )
        assert match, name
        by = {"queue_group_lane": "(queue, group, lane)", "queue_group": "(queue, group)",
              "queue": "(queue)"}[match.group(1)]
        assert f"by {by}" in expr, name
        used = set(re.findall(r"\btaskiq_redis_cluster_[a-z_]+", expr))
        assert used, name
        assert used <= _declared_series(), (name, used - _declared_series())
    lag = records["queue_group:taskiq_redis_cluster_group_lag:sum"]
    assert lag.strip() == "sum by (queue, group) (taskiq_redis_cluster_group_lag)"
    delayed = records["queue:taskiq_redis_cluster_delayed:sum"]
    assert delayed.strip() == "sum by (queue) (taskiq_redis_cluster_delayed)"
    prometheus = yaml.safe_load((_DIR / "prometheus.yml").read_text())
    assert "recording-rules.yml" in prometheus["rule_files"]


def test_keda_example_queries_recorded_series() -> None:
    doc = yaml.safe_load((_DIR / "keda-scaledobject.yaml").read_text())
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    assert doc["kind"] == "ScaledObject"
    spec = doc["spec"]
    assert spec["scaleTargetRef"]["name"]
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    records = {r["record"] for r in _recording_rules()}
    triggers = spec["triggers"]
    assert triggers
    for trigger in triggers:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http")
        float(meta["threshold"])  # KEDA wants a number in a string
        assert isinstance(meta["threshold"], str)
        used = set(re.findall(r"\bqueue(?:_group)?:[a-z_]+:[a-z]+", meta["query"]))
        assert used, meta["query"]
        assert used <= records, used - records
        assert 'queue="' in meta["query"]
