"""The queue state, read from the cluster once per scrape (asyncio).

:class:`QueueStateReader` reads every shard stream of the planned queues:
length, lag, pending entries, the idle time of the oldest pending entry,
consumers, plan epoch and how the shards sit on the masters. A shard's
priority lane streams (``P:{T}:lane:N``, found by key: the reader knows no
broker option) count as part of the shard: the per-shard and per-group
gauges combine the lanes the way their spec merges samples (lengths, lags
and pending entries add up; ages, delivery counts and flags take the
largest), and ``lane_backlog``/``lane_lag_seconds`` tell the lanes apart. One read gives
a :class:`QueueSnapshot`; nothing is cached between scrapes. A failed part
is reported as a reason in the snapshot, never raised, so that a scrape
always answers with what could be read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as _Tally
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client.core import Metric
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import InvalidOptionError, PlanError
from .._keys import DEFAULT_PREFIX, MAX_LANES, ShardKeys, workers_key
from .._planning import PlanStore, ShardPlan, Topology, balance, read_topology
from .._redis import error_kind
from ._specs import METRIC_PREFIX, METRICS, SPECS_BY_NAME, empty_family

logger = logging.getLogger(__name__)

_P = METRIC_PREFIX

_K = TypeVar("_K", bound=Hashable)
_T = TypeVar("_T")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse_id(value: Any) -> tuple[int, int] | None:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``; None if not an id."""
    if value is None:
        return None
    ms, sep, seq = _text(value).partition("-")
    try:
        return int(ms), int(seq) if sep else 0
    except ValueError:
        return None


def _get(mapping: Mapping[Any, Any], name: str) -> Any:
    """Field of a redis-py reply dict, whether its keys are str or bytes."""
    if name in mapping:
        return mapping[name]
    return mapping.get(name.encode())


@dataclass(frozen=True)
class _ShardRef:
    queue: str
    index: int
    state: str  # "active" or "draining"
    keys: ShardKeys

    @property
    def stream_labels(self) -> tuple[str, str, str]:
        return (self.queue, str(self.index), self.state)


@dataclass(frozen=True)
class _LaneRef:
    """One stream of a shard: lane 0 is the shard's stream, others its priority lanes."""

    shard: _ShardRef
    lane: int

    @property
    def stream(self) -> str:
        return self.shard.keys.lane(self.lane)


@dataclass(frozen=True)
class _StreamFacts:
    """What XINFO STREAM tells about one shard stream."""

    length: int
    removed: int | None  # entries-added - length: trimmed or deleted entries
    first: tuple[int, int] | None
    last_generated: tuple[int, int]
    max_deleted: tuple[int, int]

    def lost_before(self, last_delivered: tuple[int, int], entries_read: int | None) -> bool:
        """Whether an entry was removed before a group at ``last_delivered`` got it.

        XDEL raises ``max-deleted-entry-id``; trimming does not, but it
        removes from the head, so it lost undelivered entries when the group
        is behind the first entry and has read fewer entries than were
        removed (or the stream is empty while the group missed entries).
        """
        if self.max_deleted > last_delivered:
            return True
        if last_delivered >= self.last_generated:
            return False
        if self.length == 0 or self.first is None:
            return True
        if last_delivered < self.first and entries_read is not None and self.removed is not None:
            return entries_read < self.removed
        return False


@dataclass
class _GroupState:
    """What round 1 learned about one group of one shard stream (lane)."""

    shard: _ShardRef
    lane: int
    name: str
    pending: int
    consumers: int
    last_delivered: tuple[int, int]
    lag: int | None
    deleted_past_delivery: bool
    caught_up: bool  # last-delivered-id >= last-generated-id

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (*self.shard.stream_labels, self.name)

    @property
    def lane_labels(self) -> tuple[str, str, str, str, str]:
        return (*self.labels, str(self.lane))

    @property
    def stream(self) -> str:
        return self.shard.keys.lane(self.lane)


