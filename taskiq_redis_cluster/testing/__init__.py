"""A throwaway Redis Cluster on loopback, for development and tests.

:class:`DevCluster` starts ``redis-server`` processes (one per node) on
``127.0.0.1``, forms a cluster out of them and stops exactly those processes
again::

    async with DevCluster(masters=3, replicas=1, base_port=7100, directory=tmp) as c:
        client = await connect(c.url)

:func:`throwaway_cluster` picks free ports, starts one and always stops it.
The fault helpers (:meth:`DevCluster.kill_node`, :meth:`DevCluster.pause_node`,
:meth:`DevCluster.failover`, :meth:`DevCluster.migrate_slot`, ...) exist for
chaos tests; :meth:`DevCluster.heal` undoes them well enough for a session
fixture to be reused.

pytest fixtures on top of it live in :mod:`taskiq_redis_cluster.testing.pytest_plugin`.
The plugin is opt-in: name it in your top-level ``conftest.py``::

    pytest_plugins = ["taskiq_redis_cluster.testing.pytest_plugin"]

or pass ``-p taskiq_redis_cluster.testing.pytest_plugin``. Installing this
package adds nothing to unrelated pytest runs.

Layout, one concern per private module: ``_model`` (value objects, parsing),
``_nodes`` (the node set and admin access), ``_pidfiles`` (finding and
stopping our processes), ``_process`` (launching), ``_formation``,
``_health`` (health and topology queries), ``_faults``, and ``_cluster``
(:class:`DevCluster` composed from them).
"""

from ._cluster import DevCluster, throwaway_cluster
from ._model import Node, NodeStatus, TLSConfig, format_slots
from ._pidfiles import kill_from_pid_files, stop_directory
from ._process import check_redis_server, find_free_base_port

__all__ = [
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
