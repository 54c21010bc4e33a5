"""redis-py's private names: all in one adapter, and all still there.

``taskiq_redis_cluster/_redis/_internals.py`` is the only module allowed to
touch redis-py's private or undocumented names. These tests

* check every such name on the installed redis-py, with the kind we rely on,
  and that its major version is inside pyproject.toml's bound: an upgrade
  that renames one fails here, naming it, instead of deep in a broker;
* scan the package's source so that no other module starts using them.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from helpers import eventually
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

import taskiq_redis_cluster
from taskiq_redis_cluster._redis import _internals

PACKAGE = Path(taskiq_redis_cluster.__file__).parent
ADAPTER = PACKAGE / "_redis" / "_internals.py"
PYPROJECT = PACKAGE.parent / "pyproject.toml"

#: Attribute names that are redis-py internals (private, or undocumented
#: parts of the cluster client's node and connection management).
PRIVATE_ATTRIBUTES = frozenset({
    "_initialize",
    "_reader",
    "_writer",
    "nodes_manager",
    "acquire_connection",
    "disconnect_if_needed",
    "move_node_to_end_of_cached_nodes",
    "get_node_from_slot",
})


def _redis_requirement() -> SpecifierSet:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    for requirement in project["dependencies"]:
        name = requirement.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        if name == "redis":
            return SpecifierSet(requirement[len(name):])
    raise AssertionError("pyproject.toml does not depend on redis")


def test_redis_py_major_version_is_bounded_and_installed_inside_the_bound() -> None:
    spec = _redis_requirement()
    uppers = [s for s in spec if s.operator == "<"]
    assert uppers, f"pyproject.toml must bound redis-py's major version (found {spec})"
    upper = Version(uppers[0].version)
    assert (upper.minor, upper.micro) == (0, 0), f"bound a major version, not {upper}"
    installed = Version(redis.__version__)
    assert installed in spec, (
        f"redis-py {installed} is outside pyproject.toml's bound {spec}: check every name "
        "in taskiq_redis_cluster/_redis/_internals.py against it, then move the bound"
    )


def _method(owner: type, name: str, *, coroutine: bool, params: tuple[str, ...]) -> str | None:
    """Why ``owner.name`` does not fit, or None if it does."""
    member = getattr(owner, name, None)
    if member is None or not callable(member):
        return "is missing or not callable"
    if inspect.iscoroutinefunction(member) != coroutine:
        return f"is {'not ' if coroutine else ''}a coroutine function"
    found = tuple(inspect.signature(member).parameters)[1 : 1 + len(params)]
    if found != params:
        return f"takes {found}, expected {params} first"
    return None


# (where, what is wrong with it or None). One row per internal we use.
_CHECKS: dict[str, Callable[[], str | None]] = {
    "NodesManager.get_node_from_slot": lambda: _method(
        NodesManager, "get_node_from_slot", coroutine=False, params=("slot",)),
    "NodesManager.move_node_to_end_of_cached_nodes": lambda: _method(
        NodesManager, "move_node_to_end_of_cached_nodes", coroutine=False,
        params=("node_name",)),
    "NodesManager.initialize": lambda: _method(
        NodesManager, "initialize", coroutine=True, params=()),
    "ClusterNode.acquire_connection": lambda: _method(
        ClusterNode, "acquire_connection", coroutine=False, params=()),
    "ClusterNode.disconnect_if_needed": lambda: _method(
        ClusterNode, "disconnect_if_needed", coroutine=True, params=("connection",)),
    "ClusterNode.release": lambda: _method(
        ClusterNode, "release", coroutine=False, params=("connection",)),
    "Connection._reader/_writer": lambda: (
        None if all(hasattr(Connection(), n) for n in ("_reader", "_writer"))
        else "a fresh Connection has no _reader/_writer attribute"),
    "RedisCluster.__slots__ has _initialize": lambda: (
        None if "_initialize" in getattr(RedisCluster, "__slots__", ())
        else "RedisCluster declares no _initialize slot"),
}


@pytest.mark.parametrize("name", sorted(_CHECKS))
def test_every_internal_we_use_exists_with_its_kind(name: str) -> None:
    problem = _CHECKS[name]()
    assert problem is None, (
        f"redis-py {redis.__version__}: {name} {problem}; "
        "taskiq_redis_cluster/_redis/_internals.py must be adapted"
    )


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("MOVED 3999 127.0.0.1:6381", MovedError),
        ("ASK 3999 127.0.0.1:6381", AskError),
        ("TRYAGAIN Multiple keys request during rehashing of slot", TryAgainError),
        ("NOSCRIPT No matching script. Please use EVAL.", NoScriptError),
        ("LOADING Redis is loading the dataset in memory", BusyLoadingError),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", ResponseError),
    ],
)
def test_parse_error_maps_error_replies_to_redis_py_classes(text: str, kind: type) -> None:
    # BaseParser.parse_error is how hiredis-parsed errors become the same
    # classes as on redis-py's own path (MOVED's host and port included).
    error = _internals.parse_error(text)
    assert type(error) is kind, f"redis-py {redis.__version__}: parse_error({text!r})"
    if isinstance(error, (MovedError, AskError)):
        assert (error.host, error.port, error.slot_id) == ("127.0.0.1", 6381, 3999)


@pytest.mark.cluster
async def test_the_internals_have_their_kinds_on_a_live_client(
    cluster_client: RedisCluster, unique_name: str
) -> None:
    # The instance attributes exist only on a live client and connection.
    assert _internals.must_reinitialize(cluster_client) is False
    key = f"{{{unique_name}}}:k"
    node = _internals.node_for_slot(cluster_client, cluster_client.keyslot(key))
    assert node is not None
    assert node.name == cluster_client.get_node_from_key(key).name
    connection = node.acquire_connection()
    try:
        await node.disconnect_if_needed(connection)
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        assert isinstance(connection._reader, asyncio.StreamReader)
        assert isinstance(connection._writer, asyncio.StreamWriter)
    finally:
        node.release(connection)
    # A failed node makes the client reload its map before its next command.
    _internals.mark_node_failed(cluster_client, node)
    assert _internals.must_reinitialize(cluster_client) is True

    async def reloaded() -> bool:
        # redis-py reloads the map on its own path: at the next command up
        # to 8.1; from 8.2 at the first command once its minimum interval
        # between refreshes (1 s by default) has passed.
        await cluster_client.set(key, "v")
        return not _internals.must_reinitialize(cluster_client)

    await eventually(reloaded, "redis-py reloaded the slot map", timeout=5)
    await _internals.reinitialize_nodes(cluster_client)
    assert cluster_client.get_node_from_key(key).name == node.name


# --------------------------------------------------------------- the scan
def _violations(source: str) -> list[str]:
    """Uses of redis-py internals in ``source``, as "line: what" strings."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] if node.level == 0 else []
            )
            for module in modules:
                parts = module.split(".")
                if parts[0] == "redis" and any(p.startswith("_") for p in parts[1:]):
                    found.append(f"{node.lineno}: imports {module}")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id == "self"):
                found.append(f"{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in PRIVATE_ATTRIBUTES
        ):
            found.append(f"{node.lineno}: {node.value!r} (getattr?)")
    return found


