"""Frozen option values shared by the brokers.

Every broker keeps its settings in one of these values instead of a long
list of attributes, so the list, stream and pub/sub brokers, the rebalancer
and the exporter all read the same names with the same meaning.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from ._errors import InvalidOptionError, InvalidShardCountError
from ._keys import DEFAULT_PREFIX, MAX_LANES, validate_name
from ._redis import ConnectionOptions


def default_consumer_name() -> str:
    """Unique, readable consumer name: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


OptionsT = TypeVar("OptionsT", bound="QueueOptions")


_CONNECTION_FIELDS = frozenset({"socket_timeout", "socket_connect_timeout", "password"})


def resolve_options(
    cls: type[OptionsT],
    options: OptionsT | None,
    kwargs: dict[str, Any],
    *,
    max_connection_pool_size: int | None,
    **values: Any,
) -> OptionsT:
    """Build a broker's options from its keyword arguments, or check ``options``.

    Keywords that name a field of ``cls`` become options; the rest go to
    redis-py through ``ConnectionOptions.extra``. With ``options=`` given, no
    other keyword is accepted, so nothing is silently ignored.
    """
    if options is not None:
        if kwargs:
            raise InvalidOptionError(
                option="options",
                reason=f"options= excludes other keyword arguments: {sorted(kwargs)}",
            )
        return options
    names = {f.name for f in fields(cls)}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    # Client keywords that ConnectionOptions models itself: passed through as
    # redis-py extras they would bypass it (the socket-timeout floor that
    # blocking reads rely on, the password kept out of reprs).
    modelled = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONNECTION_FIELDS}
    connection = ConnectionOptions(
        max_connections=max_connection_pool_size or ConnectionOptions.max_connections,
        extra=dict(kwargs),
        **modelled,
    )
    return cls(**{**values, **extra, "connection": connection})


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidOptionError(
            option=name, reason=f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )


@dataclass(frozen=True)
class QueueOptions:
    """Options of a sharded queue, common to every queue broker.

    :param queue_name: logical queue name (no braces).
    :param prefix: prefix of every key (no braces).
    :param shards: shard count used when the plan is first created; ``None``
        means ``shards_per_master`` times the number of masters. An existing
        plan always wins: the count cannot change after creation.
    :param shards_per_master: see ``shards``.
    :param plan_poll_interval: seconds between cheap checks of the plan
        epoch, so producers and consumers follow the rebalancer.
    :param shard_assignment: listening workers share the shards out among
        themselves (each shard read by at least one live worker, its
        housekeeping done by one), so the Redis cost of an idle queue does
        not grow with the number of workers. ``False``: every worker reads
        every shard (the cost grows with
        workers times shards).
    :param worker_ttl: seconds after its last heartbeat at which a worker
        that died without leaving loses its shards to the others (they beat
        every ``min(plan_poll_interval, worker_ttl / 3)`` seconds).
    :param connection: client options (pool size, timeouts, TLS extras).
    """

    queue_name: str = "taskiq"
    prefix: str = DEFAULT_PREFIX
    shards: int | None = None
    shards_per_master: int = 4
    plan_poll_interval: float = 2.0
    shard_assignment: bool = True
    worker_ttl: float = 6.0
    connection: ConnectionOptions = field(default_factory=ConnectionOptions)

    def __post_init__(self) -> None:
        validate_name(self.queue_name, "queue")
        validate_name(self.prefix, "prefix")
        if self.shards is not None and not 1 <= self.shards <= 16384:
            raise InvalidShardCountError(queue=self.queue_name, shards=self.shards)
        _positive("shards_per_master", self.shards_per_master)
        _positive("plan_poll_interval", self.plan_poll_interval)
        _positive("worker_ttl", self.worker_ttl)
        if not isinstance(self.shard_assignment, bool):
            raise InvalidOptionError(
                option="shard_assignment",
                reason=f"must be True or False, got {self.shard_assignment!r}",
            )

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between a listening worker's heartbeats (and looks at the plan)."""
        return min(self.plan_poll_interval, self.worker_ttl / 3)


