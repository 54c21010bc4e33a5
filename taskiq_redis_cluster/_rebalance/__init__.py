"""The rebalancer: moves shards back into balance without losing a task."""

from __future__ import annotations

from ._moves import (
    RebalanceEvent,
    RebalanceEventKind,
    RebalanceOptions,
    RebalancePreview,
    Rebalancer,
    RebalanceResult,
    RebalanceStatus,
)

__all__ = [
    "RebalanceEvent",
    "RebalanceEventKind",
    "RebalanceOptions",
    "RebalancePreview",
    "RebalanceResult",
    "RebalanceStatus",
    "Rebalancer",
]
