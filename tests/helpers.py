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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from taskiq import AckableMessage, AsyncBroker, BrokerMessage, InMemoryBroker, TaskiqMessage
from taskiq.kicker import AsyncKicker

from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker

#: The two queue brokers, as the tests that run against both type them.
Broker = ClusterStreamBroker | ClusterListQueueBroker

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
    broker = await started_kind("stream", url, queue, **kwargs)
    assert isinstance(broker, ClusterStreamBroker)
    return broker


@contextlib.asynccontextmanager
async def running(*brokers: AsyncBroker) -> AsyncIterator[None]:
    """Start ``brokers`` and shut every one that started down at the end."""
    async with contextlib.AsyncExitStack() as stack:
        for broker in brokers:
            await broker.startup()
            stack.push_async_callback(broker.shutdown)
        yield


def chaos(timeout: float) -> Callable[[Any], Any]:
    """Mark a fault-injection test ``chaos``, with its own ``timeout`` (seconds).

    tests/conftest.py refuses a chaos test without its own timeout of at
    most 120 s: that bound is what keeps the fault scenarios CI runs short.
    """

    def mark(test: Any) -> Any:
        return pytest.mark.chaos(pytest.mark.timeout(timeout)(test))

    return mark


#: The brokers the task-control tests run against: the stream broker and
#: the list broker in its default and its reliable mode.
BROKER_KINDS = ["stream", "list", "list-reliable"]


def new_broker(kind: str, url: str, queue: str, **kwargs: Any) -> Broker:
    """A broker of ``kind`` (one of ``BROKER_KINDS``), not started, as quick to
    notice changes as ``started``'s (the list broker pops for 200 ms at a time)."""
    if kind == "stream":
        return ClusterStreamBroker(url, queue_name=queue, xread_block=200,
                                   plan_poll_interval=0.5, **kwargs)
    return ClusterListQueueBroker(url, queue_name=queue, brpop_timeout=0.2,
                                  plan_poll_interval=0.5, reliable=kind == "list-reliable",
                                  **kwargs)


async def started_kind(kind: str, url: str, queue: str, **kwargs: Any) -> Broker:
    """A started ``new_broker``."""
    broker = new_broker(kind, url, queue, **kwargs)
    await broker.startup()
    return broker


class Receiver:
    """Listens in the background, acking, and records when each task id arrived."""

    def __init__(self, broker: Broker) -> None:
        self.at: dict[str, float] = {}
        self._stream = isinstance(broker, ClusterStreamBroker)
        self._listen = broker.listen()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self._listen:
            # The stream broker always hands out ackable messages; the list
            # broker only in its reliable mode.
            assert isinstance(msg, AckableMessage) or not self._stream
            data = msg.data if isinstance(msg, AckableMessage) else msg
            self.at.setdefault(task_id_of(data), time.time())
            if isinstance(msg, AckableMessage):
                await msg.ack()  # type: ignore[misc]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._listen.aclose()


async def eventually(
    check: Callable[[], Any], what: str, timeout: float = 10.0, *, interval: float = 0.05,
    ignoring: type[Exception] | tuple[type[Exception], ...] = (),
    detail: Callable[[], object] | None = None,
) -> Any:
    """Run ``check()`` every ``interval`` s until it returns something true and
    return that; fail after ``timeout``.

    ``check`` may be a plain function or a coroutine function; a call that
    raises one of ``ignoring`` counts as not yet. ``what`` names the awaited
    state; ``detail`` is called on failure only, to add e.g. worker logs.
    The one polling helper of the test modules: for effects that are
    asynchronous by design, such as batched acks (sent within a few
    milliseconds), a dead letter written by another shard's reader, or a
    worker process's ledger.
    """
    deadline = time.monotonic() + timeout

    async def holds() -> Any:
        try:
            result = check()
            return await result if inspect.isawaitable(result) else result
        except ignoring:
            return None

    while not (result := await holds()):
        if time.monotonic() >= deadline:
            extra = "" if detail is None else f"\n{detail()}"
            raise AssertionError(f"{what} not reached within {timeout:.0f}s{extra}")
        await asyncio.sleep(interval)
    return result


@contextlib.asynccontextmanager
async def consuming(broker: Broker) -> AsyncIterator[list[str]]:
    """Listen and ack in the background; yields the task ids received so far."""
    got: list[str] = []
    listen = broker.listen()

    async def consume() -> None:
        async for msg in listen:
            if isinstance(msg, AckableMessage):
                got.append(task_id_of(msg.data))
                await msg.ack()  # type: ignore[misc]
            else:  # the list broker's default mode has nothing to ack
                got.append(task_id_of(msg))

    task = asyncio.create_task(consume())
    try:
        yield got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listen.aclose()


#: The task-control worker app: a broker of the kind in ``TQRC_KIND`` set up
#: as ``started_kind`` does, and two tasks: ``stamp`` notes its tag;
#: ``flaky`` fails its first attempt.
CONTROL_APP = textwrap.dedent(
    """
    import os
    import time

    from taskiq.middlewares import SmartRetryMiddleware

    from taskiq_redis_cluster import ClusterListQueueBroker, ClusterStreamBroker

    URL, QUEUE, KIND = os.environ["TQRC_URL"], os.environ["TQRC_QUEUE"], os.environ["TQRC_KIND"]
    if KIND == "stream":
        broker = ClusterStreamBroker(URL, queue_name=QUEUE, xread_block=200,
                                     plan_poll_interval=0.5)
    else:
        broker = ClusterListQueueBroker(URL, queue_name=QUEUE, brpop_timeout=0.2,
                                        plan_poll_interval=0.5, reliable=KIND == "list-reliable")

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


class Workers:
    """``taskiq worker`` processes of the app ``source`` (module ``app`` in
    ``tmp``), each in its own process group and with its own log file; the
    app reads the environment variables ``env``."""

    def __init__(self, tmp: Path, source: str, **env: str) -> None:
        (tmp / "app.py").write_text(source)
        self.dir = tmp
        self.env = dict(os.environ, PYTHONPATH=str(tmp), **env)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """One more worker; ``args`` go to ``taskiq worker``."""
        with (self.dir / f"worker{len(self.procs)}.log").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskiq", "worker", "app:broker", "--workers", "1",
                 *args],
                cwd=self.dir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """The end of every worker's log."""
        return "\n".join((self.dir / f"worker{i}.log").read_text()[-3000:]
                         for i in range(len(self.procs)))

    def stop_all(self) -> None:
        """Kill every worker and its children."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)


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
