"""The Lua runner: every script is a shipped file, used, and run one way.

``_redis/_lua.py`` runs every script of the package: EVALSHA, EVAL when the
node answers NOSCRIPT, keys checked to share one slot before any I/O.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

import taskiq_redis_cluster
from taskiq_redis_cluster import CrossSlotError
from taskiq_redis_cluster._planning import PlanStore, QueueSpec, ShardPlan, read_topology
from taskiq_redis_cluster._redis import AutoPipeline, CommandFailure, LuaScript, load_script
from taskiq_redis_cluster._redis._lua import script_names
from taskiq_redis_cluster.testing import DevCluster

PACKAGE = Path(taskiq_redis_cluster.__file__).parent
RUNNER = PACKAGE / "_redis" / "_lua.py"

def _loaded_names() -> dict[str, list[str]]:
    """``load_script("<name>")`` calls in the package: name -> modules."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "load_script"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.setdefault(str(node.args[0].value), []).append(
                    str(path.relative_to(PACKAGE))
                )
    return found


def test_every_script_file_is_used_and_every_used_script_exists() -> None:
    files = set(script_names())
    used = _loaded_names()
    assert len(files) >= 13
    assert files - set(used) == set(), "dead scripts: delete them or use them"
    assert set(used) - files == set(), "load_script() of a missing file"


def test_every_script_loads_with_a_stable_sha() -> None:
    for name in script_names():
        script = load_script(name)
        assert load_script(name) is script  # one runner per name and process
        assert script.source.strip(), name
        assert re.fullmatch(r"[0-9a-f]{40}", script.sha), name
        assert "redis.call" in script.source or "redis.pcall" in script.source, name


def test_loading_reads_nothing_until_first_use() -> None:
    # A name without a file fails at first use, not at import (no I/O then).
    script = LuaScript("no_such_script")
    with pytest.raises(FileNotFoundError):
        _ = script.sha


def test_no_module_runs_lua_another_way() -> None:
    # One way to run Lua: register_script, raw EVAL/EVALSHA or client.eval
    # elsewhere would bypass the NOSCRIPT fallback and the slot check.
    pattern = re.compile(r"register_script|\.evalsha\(|\.eval\(|[\"']EVAL(SHA)?[\"']")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        if path == RUNNER:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []


class _NoIO:
    """A client that fails the test if anything is sent."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"sent {args[:1]} although the keys span two slots")


async def test_keys_of_two_slots_raise_before_any_io() -> None:
    script = load_script("schedule_add")
    keys = ["{a}:schedules", "{b}:cron", "{a}:timeline"]
    with pytest.raises(CrossSlotError, match="span several slots"):
        await script(_NoIO(), keys=keys, args=["id", "payload", ""])  # type: ignore[arg-type]
    with pytest.raises(CrossSlotError):
        script.command(keys, ["id", "payload", ""])
    with pytest.raises(CrossSlotError):
        script.eval_command(keys, ["id", "payload", ""])
    # One tag, several keys: fine.
    assert script.command(["{a}:x", "{a}:y"], [1])[:3] == ("EVALSHA", script.sha, 2)
    assert script.eval_command(["{a}:x"], [1])[:3] == ("EVAL", script.source, 1)


def _calls(stats: dict[str, Any], command: str) -> int:
    row = stats.get(f"cmdstat_{command}", {})
    return int(row.get("calls", 0)) + int(row.get("rejected_calls", 0))


async def _flushed_schedule_add(
    client: RedisCluster, name: str
) -> tuple[LuaScript, list[str], Any, dict[str, Any]]:
    """The schedule_add script, its keys, their node with its script cache
    flushed, and that node's command stats from just after the flush."""
    script = load_script("schedule_add")
    tag = f"{{{name}}}"
    keys = [f"{tag}:schedules", f"{tag}:cron", f"{tag}:timeline"]
    node = client.get_node_from_key(keys[0])
    await client.execute_command("SCRIPT", "FLUSH", "SYNC", target_nodes=node)
    return script, keys, node, await client.info("commandstats", target_nodes=node)


