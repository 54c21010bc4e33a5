"""Shared test configuration.

The cluster fixtures (``redis_cluster``, ``cluster_url``, ``cluster_client``,
``unique_name``, ``healthy_cluster``) come from the package's own pytest
plugin, which is opt-in (no ``pytest11`` entry point) and loaded here; keep
fixtures there, not here.
"""

pytest_plugins = ["taskiq_redis_cluster.testing.pytest_plugin"]
