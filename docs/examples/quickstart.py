"""Quick start: a sharded stream broker with a result backend on Redis Cluster.

Run a worker and then the producer (both read TQRC_URL, default
redis://127.0.0.1:7000)::

    taskiq worker quickstart:broker
    python quickstart.py 100
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from taskiq_redis_cluster import ClusterResultBackend, ClusterStreamBroker

URL = os.environ.get("TQRC_URL", "redis://127.0.0.1:7000")
QUEUE = os.environ.get("TQRC_QUEUE", "quickstart")

broker = ClusterStreamBroker(URL, queue_name=QUEUE).with_result_backend(
    ClusterResultBackend(URL, result_ex_time=600)
)


@broker.task(task_name="quickstart:add")
async def add(a: int, b: int) -> int:
    """A task: runs in the worker, its result lands in the result backend."""
    return a + b


async def main(count: int) -> int:
    await broker.startup()
    try:
        started = time.monotonic()
        handles = await asyncio.gather(*(add.kiq(i, i) for i in range(count)))
        results = await asyncio.gather(*(h.wait_result(timeout=60) for h in handles))
        elapsed = time.monotonic() - started
        wrong = [r for i, r in enumerate(results) if r.is_err or r.return_value != 2 * i]
        plan = await broker.current_plan()
        print(
            f"{count} tasks over {len(plan.shards)} shards: {count - len(wrong)} correct "
            f"results in {elapsed:.2f}s"
        )
        return 1 if wrong else 0
    finally:
        await broker.shutdown()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)))
