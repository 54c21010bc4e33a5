"""Every exception this package raises, in one place.

The tree is rooted at taskiq's own ``TaskiqError`` so that code which already
catches taskiq errors keeps working; kick failures are also ``SendTaskError``
and result failures ``ResultBackendError``, as taskiq expects::

    TaskiqError                          (taskiq)
    └── ClusterError
        ├── ConfigurationError           bad option or URL, raised before any I/O
        │   ├── InvalidURLError
        │   ├── InvalidNameError         empty name, or a name with "{" or "}"
        │   ├── InvalidShardCountError   outside 1..16384
        │   └── InvalidOptionError       an option has a bad value or combination (also ValueError)
        ├── ConnectError                 cannot reach or understand the server
        │   └── NotAClusterError         the URL points at a non-cluster Redis
        ├── TopologyError                the live cluster cannot serve a plan
        │   └── NoMastersError
        ├── PlanError
        │   ├── PlanVersionError         plan record written by a newer release
        │   ├── CorruptPlanError         plan record that cannot be parsed
        │   ├── PlanNotFoundError        no plan record for the queue
        │   └── PlanNotReplicatedError   a plan change no replica has confirmed
        ├── CrossSlotError               keys of one operation span two slots
        ├── LifecycleError               startup twice, kick after shutdown, ...
        ├── KickError                    (also taskiq's SendTaskError)
        │   ├── KickFailedError          the task was certainly not enqueued
        │   ├── KickOutcomeUnknownError  the task may or may not be enqueued
        │   └── ReplicationTimeoutError  enqueued, but WAIT saw too few replicas
        ├── ResultError                  (also taskiq's ResultBackendError)
        │   └── ResultNotFoundError      (also taskiq's ResultGetError)
        ├── ScheduleError
        │   └── CorruptScheduleError
        ├── RebalanceError
        │   ├── RebalanceLockedError     another rebalancer holds the lease
        │   └── RebalanceAbortedError    a move timed out; the old plan stays
        └── DevClusterError              the local launcher failed
            ├── RedisServerMissingError
            ├── PortBusyError
            └── ClusterFormationError

Messages never contain passwords: URLs are redacted before they are put into
an exception (see ``_redis._connection.redact_url``).
"""

from __future__ import annotations

from taskiq.exceptions import ResultBackendError, ResultGetError, SendTaskError, TaskiqError


class ClusterError(TaskiqError):
    """Base class of every error raised by taskiq-redis-cluster."""

    __template__ = "{message}"
    message: str = "taskiq-redis-cluster error"


class ConfigurationError(ClusterError):
    """An option or argument is invalid; raised before any I/O happens."""


class InvalidURLError(ConfigurationError):
    """The Redis URL cannot be used (wrong scheme, missing host, ...)."""

    __template__ = "Invalid Redis Cluster URL {url}: {reason}"
    url: str
    reason: str


class InvalidNameError(ConfigurationError):
    """A queue, source or channel name is empty or contains a brace."""

    __template__ = "Invalid {kind} name {name!r}: {reason}"
    kind: str
    name: str
    reason: str


class InvalidShardCountError(ConfigurationError):
    """A shard count is outside 1..16384."""

    __template__ = "Invalid shard count {shards} for queue {queue!r}: must be in 1..16384"
    queue: str
    shards: int


class InvalidOptionError(ConfigurationError, ValueError):
    """An option has a bad value, or conflicts with another option.

    Also a ``ValueError``, which is what such a mistake raised before it was
    typed, so existing ``except ValueError`` handlers keep working.
    """

    __template__ = "Invalid option {option}: {reason}"
    option: str
    reason: str


class ConnectError(ClusterError):
    """The server cannot be reached or does not behave like Redis Cluster."""

    __template__ = "Cannot connect to {url}: {reason}"
    url: str
    reason: str


class NotAClusterError(ConnectError):
    """The URL points at a Redis server that is not in cluster mode."""

    __template__ = (
        "{url} is not a Redis Cluster node (cluster mode is disabled); "
        "use a cluster-mode endpoint or taskiq-redis for a standalone server"
    )
    reason: str = "not a cluster"


class TopologyError(ClusterError):
    """The live topology cannot be read or cannot serve a plan."""


class NoMastersError(TopologyError):
    """The topology has no master that owns slots."""

    __template__ = "The cluster topology has no master that owns slots"


class PlanError(ClusterError):
    """A stored plan cannot be used."""


class PlanVersionError(PlanError):
    """The plan record was written in a format this release does not know."""

    __template__ = (
        "Plan record {key!r} has format version {found}, but this release only "
        "understands up to {supported}; upgrade taskiq-redis-cluster (the record "
        "was left untouched)"
    )
    key: str
    found: int
    supported: int


