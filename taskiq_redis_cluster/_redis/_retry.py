"""Retry policy and error classification for cluster operations.

The broker's client is built with redis-py's own retries switched off, so
that a non-idempotent XADD is never re-sent behind our back. Idempotent
operations (reads, XACK, XAUTOCLAIM, group creation, trims) are retried here
with tenacity; a kick is retried only when the error proves the XADD was
not applied.

:class:`RetryPolicy` is the one backoff of the package, and every wait after
an error is one of its jittered delays: :meth:`RetryPolicy.call` (idempotent
operations, through tenacity), every long-running loop (``delay`` +
``sleep``: readers, subscriptions, promoters, the plan writer), the calls
pinned to a slot's master (``_pinned``), and redis-py's own retries of the
non-broker clients (:meth:`RetryPolicy.backoff`).

Error classification lives here too, and only here: :func:`error_kind` (a
label), :func:`is_transient` (retry an idempotent operation?),
:func:`write_outcome` (was a failed write applied?), :func:`master_trouble`
(is the master failing, rather than the command?) and :func:`recovery` (what
a call pinned to one node does next: follow, reroute, wait or give up).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.backoff import AbstractBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from .._errors import InvalidOptionError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Outcome(enum.Enum):
    """What a failed write tells us about whether it was applied."""

    NOT_APPLIED = "not_applied"  # safe to retry
    UNKNOWN = "unknown"  # may have been applied: never retry silently
    FATAL = "fatal"  # a real error (wrong type, bad args): do not retry


# Errors that Redis Cluster answers *instead of* running the command.
_REJECTIONS: tuple[type[BaseException], ...] = (
    MovedError,
    AskError,
    TryAgainError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    BusyLoadingError,
    SlotNotCoveredError,
    MaxConnectionsError,
)

_REJECTION_PREFIXES = ("CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING", "READONLY", "MOVED",
                       "ASK ")


def error_kind(exc: BaseException) -> str:
    """Short, low-cardinality name of an error, for logs and metric labels."""
    if isinstance(exc, MovedError):
        return "moved"
    if isinstance(exc, AskError):
        return "ask"
    if isinstance(exc, TryAgainError):
        return "tryagain"
    if isinstance(exc, ClusterDownError):
        return "clusterdown"
    if isinstance(exc, (RedisTimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (RedisConnectionError, OSError)):
        return "connection"
    if isinstance(exc, ResponseError):
        text = str(exc)
        if text.startswith("NOGROUP"):
            return "nogroup"
        if text.startswith("UNBLOCKED"):
            return "unblocked"
        for prefix in _REJECTION_PREFIXES:
            if text.startswith(prefix):
                return prefix.strip().lower()
        return "response"
    if isinstance(exc, RedisClusterException):
        return "cluster"
    return type(exc).__name__.lower()


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away with time: redirects, failover, network."""
    if isinstance(exc, _REJECTIONS):
        return True
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).startswith(_REJECTION_PREFIXES)
    # redis-py raises the bare RedisClusterException for "no targets" or
    # "slot not covered" while its slot map is being rebuilt.
    return isinstance(exc, RedisClusterException)


# Error kinds (see error_kind) that say a shard's master cannot take writes
# now, rather than that this one command was wrong.
_MASTER_TROUBLE = frozenset(
    {"connection", "timeout", "clusterdown", "tryagain", "masterdown", "loading", "readonly"}
)


