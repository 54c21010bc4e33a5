"""The ``taskiq-redis-cluster`` console command.

``main`` is looked up lazily: importing this package must not import
``_main``, or ``python -m taskiq_redis_cluster._cli._main`` (how the tests
and the chaos harness run the command) warns that ``_main`` was imported
before it ran, and that warning is an extra stderr line in front of every
error line.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "main",
]


def __getattr__(name: str) -> Any:
    if name == "main":
        from ._main import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
