"""Producer side: kicks at a fixed rate, each with its outcome (acked, failed, unknown)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from taskiq import AsyncBroker, TaskiqMessage

from taskiq_redis_cluster import BrokerEvents
from taskiq_redis_cluster._errors import KickFailedError

from .config import TASK_NAME, ChaosConfig
from .worker import make_broker


@dataclass(frozen=True)
class Kick:
    """Outcome of one kick: ``acked``, ``failed`` or ``unknown``."""

    task_id: str
    started: float
    finished: float
    outcome: str
    error: str = ""


def _message(broker: AsyncBroker, task_id: str) -> Any:
    msg = TaskiqMessage(task_id=task_id, task_name=TASK_NAME, labels={}, args=[task_id], kwargs={})
    return broker.formatter.dumps(msg)


async def _kick(broker: AsyncBroker, task_id: str, timeout: float) -> Kick:
    started = time.time()
    outcome, error = "acked", ""
    try:
        await asyncio.wait_for(broker.kick(_message(broker, task_id)), timeout)
    except KickFailedError as exc:
        outcome, error = "failed", short_error(exc)
    except asyncio.TimeoutError:
        outcome, error = "unknown", f"no answer within {timeout:.0f}s"
    except Exception as exc:  # every other error: the XADD may have happened
        outcome, error = "unknown", short_error(exc)
    return Kick(task_id, started, time.time(), outcome, error)


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"


async def produce(
    broker: AsyncBroker,
    ids: Sequence[str],
    rate: float,
    kick_timeout: float,
    *,
    record: list[Kick] | None = None,
    stop_after: int | None = None,
    stop: asyncio.Event | None = None,
) -> list[Kick]:
    """Kick ``ids`` at a fixed ``rate``; each kick runs concurrently and is bounded.

    ``record``, if given, receives each kick as it finishes (progress for
    a scenario that looks at the backlog while the producer runs). With
    ``stop_after``, kicking ends after that many ids once ``stop`` is set
    (at once without ``stop``); the rest of ``ids`` is an upper bound.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []

    def done(task: asyncio.Future[Kick]) -> None:
        if record is not None and not task.cancelled():
            record.append(task.result())

    for i, task_id in enumerate(ids):
        if stop_after is not None and i >= stop_after and (stop is None or stop.is_set()):
            break
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(_kick(broker, task_id, kick_timeout))
        task.add_done_callback(done)
        tasks.append(task)
    return list(await asyncio.gather(*tasks))


class KickEvents(BrokerEvents):
    """Counts the producer's kicks that left a failing master's shard."""

    def __init__(self) -> None:
        self.rerouted_count = 0

    def rerouted(self, queue: str, shard: int) -> None:
        self.rerouted_count += 1


def producer_broker(
    url: str, queue: str, config: ChaosConfig, events: BrokerEvents | None = None
) -> AsyncBroker:
    """The producer's broker for ``config`` (not started)."""
    return make_broker(
        config.broker,
        url,
        queue,
        idle_timeout=config.idle_timeout,
        xread_block=config.xread_block,
        wait_replicas=config.wait_replicas,
        shards=config.shards,
        events=events if config.broker != "taskiq-redis" else None,
    )
