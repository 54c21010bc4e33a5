"""Shared test configuration.

The cluster fixtures (``redis_cluster``, ``cluster_url``, ``cluster_client``,
``unique_name``, ``healthy_cluster``) come from the package's own pytest
plugin, ``taskiq_redis_cluster.pytest_plugin``, loaded through its ``pytest11``
entry point; keep fixtures there, not here.
"""
