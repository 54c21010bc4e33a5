"""Property tests of the pure slot planner (no Redis needed)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskiq_redis_cluster._errors import (
    CorruptPlanError,
    InvalidNameError,
    InvalidShardCountError,
    NoMastersError,
    PlanVersionError,
)
from taskiq_redis_cluster._keys import ShardKeys, slot_of
from taskiq_redis_cluster._planning._planner import (
    PLAN_FORMAT_VERSION,
    QueueSpec,
    Shard,
    ShardPlan,
    balance,
    plan_queue,
    quotas,
    replan,
)
from taskiq_redis_cluster._planning._topology import SLOT_COUNT, Topology

PROPS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Owners = list[str | None]


def node_id(seed: int, i: int) -> str:
    return hashlib.sha1(f"{seed}/{i}".encode()).hexdigest()


def to_topology(owners: Sequence[str | None], ids: Sequence[str]) -> Topology:
    """Topology from a per-slot owner list; ``ids`` without slots stay as empty masters."""
    ranges: dict[str, list[tuple[int, int]]] = {i: [] for i in ids}
    start = 0
    for slot in range(1, SLOT_COUNT + 1):
        if slot == SLOT_COUNT or owners[slot] != owners[start]:
            owner = owners[start]
            if owner is not None:
                ranges.setdefault(owner, []).append((start, slot - 1))
            start = slot
    return Topology.from_slot_map(ranges)


@st.composite
def partitions(draw: st.DrawFn, max_masters: int = 64) -> tuple[Owners, list[str]]:
    """A random contiguous partition of all slots among 1..max_masters masters."""
    n = draw(st.integers(1, max_masters))
    seed = draw(st.integers(0, 10**6))
    ids = [node_id(seed, i) for i in range(n)]
    # Cut points on a grid of 8 keep every master at >= 8 slots here; the
    # range moves of uneven maps can still shrink masters to slivers.
    grid = 8
    cuts = sorted(
        grid * c
        for c in draw(
            st.sets(st.integers(1, SLOT_COUNT // grid - 1), min_size=n - 1, max_size=n - 1)
        )
    )
    order = draw(st.permutations(ids))
    bounds = [0, *cuts, SLOT_COUNT]
    owners: Owners = [None] * SLOT_COUNT
    for i in range(n):
        owners[bounds[i] : bounds[i + 1]] = [order[i]] * (bounds[i + 1] - bounds[i])
    return owners, ids


def move_ranges(draw: st.DrawFn, owners: Owners, ids: Sequence[str], max_moves: int = 4) -> Owners:
    """Reassign a few random slot ranges to random masters (uneven maps)."""
    owners = list(owners)
    moves = draw(
        st.lists(
            st.tuples(
                st.integers(0, SLOT_COUNT - 1),
                st.integers(1, 4000),
                st.integers(0, len(ids) - 1),
            ),
            max_size=max_moves,
        )
    )
    for start, length, target in moves:
        end = min(SLOT_COUNT, start + length)
        owners[start:end] = [ids[target]] * (end - start)
    return owners


@st.composite
def topologies(draw: st.DrawFn, max_masters: int = 64) -> Topology:
    owners, ids = draw(partitions(max_masters))
    if draw(st.booleans()):
        owners = move_ranges(draw, owners, ids)
    return to_topology(owners, ids)


@st.composite
def changed_topologies(draw: st.DrawFn) -> tuple[Topology, Topology]:
    """A topology and a changed one: moved ranges, uncovered ranges, new or removed masters."""
    owners, ids = draw(partitions(48))
    before = to_topology(owners, ids)
    ids2 = list(ids)
    extra = draw(st.integers(0, 3))
    ids2 += [node_id(-1, i) for i in range(extra)]
    after = move_ranges(draw, owners, ids2, max_moves=6)
    if draw(st.booleans()) and len(ids) > 1:
        # A master leaves: its slots go to another one.
        gone = draw(st.sampled_from(ids))
        heir = draw(st.sampled_from([i for i in ids2 if i != gone]))
        after = [heir if o == gone else o for o in after]
    if draw(st.booleans()):
        # Some slots lose their master (e.g. a master died without replica).
        start = draw(st.integers(0, SLOT_COUNT - 1))
        length = draw(st.integers(1, 2000))
        end = min(SLOT_COUNT, start + length)
        after[start:end] = [None] * (end - start)
    if all(o is None for o in after):
        after[0] = ids2[0]
    return before, to_topology(after, ids2)


def eligible(topology: Topology) -> list[str]:
    return [m.node_id for m in topology.masters if m.slots]


def live_counts(plan: ShardPlan, topology: Topology) -> tuple[dict[str, int], int]:
    counts = dict.fromkeys(eligible(topology), 0)
    dead = 0
    for shard in plan.shards:
        owner = topology.owner_of(shard.slot)
        if owner is None:
            dead += 1
        else:
            counts[owner.node_id] += 1
    return counts, dead


def exact_shares(
    masters: Sequence[str], total: int, weights: Mapping[str, float] | None
) -> dict[str, Fraction]:
    w = {m: Fraction(weights.get(m, 1.0) if weights else 1) for m in masters}
    wsum = sum(w.values())
    return {m: total * w[m] / wsum for m in masters}


def minimum_moves(
    plan: ShardPlan, topology: Topology, weights: Mapping[str, float] | None = None
) -> int:
    """Fewest moves that reach quotas within one of every exact share."""
    counts, dead = live_counts(plan, topology)
    exact = exact_shares(list(counts), len(plan.shards), weights)
    floors = {m: math.floor(e) for m, e in exact.items()}
    extra = len(plan.shards) - sum(floors.values())
    base = sum(max(0, counts[m] - floors[m]) for m in counts)
    relievable = sum(1 for m in counts if exact[m] != floors[m] and counts[m] > floors[m])
    return dead + base - min(extra, relievable)


def assert_plan_consistent(plan: ShardPlan, topology: Topology, prefix: str = "tqrc") -> None:
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))
    tags = [s.tag for s in plan.all_shards()]
    assert len(set(tags)) == len(tags)
    for shard in plan.shards:
        keys = ShardKeys(prefix, shard.tag)
        assert slot_of(keys.stream) == shard.slot
        assert slot_of(keys.dead) == shard.slot
        assert slot_of(keys.list) == shard.slot
        owner = topology.owner_of(shard.slot)
        assert owner is not None
        assert owner.node_id == shard.master


def assert_within_shares(
    plan: ShardPlan, topology: Topology, weights: Mapping[str, float] | None = None
) -> None:
    counts, dead = live_counts(plan, topology)
    assert dead == 0
    exact = exact_shares(list(counts), len(plan.shards), weights)
    for m, count in counts.items():
        assert math.floor(exact[m]) <= count <= math.ceil(exact[m]), (m, count, exact[m])
    if weights is None:
        assert max(counts.values()) - min(counts.values()) <= 1


# --------------------------------------------------------------------------
# plan_queue
# --------------------------------------------------------------------------


@PROPS
@given(topology=topologies(), shards=st.integers(1, 1024))
def test_plan_keys_land_on_planned_master_and_balance(topology: Topology, shards: int) -> None:
    plan = plan_queue(topology, QueueSpec("orders", shards))
    assert plan.epoch == 1
    assert plan.draining == ()
    assert len(plan.shards) == shards
    assert_plan_consistent(plan, topology)
    assert_within_shares(plan, topology)
    report = balance(plan, topology)
    assert report.misplaced == ()
    assert report.spread <= 1
    assert report.balanced


@PROPS
@given(topology=topologies(), shards=st.integers(1, 1024))
def test_plan_is_deterministic(topology: Topology, shards: int) -> None:
    spec = QueueSpec("q.det-1", shards)
    first = plan_queue(topology, spec)
    # Same ownership described in another order must give the same plan.
    shuffled = Topology(masters=tuple(reversed(topology.masters)))
    assert plan_queue(shuffled, spec) == first


@PROPS
@given(
    topology=topologies(max_masters=16),
    shards=st.integers(1, 512),
    raw_weights=st.lists(st.floats(0.1, 10.0), min_size=16, max_size=16),
)
def test_weighted_plan_follows_largest_remainder(
    topology: Topology, shards: int, raw_weights: list[float]
) -> None:
    masters = eligible(topology)
    weights = dict(zip(masters, raw_weights, strict=False))
    plan = plan_queue(topology, QueueSpec("weighted", shards, weights=weights))
    assert_plan_consistent(plan, topology)
    assert_within_shares(plan, topology, weights)


def test_plan_prefers_distinct_slots() -> None:
    topology = Topology.from_slot_map({"a": [(0, 8191)], "b": [(8192, 16383)]})
    plan = plan_queue(topology, QueueSpec("spread", 200))
    assert len({s.slot for s in plan.shards}) == 200


def test_master_with_few_slots_reuses_slots() -> None:
    topology = Topology.from_slot_map({"a": [(0, 16381)], "b": [(16382, 16383)]})
    plan = plan_queue(topology, QueueSpec("tight", 10))
    on_b = [s for s in plan.shards if s.master == "b"]
    assert len(on_b) == 5
    assert {s.slot for s in on_b} == {16382, 16383}
    assert_plan_consistent(plan, topology)


def test_empty_master_gets_no_shards() -> None:
    topology = Topology.from_slot_map({"a": [(0, 16383)], "new": []})
    plan = plan_queue(topology, QueueSpec("q", 4))
    assert {s.master for s in plan.shards} == {"a"}
    assert dict(balance(plan, topology).counts) == {"a": 4}


def test_round_robin_order() -> None:
    topology = Topology.from_slot_map({"b": [(5000, 16383)], "a": [(0, 4999)]})
    plan = plan_queue(topology, QueueSpec("rr", 5))
    assert [s.master for s in plan.shards] == ["a", "b", "a", "b", "a"]


# --------------------------------------------------------------------------
# replan
# --------------------------------------------------------------------------


@PROPS
@given(topology=topologies(max_masters=32), shards=st.integers(1, 512))
def test_replan_unchanged_topology_is_a_no_op(topology: Topology, shards: int) -> None:
    plan = plan_queue(topology, QueueSpec("same", shards))
    result = replan(plan, topology)
    assert result.moves == ()
    assert result.plan is plan
    assert not result.changed


@PROPS
@given(pair=changed_topologies(), shards=st.integers(1, 600))
def test_replan_moves_the_minimum_and_restores_balance(
    pair: tuple[Topology, Topology], shards: int
) -> None:
    before, after = pair
    plan = plan_queue(before, QueueSpec("sticky", shards))
    expected_moves = minimum_moves(plan, after)
    result = replan(plan, after)
    new = result.plan
    assert len(result.moves) == expected_moves
    assert_plan_consistent(new, after)
    assert_within_shares(new, after)
    assert balance(new, after).balanced
    moved = {m.index for m in result.moves}
    for old_shard, new_shard in zip(plan.shards, new.shards, strict=True):
        if old_shard.index in moved:
            assert new_shard.tag != old_shard.tag
            assert new_shard.salt > old_shard.salt
        else:
            assert new_shard.tag == old_shard.tag
    if result.moves:
        assert new.epoch == plan.epoch + 1
        assert new.draining == tuple(m.old for m in result.moves)
        assert all(m.old == plan.shards[m.index] for m in result.moves)
        assert all(m.new == new.shards[m.index] for m in result.moves)
    else:
        assert new.draining == ()
    # Sticky and idempotent: a second pass on the same topology does nothing.
    again = replan(new, after)
    assert again.moves == ()
    assert again.plan is new


@PROPS
@given(
    topology=topologies(max_masters=12),
    shards=st.integers(1, 300),
    raw_weights=st.lists(st.floats(0.2, 5.0), min_size=12, max_size=12),
)
def test_weighted_replan_moves_the_minimum(
    topology: Topology, shards: int, raw_weights: list[float]
) -> None:
    plan = plan_queue(topology, QueueSpec("w", shards))
    weights = dict(zip(eligible(topology), raw_weights, strict=False))
    result = replan(plan, topology, weights=weights)
    assert len(result.moves) == minimum_moves(plan, topology, weights)
    assert_plan_consistent(result.plan, topology)
    assert_within_shares(result.plan, topology, weights)


def test_replan_after_failover_relabels_without_moves() -> None:
    before = Topology.from_slot_map({"a": [(0, 8191)], "b": [(8192, 16383)]})
    plan = plan_queue(before, QueueSpec("fo", 6))
    after = Topology.from_slot_map({"a2": [(0, 8191)], "b": [(8192, 16383)], "a": []})
    assert set(balance(plan, after).misplaced) == {s.index for s in plan.shards if s.master == "a"}
    result = replan(plan, after)
    assert result.moves == ()
    assert result.relabelled
    assert result.changed
    assert result.plan.epoch == plan.epoch + 1
    assert result.plan.tags() == plan.tags()
    assert balance(result.plan, after).balanced


def test_replan_onto_new_masters_keeps_earlier_draining_shards() -> None:
    one = Topology.from_slot_map({"a": [(0, 16383)]})
    plan = plan_queue(one, QueueSpec("grow", 6))
    two = Topology.from_slot_map({"a": [(0, 16383)], "b": []})
    assert replan(plan, two).plan is plan  # an empty master gets nothing
    # The new master received slots (e.g. rebalance --cluster-use-empty-masters).
    two = Topology.from_slot_map({"a": [(0, 8191)], "b": [(8192, 16383)]})
    first = replan(plan, two)
    assert live_counts(first.plan, two)[0] == {"a": 3, "b": 3}
    assert len(first.moves) == minimum_moves(plan, two)
    three = Topology.from_slot_map({"a": [(0, 5000)], "b": [(8192, 16383)], "c": [(5001, 8191)]})
    second = replan(first.plan, three)
    assert live_counts(second.plan, three)[0] == {"a": 2, "b": 2, "c": 2}
    assert second.plan.draining[: len(first.plan.draining)] == first.plan.draining
    assert second.plan.epoch == first.plan.epoch + 1
    finished = second.plan.drained(s.tag for s in second.plan.draining)
    assert finished.draining == ()
    assert finished.epoch == second.plan.epoch + 1
    assert finished.drained(["unknown"]) is finished


def test_balance_reports_orphans_and_imbalance() -> None:
    topology = Topology.from_slot_map({"a": [(0, 8191)], "b": [(8192, 16383)]})
    plan = plan_queue(topology, QueueSpec("bal", 4))
    victim = plan.shards[0]
    others = [r for r in ((0, 8191), (8192, 16383)) if not r[0] <= victim.slot <= r[1]]
    holes = Topology.from_slot_map({"x": others})
    report = balance(plan, holes)
    assert victim.index in report.orphaned
    assert victim.index in report.misplaced
    assert not report.balanced
    lopsided = Topology.from_slot_map({"a": [(0, 16383)], "b": []})
    report = balance(plan, lopsided)
    assert report.counts == {"a": 4}
    assert report.imbalance == 1.0
    assert len(report.misplaced) == 2


def test_quotas_prefer_masters_holding_more() -> None:
    assert quotas(["a", "b", "c"], 7, current={"c": 5}) == {"a": 2, "b": 2, "c": 3}
    assert quotas(["a", "b", "c"], 7) == {"a": 3, "b": 2, "c": 2}
    assert quotas(["a", "b"], 9, weights={"a": 2.0}) == {"a": 6, "b": 3}


# --------------------------------------------------------------------------
# Records and validation
# --------------------------------------------------------------------------


@PROPS
@given(topology=topologies(max_masters=8), shards=st.integers(1, 64))
def test_record_round_trip(topology: Topology, shards: int) -> None:
    plan = plan_queue(topology, QueueSpec("rt", shards))
    plan = ShardPlan(plan.queue, 9, plan.shards)
    record = plan.to_record()
    assert record["format"] == PLAN_FORMAT_VERSION
    assert ShardPlan.from_record(record) == plan
    assert ShardPlan.from_json(plan.to_json()) == plan


def test_record_with_draining_round_trips() -> None:
    topology = Topology.from_slot_map({"a": [(0, 16383)]})
    plan = plan_queue(topology, QueueSpec("d", 2))
    moved = replan(plan, Topology.from_slot_map({"a": [(0, 9999)], "b": [(10000, 16383)]}))
    assert ShardPlan.from_json(moved.plan.to_json()) == moved.plan


@pytest.mark.parametrize("name", ["", "a{b", "a}b", "{x}", "with space"])
def test_bad_queue_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        QueueSpec(name, 1)


@pytest.mark.parametrize("shards", [0, -1, 16385])
def test_bad_shard_counts(shards: int) -> None:
    with pytest.raises(InvalidShardCountError):
        QueueSpec("q", shards)


def test_shard_count_bounds_are_inclusive() -> None:
    assert QueueSpec("q", 1).shards == 1
    assert QueueSpec("q", 16384).shards == 16384


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf")])
def test_bad_weights(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        QueueSpec("q", 3, weights={"a": weight})


def test_spec_is_hashable_and_weights_frozen() -> None:
    spec = QueueSpec("q", 3, weights={"a": 2})
    hash(spec)
    assert spec.weights == {"a": 2.0}
    with pytest.raises(TypeError):
        spec.weights["a"] = 3.0  # type: ignore[index]


def test_no_masters() -> None:
    with pytest.raises(NoMastersError):
        plan_queue(Topology(masters=()), QueueSpec("q", 1))
    empty = Topology.from_slot_map({"a": []})
    with pytest.raises(NoMastersError):
        plan_queue(empty, QueueSpec("q", 1))
    plan = plan_queue(Topology.from_slot_map({"a": [(0, 16383)]}), QueueSpec("q", 1))
    with pytest.raises(NoMastersError):
        replan(plan, empty)
    with pytest.raises(NoMastersError):
        balance(plan, empty)


def test_newer_format_is_refused() -> None:
    plan = plan_queue(Topology.from_slot_map({"a": [(0, 16383)]}), QueueSpec("q", 2))
    record = plan.to_record()
    record["format"] = 99
    record["shards"] = "whatever a future release stores"
    with pytest.raises(PlanVersionError) as info:
        ShardPlan.from_record(record, key="tqrc:{plan:q}")
    assert info.value.found == 99
    assert "tqrc:{plan:q}" in str(info.value)


def _valid_record() -> dict[str, object]:
    plan = plan_queue(Topology.from_slot_map({"a": [(0, 16383)]}), QueueSpec("q", 2))
    return plan.to_record()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(format="1"),
        lambda r: r.update(format=0),
        lambda r: r.pop("format"),
        lambda r: r.update(epoch=0),
        lambda r: r.update(epoch="3"),
        lambda r: r.update(queue="a{b"),
        lambda r: r.update(shards=[]),
        lambda r: r.update(shards="x"),
        lambda r: r["shards"].reverse(),
        lambda r: r["shards"][0].update(slot=(r["shards"][0]["slot"] + 1) % 16384),
        lambda r: r["shards"][0].update(tag="q/1~0"),
        lambda r: r["shards"][0].update(tag="q/0~"),
        lambda r: r["shards"][0].pop("master"),
        lambda r: r.update(draining=[r["shards"][0]]),
    ],
)
def test_malformed_records_are_corrupt(mutate: object) -> None:
    record = _valid_record()
    mutate(record)  # type: ignore[operator]
    with pytest.raises(CorruptPlanError):
        ShardPlan.from_record(record, key="k")


@pytest.mark.parametrize("garbage", [b"", b"not json", b"[]", b"null", b'{"format": 1}', b"\xff"])
def test_garbage_json_is_corrupt(garbage: bytes) -> None:
    with pytest.raises(CorruptPlanError):
        ShardPlan.from_json(garbage, key="k")


def test_shard_helpers() -> None:
    plan = plan_queue(Topology.from_slot_map({"a": [(0, 16383)]}), QueueSpec("h", 3))
    assert plan.shard(1) == plan.shards[1]
    assert plan.tags() == ("h/0~0", "h/1~0", "h/2~0")
    assert plan.shards[2].salt == 0
    assert plan.shards[0].keys("p") == ShardKeys("p", "h/0~0")
    assert Counter(s.master for s in plan.shards) == {"a": 3}
    assert Shard(0, "x/y~z/0~12", 0, "a").salt == 12