def master_trouble(exc: BaseException) -> bool:
    """True when ``exc`` says the shard's master is failing, not the command."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, ClusterDownError,
                        MasterDownError, TryAgainError, OSError)):
        return True
    return error_kind(exc) in _MASTER_TROUBLE


class Recovery(enum.Enum):
    """What a call sent to one chosen node does after an error (see ``_pinned``)."""

    FOLLOW = "follow"  # ASK: the key is being imported by the node named
    REROUTE = "reroute"  # MOVED, a lost or demoted node, a stale map: find the owner again
    WAIT = "wait"  # TRYAGAIN, LOADING: the slot or the node is busy, try it later
    EVAL = "eval"  # NOSCRIPT: nothing ran; send the script's body
    RAISE = "raise"  # a real error of the command


def recovery(exc: BaseException) -> Recovery:
    """Classify the error of a command sent to one node, with no redirect followed."""
    if isinstance(exc, NoScriptError):
        return Recovery.EVAL
    if isinstance(exc, AskError):
        return Recovery.FOLLOW
    if error_kind(exc) in ("tryagain", "loading"):
        return Recovery.WAIT  # the same master, once the slot or its data is ready
    if is_transient(exc):
        return Recovery.REROUTE
    return Recovery.RAISE


def write_outcome(exc: BaseException, *, sent: bool) -> Outcome:
    """Classify the error of a write.

    :param sent: whether the command may have reached the server. A failure
        to connect or a cluster rejection means it was not applied; a broken
        connection after sending means nobody knows.
    """
    if isinstance(exc, _REJECTIONS):
        return Outcome.NOT_APPLIED
    if isinstance(exc, ResponseError):
        if str(exc).startswith(_REJECTION_PREFIXES):
            return Outcome.NOT_APPLIED
        return Outcome.FATAL
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
        if not sent or _is_connect_failure(exc):
            return Outcome.NOT_APPLIED
        return Outcome.UNKNOWN
    if isinstance(exc, RedisClusterException):
        return Outcome.NOT_APPLIED if not sent else Outcome.UNKNOWN
    return Outcome.UNKNOWN


def _is_connect_failure(exc: BaseException) -> bool:
    # redis-py words every failed connect as "Error N connecting to host:port",
    # and a connect that failed cannot have sent anything.
    return "connecting to" in str(exc) or "Connection refused" in str(exc)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in attempts.

    ``sleep`` and ``jitter`` (a draw in [0, 1)) are injectable, so tests of
    backoff run without real waiting and with known delays.
    """

    attempts: int = 8
    base: float = 0.05
    cap: float = 2.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)
    jitter: Callable[[], float] = field(default=random.random)

    def __post_init__(self) -> None:
        if not self.attempts >= 1:
            raise InvalidOptionError(option="attempts", reason=f"must be >= 1, got {self.attempts}")
        if not self.base > 0:  # also rejects NaN
            raise InvalidOptionError(option="base", reason=f"must be > 0, got {self.base}")
        if not self.cap >= self.base:
            raise InvalidOptionError(
                option="cap", reason=f"must be >= base ({self.base}), got {self.cap}"
            )

    def retrying(self, on_retry: Callable[[BaseException], None] | None = None) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for transient errors."""

        def before_sleep(state: object) -> None:
            outcome = getattr(state, "outcome", None)
            exc = outcome.exception() if outcome is not None else None
            if exc is not None and on_retry is not None:
                on_retry(exc)

        def wait(state: RetryCallState) -> float:
            # The same jittered delays as every retry loop (see delay()).
            return self.delay(state.attempt_number)

        return AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        """Run an idempotent operation, retrying transient errors."""
        async for attempt in self.retrying(on_retry):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def backoff(self) -> AbstractBackoff:
        """This policy's delays as a redis-py backoff, for a client's ``Retry``."""
        return _PolicyBackoff(self)

    def delay(self, attempt: int) -> float:
        """Backoff before attempt ``attempt`` (1-based) of a long-running loop.

        Half of the exponential step is fixed and half is random: every
        worker's readers fail together when a master dies, and without
        jitter they would all retry in the same instant; the fixed half
        keeps a reader from spinning on a delay drawn close to zero.
        """
        step = min(self.cap, self.base * (2 ** min(attempt, 16)))
        return float(step / 2 + self.jitter() * step / 2)


def retry_policy(retry: object) -> RetryPolicy:
    """A component's ``retry=``: the policy given, or the default one for None.

    :raises InvalidOptionError: for anything else, such as redis-py's
        ``Retry``, which taskiq-redis hands on to redis-py. Here redis-py
        never re-sends a broker's kick, whose outcome may be unknown; the
        brokers retry what is safe through this policy (docs/brokers.md).
    """
    if retry is None:
        return RetryPolicy()
    if not isinstance(retry, RetryPolicy):
        raise InvalidOptionError(
            option="retry",
            reason=f"takes a taskiq_redis_cluster.RetryPolicy, got {type(retry).__name__}: "
            "redis-py's retries are the package's own (0 for a broker, so that a kick whose "
            "outcome is unknown is never re-sent)",
        )
    return retry


class _PolicyBackoff(AbstractBackoff):
    """redis-py's backoff interface over :meth:`RetryPolicy.delay`."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def compute(self, failures: int) -> float:
        return self._policy.delay(failures)
