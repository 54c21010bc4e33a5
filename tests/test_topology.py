"""Topology values, reply parsing, and read_topology against the real cluster."""

from __future__ import annotations

import pytest
from redis.asyncio import RedisCluster

from taskiq_redis_cluster._errors import TopologyError
from taskiq_redis_cluster._keys import slot_of
from taskiq_redis_cluster._planning._topology import (
    SLOT_COUNT,
    MasterInfo,
    MigratingSlot,
    NodeAddress,
    ReplicaInfo,
    Topology,
    parse_cluster_nodes,
    parse_cluster_shards,
    parse_cluster_slots,
    read_topology,
)
from taskiq_redis_cluster.testing import DevCluster

A = "a" * 40
B = "b" * 40
C = "c" * 40
R = "d" * 40
E = "e" * 40

# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def test_node_address_str() -> None:
    assert str(NodeAddress("127.0.0.1", 7000)) == "127.0.0.1:7000"
    assert str(NodeAddress("::1", 7000)) == "[::1]:7000"


def test_master_info_normalises_and_answers() -> None:
    master = MasterInfo(A, NodeAddress("h", 1), ((10, 19), (0, 4), (5, 9), (100, 100)), ())
    assert master.slots == ((0, 19), (100, 100))
    assert master.slot_count == 21
    assert all(master.owns(s) for s in (0, 19, 100))
    assert not any(master.owns(s) for s in (20, 99, 16383))
    assert MasterInfo(A, NodeAddress("h", 1), (), ()).slot_count == 0


def test_master_info_rejects_bad_ranges() -> None:
    with pytest.raises(TopologyError):
        MasterInfo(A, NodeAddress("h", 1), ((5, 4),), ())
    with pytest.raises(TopologyError):
        MasterInfo(A, NodeAddress("h", 1), ((0, SLOT_COUNT),), ())


def test_topology_lookup_and_coverage() -> None:
    topology = Topology.from_slot_map({B: [(100, 16383)], A: [(0, 49)], C: []})
    assert [m.node_id for m in topology.masters] == [A, B, C]
    assert topology.owner_of(0).node_id == A  # type: ignore[union-attr]
    assert topology.owner_of(16383).node_id == B  # type: ignore[union-attr]
    assert topology.owner_of(50) is None
    assert topology.uncovered_slots == ((50, 99),)
    assert not topology.fully_covered
    assert [m.node_id for m in topology.slot_masters] == [A, B]
    assert topology.master_by_id(C) is not None
    assert topology.master_by_id("nope") is None
    assert not topology.migrating
    full = Topology.from_slot_map({A: [(0, 16383)]})
    assert full.fully_covered
    assert full.uncovered_slots == ()
    assert Topology(masters=()).uncovered_slots == ((0, 16383),)


def test_topology_is_order_independent_and_rejects_overlaps() -> None:
    one = Topology.from_slot_map({A: [(0, 9)], B: [(10, 16383)]})
    two = Topology(masters=tuple(reversed(one.masters)))
    assert one == two
    with pytest.raises(TopologyError):
        Topology.from_slot_map({A: [(0, 10)], B: [(10, 16383)]})
    with pytest.raises(TopologyError):
        Topology(masters=(one.masters[0], one.masters[0]))


def test_migrating_flag() -> None:
    topology = Topology.from_slot_map(
        {A: [(0, 16383)], B: []}, migrating=[MigratingSlot(5, A, B), MigratingSlot(5, A, B)]
    )
    assert topology.migrating
    assert topology.migrating_slots == (MigratingSlot(5, A, B),)


# --------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------


def _node(node_id: str, port: int, role: str, health: str = "online") -> dict[bytes, object]:
    return {
        b"id": node_id.encode(),
        b"port": port,
        b"ip": b"127.0.0.1",
        b"endpoint": b"127.0.0.1",
        b"role": role.encode(),
        b"replication-offset": 0,
        b"health": health.encode(),
    }


def test_parse_cluster_shards_dict_form() -> None:
    reply = [
        {
            b"slots": [0, 100, 200, 300],
            b"nodes": [
                _node(A, 7000, "master"),
                _node(R, 7003, "replica", "loading"),
                _node(E, 7004, "replica", "fail"),
            ],
        },
        {b"slots": [], b"nodes": [_node(B, 7001, "master")]},
        {b"slots": [101, 199], b"nodes": [_node(C, 7002, "master", "fail")]},
    ]
    masters = {m.node_id: m for m in parse_cluster_shards(reply)}
    assert masters[A].slots == ((0, 100), (200, 300))
    # "loading" (replication offset 0) is what idle fresh replicas report.
    assert masters[A].replicas == (
        ReplicaInfo(R, NodeAddress("127.0.0.1", 7003), True),
        ReplicaInfo(E, NodeAddress("127.0.0.1", 7004), False),
    )
    assert masters[A].healthy
    assert masters[B].slots == ()
    assert masters[B].healthy
    assert not masters[C].healthy


