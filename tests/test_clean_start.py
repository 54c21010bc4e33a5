"""Every start is warning-clean: a worker, the exporter and each CLI command.

Users see each warning at every start (redis-py 8.2's "A synchronous
redis.retry.Retry was passed to an asyncio client" was one). These tests run
the real commands in their own processes with ``PYTHONWARNINGS=default``,
which shows every warning once per place, DeprecationWarnings of libraries
included, and fail on any of them, or on a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import eventually
from taskiq.kicker import AsyncKicker

from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker
from taskiq_redis_cluster.testing import find_free_base_port

pytestmark = pytest.mark.cluster

#: A warning as Python prints it ("file:line: UserWarning: text"), or a traceback.
_NOISE = re.compile(r"\b\w*Warning: |Traceback \(most recent call last\)")

_CLI = str(Path(sys.executable).with_name("taskiq-redis-cluster"))

_APP = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker

    URL, QUEUE = os.environ["TQRC_URL"], os.environ["TQRC_QUEUE"]
    if os.environ["TQRC_KIND"] == "stream":
        broker = ClusterStreamBroker(URL, queue_name=QUEUE, xread_block=200)
    else:
        broker = ClusterListQueueBroker(URL, queue_name=QUEUE, brpop_timeout=0.2)

    @broker.task(task_name="app:touch")
    async def touch(name: str) -> None:
        Path(os.environ["TQRC_DONE"], name).touch()
    """
)


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.pop("PYTHONWARNINGS", None)
    return {**env, "PYTHONWARNINGS": "default", **more}


def _assert_clean(output: str, what: str) -> None:
    noisy = [line for line in output.splitlines() if _NOISE.search(line)]
    assert not noisy, f"{what} printed warnings or a traceback:\n" + "\n".join(noisy)


def _run(*args: str) -> str:
    done = subprocess.run(
        [_CLI, *args], env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args[:2])} exited {done.returncode}:\n{output}"
    _assert_clean(output, f"taskiq-redis-cluster {' '.join(args[:2])}")
    return output


def _spawn(
    args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group, its output going to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process group gracefully (SIGTERM), and for sure after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["stream", "list"])
async def test_a_worker_starts_runs_and_stops_without_a_warning(
    cluster_url: str, unique_name: str, tmp_path: Path, kind: str
) -> None:
    (tmp_path / "app.py").write_text(_APP)
    done = tmp_path / "done"
    done.mkdir()
    log = tmp_path / "worker.log"
    env = _env(TQRC_URL=cluster_url, TQRC_QUEUE=unique_name, TQRC_KIND=kind,
               TQRC_DONE=str(done), PYTHONPATH=str(tmp_path))
    producer = (
        ClusterStreamBroker(cluster_url, queue_name=unique_name)
        if kind == "stream"
        else ClusterListQueueBroker(cluster_url, queue_name=unique_name)
    )
    proc = _spawn([sys.executable, "-m", "taskiq", "worker", "app:broker", "--workers", "1"],
                  log, env, cwd=tmp_path)
    try:
        await AsyncKicker("app:touch", producer, {}).kiq("ran")
        await eventually(lambda: (done / "ran").exists(), "the worker ran the task", timeout=60)
    finally:
        _stop(proc)
        await producer.shutdown()
    assert proc.returncode is not None
    _assert_clean(log.read_text(errors="replace"), f"a {kind} worker")


def test_the_exporter_starts_serves_and_stops_without_a_warning(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    _run("plan", "create", "--url", cluster_url, "--queue", unique_name, "--shards", "6")
    port = find_free_base_port(1)
    log = tmp_path / "exporter.log"
    proc = _spawn([_CLI, "exporter", "--url", cluster_url, "--queue", unique_name,
                   "--host", "127.0.0.1", "--port", str(port)], log, _env())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "the exporter never served /metrics"
                time.sleep(0.2)
        assert "taskiq" in body
    finally:
        _stop(proc)
    _assert_clean(log.read_text(errors="replace"), "the exporter")


def test_each_cli_command_runs_without_a_warning(cluster_url: str, unique_name: str) -> None:
    url = ("--url", cluster_url)
    _run("--help")
    for group in ("cluster", "plan", "rebalance", "exporter"):
        _run(group, "--help")
    _run("plan", "create", *url, "--queue", unique_name, "--shards", "6")
    assert unique_name in _run("plan", "list", *url)
    _run("plan", "show", *url, "--queue", unique_name, "--json")
    _run("rebalance", "plan", *url, "--queue", unique_name)
    _run("rebalance", "verify", *url, "--queue", unique_name)
    _run("rebalance", "apply", *url, "--queue", unique_name)


def test_rebalance_watch_runs_to_its_end_without_a_warning(
    cluster_url: str, unique_name: str
) -> None:
    url = ("--url", cluster_url)
    _run("plan", "create", *url, "--queue", unique_name, "--shards", "6")
    # --once ends after the first settled check (two polls 0.2 s apart).
    out = _run("rebalance", "watch", *url, "--queue", unique_name, "--once",
               "--poll-interval", "0.2", "--settle-polls", "2", "--max-runtime", "30")
    assert "watch finished" in out


def test_a_local_cluster_goes_up_and_down_without_a_warning(tmp_path: Path) -> None:
    base = str(find_free_base_port(3))
    where = ("--dir", str(tmp_path / f"dev-{uuid.uuid4().hex[:6]}"), "--base-port", base)
    try:
        _run("cluster", "up", *where, "--masters", "3", "--replicas", "0")
        _run("cluster", "status", *where)
    finally:
        _run("cluster", "down", *where)
