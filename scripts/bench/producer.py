"""Producer subprocess (``python -c "...; producer_main()"``).

One per broker, so no event-loop state leaks between brokers: it kicks the
app module's tasks on JSON requests read from stdin and answers on stdout.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import APP_MODULE, ENV_PREFIX


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def producer_main() -> None:
    """Entry point of a producer subprocess: JSON requests on stdin, replies on stdout."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_producer())


async def _producer() -> None:
    app = importlib.import_module(APP_MODULE)
    broker = app.broker
    concurrency = int(os.environ.get(ENV_PREFIX + "CONCURRENCY", "64"))
    await broker.startup()
    try:
        # Warm-up: open the connection pools (and initialize a lazily
        # created cluster client) before anything is measured.
        await app.warm.kiq(time.time())
        await asyncio.gather(*(app.warm.kiq(time.time()) for _ in range(concurrency)))
        _emit({"ready": True, "warm": concurrency + 1})
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                reply = await _handle(app, request)
            except Exception as exc:  # reported to the controller, which fails the run
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            _emit(reply)
    finally:
        await broker.shutdown()


async def _handle(app: Any, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "kick":
        task = getattr(app, request["task"])
        return await kick_many(
            lambda i: task.kiq(time.time(), *request.get("args", [])),
            int(request["count"]),
            int(request["concurrency"]),
        )
    if op == "slow":
        count = int(request["count"])
        return await kick_many(lambda i: app.slow.kiq(time.time(), i), count, count)
    if op == "rate":
        # The latency task by default; the scale phase's ping and incr too.
        paced = getattr(app, request.get("task", "latency"))
        round_no = int(request["round"])
        return await kick_at_rate(
            lambda: paced.kiq(time.time(), round_no),
            float(request["rate"]),
            float(request["seconds"]),
        )
    raise ValueError(f"unknown op {op!r}")


async def kick_many(
    kick: Callable[[int], Awaitable[Any]], count: int, concurrency: int
) -> dict[str, Any]:
    """Kick ``count`` tasks from ``concurrency`` coroutines; returns timings.

    Each coroutine takes the next number and kicks until none are left, so
    exactly ``concurrency`` kicks are in flight at any time.
    """
    numbers = iter(range(count))
    errors: list[str] = []

    async def worker() -> None:
        for i in numbers:
            try:
                await kick(i)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    first = time.time()
    start = time.perf_counter()
    cpu_start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {
        "count": count,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "first_kick": first,
        "elapsed": elapsed,
        "tps": count / elapsed if elapsed > 0 else 0.0,
        "cpu_us_per_kick": cpu / count * 1e6,
    }


async def kick_at_rate(
    kick: Callable[[], Awaitable[Any]], rate: float, seconds: float
) -> dict[str, Any]:
    """Kick at a fixed ``rate`` for ``seconds``; a slow kick never delays the next."""
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * seconds))
    pending: set[asyncio.Task[Any]] = set()
    errors = 0
    start = loop.time()
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(kick())
        pending.add(task)
        task.add_done_callback(pending.discard)
    results = await asyncio.gather(*pending, return_exceptions=True)
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return {"count": count, "errors": errors, "elapsed": loop.time() - start}
