"""The sharded brokers: the base written once, stream, list and pub/sub."""

from __future__ import annotations

from ._list import (
    ClusterListQueueBroker,
)
from ._pubsub import (
    ClusterPubSubBroker,
)
from ._stream import (
    ClusterStreamBroker,
)

__all__ = [
    "ClusterListQueueBroker",
    "ClusterPubSubBroker",
    "ClusterStreamBroker",
]
