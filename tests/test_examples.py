"""The runnable docs example works end to end through a real `taskiq worker`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_quickstart_example_runs(cluster_url: str, unique_name: str, tmp_path: Path) -> None:
    env = dict(os.environ, TQRC_URL=cluster_url, TQRC_QUEUE=unique_name,
               PYTHONPATH=str(EXAMPLES))
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskiq", "worker", "quickstart:broker", "--workers", "1"],
        cwd=EXAMPLES, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        done = subprocess.run(
            [sys.executable, "quickstart.py", "50"], cwd=EXAMPLES, env=env,
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "50 correct results" in done.stdout
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
