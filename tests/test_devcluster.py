"""The local cluster launcher, its CLI and the pytest fixtures, on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import chaos, eventually
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, MovedError, RedisError

from taskiq_redis_cluster import testing
from taskiq_redis_cluster._errors import (
    ClusterFormationError,
    PortBusyError,
    RedisServerMissingError,
)
from taskiq_redis_cluster._redis._connection import ConnectionOptions, connect
from taskiq_redis_cluster.testing import (
    DevCluster,
    Node,
    TLSConfig,
    find_free_base_port,
)

pytestmark = pytest.mark.cluster

CLI = [sys.executable, "-m", "taskiq_redis_cluster._cli._main"]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _redis_pids_on(ports: list[int]) -> list[int]:
    """Pids of any redis-server whose title names one of ``ports``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ours = any(f":{p} ".encode() in cmdline for p in ports)
        if b"redis-server" in cmdline and ours and _alive(int(proc.name)):
            found.append(int(proc.name))
    return found


async def _ping_6379() -> bool:
    """Read-only check of the standalone Redis the tests must never disturb."""
    client = Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def _node_call(node: Node, *args: object, password: str | None = None) -> object:
    async with Redis(
        host=node.host, port=node.port, password=password, socket_timeout=2, protocol=2
    ) as client:
        return await client.execute_command(*args)


async def _replica_get(node: Node, key: str) -> object:
    async with Redis(host=node.host, port=node.port, socket_timeout=2, protocol=2) as client:
        await client.execute_command("READONLY")
        return await client.execute_command("GET", key)


@contextlib.contextmanager
def _busy_port(port: int) -> Iterator[None]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        yield
    finally:
        sock.close()


# --------------------------------------------------------------------------
# The session cluster and its helpers
# --------------------------------------------------------------------------


