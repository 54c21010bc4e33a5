"""Shared test configuration.

The cluster fixtures (``redis_cluster``, ``cluster_url``, ``cluster_client``,
``unique_name``, ``healthy_cluster``) come from the package's own pytest
plugin, which is opt-in (no ``pytest11`` entry point) and loaded here; keep
cluster fixtures there. Only ``standalone_url``, which no user needs, lives
here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskiq_redis_cluster.testing import find_free_base_port

pytest_plugins = ["taskiq_redis_cluster.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def standalone_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A non-cluster redis-server of our own, for the not-a-cluster checks.

    The machine's standalone Redis on 6379 is not ours to use; this one runs
    on a free loopback port, keeps nothing on disk and is stopped at the end.
    """
    server = shutil.which("redis-server")
    assert server is not None, "redis-server is required"
    port = find_free_base_port(1)
    directory: Path = tmp_path_factory.mktemp("standalone")
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
                assert time.monotonic() < deadline, "standalone redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
