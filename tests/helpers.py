"""Helpers shared by the test modules (fixtures live in the pytest plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from taskiq import AckableMessage, BrokerMessage, InMemoryBroker, TaskiqMessage

from taskiq_redis_cluster import ClusterStreamBroker

#: taskiq's default formatter; brokers dead-letter anything it cannot parse.
FORMATTER = InMemoryBroker().formatter


def make_message(
    task_id: str, task_name: str = "tests:noop", args: Sequence[Any] = (), **labels: Any
) -> BrokerMessage:
    """A real taskiq message, as ``kiq()`` would send it."""
    msg = TaskiqMessage(
        task_id=task_id, task_name=task_name, labels=labels, args=list(args), kwargs={}
    )
    return BrokerMessage(
        task_id=task_id, task_name=task_name, message=FORMATTER.dumps(msg).message,
        labels=labels,
    )


def task_id_of(data: bytes) -> str:
    """The task id inside a message's bytes."""
    return str(FORMATTER.loads(data).task_id)


async def take(
    broker: ClusterStreamBroker, want: int, *, ack: bool = True, timeout: float = 20.0
) -> list[AckableMessage]:
    """Listen until ``want`` messages arrived (acking them unless told not to)."""
    got: list[AckableMessage] = []
    gen = broker.listen()

    async def run() -> None:
        async for msg in gen:
            assert isinstance(msg, AckableMessage)
            got.append(msg)
            if ack:
                await msg.ack()  # type: ignore[misc]
            if len(got) >= want:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        await gen.aclose()
    return got


async def started(url: str, queue: str, **kwargs: Any) -> ClusterStreamBroker:
    """A started stream broker that notices changes fast: short blocking
    reads (200 ms) and plan polls (0.5 s); ``kwargs`` are broker options."""
    broker = ClusterStreamBroker(url, queue_name=queue, xread_block=200,
                                 plan_poll_interval=0.5, **kwargs)
    await broker.startup()
    return broker


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 10.0
) -> None:
    """Run ``check()`` every 0.05 s until it is true; fail after ``timeout``.

    ``check`` may be a plain function or a coroutine function. The one
    polling helper of the test modules: for effects that are asynchronous by
    design, such as batched acks (sent within a few milliseconds), a dead
    letter written by another shard's reader, or a worker process's ledger.
    """
    deadline = time.monotonic() + timeout

    async def holds() -> bool:
        result = check()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    while not await holds():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def consuming(broker: ClusterStreamBroker) -> AsyncIterator[list[str]]:
    """Listen and ack in the background; yields the task ids received so far."""
    got: list[str] = []
    listen = broker.listen()

    async def consume() -> None:
        async for msg in listen:
            assert isinstance(msg, AckableMessage)
            got.append(task_id_of(msg.data))
            await msg.ack()  # type: ignore[misc]

    task = asyncio.create_task(consume())
    try:
        yield got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listen.aclose()
