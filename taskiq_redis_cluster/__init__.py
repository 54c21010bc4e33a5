"""taskiq-redis-cluster: cluster-aware sharded taskiq brokers for Redis Cluster.

Everything public is importable from here; the modules behind it are
private and may change without notice (except ``devcluster`` and
``pytest_plugin``, which are public tools for tests and demos).
"""

from ._connection import ConnectionOptions, connect, redact_url
from ._errors import (
    ClusterError,
    ClusterFormationError,
    ConfigurationError,
    ConnectError,
    CorruptPlanError,
    CorruptScheduleError,
    CrossSlotError,
    DevClusterError,
    InvalidNameError,
    InvalidShardCountError,
    InvalidURLError,
    KickError,
    KickFailedError,
    KickOutcomeUnknownError,
    LifecycleError,
    NoMastersError,
    NotAClusterError,
    PlanError,
    PlanNotReplicatedError,
    PlanVersionError,
    PortBusyError,
    RebalanceAbortedError,
    RebalanceError,
    RebalanceLockedError,
    RedisServerMissingError,
    ReplicationTimeoutError,
    ResultError,
    ResultNotFoundError,
    ScheduleError,
    TopologyError,
)
from ._events import BrokerEvents
from ._exporter import MetricsServer, run_exporter, scrape_once, start_metrics_server
from ._list import ClusterListQueueBroker
from ._metrics import (
    PrometheusEvents,
    QueueCollector,
    QueueSnapshot,
    QueueStateReader,
    default_events,
    metrics_registry,
)
from ._options import ListOptions, QueueOptions, StreamOptions
from ._planner import QueueSpec, Shard, ShardPlan, balance, plan_queue, replan
from ._planstore import PlanStore
from ._pubsub import ClusterPubSubBroker
from ._rebalance import (
    RebalanceEvent,
    RebalanceEventKind,
    RebalanceOptions,
    RebalancePreview,
    Rebalancer,
    RebalanceResult,
    RebalanceStatus,
)
from ._result_backend import ClusterResultBackend
from ._retry import RetryPolicy
from ._schedule_source import ClusterListScheduleSource
from ._stream import ClusterStreamBroker
from ._topology import MasterInfo, Topology, read_topology

__all__ = [
    "BrokerEvents",
    "ClusterError",
    "ClusterFormationError",
    "ClusterListQueueBroker",
    "ClusterListScheduleSource",
    "ClusterPubSubBroker",
    "ClusterResultBackend",
    "ClusterStreamBroker",
    "ConfigurationError",
    "ConnectError",
    "ConnectionOptions",
    "CorruptPlanError",
    "CorruptScheduleError",
    "CrossSlotError",
    "DevClusterError",
    "InvalidNameError",
    "InvalidShardCountError",
    "InvalidURLError",
    "KickError",
    "KickFailedError",
    "KickOutcomeUnknownError",
    "LifecycleError",
    "ListOptions",
    "MasterInfo",
    "MetricsServer",
    "NoMastersError",
    "NotAClusterError",
    "PlanError",
    "PlanNotReplicatedError",
    "PlanStore",
    "PlanVersionError",
    "PortBusyError",
    "PrometheusEvents",
    "QueueCollector",
    "QueueOptions",
    "QueueSnapshot",
    "QueueSpec",
    "QueueStateReader",
    "RebalanceAbortedError",
    "RebalanceError",
    "RebalanceEvent",
    "RebalanceEventKind",
    "RebalanceLockedError",
    "RebalanceOptions",
    "RebalancePreview",
    "RebalanceResult",
    "RebalanceStatus",
    "Rebalancer",
    "RedisServerMissingError",
    "ReplicationTimeoutError",
    "ResultError",
    "ResultNotFoundError",
    "RetryPolicy",
    "ScheduleError",
    "Shard",
    "ShardPlan",
    "StreamOptions",
    "Topology",
    "TopologyError",
    "balance",
    "connect",
    "default_events",
    "metrics_registry",
    "plan_queue",
    "read_topology",
    "redact_url",
    "replan",
    "run_exporter",
    "scrape_once",
    "start_metrics_server",
]
