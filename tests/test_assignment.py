"""Shard assignment (issue 29): the listening workers share a queue's shards out.

The pure rule first (every tag one housekeeper and at least one reader,
whatever the counts), then real brokers on the real cluster: listeners
split the shards, a leaving or killed worker's shards are read again within
the stated bounds, and a worker that cannot tell who is alive reads them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CONTROL_APP, Workers, consuming, eventually, make_message, new_broker, running
from taskiq.kicker import AsyncKicker

from taskiq_redis_cluster import ClusterStreamBroker, InvalidOptionError, StreamOptions
from taskiq_redis_cluster._brokers._assign import assign
from taskiq_redis_cluster._keys import slot_of, workers_key
from taskiq_redis_cluster._metrics import scrape_once


# ------------------------------------------------------------------ the rule
@pytest.mark.parametrize("members", [1, 2, 3, 5, 11, 12, 13, 32, 100])
@pytest.mark.parametrize("tags", [1, 2, 6, 12, 14])
def test_every_tag_has_one_housekeeper_and_a_reader(members: int, tags: int) -> None:
    names = sorted(f"w{i:03d}" for i in range(members))
    tag_list = [f"t{j}" for j in range(tags)]
    shares = {name: assign(tag_list, names, name) for name in names}
    for tag in tag_list:
        keepers = [n for n, share in shares.items() if tag in share.keeps_house]
        assert len(keepers) == 1, (tag, keepers)
        assert any(tag in share.reads for share in shares.values())
    for share in shares.values():
        assert share.reads  # nobody idles while others have work
        assert share.keeps_house <= share.reads
        # Balanced: a member reads its even share, plus one when members outnumber tags.
        assert len(share.reads) <= -(-tags // members) + 1
    # Blocked reads in all: one per tag, or one per member when they outnumber tags.
    assert sum(len(s.reads) for s in shares.values()) == max(tags, members)


def test_unknown_or_foreign_membership_reads_everything() -> None:
    tags = ["a", "b", "c"]
    for members in (None, [], ["x", "y"]):
        share = assign(tags, members, "me")
        assert share.reads == share.keeps_house == frozenset(tags)


def test_bad_assignment_options_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="worker_ttl"):
        StreamOptions(worker_ttl=0)
    with pytest.raises(InvalidOptionError, match="shard_assignment"):
        StreamOptions(shard_assignment="no")  # type: ignore[arg-type]
    assert StreamOptions(worker_ttl=1.5, plan_poll_interval=2).heartbeat_interval == 0.5


# ------------------------------------------------------------ real listeners
pytestmark = pytest.mark.cluster

#: Fast enough for a test: beats every 0.5 s, a dead worker is gone after 1.5 s.
FAST = {"xread_block": 200, "plan_poll_interval": 0.5, "worker_ttl": 1.5, "priority_lanes": 1}


async def blocked_reads(broker: ClusterStreamBroker) -> int:
    """Blocked XREADGROUPs on the masters (each test stops its brokers when done)."""
    total = 0
    for node in broker.client.get_primaries():
        clients = await broker.client.client_list(target_nodes=node)
        total += sum(1 for c in clients if c["cmd"] == "xreadgroup" and "b" in c["flags"])
    return total


@contextlib.asynccontextmanager
async def listeners(
    url: str, queue: str, names: list[str], **options: Any
) -> AsyncIterator[tuple[list[ClusterStreamBroker], dict[str, list[str]]]]:
    """Brokers named ``names``, each listening and acking, and what each received."""
    async with contextlib.AsyncExitStack() as stack:
        brokers, received = [], {}
        for name in names:
            broker = ClusterStreamBroker(url, queue_name=queue, consumer_name=name,
                                         **{**FAST, **options})
            await stack.enter_async_context(running(broker))
            received[name] = await stack.enter_async_context(consuming(broker))
            brokers.append(broker)
        yield brokers, received


def pinned_keys(shards: int, per_shard: int) -> dict[int, list[str]]:
    """``per_shard`` partition keys that pin a kick to each shard index."""
    keys: dict[int, list[str]] = {i: [] for i in range(shards)}
    n = 0
    while any(len(k) < per_shard for k in keys.values()):
        index = slot_of(f"k{n}") % shards
        if len(keys[index]) < per_shard:
            keys[index].append(f"k{n}")
        n += 1
    return keys


async def kick_per_shard(
    broker: ClusterStreamBroker, received: dict[str, list[str]], prefix: str, per_shard: int = 5
) -> dict[int, set[str]]:
    """Kick ``per_shard`` tasks pinned to each shard; which listeners got each shard's."""
    shards = len((await broker.current_plan()).shards)
    sent: dict[str, int] = {}
    for index, keys in pinned_keys(shards, per_shard).items():
        for key in keys:
            task_id = f"{prefix}-{key}"
            await broker.kick(make_message(task_id, partition_key=key))
            sent[task_id] = index
    await eventually(
        lambda: sum(1 for got in received.values() for t in got if t in sent) >= len(sent),
        f"{len(sent)} tasks",
    )
    await asyncio.sleep(0.3)  # a duplicate would show up by now
    everything = [t for got in received.values() for t in got if t in sent]
    assert sorted(everything) == sorted(sent)
    readers: dict[int, set[str]] = {i: set() for i in range(shards)}
    for name, got in received.items():
        for task_id in got:
            if task_id in sent:
                readers[sent[task_id]].add(name)
    return readers


