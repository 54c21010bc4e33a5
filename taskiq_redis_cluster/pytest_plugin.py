"""Moved to :mod:`taskiq_redis_cluster.testing.pytest_plugin`; this alias is removed soon.

It holds no fixture and no hook, and nothing loads it as a plugin any more
(the ``pytest11`` entry point is gone), so the fixtures are never registered
twice. Opt in with ``pytest_plugins = ["taskiq_redis_cluster.testing.pytest_plugin"]``.
"""

from .testing.pytest_plugin import BASE_PORT_ENV

__all__ = ["BASE_PORT_ENV"]
