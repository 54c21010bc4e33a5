"""The live shape of the cluster as an immutable value: masters, slots, replicas.

A :class:`Topology` answers the questions the planner and the tools ask:
who owns slot ``s`` now, which slots nobody owns, which slots are being
migrated. It is built either from a plain slot map (tests, benchmarks) or
from a running cluster by :func:`read_topology`, which uses ``CLUSTER
SHARDS`` (Redis >= 7.0) and falls back to ``CLUSTER SLOTS`` on older
servers. Nodes are identified by their node id, never by address: an
address can be reused by another node after a restart, an id cannot.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import RedisError, ResponseError

from .._errors import TopologyError

logger = logging.getLogger(__name__)

#: Number of hash slots in a Redis Cluster.
SLOT_COUNT = 16384


@dataclass(frozen=True)
class NodeAddress:
    """Where a node listens."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6 literal
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica of a master."""

    node_id: str
    address: NodeAddress
    healthy: bool


def _normalize_ranges(ranges: Iterable[tuple[int, int]], owner: str) -> tuple[tuple[int, int], ...]:
    """Sort, validate and merge adjacent or overlapping inclusive ranges."""
    items: list[tuple[int, int]] = []
    for item in ranges:
        start, end = int(item[0]), int(item[1])
        if not 0 <= start <= end < SLOT_COUNT:
            raise TopologyError(
                message=f"master {owner}: invalid slot range {start}-{end} "
                f"(slots are 0..{SLOT_COUNT - 1})"
            )
        items.append((start, end))
    items.sort()
    merged: list[tuple[int, int]] = []
    for start, end in items:
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


@dataclass(frozen=True)
class MasterInfo:
    """A master, the slot ranges it serves and its replicas.

    ``slots`` holds sorted, merged, inclusive ``(start, end)`` ranges; a
    master without slots (for example one just added to the cluster) has
    ``slots == ()`` and cannot own shards.
    """

    node_id: str
    address: NodeAddress
    slots: tuple[tuple[int, int], ...]
    replicas: tuple[ReplicaInfo, ...]
    healthy: bool = True

    def __post_init__(self) -> None:
        # Normalising here makes two topologies that describe the same
        # ownership compare equal however their ranges were written.
        object.__setattr__(self, "slots", _normalize_ranges(self.slots, self.node_id))
        object.__setattr__(self, "replicas", tuple(sorted(self.replicas, key=lambda r: r.node_id)))

    @property
    def slot_count(self) -> int:
        """Number of slots this master serves."""
        return sum(end - start + 1 for start, end in self.slots)

    def owns(self, slot: int) -> bool:
        """Whether this master serves ``slot``."""
        i = bisect.bisect_right(self.slots, (slot, SLOT_COUNT)) - 1
        return i >= 0 and self.slots[i][0] <= slot <= self.slots[i][1]


@dataclass(frozen=True)
class MigratingSlot:
    """A slot that is being moved from ``source`` to ``target`` (node ids).

    Either side alone may report the migration (``CLUSTER NODES`` shows the
    ``[slot->-id]`` marker on the source and ``[slot-<-id]`` on the
    target); a half-open migration is still a migration.
    """

    slot: int
    source: str
    target: str


@dataclass(frozen=True)
class Topology:
    """Every master of the cluster, sorted by node id for determinism.

    Construction checks that no slot is claimed by two masters; slots that
    no master claims are allowed and reported by :attr:`uncovered_slots`.
    """

    masters: tuple[MasterInfo, ...]
    migrating_slots: tuple[MigratingSlot, ...] = ()
    _owners: tuple[str | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        masters = tuple(sorted(self.masters, key=lambda m: m.node_id))
        ids = [m.node_id for m in masters]
        if len(set(ids)) != len(ids):
            raise TopologyError(message="duplicate master node ids in topology")
        object.__setattr__(self, "masters", masters)
        object.__setattr__(
            self,
            "migrating_slots",
            tuple(sorted(set(self.migrating_slots), key=lambda s: (s.slot, s.source, s.target))),
        )
        owners: list[str | None] = [None] * SLOT_COUNT
        for master in masters:
            for start, end in master.slots:
                for slot in range(start, end + 1):
                    other = owners[slot]
                    if other is not None:
                        raise TopologyError(
                            message=f"slot {slot} is claimed by both {other} and {master.node_id}"
                        )
                    owners[slot] = master.node_id
        object.__setattr__(self, "_owners", tuple(owners))

    @classmethod
    def from_slot_map(
        cls,
        mapping: Mapping[str, Iterable[tuple[int, int]]],
        *,
        migrating: Iterable[MigratingSlot] = (),
    ) -> Topology:
        """Build a topology from ``{node_id: [(start, end), ...]}`` (tests, benches).

        Addresses are made up (``127.0.0.1``, ports from 7000 in node-id
        order), masters are healthy and have no replicas.
        """
        masters = tuple(
            MasterInfo(
                node_id=node_id,
                address=NodeAddress("127.0.0.1", 7000 + i),
                slots=tuple(ranges),
                replicas=(),
            )
            for i, (node_id, ranges) in enumerate(sorted(mapping.items()))
        )
        return cls(masters=masters, migrating_slots=tuple(migrating))

    @property
    def slot_owners(self) -> tuple[str | None, ...]:
        """Node id owning each slot (index = slot), ``None`` where uncovered."""
        return self._owners

    @cached_property
    def _by_id(self) -> dict[str, MasterInfo]:
        return {m.node_id: m for m in self.masters}

    def owner_of(self, slot: int) -> MasterInfo | None:
        """The master serving ``slot``, or ``None`` if no master covers it."""
        node_id = self._owners[slot]
        return None if node_id is None else self._by_id[node_id]

    def master_by_id(self, node_id: str) -> MasterInfo | None:
        """The master with ``node_id``, or ``None`` if it is not a master now."""
        return self._by_id.get(node_id)

    @property
    def slot_masters(self) -> tuple[MasterInfo, ...]:
        """Masters that serve at least one slot (the ones that can own shards)."""
        return tuple(m for m in self.masters if m.slots)

    @cached_property
    def uncovered_slots(self) -> tuple[tuple[int, int], ...]:
        """Inclusive ranges of slots that no master serves."""
        ranges: list[tuple[int, int]] = []
        start: int | None = None
        for slot, owner in enumerate(self._owners):
            if owner is None and start is None:
                start = slot
            elif owner is not None and start is not None:
                ranges.append((start, slot - 1))
                start = None
        if start is not None:
            ranges.append((start, SLOT_COUNT - 1))
        return tuple(ranges)

    @property
    def fully_covered(self) -> bool:
        """Whether every slot has a master."""
        return not self.uncovered_slots

    @property
    def migrating(self) -> bool:
        """Whether any slot migration is in progress (as far as the masters report)."""
        return bool(self.migrating_slots)


# --------------------------------------------------------------------------
# Reading the live cluster
# --------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _as_dict(value: Any) -> dict[str, Any]:
    """Normalise a RESP map (dict, or flat key/value list) to str keys."""
    if isinstance(value, Mapping):
        return {_text(k): v for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) % 2 == 0:
        return {_text(value[i]): value[i + 1] for i in range(0, len(value), 2)}
    raise TopologyError(message=f"unexpected CLUSTER SHARDS entry: {value!r:.200}")


def _slot_pairs(value: Any) -> list[tuple[int, int]]:
    """Slots of a shard: a flat ``[s, e, s, e]`` list or a list of pairs."""
    if not isinstance(value, (list, tuple)):
        raise TopologyError(message=f"unexpected slots value: {value!r:.200}")
    if all(isinstance(v, (list, tuple)) for v in value):
        return [(int(v[0]), int(v[1])) for v in value]
    if len(value) % 2:
        raise TopologyError(message=f"odd-length slots list: {value!r:.200}")
    return [(int(value[i]), int(value[i + 1])) for i in range(0, len(value), 2)]


def _node_address(node: Mapping[str, Any]) -> NodeAddress:
    endpoint = _text(node.get("endpoint", "") or "")
    host = endpoint if endpoint not in ("", "?") else _text(node.get("ip", ""))
    port = node.get("port", node.get("tls-port"))
    if not host or port is None:
        raise TopologyError(message=f"node without address in CLUSTER SHARDS: {node!r:.200}")
    return NodeAddress(host, int(port))


def parse_cluster_shards(response: Any) -> list[MasterInfo]:
    """Masters described by a ``CLUSTER SHARDS`` reply (any redis-py shape)."""
    if not isinstance(response, (list, tuple)):
        raise TopologyError(message=f"unexpected CLUSTER SHARDS reply: {response!r:.200}")
    masters: list[MasterInfo] = []
    for raw_shard in response:
        shard = _as_dict(raw_shard)
        slots = _slot_pairs(shard.get("slots", []))
        nodes = [_as_dict(n) for n in shard.get("nodes", [])]
        primaries = [n for n in nodes if _text(n.get("role", "")) == "master"]
        if not primaries:
            # A shard whose master vanished: its slots are not served.
            logger.debug("CLUSTER SHARDS entry without a master: %r", shard)
            continue
        # Redis reports one master per shard; if several appear (a failed
        # old master still listed), the one that is not failed is in charge.
        primaries.sort(key=lambda n: _text(n.get("health", "")) == "fail")
        primary = primaries[0]
        replicas = tuple(
            ReplicaInfo(
                node_id=_text(n.get("id", "")),
                address=_node_address(n),
                # "loading" only means replication offset 0, which an idle
                # fresh cluster also reports; only "fail" is a failure.
                healthy=_text(n.get("health", "")) != "fail",
            )
            for n in nodes
            if _text(n.get("role", "")) != "master"
        )
        masters.append(
            MasterInfo(
                node_id=_text(primary.get("id", "")),
                address=_node_address(primary),
                slots=tuple(slots),
                replicas=replicas,
                healthy=_text(primary.get("health", "")) == "online",
            )
        )
        for other in primaries[1:]:
            masters.append(
                MasterInfo(
                    node_id=_text(other.get("id", "")),
                    address=_node_address(other),
                    slots=(),
                    replicas=(),
                    healthy=_text(other.get("health", "")) == "online",
                )
            )
    return masters


@dataclass(frozen=True)
class _NodeLine:
    node_id: str
    address: NodeAddress
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]
    migrating: tuple[MigratingSlot, ...]
    link_connected: bool = True

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        """Agreed failure (``fail``) or no address: the node is out."""
        return "fail" in self.flags or "noaddr" in self.flags

    @property
    def replica_ok(self) -> bool:
        """A replica that could take over now: not even suspected, link up."""
        return not self.failed and "fail?" not in self.flags and self.link_connected


def _parse_address(text: str) -> NodeAddress:
    # "host:port@cport[,hostname]"; IPv6 hosts contain colons.
    hostport = text.split("@", 1)[0].split(",", 1)[0]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        return NodeAddress(host, int(port))
    except ValueError:
        raise TopologyError(message=f"bad node address {text!r} in CLUSTER NODES") from None


def parse_cluster_nodes(response: Any) -> list[_NodeLine]:
    """Lines of a ``CLUSTER NODES`` reply, with migration markers."""
    if not isinstance(response, (str, bytes)):
        raise TopologyError(message=f"unexpected CLUSTER NODES reply: {response!r:.200}")
    lines: list[_NodeLine] = []
    for line in _text(response).splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 8:
            raise TopologyError(message=f"bad CLUSTER NODES line: {line!r:.200}")
        node_id, addr, flags, master = parts[0], parts[1], parts[2], parts[3]
        slots: list[tuple[int, int]] = []
        migrating: list[MigratingSlot] = []
        for item in parts[8:]:
            try:
                if item.startswith("["):
                    body = item.strip("[]")
                    if "->-" in body:
                        slot, target = body.split("->-", 1)
                        migrating.append(MigratingSlot(int(slot), node_id, target))
                    elif "-<-" in body:
                        slot, source = body.split("-<-", 1)
                        migrating.append(MigratingSlot(int(slot), source, node_id))
                elif "-" in item:
                    start, end = item.split("-", 1)
                    slots.append((int(start), int(end)))
                else:
                    slots.append((int(item), int(item)))
            except ValueError:
                raise TopologyError(message=f"bad slot field {item!r} in CLUSTER NODES") from None
        lines.append(
            _NodeLine(
                node_id=node_id,
                address=_parse_address(addr),
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                slots=tuple(slots),
                migrating=tuple(migrating),
                link_connected=parts[7] == "connected",
            )
        )
    return lines


def parse_cluster_slots(response: Any) -> list[MasterInfo]:
    """Masters described by a ``CLUSTER SLOTS`` reply (Redis < 7.0 fallback).

    Accepts the raw list reply and redis-py's parsed ``{(start, end): {...}}``
    form. Masters without slots do not appear in this reply; the caller adds
    them from ``CLUSTER NODES``.
    """
    by_id: dict[str, tuple[NodeAddress, list[tuple[int, int]], dict[str, ReplicaInfo]]] = {}

    def add(start: int, end: int, nodes: Sequence[Any]) -> None:
        if not nodes:
            raise TopologyError(message=f"slot range {start}-{end} without nodes")
        primary = nodes[0]
        if len(primary) < 3:
            # Very old servers omit node ids; without ids we cannot plan.
            raise TopologyError(message="CLUSTER SLOTS reply without node ids")
        node_id = _text(primary[2])
        entry = by_id.setdefault(node_id, (NodeAddress(_text(primary[0]), int(primary[1])), [], {}))
        entry[1].append((start, end))
        for replica in nodes[1:]:
            if len(replica) >= 3:
                rid = _text(replica[2])
                entry[2][rid] = ReplicaInfo(
                    rid, NodeAddress(_text(replica[0]), int(replica[1])), True
                )

    if isinstance(response, Mapping):
        raise TopologyError(message="parsed CLUSTER SLOTS reply lacks node ids")
    if not isinstance(response, (list, tuple)):
        raise TopologyError(message=f"unexpected CLUSTER SLOTS reply: {response!r:.200}")
    for item in response:
        if not isinstance(item, (list, tuple)) or len(item) < 3:
            raise TopologyError(message=f"bad CLUSTER SLOTS entry: {item!r:.200}")
        add(int(item[0]), int(item[1]), list(item[2:]))
    return [
        MasterInfo(node_id=nid, address=addr, slots=tuple(slots), replicas=tuple(reps.values()))
        for nid, (addr, slots, reps) in by_id.items()
    ]


def _is_unknown_subcommand(exc: ResponseError) -> bool:
    text = str(exc).lower()
    return "unknown subcommand" in text or "unknown command" in text


async def _node_command(client: RedisCluster, node: ClusterNode, *args: Any) -> Any:
    return await client.execute_command(*args, target_nodes=node)


async def read_topology(client: RedisCluster) -> Topology:
    """Read the live topology from the cluster.

    Asks the primaries redis-py knows, in turn, for ``CLUSTER SHARDS``
    (``CLUSTER SLOTS`` plus ``CLUSTER NODES`` on servers that do not know
    SHARDS); then asks every healthy master for ``CLUSTER NODES`` to learn
    about slot migrations, which only the nodes taking part report.

    Masters without slots are included with ``slots=()``; masters flagged
    ``fail`` are marked ``healthy=False``.

    :raises TopologyError: if no node answers or a reply cannot be parsed.
    """
    primaries = list(client.get_primaries())
    if not primaries:
        raise TopologyError(message="the client knows no primary node")
    masters: list[MasterInfo] | None = None
    lines: list[_NodeLine] = []
    errors: list[str] = []
    for node in primaries:
        try:
            try:
                masters = parse_cluster_shards(
                    await _node_command(client, node, "CLUSTER", "SHARDS")
                )
                lines = parse_cluster_nodes(await _node_command(client, node, "CLUSTER", "NODES"))
            except ResponseError as exc:
                if not _is_unknown_subcommand(exc):
                    raise
                masters = parse_cluster_slots(await _node_command(client, node, "CLUSTER", "SLOTS"))
                lines = parse_cluster_nodes(await _node_command(client, node, "CLUSTER", "NODES"))
            break
        except (RedisError, OSError) as exc:
            errors.append(f"{node.name}: {exc}")
            logger.debug("Cannot read topology from %s: %s", node.name, exc)
    if masters is None:
        raise TopologyError(
            message="no primary answered CLUSTER SHARDS/SLOTS: " + "; ".join(errors)
        )

    masters = _merge_node_lines(masters, lines)
    migrating = await _read_migrations(client, masters, lines)
    return Topology(masters=tuple(masters), migrating_slots=tuple(migrating))


def _merge_node_lines(masters: list[MasterInfo], lines: list[_NodeLine]) -> list[MasterInfo]:
    """Add health flags and slot-less masters known only to ``CLUSTER NODES``."""
    by_line = {line.node_id: line for line in lines}
    known = {m.node_id for m in masters}
    merged: list[MasterInfo] = []
    for master in masters:
        line = by_line.get(master.node_id)
        healthy = master.healthy and not (line is not None and line.failed)
        listed = {r.node_id for r in master.replicas}
        replicas = tuple(
            ReplicaInfo(
                r.node_id,
                r.address,
                r.healthy and (r.node_id not in by_line or by_line[r.node_id].replica_ok),
            )
            for r in master.replicas
        )
        # CLUSTER SLOTS omits failed replicas; CLUSTER NODES still lists them.
        replicas += tuple(
            ReplicaInfo(o.node_id, o.address, o.replica_ok)
            for o in lines
            if o.master_id == master.node_id
            and o.node_id not in listed
            and not o.is_master
            and "handshake" not in o.flags
        )
        merged.append(MasterInfo(master.node_id, master.address, master.slots, replicas, healthy))
    for line in lines:
        if line.is_master and line.node_id not in known and "handshake" not in line.flags:
            replicas = tuple(
                ReplicaInfo(o.node_id, o.address, o.replica_ok)
                for o in lines
                if o.master_id == line.node_id and not o.is_master
            )
            # Slots come from SHARDS/SLOTS only, so one consistent view wins.
            merged.append(MasterInfo(line.node_id, line.address, (), replicas, not line.failed))
    return merged


async def _read_migrations(
    client: RedisCluster, masters: list[MasterInfo], first_lines: list[_NodeLine]
) -> list[MigratingSlot]:
    """Migration markers of every healthy master (each reports only its own).

    Masters without slots are not asked: redis-py does not know them (they
    are absent from CLUSTER SLOTS), and a slot being imported into one is
    also reported as migrating by its source, which owns the slot.
    """
    found: set[MigratingSlot] = set()
    myself = None
    for line in first_lines:
        if "myself" in line.flags:
            myself = line.node_id
            found.update(line.migrating)
    for master in masters:
        if not master.healthy or not master.slots or master.node_id == myself:
            continue
        node = client.get_node(host=master.address.host, port=master.address.port)
        if node is None:
            logger.warning(
                "Master %s at %s is unknown to the client; its migration state is not read",
                master.node_id,
                master.address,
            )
            continue
        try:
            lines = parse_cluster_nodes(await _node_command(client, node, "CLUSTER", "NODES"))
        except (RedisError, OSError) as exc:
            # Reported, not hidden: "no migration seen" must not be claimed
            # for a master we could not ask.
            raise TopologyError(
                message=f"cannot read migration state of master {master.address}: {exc}"
            ) from None
        for line in lines:
            if "myself" in line.flags:
                found.update(line.migrating)
    return sorted(found, key=lambda s: (s.slot, s.source, s.target))
