"""Producer side: kicks at a fixed rate, each with its outcome (acked, failed, unknown)."""

from __future__ import annotations

import asyncio
import time
import zlib
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
    """Outcome of one kick: ``acked``, ``failed`` or ``unknown``.

    ``kind`` is ``plain``, ``priority``, ``delayed`` or ``delayed+priority``
    (see :func:`kick_kind`); ``delay`` the seconds a delayed kick waits.
    """

    task_id: str
    started: float
    finished: float
    outcome: str
    error: str = ""
    kind: str = "plain"
    delay: float = 0.0

    @property
    def due(self) -> float:
        """Unix time after which the task may run (at the latest)."""
        return self.finished + self.delay


#: The kinds of kick of the mix, in the order of the report.
KINDS = ("plain", "priority", "delayed", "delayed+priority")


def kick_kind(task_id: str) -> tuple[str, dict[str, Any]]:
    """The kind and labels of a mixed kick, fixed by its id (a hash).

    Three eighths plain, a quarter with a ``priority`` label of 1-9 (the
    lanes above 0 with the broker's defaults), a quarter with a ``delay`` of
    0.2-1.5 s, an eighth with both.
    """
    h = zlib.crc32(task_id.encode())
    slot = h % 8
    labels: dict[str, Any] = {}
    if slot in (3, 4, 7):
        labels["priority"] = 1 + (h >> 3) % 9
    if slot in (5, 6, 7):
        labels["delay"] = round(0.2 + ((h >> 8) % 1301) / 1000, 3)
    kind = "+".join(k for k, on in (("delayed", "delay" in labels),
                                    ("priority", "priority" in labels)) if on)
    return kind or "plain", labels


def _message(broker: AsyncBroker, task_id: str, labels: dict[str, Any]) -> Any:
    msg = TaskiqMessage(
        task_id=task_id, task_name=TASK_NAME, labels=labels, args=[task_id], kwargs={}
    )
    return broker.formatter.dumps(msg)


async def _kick(broker: AsyncBroker, task_id: str, timeout: float, mix: bool = False) -> Kick:
    kind, labels = kick_kind(task_id) if mix else ("plain", {})
    started = time.time()
    outcome, error = "acked", ""
    try:
        await asyncio.wait_for(broker.kick(_message(broker, task_id, labels)), timeout)
    except KickFailedError as exc:
        outcome, error = "failed", short_error(exc)
    except asyncio.TimeoutError:
        outcome, error = "unknown", f"no answer within {timeout:.0f}s"
    except Exception as exc:  # every other error: the XADD may have happened
        outcome, error = "unknown", short_error(exc)
    return Kick(
        task_id, started, time.time(), outcome, error, kind, float(labels.get("delay", 0.0))
    )


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
    mix: bool = False,
) -> list[Kick]:
    """Kick ``ids`` at a fixed ``rate``; each kick runs concurrently and is bounded.

    ``record``, if given, receives each kick as it finishes (progress for
    a scenario that looks at the backlog while the producer runs). With
    ``stop_after``, kicking ends after that many ids once ``stop`` is set
    (at once without ``stop``); the rest of ``ids`` is an upper bound.
    With ``mix``, kicks carry priority and delay labels (:func:`kick_kind`).
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
        task = asyncio.ensure_future(_kick(broker, task_id, kick_timeout, mix))
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
