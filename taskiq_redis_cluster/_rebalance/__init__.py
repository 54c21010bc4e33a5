"""The rebalancer: moves shards back into balance without losing a task."""

from __future__ import annotations

from ._options import (
    RebalanceEvent,
    RebalanceEventKind,
    RebalanceOptions,
    RebalancePreview,
    RebalanceResult,
    RebalanceStatus,
)
from ._rebalancer import Rebalancer

__all__ = [
    "RebalanceEvent",
    "RebalanceEventKind",
    "RebalanceOptions",
    "RebalancePreview",
    "RebalanceResult",
    "RebalanceStatus",
    "Rebalancer",
]
