"""Moved to :mod:`taskiq_redis_cluster.testing`; this alias is removed soon.

Only re-exports, so code that still imports from here keeps working until it
has moved.
"""

from .testing import (
    DevCluster,
    Node,
    NodeStatus,
    TLSConfig,
    check_redis_server,
    find_free_base_port,
    format_slots,
    kill_from_pid_files,
    stop_directory,
    throwaway_cluster,
)
from .testing._model import BUS_PORT_OFFSET, SLOTS, STATE_FILE

__all__ = [
    "BUS_PORT_OFFSET",
    "SLOTS",
    "STATE_FILE",
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