async def test_session_cluster_is_healthy(healthy_cluster: DevCluster) -> None:
    cluster = healthy_cluster
    info = await _node_call(cluster.nodes[0], "CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    assert "cluster_state:ok" in text
    assert "cluster_size:3" in text
    statuses = await cluster.status()
    assert len(statuses) == 6
    assert all(s.up for s in statuses)
    assert sorted(s.role for s in statuses) == ["master"] * 3 + ["replica"] * 3
    covered = sum(hi - lo + 1 for s in statuses for lo, hi in s.slots)
    assert covered == 16384
    masters = await cluster.masters()
    assert len(masters) == 3
    assert len(await cluster.replicas()) == 3
    for master in masters:
        replica = await cluster.replica_of(master)
        assert replica.port != master.port
    assert cluster.url.startswith("redis://127.0.0.1:")


async def test_fixtures_give_a_working_client(
    cluster_client: RedisCluster, unique_name: str, cluster_url: str
) -> None:
    assert "{" not in unique_name
    assert "}" not in unique_name
    assert not any(c.isspace() for c in unique_name)
    assert unique_name.startswith("t-")
    await cluster_client.set(unique_name, b"v")
    assert await cluster_client.get(unique_name) == b"v"
    await cluster_client.delete(unique_name)
    assert cluster_url.startswith("redis://")


@pytest.mark.slow
@chaos(timeout=120)
async def test_pause_kill_restart_failover_heal(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, unique_name: str
) -> None:
    cluster = healthy_cluster
    key = f"{unique_name}:k"
    master = await cluster.master_of_key(key)
    replica = await cluster.replica_of(master)
    await cluster_client.set(key, b"kept")
    # Make sure the replica has the write before its master dies.
    async def replicated() -> bool:
        return await _replica_get(replica, key) == b"kept"

    await eventually(replicated, "the write on the replica", 5)
    assert await _replica_get(replica, key) == b"kept"

    # Pause: the process stays, but does not answer; resume brings it back.
    await cluster.pause_node(replica)
    with pytest.raises((RedisError, OSError)):
        async with Redis(host=replica.host, port=replica.port, socket_timeout=0.5) as r:
            await r.ping()
    await cluster.resume_node(replica)
    assert await _node_call(replica, "PING")

    # Kill the master: its replica takes over and the key survives.
    await cluster.kill_node(master)
    assert cluster.node_for_port(master.port).pid is None
    slot = key_slot(key.encode())
    async def promoted() -> bool:
        return (await cluster.master_of_slot(slot)).port == replica.port

    await eventually(promoted, "the replica promoted", 30, interval=0.1,
                     ignoring=(RedisError, OSError))
    assert (await cluster.master_of_slot(slot)).port == replica.port
    assert await cluster_client.get(key) == b"kept"

    # Heal: the old master comes back (as a replica of its successor).
    await cluster.heal()
    roles = {s.port: s.role for s in await cluster.status()}
    assert roles[master.port] == "replica"
    assert roles[replica.port] == "master"

    # Manual failover gives the old master its role back, losing nothing.
    await cluster.failover(master)
    assert (await cluster.master_of_slot(slot)).port == master.port
    await cluster.wait_healthy(timeout=60)
    assert await cluster_client.get(key) == b"kept"
    await cluster_client.delete(key)


@chaos(timeout=120)
async def test_migrate_slot_moves_keys_under_load(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, unique_name: str
) -> None:
    cluster = healthy_cluster
    key = f"{{{unique_name}}}:moved"
    counters = [f"{{{unique_name}}}:n{i}" for i in range(40)]
    slot = key_slot(key.encode())
    source = await cluster.master_of_slot(slot)
    target = next(m for m in await cluster.masters() if m.port != source.port)
    await cluster_client.set(key, b"payload")
    done = asyncio.Event()
    increments = 0

    async def writer() -> None:
        # Keys that exist on the source and keys created during the move
        # (ASK to the target) are both exercised.
        nonlocal increments
        for i in range(100_000):
            if done.is_set():
                break
            await cluster_client.incr(counters[i % len(counters)])
            increments += 1

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.05)
        await cluster.migrate_slot(slot, target, batch=7)
        await asyncio.sleep(0.05)
    finally:
        done.set()
        await task

    assert (await cluster.master_of_key(key)).port == target.port
    assert await _node_call(target, "GET", key) == b"payload"
    with pytest.raises(MovedError):
        await _node_call(source, "GET", key)
    assert await cluster_client.get(key) == b"payload"
    values = [int(v or 0) for v in await cluster_client.mget(counters)]
    assert sum(values) == increments > 0
    # Put the slot back so the even layout other tests see is kept.
    await cluster.migrate_slot(slot, source)
    assert (await cluster.master_of_key(key)).port == source.port
    assert await cluster_client.get(key) == b"payload"
    await cluster_client.delete(key, *counters)


# --------------------------------------------------------------------------
# Small clusters of their own
# --------------------------------------------------------------------------


async def test_start_stop_leaves_nothing_running(tmp_path: Path) -> None:
    standalone_before = await _ping_6379()
    base = find_free_base_port(3)
    cluster = DevCluster(masters=3, replicas=0, base_port=base, directory=tmp_path)
    async with cluster:
        pids = [n.pid for n in cluster.nodes]
        assert all(pid is not None and _alive(pid) for pid in pids)
        info = await _node_call(cluster.nodes[1], "CLUSTER", "INFO")
        assert b"cluster_state:ok" in info
        assert b"cluster_size:3" in info
    assert not any(pid is not None and _alive(pid) for pid in pids)
    assert _redis_pids_on(cluster.ports) == []
    assert all(n.pid is None for n in cluster.nodes)
    await cluster.stop()  # idempotent
    if standalone_before:
        assert await _ping_6379()


async def test_busy_port_is_refused_before_starting(tmp_path: Path) -> None:
    base = find_free_base_port(3)
    with _busy_port(base + 1):
        cluster = DevCluster(masters=3, replicas=0, base_port=base, directory=tmp_path)
        with pytest.raises(PortBusyError, match=f"Port {base + 1} "):
            await cluster.start()
    assert _redis_pids_on([base, base + 1, base + 2]) == []
    # The bus port (+10000) counts as well.
    with (
        _busy_port(base + 2 + 10000),
        pytest.raises(PortBusyError, match=f"Port {base + 10002} "),
    ):
        await DevCluster(masters=3, replicas=0, base_port=base, directory=tmp_path).start()
    assert _redis_pids_on([base, base + 1, base + 2]) == []


