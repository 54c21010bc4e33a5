"""Worker side: the broker factory ``taskiq worker`` imports, and the ledger task.

Everything here runs inside the ``taskiq worker`` processes (and
:func:`make_broker` also in the producer, so both sides configure the
broker under test the same way).
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from pathlib import Path
from typing import Any

from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

from taskiq_redis_cluster import BrokerEvents, ClusterListQueueBroker, ClusterStreamBroker
from taskiq_redis_cluster._errors import ConfigurationError

from .config import ENV_PREFIX, EVENTS_FILE, TASK_NAME
from .ledger import append_line


def make_broker(
    kind: str,
    url: str,
    queue: str,
    *,
    idle_timeout: int,
    xread_block: int,
    wait_replicas: int = 0,
    shards: int | None = None,
    events: BrokerEvents | None = None,
) -> AsyncBroker:
    """The broker under test, configured the same in workers and producer.

    ``events`` (ours only) is how the producer counts rerouted kicks.
    """
    if kind == "ours":
        extra: dict[str, Any] = {"events": events}
        if shards is not None:
            extra["shards"] = shards
        return ClusterStreamBroker(
            url,
            queue_name=queue,
            idle_timeout=idle_timeout,
            xread_block=xread_block,
            wait_replicas=wait_replicas,
            plan_poll_interval=0.5,
            **extra,
        )
    if kind == "taskiq-redis":
        from taskiq_redis import RedisStreamClusterBroker

        # Its defaults, except the block time (the same as ours) and a sane
        # pool size; taskiq-redis has neither reclaiming nor WAIT.
        broker: AsyncBroker = RedisStreamClusterBroker(
            url, queue_name=queue, xread_block=xread_block, max_connection_pool_size=1000
        )
        return broker
    if kind == "ours-list":
        extra = {"events": events} if shards is None else {"shards": shards, "events": events}
        return ClusterListQueueBroker(url, queue_name=queue, plan_poll_interval=0.5, **extra)
    raise ConfigurationError(message=f"unknown broker {kind!r}")


def task_sleep(task_id: str, base: float, spread: float) -> float:
    """Seconds the task ``task_id`` sleeps: ``base`` plus a share of ``spread``.

    The share comes from a hash of the id, so a rerun (or a redelivery)
    of the same task sleeps as long.
    """
    return base + spread * (zlib.crc32(task_id.encode()) % 1001) / 1000


def worker_broker() -> AsyncBroker:
    """Broker factory for ``taskiq worker chaos.worker:worker_broker``.

    Reads ``TQRC_CHAOS_URL``, ``_QUEUE``, ``_BROKER``, ``_DIR``, ``_SLEEP``,
    ``_SLEEP_MAX``, ``_IDLE_TIMEOUT``, ``_XREAD_BLOCK``, ``_SHARDS`` and
    ``_WORKER``; registers
    the ledger task and records the process start (and, once the broker
    started, readiness) in ``DIR/workers.log``.
    """
    env = os.environ
    directory = Path(env[ENV_PREFIX + "DIR"])
    label = env.get(ENV_PREFIX + "WORKER", "?")
    sleep = float(env.get(ENV_PREFIX + "SLEEP", "0"))
    sleep_max_text = env.get(ENV_PREFIX + "SLEEP_MAX", "")
    spread = max(0.0, float(sleep_max_text) - sleep) if sleep_max_text else 0.0
    shards_text = env.get(ENV_PREFIX + "SHARDS", "")
    broker = make_broker(
        env.get(ENV_PREFIX + "BROKER", "ours"),
        env[ENV_PREFIX + "URL"],
        env[ENV_PREFIX + "QUEUE"],
        idle_timeout=int(env.get(ENV_PREFIX + "IDLE_TIMEOUT", "2000")),
        xread_block=int(env.get(ENV_PREFIX + "XREAD_BLOCK", "500")),
        shards=int(shards_text) if shards_text else None,
    )
    pid = os.getpid()
    events = directory / EVENTS_FILE
    append_line(events, f"start {label} {pid} {time.time():.6f}\n")
    ledger = os.open(directory / f"exec-{pid}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def record(task_id: str) -> None:
        if sleep > 0 or spread > 0:
            await asyncio.sleep(task_sleep(task_id, sleep, spread))
        os.write(ledger, f"{task_id} {time.time():.6f}\n".encode())

    def ready(state: TaskiqState) -> None:
        append_line(events, f"ready {label} {pid} {time.time():.6f}\n")

    broker.register_task(record, task_name=TASK_NAME)
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, ready)
    return broker
