"""Where shards live: topology, the pure planner and the plan store."""

from __future__ import annotations

from ._planner import (
    BalanceReport,
    Move,
    QueueSpec,
    Replan,
    Shard,
    ShardPlan,
    balance,
    plan_queue,
    replan,
)
from ._planstore import (
    PlanFollower,
    PlanStore,
)
from ._topology import (
    MasterInfo,
    Topology,
    read_topology,
)

__all__ = [
    "BalanceReport",
    "MasterInfo",
    "Move",
    "PlanFollower",
    "PlanStore",
    "QueueSpec",
    "Replan",
    "Shard",
    "ShardPlan",
    "Topology",
    "balance",
    "plan_queue",
    "read_topology",
    "replan",
]