async def test_missing_redis_server(tmp_path: Path) -> None:
    cluster = DevCluster(
        masters=3,
        replicas=0,
        base_port=find_free_base_port(3),
        directory=tmp_path,
        redis_server="/nonexistent/redis-server",
    )
    with pytest.raises(RedisServerMissingError, match="apt-get install -y redis-server"):
        await cluster.start()
    assert not any((tmp_path / str(p) / "node.pid").exists() for p in cluster.ports)


async def test_acl_user_and_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    password = "s3cret-Pw-91f"
    base = find_free_base_port(6)
    caplog.set_level(logging.DEBUG, logger="taskiq_redis_cluster")
    async with DevCluster(
        masters=3,
        replicas=1,
        base_port=base,
        directory=tmp_path,
        username="app",
        password=password,
    ) as cluster:
        assert cluster.url == f"redis://app:{password}@127.0.0.1:{base}"
        client = await connect(cluster.url)
        try:
            await client.set("acl-key", b"1")
            assert await client.get("acl-key") == b"1"
            assert await client.execute_command("ACL WHOAMI") in (b"app", "app")
        finally:
            await client.aclose()
        # Replication authenticated as the ACL user (wait_healthy checked
        # master_link_status:up on every replica).
        statuses = await cluster.status()
        assert sorted(s.role for s in statuses) == ["master"] * 3 + ["replica"] * 3
        # Without credentials the nodes refuse commands.
        with pytest.raises(AuthenticationError):
            await _node_call(cluster.nodes[0], "GET", "acl-key")
    for port in cluster.ports:
        assert password not in (tmp_path / str(port) / "redis.log").read_text(errors="replace")
    assert password not in caplog.text


async def test_formation_timeout_stops_the_nodes(tmp_path: Path) -> None:
    base = find_free_base_port(3)
    cluster = DevCluster(
        masters=3, replicas=0, base_port=base, directory=tmp_path, form_timeout=0.01
    )
    with pytest.raises(ClusterFormationError, match="did not form"):
        await cluster.start()
    assert _redis_pids_on(cluster.ports) == []
    assert all(n.pid is None for n in cluster.nodes)


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_cli_up_status_down(tmp_path: Path) -> None:
    base = find_free_base_port(3)
    common = ["--dir", str(tmp_path), "--base-port", str(base)]
    password = "cli-Pw-7e2"
    up = _cli("cluster", "up", "--masters", "3", "--replicas", "0", "--password", password, *common)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"redis://:{password}@127.0.0.1:{base}"
        assert password not in up.stderr

        status = _cli("cluster", "status", *common)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.strip().splitlines()
        assert len(lines) == 3
        for i, line in enumerate(lines):
            assert line.startswith(f"127.0.0.1:{base + i} ")
            assert " master " in line
            assert line.endswith(" up")
        pids = [int((tmp_path / str(base + i) / "node.pid").read_text()) for i in range(3)]
        assert all(_alive(pid) for pid in pids)

        wrong = _cli("cluster", "status", "--dir", str(tmp_path), "--base-port", str(base + 1))
        assert wrong.returncode != 0
        assert len(wrong.stderr.strip().splitlines()) == 1
    finally:
        down = _cli("cluster", "down", *common)
    assert down.returncode == 0, down.stderr
    assert "stopped 3 node(s)" in down.stdout
    assert not any(_alive(pid) for pid in pids)
    assert _redis_pids_on([base, base + 1, base + 2]) == []
    for log in tmp_path.glob("*/redis.log"):
        assert password not in log.read_text(errors="replace")
    # A second down finds nothing and still succeeds.
    again = _cli("cluster", "down", *common)
    assert again.returncode == 0
    assert "no running node" in again.stdout


def test_cli_up_on_busy_port_fails_with_one_line(tmp_path: Path) -> None:
    base = find_free_base_port(3)
    with _busy_port(base):
        result = _cli(
            "cluster", "up", "--masters", "3", "--replicas", "0",
            "--dir", str(tmp_path), "--base-port", str(base),
        )  # fmt: skip
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"Port {base} on 127.0.0.1 is already in use" in lines[0]
    assert _redis_pids_on([base, base + 1, base + 2]) == []


