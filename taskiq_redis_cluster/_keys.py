"""Every Redis key and channel name this package uses is built here.

Layout (``P`` is the prefix, ``T`` a hash tag; braces mark the hash tag, so
every key of one shard lands in the shard's single slot)::

    P:{T}:stream        the shard's stream (priority lane 0); its consumer group lives inside it
    P:{T}:lane:N        the shard's priority lane N (1..MAX_LANES-1), a stream like the one above
    P:{T}:dead          the shard's dead-letter stream
    P:{T}:delayed       the shard's delayed tasks (sorted set, score = due ms)
    P:{T}:dedup:K       the shard's marker of dedup key K (value: first task id)
    P:{T}:list          the shard's list (list broker)
    P:{T}:processing:C  list broker, reliable mode: consumer C's popped messages
    P:{T}:heartbeat:C   list broker, reliable mode: C is alive while this exists
    P:{T}:consumers     list broker, reliable mode: set of C with a processing list
    P:{T}:handback:K    list broker: marker that makes hand-back K run once
    P:{plan:Q}          plan record of queue Q, in a slot of its own
    P:{plan:Q}:workers  listening workers of Q (sorted set: member -> expiry ms)
    P:{plans}           set of queue names that have a plan
    P:{rebalance}:lease the rebalancer's lease lock
    P:{sched:S}:...     every key of schedule source S (one tag per source)
    P:result:ID         result of task ID (no tag: results spread by task id)
    P:{bcast:N}         sharded pub/sub channel N

Slot math always goes through ``redis.crc.key_slot``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from redis.crc import key_slot

from ._errors import InvalidNameError

DEFAULT_PREFIX = "tqrc"

#: Most priority lanes a shard can have (lane 0 is the shard's stream). The
#: rebalancer and the exporter look for lanes up to this bound, so they need
#: no broker option to find them.
MAX_LANES = 10

#: Separator characters used inside tags; names may contain them, the
#: planner only appends ``/index~salt`` so a tag stays unambiguous.
_MAX_NAME_LENGTH = 512


def validate_name(name: str, kind: str = "queue") -> str:
    """Return ``name`` if it is usable inside a hash tag, else raise.

    :raises InvalidNameError: for an empty or over-long name, or one with a
        brace (a brace would end or start the hash tag and move the key to
        another slot) or whitespace/control characters.
    """
    if not isinstance(name, str) or not name:
        raise InvalidNameError(kind=kind, name=str(name), reason="must be a non-empty string")
    if "{" in name or "}" in name:
        raise InvalidNameError(
            kind=kind,
            name=name,
            reason="'{' and '}' are reserved for Redis Cluster hash tags",
        )
    if len(name) > _MAX_NAME_LENGTH:
        raise InvalidNameError(
            kind=kind, name=name, reason=f"longer than {_MAX_NAME_LENGTH} characters"
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in name):
        raise InvalidNameError(
            kind=kind, name=name, reason="whitespace and control characters are not allowed"
        )
    return name


def slot_of(key: str | bytes) -> int:
    """Cluster slot of ``key`` (hash tags honoured)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def shard_tag(queue: str, index: int, salt: int) -> str:
    """Hash tag of shard ``index`` of ``queue``; ``salt`` picks the slot."""
    return f"{queue}/{index}~{salt}"


def shard_tag_slots(
    queue: str, index: int, start_salt: int, count: int
) -> Iterator[tuple[int, int]]:
    """``(salt, tag_slot(shard_tag(queue, index, salt)))`` for ``count`` salts from ``start_salt``.

    The planner's hot loop: builds the tag bytes once per salt instead of
    going through ``shard_tag``/``tag_slot``; same format, same slots.
    """
    head = ("{" + shard_tag(queue, index, 0)[:-1]).encode()
    for salt in range(start_salt, start_salt + count):
        yield salt, int(key_slot(b"%s%d}" % (head, salt)))


def tag_slot(tag: str) -> int:
    """Slot that every key with hash tag ``tag`` lands in."""
    return slot_of("{" + tag + "}")


