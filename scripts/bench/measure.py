"""What the controller measures besides the workers' own records.

Redis memory and command counts per master, Redis CPU and clients per node,
percentiles and medians, and the two isolated timings: the planner and one
exporter scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode

from taskiq_redis_cluster import ClusterStreamBroker, scrape_once
from taskiq_redis_cluster._planning._planner import QueueSpec, plan_queue
from taskiq_redis_cluster._planning._topology import Topology

logger = logging.getLogger("taskiq_redis_cluster.bench")


def _as_info(reply: Any) -> dict[str, Any]:
    """INFO as a dict, whether redis-py parsed it (maybe keyed by node) or not."""
    if isinstance(reply, bytes | str):
        text = reply.decode() if isinstance(reply, bytes) else reply
        result: dict[str, Any] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                result[key] = value
        return result
    if isinstance(reply, dict) and len(reply) == 1:
        (only,) = reply.values()
        if isinstance(only, dict | bytes | str):
            return _as_info(only)
    return dict(reply)


async def _info(client: RedisCluster, node: ClusterNode, section: str) -> dict[str, Any]:
    reply = await client.execute_command("INFO", section, target_nodes=node)
    return _as_info(reply)


async def memory(client: RedisCluster) -> int:
    """``used_memory`` summed over the masters."""
    used = 0
    for node in client.get_primaries():
        info = await _info(client, node, "memory")
        used += int(info["used_memory"])
        logger.debug(
            "memory of %s: used %s, clients %s, backlog %s, overhead %s",
            node.name,
            info.get("used_memory"),
            info.get("mem_clients_normal"),
            info.get("mem_replication_backlog"),
            info.get("used_memory_overhead"),
        )
    return used


async def key_memory(client: RedisCluster, keys: Sequence[str]) -> int:
    """``MEMORY USAGE key SAMPLES 0`` summed over ``keys`` (missing keys count 0).

    Exact for the queue's own data, and blind to client buffers and other
    keys, unlike a ``used_memory`` delta.
    """
    total = 0
    for key in keys:
        total += int(await client.memory_usage(key, samples=0) or 0)
    return total


async def prime_replication_backlogs(client: RedisCluster, run_id: str) -> None:
    """Fill every master's replication backlog before memory is measured.

    The backlog grows with the first writes up to ``repl-backlog-size`` and
    stays there; without this, whichever broker writes to a master first
    would be charged up to that size (1 MB by default) per master.
    """
    for node in client.get_primaries():
        info = await _info(client, node, "replication")
        size = int(info.get("repl_backlog_size", 1 << 20)) + (256 << 10)
        for i in range(100_000):
            key = f"bench-{run_id}-prime{i}"
            owner = client.get_node_from_key(key)
            if owner is not None and owner.name == node.name:
                break
        await client.set(key, b"x" * size)
        await client.unlink(key)


async def know_every_node(client: RedisCluster, timeout: float = 15.0) -> int:
    """Reload ``client``'s slot map until it knows every live node; how many it knows.

    redis-py takes its nodes from ``CLUSTER SLOTS``, which in Redis 7 lists
    a replica only once it has acknowledged some replication: on a fresh
    cluster with nothing written yet, the masters alone. Write to every
    master first (:func:`prime_replication_backlogs`). Bounded by ``timeout``.
    """
    reply = await client.execute_command("CLUSTER", "NODES", target_nodes=client.get_primaries()[0])
    if isinstance(reply, dict):  # parsed by a response callback: address -> fields
        flags = [str(v.get("flags", "")) for v in reply.values()]
    else:
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        flags = [line.split()[2] for line in text.splitlines() if len(line.split()) > 2]
    down = {"fail", "fail?", "handshake", "noaddr"}
    live = sum(1 for f in flags if not down & set(f.split(",")))
    deadline = time.monotonic() + timeout
    while len(client.get_nodes()) < live and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        await client.nodes_manager.initialize()
    known = len(client.get_nodes())
    if known < live:
        logger.warning(
            "The client knows %d of %d live nodes; CPU is summed over those", known, live
        )
    return known


def per_100k(delta: int, tasks: int) -> int:
    return max(0, round(delta * 100_000 / tasks)) if tasks > 0 else 0


async def command_calls(client: RedisCluster) -> dict[str, int]:
    """Commands executed so far per master (INFO commandstats, minus INFO itself)."""
    calls: dict[str, int] = {}
    for node in client.get_primaries():
        stats = await _info(client, node, "commandstats")
        total = 0
        for name, value in stats.items():
            if not str(name).startswith("cmdstat_") or str(name) == "cmdstat_info":
                continue
            if isinstance(value, dict):
                total += int(value.get("calls", 0))
            else:
                for part in str(value).split(","):
                    key, _, number = part.partition("=")
                    if key == "calls":
                        total += int(number)
        calls[node.name] = total
    return calls


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds every node had used (``INFO CPU``) at :attr:`at` (monotonic).

    ``nodes`` maps a node's name to ``used_cpu_sys + used_cpu_user`` and
    ``main`` to the ``_main_thread`` pair (Redis 7+; empty before).
    """

    at: float
    nodes: dict[str, float]
    main: dict[str, float]
    masters: frozenset[str]