def test_parse_cluster_shards_flat_resp2_form() -> None:
    def flat(d: dict[bytes, object]) -> list[object]:
        return [x for kv in d.items() for x in kv]

    reply = [[b"slots", [0, 16383], b"nodes", [flat(_node(A, 7000, "master"))]]]
    (master,) = parse_cluster_shards(reply)
    assert master.slots == ((0, 16383),)
    assert master.address == NodeAddress("127.0.0.1", 7000)


def test_parse_cluster_shards_pairs_and_str_keys() -> None:
    reply = [
        {
            "slots": [(0, 5), (6, 16383)],
            "nodes": [{k.decode(): v for k, v in _node(A, 1, "master").items()}],
        }
    ]
    (master,) = parse_cluster_shards(reply)
    assert master.slots == ((0, 16383),)


@pytest.mark.parametrize("reply", [None, b"x", [b"odd"], [{b"slots": [1], b"nodes": []}]])
def test_parse_cluster_shards_rejects_garbage(reply: object) -> None:
    with pytest.raises(TopologyError):
        parse_cluster_shards(reply)


def test_parse_cluster_nodes_with_migration_markers() -> None:
    text = (
        f"{A} 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [77->-{B}] [99-<-{C}]\n"
        f"{B} 127.0.0.1:7001@17001,host.example master - 0 0 2 connected 5461-10922 12000\n"
        f"{R} [::1]:7003@17003 slave,fail {A} 0 0 1 disconnected\n"
    ).encode()
    lines = {line.node_id: line for line in parse_cluster_nodes(text)}
    assert lines[A].migrating == (MigratingSlot(77, A, B), MigratingSlot(99, C, A))
    assert lines[A].slots == ((0, 5460),)
    assert lines[B].slots == ((5461, 10922), (12000, 12000))
    assert lines[B].address == NodeAddress("127.0.0.1", 7001)
    assert lines[R].address == NodeAddress("::1", 7003)
    assert lines[R].failed
    assert lines[R].master_id == A
    with pytest.raises(TopologyError):
        parse_cluster_nodes([b"not text"])
    with pytest.raises(TopologyError):
        parse_cluster_nodes(b"too short line")


def test_parse_cluster_slots() -> None:
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, A.encode(), {}], [b"127.0.0.1", 7003, R.encode(), {}]],
        [5461, 16383, [b"127.0.0.1", 7001, B.encode()]],
        [16000, 16000, [b"127.0.0.1", 7000, A.encode()]],
    ]
    masters = {m.node_id: m for m in parse_cluster_slots(reply)}
    assert masters[A].slots == ((0, 5460), (16000, 16000))
    assert [r.node_id for r in masters[A].replicas] == [R]
    with pytest.raises(TopologyError):
        parse_cluster_slots([[0, 1, [b"h", 1]]])  # no node id


# --------------------------------------------------------------------------
# Against the real cluster
# --------------------------------------------------------------------------


@pytest.mark.cluster
async def test_read_topology_of_dev_cluster(
    healthy_cluster: DevCluster, cluster_client: RedisCluster
) -> None:
    topology = await read_topology(cluster_client)
    assert len(topology.masters) == 3
    assert topology.fully_covered
    assert not topology.migrating
    masters = {n.port for n in await healthy_cluster.masters()}
    assert {m.address.port for m in topology.masters} == masters
    for master in topology.masters:
        assert master.healthy
        assert master.slot_count > 0
        assert len(master.replicas) == 1
        assert master.replicas[0].healthy
        assert len(master.node_id) == 40
    assert sum(m.slot_count for m in topology.masters) == SLOT_COUNT
    for key in ("a", "b", "{x}y", "queue-42"):
        owner = topology.owner_of(slot_of(key))
        assert owner is not None
        assert owner.address.port == (await healthy_cluster.master_of_key(key)).port


@pytest.mark.cluster
async def test_read_topology_sees_open_slots(
    healthy_cluster: DevCluster, cluster_client: RedisCluster
) -> None:
    topology = await read_topology(cluster_client)
    source, target = topology.masters[0], topology.masters[1]
    slot = source.slots[0][0]
    src_node = cluster_client.get_node(host=source.address.host, port=source.address.port)
    dst_node = cluster_client.get_node(host=target.address.host, port=target.address.port)
    assert src_node is not None
    assert dst_node is not None
    try:
        await cluster_client.execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id, target_nodes=dst_node
        )
        seen = await read_topology(cluster_client)
        assert seen.migrating_slots == (MigratingSlot(slot, source.node_id, target.node_id),)
        await cluster_client.execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id, target_nodes=src_node
        )
        seen = await read_topology(cluster_client)
        assert seen.migrating
        assert seen.migrating_slots == (MigratingSlot(slot, source.node_id, target.node_id),)
        assert seen.owner_of(slot).node_id == source.node_id  # type: ignore[union-attr]
    finally:
        for node in (src_node, dst_node):
            await cluster_client.execute_command(
                "CLUSTER", "SETSLOT", slot, "STABLE", target_nodes=node
            )
    assert not (await read_topology(cluster_client)).migrating