@dataclass(frozen=True)
class ShardKeys:
    """All keys of one shard; they share one hash tag and so one slot."""

    prefix: str
    tag: str

    @property
    def stream(self) -> str:
        return f"{self.prefix}:{{{self.tag}}}:stream"

    def lane(self, lane: int) -> str:
        """Stream of priority lane ``lane``; lane 0 is :attr:`stream` itself,
        so a queue without priorities has the same keys as before lanes."""
        if lane == 0:
            return self.stream
        return f"{self.prefix}:{{{self.tag}}}:lane:{lane}"

    def lanes(self, count: int = MAX_LANES) -> list[str]:
        """Streams of lanes ``0 .. count-1``, lowest first."""
        return [self.lane(lane) for lane in range(count)]

    @property
    def dead(self) -> str:
        return f"{self.prefix}:{{{self.tag}}}:dead"

    @property
    def delayed(self) -> str:
        """Sorted set of delayed messages, scored by due time (Unix ms)."""
        return f"{self.prefix}:{{{self.tag}}}:delayed"

    def dedup(self, key: str) -> str:
        """Marker of dedup key ``key``; the shard's tag comes first, so a
        brace inside ``key`` cannot move it to another slot."""
        return f"{self.prefix}:{{{self.tag}}}:dedup:{key}"

    @property
    def list(self) -> str:
        return f"{self.prefix}:{{{self.tag}}}:list"

    @property
    def consumers(self) -> str:
        return f"{self.prefix}:{{{self.tag}}}:consumers"

    def processing(self, consumer: str) -> str:
        return f"{self.prefix}:{{{self.tag}}}:processing:{consumer}"

    def heartbeat(self, consumer: str) -> str:
        return f"{self.prefix}:{{{self.tag}}}:heartbeat:{consumer}"

    def handback(self, token: str) -> str:
        return f"{self.prefix}:{{{self.tag}}}:handback:{token}"

    @property
    def slot(self) -> int:
        return tag_slot(self.tag)


def plan_key(prefix: str, queue: str) -> str:
    """Key of the plan record of ``queue``."""
    return f"{prefix}:{{plan:{queue}}}"


def workers_key(prefix: str, queue: str) -> str:
    """Listening workers of ``queue`` and when each expires (same slot as its plan)."""
    return f"{prefix}:{{plan:{queue}}}:workers"


def plans_index_key(prefix: str) -> str:
    """Set of queue names that have a plan (lets tools find every queue)."""
    return f"{prefix}:{{plans}}"


def rebalance_lease_key(prefix: str) -> str:
    """Lease lock that keeps rebalancers from running concurrently."""
    return f"{prefix}:{{rebalance}}:lease"


def rebalance_journal_key(prefix: str, queue: str) -> str:
    """Journal of the rebalancer's steps for ``queue`` (same slot as its plan)."""
    return f"{prefix}:{{plan:{queue}}}:journal"


@dataclass(frozen=True)
class ScheduleKeys:
    """Keys of one schedule source; one tag, so multi-key commands are legal."""

    prefix: str
    source: str

    @property
    def _base(self) -> str:
        return f"{self.prefix}:{{sched:{self.source}}}"

    @property
    def schedules(self) -> str:
        """Hash: schedule id -> serialized schedule."""
        return f"{self._base}:schedules"

    @property
    def cron(self) -> str:
        """Set of ids of cron and interval schedules."""
        return f"{self._base}:cron"

    @property
    def timeline(self) -> str:
        """Sorted set of one-off schedule ids scored by due time (the index)."""
        return f"{self._base}:timeline"

    def claim(self, schedule_id: str, due: int) -> str:
        """Claim marker that makes one firing happen once across schedulers."""
        return f"{self._base}:claim:{schedule_id}:{due}"


def result_key(prefix: str, task_id: str) -> str:
    """Key of a task's result; untagged so results spread over all slots."""
    return f"{prefix}:result:{task_id}"


def progress_key(prefix: str, task_id: str) -> str:
    """Key of a task's progress report."""
    return f"{prefix}:progress:{task_id}"


def broadcast_channel(prefix: str, name: str) -> str:
    """Sharded pub/sub channel of a broadcast broker."""
    return f"{prefix}:{{bcast:{name}}}"