@pytest.mark.cluster
async def test_evalsha_falls_back_to_eval_after_script_flush(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    script, keys, node, before = await _flushed_schedule_add(cluster_client, unique_name)

    # Not cached on the node: EVALSHA answers NOSCRIPT, EVAL runs it once.
    assert await script(cluster_client, keys=keys, args=["s1", "p1", ""]) == 1
    after_first = await cluster_client.info("commandstats", target_nodes=node)
    assert _calls(after_first, "evalsha") == _calls(before, "evalsha") + 1
    assert _calls(after_first, "eval") == _calls(before, "eval") + 1
    assert await cluster_client.execute_command(
        "SCRIPT", "EXISTS", script.sha, target_nodes=node
    ) == [1]

    # Cached now: EVALSHA alone.
    assert await script(cluster_client, keys=keys, args=["s2", "p2", "1000"]) == 1
    after_second = await cluster_client.info("commandstats", target_nodes=node)
    assert _calls(after_second, "evalsha") == _calls(before, "evalsha") + 2
    assert _calls(after_second, "eval") == _calls(before, "eval") + 1

    # Both calls ran the script for real.
    assert await cluster_client.hget(keys[0], "s1") == b"p1"
    assert await cluster_client.smembers(keys[1]) == {b"s1"}
    assert await cluster_client.zscore(keys[2], "s2") == 1000.0


@pytest.mark.cluster
async def test_a_pipelined_call_falls_back_to_eval_and_raises_redis_errors_unwrapped(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    # The brokers' per-shard scripts go in the auto-pipeline's batches: the
    # NOSCRIPT fallback must hold there too, in the same node's next batch.
    script, keys, node, before = await _flushed_schedule_add(cluster_client, unique_name)
    pipe = AutoPipeline(cluster_client)
    try:
        assert await script(pipe, keys=keys, args=["s1", "p1", ""]) == 1
        reply = await script.submit(pipe, keys, ["s2", "p2", "1000"])
        assert reply.value == 1
        after = await cluster_client.info("commandstats", target_nodes=node)
        assert _calls(after, "evalsha") == _calls(before, "evalsha") + 2
        assert _calls(after, "eval") == _calls(before, "eval") + 1
        assert await cluster_client.hget(keys[0], "s1") == b"p1"
        assert await cluster_client.zscore(keys[2], "s2") == 1000.0

        # A script's own error comes out as redis-py raises it, not wrapped.
        await cluster_client.set(keys[0], "not a hash")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await script(pipe, keys=keys, args=["s3", "p3", ""])
        with pytest.raises(CommandFailure) as failure:
            await script.submit(pipe, keys, ["s3", "p3", ""])
        assert isinstance(failure.value.error, ResponseError)
        # No key, no node to route by: refused before anything is sent.
        with pytest.raises(ValueError, match="no key"):
            await script.submit(pipe, [], [])
    finally:
        await pipe.drain()
        await cluster_client.delete(*keys)


@pytest.mark.cluster
async def test_every_script_compiles_on_the_server(cluster_client: RedisCluster) -> None:
    # SCRIPT LOAD compiles without running: a syntax error in any file fails
    # here, not on the first rare path that runs it.
    node = cluster_client.get_default_node()
    for name in script_names():
        script = load_script(name)
        sha = await cluster_client.execute_command(
            "SCRIPT", "LOAD", script.source, target_nodes=node
        )
        assert (sha.decode() if isinstance(sha, bytes) else sha) == script.sha, name


def test_the_script_files_ship_in_the_wheel() -> None:
    # setuptools only packs non-Python files that package-data names.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["taskiq_redis_cluster"]
    for name in script_names():
        path = f"_redis/scripts/{name}.lua"
        assert any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is not package data"


@pytest.mark.cluster
async def test_the_plan_store_batch_falls_back_to_eval_after_script_flush(
    healthy_cluster: DevCluster, cluster_client: RedisCluster, unique_name: str
) -> None:
    # The confirmed swap is a raw batch (script, WAIT 1, ROLE) on one
    # connection, built from script.command(); NOSCRIPT resends it with
    # script.eval_command() on that same node.
    store = PlanStore(cluster_client)
    topology = await read_topology(cluster_client)
    plan = await store.get_or_create(topology, QueueSpec(unique_name, 3))
    try:
        node = cluster_client.get_node_from_key(store.key(unique_name))
        await cluster_client.execute_command("SCRIPT", "FLUSH", "SYNC", target_nodes=node)
        before = await cluster_client.info("commandstats", target_nodes=node)
        new = ShardPlan(plan.queue, plan.epoch + 1, plan.shards, plan.draining)
        assert await store.compare_and_swap(new, expected_epoch=plan.epoch)
        after = await cluster_client.info("commandstats", target_nodes=node)
        assert _calls(after, "evalsha") == _calls(before, "evalsha") + 1
        assert _calls(after, "eval") == _calls(before, "eval") + 1
        assert await store.epoch(unique_name) == plan.epoch + 1
    finally:
        await store.delete(unique_name)


def test_includes_are_spliced_in_and_shipped() -> None:
    # EVAL scripts cannot import each other: a shared helper is spliced in.
    trim = load_script("stream_safe_trim")
    assert "--!include" not in trim.source
    assert "local function id_less" in trim.source
    include = PACKAGE / "_redis" / "scripts" / "include" / "stream_ids.lua"
    assert include.read_text() in trim.source
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"_redis/scripts/include/*.lua"' in pyproject