async def redis_cpu(client: RedisCluster) -> CpuSnapshot:
    """``INFO CPU`` of every node, masters and replicas."""
    nodes: dict[str, float] = {}
    main: dict[str, float] = {}
    for node in client.get_nodes():
        info = await _info(client, node, "cpu")
        nodes[node.name] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        if "used_cpu_sys_main_thread" in info:
            main[node.name] = float(info["used_cpu_sys_main_thread"]) + float(
                info["used_cpu_user_main_thread"]
            )
    masters = frozenset(node.name for node in client.get_primaries())
    return CpuSnapshot(time.monotonic(), nodes, main, masters)


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """CPU seconds used between two snapshots: all nodes, the hottest master, per node.

    ``main_thread_s`` is None when the nodes do not report their main thread.
    """
    per_node = {n: after.nodes[n] - before.nodes[n] for n in after.nodes if n in before.nodes}
    masters = {n: v for n, v in per_node.items() if n in after.masters}
    hottest = max(masters, key=lambda n: masters[n]) if masters else None
    main = [after.main[n] - before.main[n] for n in after.main if n in before.main]
    return {
        "seconds": after.at - before.at,
        "all_s": sum(per_node.values()),
        "hottest_master": hottest,
        "hottest_master_s": masters[hottest] if hottest is not None else 0.0,
        "main_thread_s": sum(main) if main else None,
        "per_node_s": per_node,
    }


def cpu_per_task_us(used_s: float, idle_per_s: float, seconds: float, tasks: int) -> float | None:
    """Redis CPU per task (µs): ``used_s`` minus the idle share ``idle_per_s * seconds``.

    Not clamped: noise can make it slightly negative at very low loads.
    """
    if tasks <= 0:
        return None
    return round((used_s - idle_per_s * seconds) / tasks * 1e6, 2)


async def client_counts(client: RedisCluster) -> dict[str, Any]:
    """Clients of every node: ``connected_clients`` and ``blocked_clients`` summed
    (``INFO clients``), and the blocked ones by command (``CLIENT LIST``, flag b).
    """
    connected = blocked = 0
    by_command: dict[str, int] = {}
    for node in client.get_nodes():
        info = await _info(client, node, "clients")
        connected += int(info["connected_clients"])
        blocked += int(info["blocked_clients"])
        reply = await client.client_list(target_nodes=node)
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply
        for entry in entries:
            if "b" in str(entry.get("flags", "")):
                command = str(entry.get("cmd", "?"))
                by_command[command] = by_command.get(command, 0) + 1
    return {
        "connected_clients": connected,
        "blocked_clients": blocked,
        "blocked_by_command": dict(sorted(by_command.items())),
    }


def spread(before: dict[str, int], after: dict[str, int]) -> tuple[float, dict[str, int]]:
    """Max/mean of the per-master call deltas (1.0 = perfectly even)."""
    deltas = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    values = list(deltas.values())
    mean = sum(values) / len(values) if values else 0.0
    return (max(values) / mean if mean > 0 else 0.0), deltas


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def bench_planner(shards: int, masters: int, rounds: int) -> dict[str, Any]:
    """Time ``plan_queue`` for ``shards`` shards over ``masters`` equal masters."""
    per = 16384 // masters
    mapping = {
        f"{i:040x}": [(i * per, 16383 if i == masters - 1 else (i + 1) * per - 1)]
        for i in range(masters)
    }
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        plan = plan_queue(Topology.from_slot_map(mapping), QueueSpec(f"planbench{r}", shards))
        times.append((time.perf_counter() - start) * 1000)
        assert len(plan.shards) == shards
    return {"shards": shards, "masters": masters, "ms": median(times), "rounds_ms": times}


async def _scrape_equivalent(client: RedisCluster, streams: Sequence[str], group: str) -> None:
    """What an exporter scrape costs in Redis: one cluster pipeline over all shards."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, group)
        pipe.xlen(stream)
    await pipe.execute()


async def bench_scrape(
    client: RedisCluster, url: str, run_id: str, queues: int, shards: int, rounds: int
) -> dict[str, Any]:
    """Time one metrics scrape of ``queues`` stream queues with ``shards`` shards each.

    This is the swap point for the exporter. ``ms`` times the public
    :func:`taskiq_redis_cluster.scrape_once` (read and render);
    ``equivalent_ms`` times the bare Redis work of a scrape (XINFO GROUPS +
    XPENDING summary + XLEN per shard stream in one cluster pipeline), a
    floor to compare it with.
    """
    names = [f"bench-{run_id}-scrape{i}" for i in range(queues)]
    streams: list[str] = []
    group = "taskiq"
    for name in names:
        broker = ClusterStreamBroker(url, queue_name=name, shards=shards)
        await broker.startup()
        try:
            plan = await broker.current_plan()
            for shard in plan.shards:
                stream = shard.keys(broker.options.prefix).stream
                streams.append(stream)
                await client.xadd(stream, {b"data": b"x"})
                with contextlib.suppress(Exception):  # BUSYGROUP on a re-run
                    await client.xgroup_create(stream, group, id="0")
        finally:
            await broker.shutdown()

    async def equivalent() -> None:
        await _scrape_equivalent(client, streams, group)

    async def timed(fn: Callable[[], Awaitable[Any]]) -> list[float]:
        await fn()  # warm the connections
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            await fn()
            times.append((time.perf_counter() - start) * 1000)
        return times

    async def exporter() -> None:
        await scrape_once(client, names)

    equivalent_times = await timed(equivalent)
    times = await timed(exporter)
    return {
        "queues": queues,
        "shards_per_queue": shards,
        "streams": len(streams),
        "source": "taskiq_redis_cluster.scrape_once (read + render)",
        "ms": median(times),
        "rounds_ms": times,
        "equivalent_ms": median(equivalent_times),
        "queue_names": names,
    }