class CorruptPlanError(PlanError):
    """The plan record exists but cannot be parsed."""

    __template__ = "Plan record {key!r} is corrupt: {reason} (the record was left untouched)"
    key: str
    reason: str


class PlanNotFoundError(PlanError):
    """No plan is stored for the queue (it was never created, or was deleted)."""

    __template__ = "No plan is stored for queue {queue!r} (key {key!r})"
    queue: str
    key: str


class PlanNotReplicatedError(PlanError):
    """A plan change was written on its master but no replica confirmed it.

    The change is in force on the master and may be lost on a failover, so
    it must not be treated as done. ``replicas`` is how many replicas the
    master had: 0 means none (see ``PlanStore(require_replica=False)``).
    """

    __template__ = (
        "Plan record {key!r} was written at epoch {epoch} on its master, but not "
        "confirmed by a replica: {reason}"
    )
    key: str
    epoch: int
    replicas: int
    reason: str


class CrossSlotError(ClusterError):
    """Keys that must share a slot do not."""

    __template__ = "Keys {keys!r} span several slots; they must share one hash tag"
    keys: tuple[str, ...]


class LifecycleError(ClusterError):
    """A component was used in the wrong lifecycle state."""

    __template__ = "{component}: {message}"
    component: str


class KickError(ClusterError, SendTaskError):
    """A task could not be enqueued as asked."""

    __template__ = "Kick to {queue!r} failed: {reason}"
    queue: str
    reason: str


class KickFailedError(KickError):
    """The task was certainly not enqueued; it is safe to retry the kick."""


class KickOutcomeUnknownError(KickError):
    """The connection broke after the XADD was sent: the task may be enqueued.

    Retrying may duplicate the task; not retrying may lose it. The caller
    decides, because only the caller knows whether the task is idempotent.
    """

    __template__ = (
        "Kick to {queue!r} has an unknown outcome ({reason}); the task may or may "
        "not be enqueued"
    )


class ReplicationTimeoutError(KickError):
    """The task was enqueued, but fewer replicas than asked acknowledged it."""

    __template__ = (
        "Task {task_id!r} was enqueued to {queue!r} but only {acked} of {wanted} "
        "replicas acknowledged it within {timeout_ms} ms"
    )
    reason: str = "replication timeout"
    task_id: str
    acked: int
    wanted: int
    timeout_ms: int


class ResultError(ClusterError, ResultBackendError):
    """A result-backend operation failed."""

    __template__ = "Result backend error for task {task_id!r}: {reason}"
    task_id: str
    reason: str


class ResultNotFoundError(ResultError, ResultGetError):
    """No result is stored for the task (never set, expired or already read).

    Also taskiq's ``ResultGetError``, as taskiq-redis's ``ResultIsMissingError``
    is, so code that catches that around ``get_result()`` keeps working.
    """

    reason: str = "no result stored (not ready, expired, or removed by keep_results=False)"


class ScheduleError(ClusterError):
    """A schedule-source operation failed."""


class CorruptScheduleError(ScheduleError):
    """A stored schedule record cannot be decoded."""

    __template__ = "Schedule {schedule_id!r} in source {source!r} is corrupt: {reason}"
    source: str
    schedule_id: str
    reason: str


class RebalanceError(ClusterError):
    """The rebalancer could not complete."""


class RebalanceLockedError(RebalanceError):
    """Another rebalancer holds the lease."""

    __template__ = (
        "Another rebalancer ({holder}) holds the lease on {key!r} for {ttl_ms} ms more; "
        "only one may run at a time"
    )
    key: str
    holder: str
    ttl_ms: int


class RebalanceAbortedError(RebalanceError):
    """A move was aborted (timeout or error); the previous plan stays in force."""

    __template__ = "Move of shard {shard} of queue {queue!r} aborted: {reason}"
    queue: str
    shard: int
    reason: str


class DevClusterError(ClusterError):
    """The local development cluster could not be started or stopped."""


class RedisServerMissingError(DevClusterError):
    """``redis-server`` is missing or too old."""

    __template__ = (
        "{reason}; install Redis 7.0 or newer, e.g. `apt-get install -y redis-server`"
    )
    reason: str


class PortBusyError(DevClusterError):
    """A port the launcher needs is already in use."""

    __template__ = "Port {port} on {host} is already in use; choose another --base-port"
    host: str
    port: int


class ClusterFormationError(DevClusterError):
    """The nodes started but did not form a healthy cluster in time."""

    __template__ = "The cluster did not form: {reason}"
    reason: str