class _Samples:
    """Samples of one scrape, keyed by metric and labels, merged per spec."""

    def __init__(self) -> None:
        self._values: dict[str, dict[tuple[str, ...], float]] = {}

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        spec = SPECS_BY_NAME[name]
        key = tuple(labels)
        assert len(key) == len(spec.labels), name
        bucket = self._values.setdefault(name, {})
        if key in bucket:
            old = bucket[key]
            bucket[key] = max(old, value) if spec.merge == "max" else old + value
        else:
            bucket[key] = float(value)

    def value(self, name: str, labels: Sequence[str]) -> float | None:
        """One sample's value (tests and tools)."""
        return self._values.get(name, {}).get(tuple(labels))

    def items(self, name: str) -> list[tuple[tuple[str, ...], float]]:
        return sorted(self._values.get(name, {}).items(), key=lambda kv: _natural(kv[0]))


def _natural(labels: tuple[str, ...]) -> tuple[tuple[int, int, str], ...]:
    """Sort key that puts shard "2" before shard "10"."""
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in labels)


@dataclass
class QueueSnapshot:
    """The result of one queue-state read.

    :ivar samples: every sample read (see :data:`METRICS`, source ``exporter``).
    :ivar errors: one reason per failed part (``timeout``, ``topology``, ...).
    :ivar duration: seconds the read took.
    """

    samples: _Samples = field(default_factory=_Samples)
    errors: list[str] = field(default_factory=list)
    duration: float = 0.0

    def families(self, error_totals: Mapping[str, float] | None = None) -> list[Metric]:
        """Metric families of this snapshot, in :data:`METRICS` order.

        :param error_totals: cumulative scrape errors to report; default is
            this snapshot's errors alone.
        """
        totals = _Tally(self.errors) if error_totals is None else error_totals
        result: list[Metric] = []
        for spec in METRICS:
            if spec.source != "exporter":
                continue
            family = empty_family(spec)
            if spec.name == f"{_P}scrape_duration_seconds":
                family.add_metric([], self.duration)
            elif spec.name == f"{_P}scrape_errors_total":
                for reason, count in sorted(totals.items()):
                    family.add_metric([reason], count)
            else:
                items = self.samples.items(spec.name)
                if not items and spec.optional:
                    continue
                for labels, value in items:
                    family.add_metric(list(labels), value)
            result.append(family)
        return result