async def test_listening_workers_split_the_shards(cluster_url: str, unique_name: str) -> None:
    names = ["w0", "w1", "w2"]
    async with listeners(cluster_url, unique_name, names, shards=6) as (brokers, received):
        key = workers_key("tqrc", unique_name)
        await eventually(lambda: _zcard_is(brokers[0], key, 3), "three workers")
        # One blocked read per shard in all, where each worker read all six before.
        await eventually(lambda: _blocked_is(brokers[0], 6), "six blocked reads")
        readers = await kick_per_shard(brokers[0], received, "s")
        # Each shard's tasks went to one worker, and each worker read two shards.
        assert all(len(names_) == 1 for names_ in readers.values()), readers
        counts = [sum(1 for r in readers.values() if name in r) for name in names]
        assert counts == [2, 2, 2], readers
        # The exporter counts the listening workers.
        text, _ = await scrape_once(brokers[0].client, [unique_name])
        assert f'taskiq_redis_cluster_workers{{queue="{unique_name}"}} 3.0' in text


async def _blocked_is(broker: ClusterStreamBroker, count: int) -> bool:
    return await blocked_reads(broker) == count


@pytest.mark.parametrize("kind", ["stream", "list"])
async def test_a_leaving_worker_hands_its_shards_over(
    cluster_url: str, unique_name: str, kind: str
) -> None:
    brokers = [new_broker(kind, cluster_url, unique_name, consumer_name=f"w{i}",
                          worker_ttl=1.5, shards=6) for i in range(2)]
    async with running(*brokers), contextlib.AsyncExitStack() as first:
        gone = await first.enter_async_context(consuming(brokers[0]))
        async with consuming(brokers[1]) as stays:
            key = workers_key("tqrc", unique_name)
            await eventually(
                lambda: _zcard_is(brokers[1], key, 2), "both workers in the worker set"
            )
            await asyncio.sleep(1.0)  # both read their share by now
            await first.aclose()  # w0 leaves: it takes itself out of the set
            left = time.monotonic()
            assert await brokers[1].client.zrange(key, 0, -1) == [b"w1"]
            for i in range(30):
                await brokers[1].kick(make_message(f"h{i}"))
            await eventually(lambda: len(stays) >= 30, "the leaver's shards read again",
                             timeout=10)
            took = time.monotonic() - left
        assert sorted(stays) == sorted(f"h{i}" for i in range(30))
        assert not [t for t in gone if t.startswith("h")]
    # The stated bound: one heartbeat interval, plus one blocking read.
    print(f"all 30 read {took:.2f}s after the other worker left")
    assert took < 4.0


async def _zcard_is(broker: Any, key: str, count: int) -> bool:
    return bool(await broker.client.zcard(key) == count)


async def test_membership_unknown_reads_every_shard(cluster_url: str, unique_name: str) -> None:
    names = ["w0", "w1"]
    async with listeners(cluster_url, unique_name, names, shards=4) as (brokers, received):
        key = workers_key("tqrc", unique_name)
        await eventually(lambda: _zcard_is(brokers[0], key, 2), "two workers")
        await eventually(lambda: _blocked_is(brokers[0], 4), "one blocked read per shard")
        # Someone clobbers the worker set: the heartbeat fails with WRONGTYPE,
        # and after worker_ttl each worker must assume it may be alone.
        await brokers[0].client.set(key, "not a sorted set")
        await eventually(lambda: _blocked_is(brokers[0], 8), "both workers reading every shard")
        await kick_per_shard(brokers[0], received, "u")  # exactly once, all of them
        await brokers[0].client.delete(key)
        # The heartbeat works again: back to shares.
        await eventually(lambda: _blocked_is(brokers[0], 4), "one blocked read per shard")
        readers = await kick_per_shard(brokers[0], received, "v")
        assert all(len(names_) == 1 for names_ in readers.values()), readers


async def test_killed_worker_process_loses_its_shards_after_worker_ttl(
    cluster_url: str, unique_name: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    ledger.write_text("")
    app = CONTROL_APP.replace("plan_poll_interval=0.5)", "plan_poll_interval=0.5, worker_ttl=2)")
    assert "worker_ttl=2" in app
    workers = Workers(tmp_path, app, TQRC_URL=cluster_url, TQRC_QUEUE=unique_name,
                      TQRC_KIND="stream", TQRC_LEDGER=str(ledger))
    producer = ClusterStreamBroker(cluster_url, queue_name=unique_name, shards=6)
    try:
        async with running(producer):
            await producer.current_plan()
            doomed, survivor = workers.start(), workers.start()
            key = workers_key("tqrc", unique_name)
            await eventually(lambda: _zcard_is(producer, key, 2), "two workers", timeout=30)
            await asyncio.sleep(1.5)  # each reads its share
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait(timeout=10)
            killed = time.monotonic()
            # Until Redis has seen the dead worker's sockets close, a kick can
            # still be served to one of its blocked reads; that entry is then
            # pending on the dead consumer until idle_timeout (at least once,
            # as before assignment). The bound tested here is for the rest.
            await asyncio.sleep(0.3)
            for i in range(40):
                await AsyncKicker("app:stamp", producer, {}).kiq(f"k{i}")

            def stamped() -> int:
                return sum(1 for line in ledger.read_text().splitlines()
                           if line.startswith("stamp k"))

            await eventually(lambda: stamped() >= 40, "every task after the kill", timeout=20,
                             detail=workers.logs)
            took = time.monotonic() - killed
            assert survivor.poll() is None
            await asyncio.sleep(0.5)
            assert stamped() == 40
    finally:
        workers.stop_all()
    print(f"all 40 ran {took:.2f}s after the SIGKILL (worker_ttl 2 s)")
    # worker_ttl, one heartbeat interval and a blocking read, with room for a slow CI.
    assert took < 2 + 0.5 + 0.2 + 3.0
