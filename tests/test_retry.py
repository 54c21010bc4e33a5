"""RetryPolicy: the one backoff every retry loop uses (no cluster needed)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, TryAgainError

from taskiq_redis_cluster import InvalidOptionError, RetryPolicy


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


async def test_call_waits_the_same_jittered_delays_as_every_loop() -> None:
    # One backoff for the package: call() (tenacity) sleeps delay(n) before
    # attempt n + 1, exactly what the readers' loops sleep after n failures.
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(attempts=4, base=0.1, cap=10.0, sleep=sleep, jitter=lambda: 0.5)
    failures = iter([RedisConnectionError("down"), TryAgainError("later"),
                     RedisConnectionError("down")])

    async def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "done"

    assert await policy.call(flaky) == "done"
    assert slept == [policy.delay(1), policy.delay(2), policy.delay(3)]
    assert slept == pytest.approx([0.15, 0.3, 0.6])


async def test_call_gives_up_after_its_attempts_and_never_retries_a_real_error() -> None:
    calls: list[int] = []

    async def sleep(seconds: float) -> None:
        pass

    policy = RetryPolicy(attempts=3, sleep=sleep)

    async def down() -> None:
        calls.append(1)
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        await policy.call(down)
    assert len(calls) == 3

    async def wrong_type() -> None:
        calls.append(2)
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(ResponseError):
        await policy.call(wrong_type)
    assert calls.count(2) == 1


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"attempts": 0}, "attempts"), ({"base": 0.0}, "base"), ({"base": float("nan")}, "base"),
     ({"base": 1.0, "cap": 0.5}, "cap")],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float], option: str) -> None:
    with pytest.raises(InvalidOptionError, match=f"Invalid option {option}"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