class QueueStateReader:
    """Reads the state of queues' shard streams (asyncio; one call per scrape).

    Each read loads the plans and the topology, then sends per master one
    pipeline of ``XINFO STREAM``/``XINFO GROUPS``/``XLEN`` for all its
    shards, with a ``TYPE`` of each possible priority lane stream; then one
    of ``XINFO STREAM``/``XINFO GROUPS`` of the lane streams that exist
    (skipped when none does), then one pipeline of ``XPENDING - + 1`` (oldest pending entry)
    and ``XRANGE (last-delivered-id + COUNT 1`` (oldest undelivered entry)
    where needed. Masters are read concurrently and independently: a dead
    master costs only its own shards.

    :param client: an initialized cluster client (not owned, not closed).
    :param queues: queues to read; ``None`` = every queue with a plan, looked
        up at each read (``PlanStore.list_queues``).
    :param prefix: key prefix of the deployment.
    :param groups: consumer groups to report; ``None`` = every group found.
    :param timeout: seconds a whole read may take; what is unfinished then
        is reported as a ``timeout`` error.
    :param per_consumer: also report per-consumer pending/idle (a label per
        consumer name, so off by default).
    :param clock: wall clock in seconds (entry ids hold the server's ms time).
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        queues: Sequence[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        groups: Sequence[str] | None = None,
        timeout: float = 5.0,
        per_consumer: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout <= 0:
            raise InvalidOptionError(option="timeout", reason=f"must be > 0, got {timeout!r}")
        self.client = client
        self.queues = tuple(queues) if queues else None
        self.prefix = prefix
        self.groups = frozenset(groups) if groups else None
        self.timeout = timeout
        self.per_consumer = per_consumer
        self._clock = clock
        self._store = PlanStore(client, prefix=prefix)
        # Only a fallback for a plan read that fails; never used otherwise.
        self._last_plans: dict[str, ShardPlan] = {}

    async def read(self) -> QueueSnapshot:
        """Read everything once; never raises for Redis trouble (see ``errors``)."""
        started = time.perf_counter()
        snap = QueueSnapshot()
        try:
            await self._read(snap, asyncio.get_running_loop().time())
        except Exception as exc:  # a scrape must answer; the reason is counted
            logger.warning("Reading the queue state failed: %r", exc)
            snap.errors.append(error_reason(exc))
        snap.duration = time.perf_counter() - started
        return snap

    async def _read(self, snap: QueueSnapshot, start: float) -> None:
        # Each phase gets a share of the time, so a master that hangs in
        # one phase does not starve the reads of the healthy masters.
        deadline = start + self.timeout
        plans_deadline = start + self.timeout * 0.4
        streams_deadline = start + self.timeout * 0.75
        # The topology is only needed for the per-master metrics: read it
        # alongside everything else.
        topology_task = asyncio.ensure_future(read_topology(self.client))
        try:
            plans = await self._read_plans(snap, plans_deadline)
            shards: list[_ShardRef] = []
            for plan in plans:
                snap.samples.add(f"{_P}plan_epoch", [plan.queue], plan.epoch)
                snap.samples.add(f"{_P}plan_shards", [plan.queue, "active"], len(plan.shards))
                snap.samples.add(f"{_P}plan_shards", [plan.queue, "draining"], len(plan.draining))
                shards += [
                    _ShardRef(plan.queue, s.index, "active", s.keys(self.prefix))
                    for s in plan.shards
                ]
                shards += [
                    _ShardRef(plan.queue, s.index, "draining", s.keys(self.prefix))
                    for s in plan.draining
                ]
            await self._read_workers(snap, plans, streams_deadline)
            groups = await self._round_streams(snap, shards, streams_deadline)
            await self._round_groups(snap, groups, deadline)
        finally:
            done, errors = await _bounded({"": topology_task}, deadline)
        if errors:
            snap.errors.append("topology")
        else:
            self._topology_samples(snap.samples, done[""], plans)

    async def _read_workers(
        self, snap: QueueSnapshot, plans: list[ShardPlan], deadline: float
    ) -> None:
        """How many workers each queue's worker set holds (live ones remove the dead)."""
        jobs = {
            plan.queue: self.client.zcard(workers_key(self.prefix, plan.queue)) for plan in plans
        }
        done, errors = await _bounded(jobs, deadline)
        snap.errors.extend(errors.values())
        for queue, count in done.items():
            snap.samples.add(f"{_P}workers", [queue], int(count))

    async def _read_plans(self, snap: QueueSnapshot, deadline: float) -> list[ShardPlan]:
        queues: Sequence[str] | None = self.queues
        if queues is None:
            listed, failed = await _bounded({0: self._store.list_queues()}, deadline)
            snap.errors.extend(failed.values())
            queues = listed.get(0, [])
        jobs = {q: self._store.load(q) for q in queues}
        done, errors = await _bounded(jobs, deadline)
        snap.errors.extend(errors.values())
        plans: list[ShardPlan] = []
        for queue in queues:
            if queue not in done:
                # The plan's master is slow or down: the shards on the other
                # masters are still worth reporting, with the last plan seen.
                cached = self._last_plans.get(queue)
                if cached is not None:
                    plans.append(cached)
                continue
            plan = done[queue]
            if plan is None:
                snap.errors.append("no_plan")
                self._last_plans.pop(queue, None)
                logger.debug("Queue %s has no plan; nothing to report", queue)
            else:
                self._last_plans[queue] = plan
                plans.append(plan)
        return plans

    # ----------------------------------------------------------- topology
    @staticmethod
    def _topology_samples(samples: _Samples, topology: Topology, plans: list[ShardPlan]) -> None:
        for master in topology.masters:
            samples.add(f"{_P}master_up", [str(master.address)], 1 if master.healthy else 0)
        serving = topology.slot_masters
        for plan in plans:
            for state, shard_list in (("active", plan.shards), ("draining", plan.draining)):
                counts = dict.fromkeys((str(m.address) for m in serving), 0)
                for shard in shard_list:
                    owner = topology.owner_of(shard.slot)
                    if owner is not None:
                        name = str(owner.address)
                        counts[name] = counts.get(name, 0) + 1
                for name, count in counts.items():
                    samples.add(f"{_P}master_shards", [plan.queue, name, state], count)
            if serving:
                report = balance(plan, topology)
                samples.add(f"{_P}plan_imbalance", [plan.queue], report.imbalance)
                samples.add(f"{_P}plan_misplaced_shards", [plan.queue], len(report.misplaced))
                samples.add(f"{_P}plan_orphaned_shards", [plan.queue], len(report.orphaned))

    # -------------------------------------------------------- round one
    async def _round_streams(
        self, snap: QueueSnapshot, shards: list[_ShardRef], deadline: float
    ) -> list[_GroupState]:
        """XINFO STREAM, XINFO GROUPS, the dead-letter XLEN and the delayed
        ZCARD of every shard, and which priority lane streams it has; then
        XINFO STREAM and XINFO GROUPS of those lanes."""
        per_shard = 4 + MAX_LANES - 1
        commands: list[_Command] = []
        for ref in shards:
            stream, dead, delayed = ref.keys.stream, ref.keys.dead, ref.keys.delayed
            commands.append(_Command(stream, "xinfo_stream", (stream,)))
            commands.append(_Command(stream, "xinfo_groups", (stream,)))
            commands.append(_Command(dead, "xlen", (dead,)))
            commands.append(_Command(delayed, "zcard", (delayed,)))
            # TYPE answers for a missing key too (XINFO would raise).
            for n in range(1, MAX_LANES):
                commands.append(_Command(ref.keys.lane(n), "type", (ref.keys.lane(n),)))
        replies, reasons = await self._pipelined(commands, deadline)
        snap.errors.extend(reasons)
        states: list[_GroupState] = []
        lanes: list[_LaneRef] = []
        for ref, i in zip(shards, range(0, len(commands), per_shard), strict=True):
            info, groups, dead, delayed = replies[i : i + 4]
            if isinstance(dead, int):
                snap.samples.add(f"{_P}dead_letter_length", ref.stream_labels, dead)
            if isinstance(delayed, int):
                snap.samples.add(f"{_P}delayed", ref.stream_labels, delayed)
            lanes += [
                _LaneRef(ref, n)
                for n, kind in enumerate(replies[i + 4 : i + per_shard], start=1)
                if not isinstance(kind, BaseException) and _text(kind) == "stream"
            ]
            states += self._lane_samples(snap.samples, _LaneRef(ref, 0), info, groups)
        if lanes:
            lane_commands: list[_Command] = []
            for lane in lanes:
                lane_commands.append(_Command(lane.stream, "xinfo_stream", (lane.stream,)))
                lane_commands.append(_Command(lane.stream, "xinfo_groups", (lane.stream,)))
            replies, reasons = await self._pipelined(lane_commands, deadline)
            snap.errors.extend(reasons)
            for lane, i in zip(lanes, range(0, len(lane_commands), 2), strict=True):
                states += self._lane_samples(snap.samples, lane, replies[i], replies[i + 1])
        return states

    def _lane_samples(
        self, samples: _Samples, lane: _LaneRef, info: Any, groups: Any
    ) -> list[_GroupState]:
        if _missing_key(info):
            # The stream does not exist (nothing kicked, no reader; or a
            # lane deleted since its TYPE was read).
            samples.add(f"{_P}stream_length", lane.shard.stream_labels, 0)
            return []
        if not isinstance(info, Mapping) or not isinstance(groups, list):
            return []  # failed; the reason is already in snap.errors
        return self._stream_samples(samples, lane, info, groups)

    def _stream_samples(
        self, samples: _Samples, lane: _LaneRef, info: Mapping[Any, Any], groups: list[Any]
    ) -> list[_GroupState]:
        ref = lane.shard
        labels = ref.stream_labels
        length = int(_get(info, "length") or 0)
        samples.add(f"{_P}stream_length", labels, length)
        added = _get(info, "entries-added")
        if added is not None:
            samples.add(f"{_P}stream_entries_added_total", labels, int(added))
        stream = _StreamFacts(
            length=length,
            removed=None if added is None else int(added) - length,
            first=_first_id(_get(info, "first-entry")),
            last_generated=_parse_id(_get(info, "last-generated-id")) or (0, 0),
            max_deleted=_parse_id(_get(info, "max-deleted-entry-id")) or (0, 0),
        )
        states: list[_GroupState] = []
        for raw in groups:
            group = _as_map(raw)
            name = _text(_get(group, "name"))
            if self.groups is not None and name not in self.groups:
                continue
            lag = _get(group, "lag")
            read = _get(group, "entries-read")
            last = _parse_id(_get(group, "last-delivered-id")) or (0, 0)
            state = _GroupState(
                shard=ref,
                lane=lane.lane,
                name=name,
                pending=int(_get(group, "pending") or 0),
                consumers=int(_get(group, "consumers") or 0),
                last_delivered=last,
                lag=None if lag is None else int(lag),
                deleted_past_delivery=stream.lost_before(last, None if read is None else int(read)),
                caught_up=last >= stream.last_generated,
            )
            glabels = state.labels
            samples.add(f"{_P}group_pending", glabels, state.pending)
            samples.add(f"{_P}group_consumers", glabels, state.consumers)
            samples.add(f"{_P}group_lag_unknown", glabels, 1 if state.lag is None else 0)
            if state.lag is not None:
                samples.add(f"{_P}group_lag", glabels, state.lag)
            samples.add(
                f"{_P}group_undelivered_trimmed", glabels, 1 if state.deleted_past_delivery else 0
            )
            if state.lag is not None:
                samples.add(f"{_P}lane_backlog", state.lane_labels, state.lag + state.pending)
            states.append(state)
        return states

    # -------------------------------------------------------- round two
    async def _round_groups(
        self, snap: QueueSnapshot, groups: list[_GroupState], deadline: float
    ) -> None:
        """Oldest pending entry, oldest undelivered entry (and consumers) per group."""
        commands: list[tuple[_GroupState, str, _Command]] = []
        for g in groups:
            stream = g.stream
            if g.pending > 0:
                commands.append(
                    (
                        g,
                        "pending",
                        _Command(
                            stream,
                            "xpending_range",
                            (stream, g.name),
                            {"min": "-", "max": "+", "count": 1},
                        ),
                    )
                )
            else:
                snap.samples.add(f"{_P}group_oldest_pending_idle_seconds", g.labels, 0)
                snap.samples.add(f"{_P}group_oldest_pending_deliveries", g.labels, 0)
            if g.caught_up or g.lag == 0:
                snap.samples.add(f"{_P}group_lag_seconds", g.labels, 0)
                snap.samples.add(f"{_P}lane_lag_seconds", g.lane_labels, 0)
            else:
                start = "({}-{}".format(*g.last_delivered)
                commands.append(
                    (
                        g,
                        "undelivered",
                        _Command(
                            stream, "xrange", (stream,), {"min": start, "max": "+", "count": 1}
                        ),
                    )
                )
            if self.per_consumer:
                commands.append(
                    (g, "consumers", _Command(stream, "xinfo_consumers", (stream, g.name)))
                )
        if not commands:
            return
        replies, reasons = await self._pipelined([cmd for _, _, cmd in commands], deadline)
        snap.errors.extend(reasons)
        now_ms = self._clock() * 1000
        for (g, what, _), reply in zip(commands, replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            if what == "pending":
                idle, deliveries = _oldest_pending(reply)
                snap.samples.add(f"{_P}group_oldest_pending_idle_seconds", g.labels, idle / 1000)
                snap.samples.add(f"{_P}group_oldest_pending_deliveries", g.labels, deliveries)
            elif what == "undelivered":
                first = _parse_id(reply[0][0]) if reply else None
                age = 0.0 if first is None else max(0.0, (now_ms - first[0]) / 1000)
                snap.samples.add(f"{_P}group_lag_seconds", g.labels, age)
                snap.samples.add(f"{_P}lane_lag_seconds", g.lane_labels, age)
            else:
                for consumer in reply or ():
                    row = _as_map(consumer)
                    clabels = [*g.labels, _text(_get(row, "name"))]
                    snap.samples.add(
                        f"{_P}consumer_pending", clabels, int(_get(row, "pending") or 0)
                    )
                    snap.samples.add(
                        f"{_P}consumer_idle_seconds", clabels, int(_get(row, "idle") or 0) / 1000
                    )

    # ------------------------------------------------------------ plumbing
    async def _pipelined(
        self, commands: list[_Command], deadline: float
    ) -> tuple[list[Any], list[str]]:
        """Run ``commands``, one pipeline per master, concurrently.

        :returns: one reply per command (an exception where it failed) and
            the reasons of failed groups (one per failed master pipeline).
        """
        by_node: dict[str, list[int]] = {}
        for i, command in enumerate(commands):
            try:
                found = self.client.get_node_from_key(command.key)
            except Exception:  # slot not covered right now: redis-py retries it
                found = None
            node = found.name if found is not None else "?"
            by_node.setdefault(node, []).append(i)
        jobs = {
            node: self._run_pipeline([commands[i] for i in idx]) for node, idx in by_node.items()
        }
        done, errors = await _bounded(jobs, deadline)
        replies: list[Any] = [None] * len(commands)
        for node, idx in by_node.items():
            node_replies = done.get(node)
            failure = _ReadFailed(errors.get(node, "unknown"))
            for pos, i in enumerate(idx):
                replies[i] = failure if node_replies is None else node_replies[pos]
        reasons = list(errors.values())
        # Single commands that failed inside a pipeline (other than a missing
        # key, which just means an empty shard) count once per kind.
        inner = {
            error_reason(r)
            for r in replies
            if isinstance(r, BaseException)
            and not isinstance(r, _ReadFailed)
            and not _missing_key(r)
        }
        return replies, reasons + sorted(inner)

    async def _run_pipeline(self, commands: list[_Command]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            # redis-py's named methods, not execute_command: only they get
            # the reply parsers (XPENDING's depends on the call's options).
            getattr(pipe, command.method)(*command.args, **command.kwargs)
        result: list[Any] = await pipe.execute(raise_on_error=False)
        return result


@dataclass(frozen=True)
class _Command:
    """One pipelined call: the key that routes it, a redis-py method, arguments."""

    key: str
    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class _ReadFailed(Exception):
    """Stand-in reply for commands whose whole pipeline failed."""


def error_reason(exc: BaseException) -> str:
    """The ``scrape_errors_total`` reason of a failed read."""
    if isinstance(exc, PlanError):
        return "plan"
    return error_kind(exc)


def _as_map(value: Any) -> Mapping[Any, Any]:
    """A reply row as a mapping (redis-py gives dicts; a flat list also works)."""
    if isinstance(value, Mapping):
        return value
    items = list(value)
    return dict(zip(items[::2], items[1::2], strict=True))


def _first_id(entry: Any) -> tuple[int, int] | None:
    """Id of XINFO STREAM's ``first-entry`` (``(id, fields)`` or None)."""
    if not entry:
        return None
    return _parse_id(entry[0])


def _missing_key(reply: Any) -> bool:
    return isinstance(reply, RedisError) and "no such key" in str(reply).lower()


def _oldest_pending(reply: Any) -> tuple[float, int]:
    """(idle ms, deliveries) from an ``XPENDING key group - + 1`` reply."""
    if not reply:
        return 0.0, 0
    row = reply[0]
    if isinstance(row, Mapping):
        return float(_get(row, "time_since_delivered") or 0), int(_get(row, "times_delivered") or 0)
    return float(row[2]), int(row[3])


async def _bounded(
    jobs: Mapping[_K, Awaitable[_T]], deadline: float
) -> tuple[dict[_K, _T], dict[_K, str]]:
    """Run ``jobs`` concurrently until ``deadline`` (loop time).

    :returns: results of the jobs that finished, and an error reason for
        each one that raised or was still running at the deadline
        (``timeout``; it is cancelled).
    """
    if not jobs:
        return {}, {}
    tasks = {key: asyncio.ensure_future(job) for key, job in jobs.items()}
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining > 0:
        await asyncio.wait(tasks.values(), timeout=remaining)
    done: dict[_K, _T] = {}
    errors: dict[_K, str] = {}
    for key, task in tasks.items():
        if not task.done():
            task.cancel()
            errors[key] = "timeout"
        elif task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            logger.debug("Scrape part %r failed: %r", key, exc)
            errors[key] = error_reason(exc)
        else:
            done[key] = task.result()
    cancelled = [t for t in tasks.values() if t.cancelled() or not t.done()]
    if cancelled:
        # Let cancellations run their cleanup (connections are released).
        await asyncio.wait(cancelled, timeout=1.0)
    return done, errors