def test_cli_missing_redis_server(tmp_path: Path) -> None:
    result = _cli(
        "cluster", "up", "--redis-server", "/nonexistent/redis-server",
        "--dir", str(tmp_path), "--base-port", str(find_free_base_port(6)),
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "apt-get install -y redis-server" in lines[0]


# --------------------------------------------------------------------------
# The public package and its opt-in pytest plugin
# --------------------------------------------------------------------------

PLUGIN = "taskiq_redis_cluster.testing.pytest_plugin"
_OUR_FIXTURES = ("redis_cluster", "cluster_url", "cluster_client", "unique_name")


def test_testing_exports_are_pinned() -> None:
    assert testing.__all__ == [
        "DevCluster",
        "Node",
        "NodeStatus",
        "TLSConfig",
        "check_redis_server",
        "find_free_base_port",
        "format_slots",
        "kill_from_pid_files",
        "stop_directory",
        "throwaway_cluster",
    ]
    public = {
        name
        for name in dir(testing)
        if not name.startswith("_") and not isinstance(getattr(testing, name), type(testing))
    }
    assert public == set(testing.__all__)


def _fixtures_listed(directory: Path) -> set[str]:
    """Fixture names that ``pytest --fixtures`` shows in a bare project."""
    # A project of its own: its own ini (so no parent config is found) and
    # no plugin forced in through the environment.
    (directory / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_PLUGINS", "PYTEST_ADDOPTS")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # 5 is "no tests collected", the normal outcome of an empty project.
    assert result.returncode in (0, 5), result.stdout[-2000:] + result.stderr[-2000:]
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def test_plugin_is_not_loaded_into_unrelated_pytest_runs(
    tmp_path: Path, request: pytest.FixtureRequest, unique_name: str
) -> None:
    listed = _fixtures_listed(tmp_path)
    # The listing is read correctly: pytest's own fixtures are there ...
    assert {"tmp_path", "monkeypatch"} <= listed
    # ... and installing the package put none of ours into an unrelated run
    # (it used to, through a pytest11 entry point), while this project, which
    # opts in through conftest.py, has them (this test got ``unique_name``).
    assert listed.isdisjoint(_OUR_FIXTURES)
    assert request.config.pluginmanager.has_plugin(PLUGIN)
    assert unique_name.startswith("t-")


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def _make_certs(directory: Path) -> TLSConfig:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=tqrc-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
        "-subj", "/CN=localhost")  # fmt: skip
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "node.crt", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    return TLSConfig(
        cert_file=directory / "node.crt",
        key_file=directory / "node.key",
        ca_cert_file=directory / "ca.crt",
    )


def _redis_supports_tls(tls: TLSConfig) -> bool:
    """Start redis-server listening nowhere with TLS options; see if it stays up."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        return True  # let the test fail with RedisServerMissingError
    proc = subprocess.Popen(
        [redis_server, "--port", "0", "--tls-port", str(find_free_base_port(1)),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--tls-cert-file", str(tls.cert_file), "--tls-key-file", str(tls.key_file),
         "--tls-ca-cert-file", str(tls.ca_cert_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=10)
        return True
    return False


async def test_tls_cluster(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; cannot make test certificates")
    certs = tmp_path / "certs"
    certs.mkdir()
    tls = _make_certs(certs)
    if not _redis_supports_tls(tls):
        pytest.skip("this redis-server was built without TLS support")
    async with DevCluster(
        masters=3, replicas=0, base_port=find_free_base_port(3), directory=tmp_path, tls=tls
    ) as cluster:
        assert cluster.url.startswith("rediss://127.0.0.1:")
        client = await connect(
            cluster.url, ConnectionOptions(extra={"ssl_ca_certs": str(tls.ca_cert_file)})
        )
        try:
            await client.set("tls-key", b"over-tls")
            assert await client.get("tls-key") == b"over-tls"
        finally:
            await client.aclose()
        # The plain-text port is closed.
        with pytest.raises((RedisError, OSError)):
            await _node_call(cluster.nodes[0], "PING")
