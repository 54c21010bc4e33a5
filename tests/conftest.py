"""Shared test configuration.

The cluster fixtures (``redis_cluster``, ``cluster_url``, ``cluster_client``,
``unique_name``, ``healthy_cluster``) come from the package's own pytest
plugin, which is opt-in (no ``pytest11`` entry point) and loaded here; keep
cluster fixtures there. Only the standalone (non-cluster) servers, which no
user needs, live here, and the marker checks.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskiq_redis_cluster.testing import find_free_base_port

pytest_plugins = ["taskiq_redis_cluster.testing.pytest_plugin"]


@contextlib.contextmanager
def _redis_server(directory: Path) -> Iterator[str]:
    """A non-cluster redis-server of our own on a free loopback port.

    The machine's standalone Redis on 6379 is not ours to use; this one
    keeps nothing on disk and is stopped at the end.
    """
    server = shutil.which("redis-server")
    assert server is not None, "redis-server is required"
    port = find_free_base_port(1)
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def standalone_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A standalone redis-server for the not-a-cluster checks, which only connect."""
    with _redis_server(tmp_path_factory.mktemp("standalone")) as url:
        yield url


@pytest.fixture
def standalone_redis(tmp_path: Path) -> Iterator[str]:
    """A throwaway standalone redis-server of this test's own, to write data to."""
    with _redis_server(tmp_path) as url:
        yield url


def _own_timeout(item: pytest.Item) -> object:
    """The seconds of the test's own ``pytest.mark.timeout`` (None without one)."""
    for mark in item.own_markers:
        if mark.name == "timeout":
            return mark.kwargs.get("timeout", mark.args[0] if mark.args else None)
    return None


#: The longest timeout (s) a ``chaos`` test may declare for itself.
CHAOS_TIMEOUT_MAX = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a ``chaos`` test that does not bound itself.

    CI runs every test, chaos and slow ones included; what keeps the fault
    scenarios bounded is that each carries its own
    ``@pytest.mark.timeout(N)`` with N <= ``CHAOS_TIMEOUT_MAX`` (a module's
    ``pytestmark`` or the suite-wide ``timeout`` does not count).
    ``helpers.chaos(timeout=N)`` puts both marks on a test.
    """
    unbounded = []
    for item in items:
        if item.get_closest_marker("chaos") is None:
            continue
        seconds = _own_timeout(item)
        if not isinstance(seconds, (int, float)) or not 0 < seconds <= CHAOS_TIMEOUT_MAX:
            unbounded.append(f"  {item.nodeid}: timeout {seconds!r}")
    if unbounded:
        raise pytest.UsageError(
            f"chaos tests need their own @pytest.mark.timeout(N), 0 < N <= "
            f"{CHAOS_TIMEOUT_MAX}:\n" + "\n".join(unbounded)
        )
