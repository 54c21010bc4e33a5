"""The execution ledger and worker event log: files outside the cluster under test.

Each task writes ``"<task id> <unix time>\\n"`` with one ``O_APPEND`` write
to a file of its worker process (``exec-<pid>.log``); each worker process
logs its start and readiness to ``workers.log``. A fault in the cluster
cannot corrupt either.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from .config import EVENTS_FILE


def append_line(path: Path, line: str) -> None:
    # One write() of a short line with O_APPEND: atomic between processes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Execution:
    """One run of the ledger task."""

    task_id: str
    at: float
    pid: int


def read_executions(directory: Path) -> list[Execution]:
    """Every execution recorded under ``directory``, oldest first."""
    found: list[Execution] = []
    for path in directory.glob("exec-*.log"):
        pid = int(path.stem.split("-", 1)[1])
        with contextlib.suppress(OSError):
            text = path.read_text()
            # A line still being written has no newline yet; skip it.
            for line in text.splitlines(keepends=True):
                if not line.endswith("\n"):
                    continue
                task_id, _, at = line.strip().partition(" ")
                if task_id:
                    found.append(Execution(task_id, float(at or 0), pid))
    found.sort(key=lambda e: e.at)
    return found


def read_worker_events(directory: Path) -> list[tuple[str, str, int, float]]:
    """``(kind, worker label, pid, time)`` lines of ``workers.log``."""
    rows: list[tuple[str, str, int, float]] = []
    with contextlib.suppress(OSError):
        for line in (directory / EVENTS_FILE).read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                rows.append((parts[0], parts[1], int(parts[2]), float(parts[3])))
    return rows
