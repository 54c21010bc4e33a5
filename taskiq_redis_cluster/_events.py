"""Hook through which brokers report what they do (for metrics).

Brokers call these methods on the hot path, so the default implementation
does nothing; the Prometheus implementation lives in ``_metrics``. Keeping
the broker unaware of prometheus_client keeps both sides small.
"""

from __future__ import annotations


class BrokerEvents:
    """Receives broker events; subclass and override what you need."""

    def published(self, queue: str, shard: int, count: int = 1) -> None:
        """``count`` tasks were enqueued to ``shard``."""

    def publish_error(self, queue: str, reason: str) -> None:
        """A kick failed; ``reason`` is a short error kind."""

    def acked(self, queue: str, shard: int, count: int = 1) -> None:
        """``count`` deliveries were acknowledged."""

    def reclaimed(self, queue: str, shard: int, count: int = 1) -> None:
        """``count`` entries of crashed consumers were taken over."""

    def dead_lettered(self, queue: str, shard: int, reason: str) -> None:
        """An entry moved to the dead-letter stream."""

    def nogroup_recovered(self, queue: str, shard: int) -> None:
        """A lost consumer group (NOGROUP/UNBLOCKED) was recreated."""

    def rerouted(self, queue: str, shard: int) -> None:
        """A kick left ``shard`` (its master failing) for a healthy shard."""

    def retried(self, kind: str) -> None:
        """A Redis operation was retried or redirected; ``kind`` is the error kind."""


#: Shared do-nothing instance; it has no state, so sharing is safe.
NULL_EVENTS = BrokerEvents()
