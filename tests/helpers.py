"""Helpers shared by the test modules (fixtures live in the pytest plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from taskiq import AckableMessage, AsyncBroker, BrokerMessage, InMemoryBroker, TaskiqMessage
from taskiq.kicker import AsyncKicker

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


#: Tasks of the task-control worker apps (appended to a line that makes
#: ``broker``): ``stamp`` notes its tag; ``flaky`` fails its first attempt.
CONTROL_TASKS = textwrap.dedent(
    """
    import os
    import time

    from taskiq.middlewares import SmartRetryMiddleware

    broker = broker.with_middlewares(
        SmartRetryMiddleware(
            default_retry_count=3, default_delay=2, use_jitter=False, default_retry_label=True
        )
    )

    def _note(line: str) -> None:
        with open(os.environ["TQRC_LEDGER"], "a") as ledger:
            ledger.write(f"{line} {time.time()}\\n")

    @broker.task(task_name="app:stamp")
    async def stamp(tag: str) -> None:
        _note(f"stamp {tag}")

    @broker.task(task_name="app:flaky", retry_on_error=True)
    async def flaky(tag: str) -> None:
        with open(os.environ["TQRC_LEDGER"]) as ledger:
            tries = sum(1 for line in ledger if line.startswith(f"flaky {tag} "))
        _note(f"flaky {tag}")
        if tries == 0:
            raise RuntimeError("first attempt fails")
    """
)


class WorkerProcess:
    """A real ``taskiq worker`` of the app ``source`` (module ``app``), in its own
    process group.

    The app reads ``TQRC_URL``, ``TQRC_QUEUE`` and ``TQRC_LEDGER`` (a file
    its tasks append ``<words> <time>`` lines to) and any ``env`` given.
    """

    def __init__(self, tmp: Path, source: str, url: str, queue: str, *args: str,
                 **env: str) -> None:
        (tmp / "app.py").write_text(source)
        self.queue = queue
        self.ledger = tmp / "ledger.txt"
        self.ledger.write_text("")
        self.log = tmp / "worker.log"
        environ = dict(os.environ, TQRC_URL=url, TQRC_QUEUE=queue, TQRC_LEDGER=str(self.ledger),
                       PYTHONPATH=str(tmp), **env)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskiq", "worker", "app:broker", "--workers", "1",
                 "--log-level", "INFO", *args],
                cwd=tmp, env=environ, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def words(self) -> list[str]:
        """The first word of every ledger line, in order."""
        return [line.split()[0] for line in self.ledger.read_text().splitlines()]

    def lines(self, prefix: str) -> list[float]:
        """Times of the ledger lines that start with ``prefix``."""
        return [float(line.split()[-1]) for line in self.ledger.read_text().splitlines()
                if line.startswith(prefix + " ")]

    async def ready(self, producer: AsyncBroker) -> None:
        """Wait until the worker runs tasks: an ``app:stamp`` ping went through."""
        tag = uuid.uuid4().hex[:6]
        await AsyncKicker("app:stamp", producer, {}).kiq(f"ping-{tag}")
        await eventually(lambda: bool(self.lines(f"stamp ping-{tag}")), "the worker",
                         timeout=30)

    def stop(self) -> None:
        """Kill the worker and its children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