@dataclass(frozen=True)
class StreamOptions(QueueOptions):
    """Options of :class:`ClusterStreamBroker`.

    Names and units follow taskiq-redis's ``RedisStreamBroker`` where the
    meaning is the same (``idle_timeout`` and ``xread_block`` in ms).

    :param consumer_group_name: consumer group of every shard stream.
    :param consumer_name: this process's consumer name (default: unique).
    :param idle_timeout: ms an entry may stay unacknowledged, with nobody
        renewing its lease, before another worker reclaims it (crash
        recovery). With ``renew_leases`` (the default) a running task's
        worker keeps its entry fresh, so this can be seconds whatever the
        task's length; without, it must exceed your longest task.
    :param xread_block: ms one XREADGROUP blocks waiting for entries.
    :param xread_count: most entries a worker holds unprocessed (prefetch),
        split fairly over the shards.
    :param unacknowledged_batch_size: most entries one reclaim pass takes.
    :param max_deliveries: deliveries after which an entry is dead-lettered.
    :param wait_replicas: replicas that must confirm a kick (WAIT); 0 = off.
    :param wait_timeout: ms to wait for ``wait_replicas``.
    :param maxlen: opt-in hard cap on stream length. DANGEROUS: it deletes
        entries whether or not they were processed. Default ``None`` trims only
        acknowledged entries.
    :param approximate: use ``~`` for ``maxlen`` trimming.
    :param trim_interval: seconds between safe (MINID) trims of each shard.
    :param reclaim_interval: seconds between reclaim passes; ``None`` derives
        it from ``idle_timeout``.
    :param dead_letter_maxlen: approximate cap of each dead-letter stream.
    :param max_batch: most commands one auto-pipelined flush sends.
    :param stale_consumer_idle: ms after which a consumer with nothing
        pending is removed from the group (every worker restart leaves one
        behind). A live consumer is idle for at most ``xread_block``, and a
        removed one is recreated by its next read, so this is always safe.
    :param renew_leases: a worker renews the entries it holds (read and
        not yet handed out, or whose task is running) so that they are not
        reclaimed while it lives; see docs/brokers.md, "Long tasks and ack
        types". ``False`` restores reclaiming after ``idle_timeout`` whatever
        the worker does.
    :param lease_renew_interval: seconds between renewals; ``None`` means a
        third of ``idle_timeout``. Must be shorter than ``idle_timeout``.
    :param dedup_ttl: seconds a ``dedup_key`` blocks later kicks of the same
        key, for kicks without a ``dedup_ttl`` label.
    :param priority_lanes: streams per shard for the ``priority`` label,
        counting the shard's own stream (lane 0, where kicks without the
        label go); 1 turns priorities off (the label is then ignored), at
        most ``MAX_LANES`` (10). Each extra lane costs every worker one more
        blocking read per shard. Producers pick lanes with it; workers also
        read any other lane they find, so a mismatch strands nothing.
    :param max_priority: the highest ``priority`` label value; larger values
        count as this one. Values ``0 .. max_priority`` are spread evenly
        over the lanes: ``lane = ceil(priority * (priority_lanes - 1) /
        max_priority)``, so with the defaults 0 is lane 0, 1-4 lane 1 and 5-9
        lane 2.
    :param priority_fairness: a worker hands out messages from its highest
        non-empty lane first, except that every ``priority_fairness``-th one
        is the message that has waited longest in the worker, whatever its
        lane: a busy higher lane slows a lower one down but never stops it.
    """

    consumer_group_name: str = "taskiq"
    consumer_name: str = field(default_factory=default_consumer_name)
    idle_timeout: int = 600_000
    xread_block: int = 2_000
    xread_count: int = 100
    unacknowledged_batch_size: int = 100
    max_deliveries: int = 5
    wait_replicas: int = 0
    wait_timeout: int = 1_000
    maxlen: int | None = None
    approximate: bool = True
    trim_interval: float = 10.0
    reclaim_interval: float | None = None
    dead_letter_maxlen: int = 100_000
    max_batch: int = 512
    stale_consumer_idle: int = 3_600_000
    renew_leases: bool = True
    lease_renew_interval: float | None = None
    dedup_ttl: float = 3600.0
    priority_lanes: int = 3
    max_priority: int = 9
    priority_fairness: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.priority_lanes <= MAX_LANES:
            raise InvalidOptionError(
                option="priority_lanes",
                reason=f"must be 1..{MAX_LANES}, got {self.priority_lanes!r}",
            )
        if self.max_priority < self.priority_lanes - 1:
            raise InvalidOptionError(
                option="max_priority",
                reason=f"must be at least priority_lanes - 1 ({self.priority_lanes - 1}) so "
                f"that every lane has a priority, got {self.max_priority!r}",
            )
        if self.priority_fairness < 2:
            raise InvalidOptionError(
                option="priority_fairness",
                reason=f"must be >= 2 (every n-th hand-out is the oldest), "
                f"got {self.priority_fairness!r}",
            )
        validate_name(self.consumer_group_name, "consumer group")
        validate_name(self.consumer_name, "consumer")
        for name in ("idle_timeout", "xread_block", "xread_count", "unacknowledged_batch_size",
                     "max_deliveries", "wait_timeout", "trim_interval", "dead_letter_maxlen",
                     "max_batch", "stale_consumer_idle", "dedup_ttl"):
            _positive(name, getattr(self, name))
        _positive("wait_replicas", self.wait_replicas, allow_zero=True)
        if self.maxlen is not None:
            _positive("maxlen", self.maxlen)
        if self.reclaim_interval is not None:
            _positive("reclaim_interval", self.reclaim_interval)
        if self.lease_renew_interval is not None:
            _positive("lease_renew_interval", self.lease_renew_interval)
            if self.lease_renew_interval * 1000 >= self.idle_timeout:
                raise InvalidOptionError(
                    option="lease_renew_interval",
                    reason=f"must be shorter than idle_timeout ({self.idle_timeout} ms), "
                    f"else leases lapse between renewals; got {self.lease_renew_interval!r} s",
                )

    @property
    def effective_reclaim_interval(self) -> float:
        """Seconds between reclaim passes (a quarter of idle_timeout, 0.2..30 s)."""
        if self.reclaim_interval is not None:
            return self.reclaim_interval
        return min(30.0, max(0.2, self.idle_timeout / 4000))

    def lane_of(self, priority: int) -> int:
        """Lane of a ``priority`` label value (clamped to ``0 .. max_priority``)."""
        if self.priority_lanes == 1 or priority <= 0:
            return 0
        priority = min(priority, self.max_priority)
        return -(-priority * (self.priority_lanes - 1) // self.max_priority)

    @property
    def effective_lease_renew_interval(self) -> float:
        """Seconds between lease renewals (a third of idle_timeout by default)."""
        if self.lease_renew_interval is not None:
            return self.lease_renew_interval
        return self.idle_timeout / 3000


@dataclass(frozen=True)
class ListOptions(QueueOptions):
    """Options of :class:`ClusterListQueueBroker`.

    :param brpop_timeout: seconds one blocking pop waits per shard.
    :param max_batch: most commands one auto-pipelined flush sends.
    :param prefetch: most popped messages a worker holds that taskiq has not
        taken yet (besides one per shard reader). A graceful stop hands them
        back; a crash loses them, so it is kept small: taskiq's own
        ``--max-async-tasks``/``--max-prefetch`` already decide how many a
        worker runs.
    :param reliable: opt-in at-least-once delivery. A pop moves the message
        into this consumer's processing list (BLMOVE) and taskiq's ack
        removes it; the processing list of a consumer whose heartbeat expired
        is moved back to its shard by any other worker.
    :param consumer_name: this process's consumer name (reliable mode;
        default: unique per broker).
    :param heartbeat_ttl: seconds a consumer's heartbeat lives without being
        refreshed (reliable mode). A worker whose event loop is blocked longer
        than this has its messages handed to others and run twice.
    :param recovery_interval: seconds between checks, per shard, for
        processing lists of dead consumers (reliable mode).
    :param dedup_ttl: seconds a ``dedup_key`` blocks later kicks of the same
        key, for kicks without a ``dedup_ttl`` label.
    """

    brpop_timeout: float = 1.0
    max_batch: int = 512
    prefetch: int = 10
    reliable: bool = False
    consumer_name: str = field(default_factory=default_consumer_name)
    heartbeat_ttl: float = 30.0
    recovery_interval: float = 10.0
    dedup_ttl: float = 3600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_name(self.consumer_name, "consumer")
        for name in ("brpop_timeout", "max_batch", "prefetch", "heartbeat_ttl",
                     "recovery_interval", "dedup_ttl"):
            _positive(name, getattr(self, name))