def test_the_scan_sees_each_kind_of_use() -> None:
    assert _violations("client.nodes_manager.initialize()\n") == ["1: .nodes_manager"]
    assert _violations("x = c._initialize\n") == ["1: ._initialize"]
    assert _violations("w = connection._writer\n") == ["1: ._writer"]
    assert _violations("from redis._parsers.base import BaseParser\n") == [
        "1: imports redis._parsers.base"
    ]
    assert _violations("import redis._parsers\n") == ["1: imports redis._parsers"]
    assert _violations("getattr(client, '_initialize')\n") == ["1: '_initialize' (getattr?)"]
    # Our own names are not redis-py's.
    assert _violations("from ._reader import QueueStateReader\nself._reader = 1\n") == []
    assert _violations("from redis.asyncio.cluster import ClusterNode\n") == []


def test_no_module_but_the_adapter_touches_redis_py_internals() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ADAPTER:
            continue
        for violation in _violations(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE)}:{violation}")
    assert offenders == [], (
        "redis-py internals used outside _redis/_internals.py; add a wrapper there: "
        + ", ".join(offenders)
    )


def test_the_adapter_uses_every_listed_internal() -> None:
    # The list above is the adapter's inventory, not a wish list.
    used = {v.split(".", 1)[1] for v in _violations(ADAPTER.read_text()) if ": ." in v}
    assert used == PRIVATE_ATTRIBUTES
