"""RetryPolicy: the one backoff every retry loop uses (no cluster needed)."""

from __future__ import annotations

from taskiq_redis_cluster import RetryPolicy


def test_delay_is_half_fixed_half_jitter_and_capped() -> None:
    low = RetryPolicy(base=0.05, cap=2.0, jitter=lambda: 0.0)
    high = RetryPolicy(base=0.05, cap=2.0, jitter=lambda: 0.999999)
    for attempt, step in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 2.0), (40, 2.0)):
        assert low.delay(attempt) == step / 2
        assert step / 2 < high.delay(attempt) < step + 1e-9


def test_delays_of_many_readers_spread_out() -> None:
    # Readers of every worker fail in the same instant when a master dies;
    # their retries must not all land in the same instant again.
    policy = RetryPolicy()
    delays = {policy.delay(3) for _ in range(50)}
    assert len(delays) > 40
    assert all(0.2 <= d <= 0.4 for d in delays)
