"""taskiq-redis users keep their code: the migration table in docs/brokers.md holds.

The table is the contract. Each of its rows is checked here against the
installed taskiq-redis and against our classes: every keyword and public
attribute of taskiq-redis's classes has a row; a keyword marked ``same`` is
accepted at the same position and means the same; ``refused`` raises
``ConfigurationError``; and every ``same`` behaviour row names a scenario
below that uses our class the way taskiq-redis's README and tests use theirs
(keywords, no ``startup()`` for producers and backends, ``async with``), on
the real cluster.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import taskiq_redis
from helpers import eventually, make_message, task_id_of
from redis.asyncio import RedisCluster
from taskiq import (
    AckableMessage,
    AsyncBroker,
    BrokerMessage,
    InMemoryBroker,
    ScheduledTask,
    TaskiqEvents,
)
from taskiq.result import TaskiqResult
from taskiq.serializers import PickleSerializer

import taskiq_redis_cluster
from taskiq_redis_cluster import (
    ClusterListQueueBroker,
    ClusterListScheduleSource,
    ClusterPubSubBroker,
    ClusterResultBackend,
    ClusterStreamBroker,
    _keys,
)
from taskiq_redis_cluster._errors import (
    ConfigurationError,
    ConnectError,
    InvalidOptionError,
    LifecycleError,
)
from taskiq_redis_cluster._keys import ShardKeys
from taskiq_redis_cluster.testing import find_free_base_port

pytestmark = pytest.mark.cluster

DOC = Path(__file__).resolve().parents[1] / "docs" / "brokers.md"
SECTION = "## Migrating from taskiq-redis"
STATUSES = {"same", "default differs", "accepted, no effect", "refused", "differs"}
#: A URL for construction only: nothing here connects to it.
OFFLINE_URL = "redis://127.0.0.1:7000"


# ----------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    theirs: str
    item: str
    ours: str
    status: str
    reason: str

    @property
    def kind(self) -> str:
        if self.item == "class":
            return "class"
        if re.fullmatch(r"`\*\*\w+`|`\w+=`", self.item):
            return "keyword"
        if re.fullmatch(r"`\.\w+`", self.item):
            return "attribute"
        if re.fullmatch(r"`\w+\(\)`", self.item):
            return "method"
        return "behaviour"

    @property
    def name(self) -> str:
        """The keyword, attribute or method name (behaviour: the text)."""
        if self.kind in ("keyword", "attribute", "method"):
            return self.item.strip("`").lstrip("*.").rstrip("=()")
        return self.item

    @property
    def id(self) -> str:
        return f"{self.theirs}:{self.item}"


def _cells(line: str) -> list[str]:
    # Cells are split on pipes outside backticks (none of ours holds one).
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_table() -> list[Row]:
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    end = section.find("\n## ", len(SECTION))
    section = section if end == -1 else section[:end]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = _cells(line)
        assert len(cells) == 5, f"malformed row: {line}"
        rows.append(Row(cells[0].strip("`"), cells[1], cells[2], cells[3], cells[4]))
    return rows


ROWS = read_table()

THEIRS: dict[str, type[Any]] = {
    name: getattr(taskiq_redis, name)
    for name in (
        "RedisStreamClusterBroker",
        "ListQueueClusterBroker",
        "PubSubBroker",
        "RedisAsyncClusterResultBackend",
        "RedisClusterScheduleSource",
        "ListRedisScheduleSource",
    )
}


def _class_row(theirs: str) -> Row:
    [row] = [r for r in ROWS if r.theirs == theirs and r.kind == "class"]
    return row


def ours_of(theirs: str) -> type[Any]:
    cls: type[Any] = getattr(taskiq_redis_cluster, _class_row(theirs).ours.strip("`"))
    return cls


def _params(cls: type[Any]) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


def _param_names(cls: type[Any]) -> list[str]:
    return [p.name for p in _params(cls)]


def _positional(cls: type[Any]) -> list[str]:
    return [p.name for p in _params(cls) if p.kind is p.POSITIONAL_OR_KEYWORD]


def test_table_is_well_formed() -> None:
    assert len(ROWS) > 50
    assert {r.status for r in ROWS} <= STATUSES, {r.status for r in ROWS} - STATUSES
    assert len({r.id for r in ROWS}) == len(ROWS), "duplicate rows"
    for row in ROWS:
        assert row.theirs in THEIRS, row
        if row.status in ("differs", "default differs", "accepted, no effect", "refused"):
            assert row.reason, f"{row.id}: a deviation needs its reason"
    for theirs in THEIRS:
        assert ours_of(theirs).__name__ in taskiq_redis_cluster.__all__


async def _their_public_attributes(theirs: str) -> set[str]:
    cls = THEIRS[theirs]
    obj = cls(OFFLINE_URL)  # taskiq-redis builds its client without I/O
    try:
        names = {n for n in vars(obj) if not n.startswith("_")}
        if isinstance(obj, AsyncBroker):
            names -= set(vars(InMemoryBroker()))  # taskiq's own broker attributes
        return names
    finally:
        pool = getattr(obj, "connection_pool", None) or getattr(obj, "_connection_pool", None)
        if pool is not None:
            await pool.disconnect()
        redis = getattr(obj, "redis", None)
        if redis is not None:
            await redis.aclose()


@pytest.mark.parametrize("theirs", sorted(THEIRS))
async def test_every_keyword_and_attribute_has_a_row(theirs: str) -> None:
    cls = THEIRS[theirs]
    rows = [r for r in ROWS if r.theirs == theirs]
    keywords = {r.name for r in rows if r.kind == "keyword"}
    attributes = {r.name for r in rows if r.kind == "attribute"}
    assert set(_param_names(cls)) <= keywords, set(_param_names(cls)) - keywords
    # And no row names a keyword taskiq-redis does not have.
    assert keywords <= set(_param_names(cls))
    wanted = await _their_public_attributes(theirs)
    assert wanted <= attributes, wanted - attributes
    methods = {
        n for n in vars(cls)
        if not n.startswith("_") and callable(vars(cls)[n])
        and not any(n in vars(base) for base in cls.__mro__[1:])
    }
    assert methods <= {r.name for r in rows if r.kind == "method"}


# ------------------------------------------------------- keyword/attribute rows
#: A value for every keyword, different from both libraries' defaults.
SAMPLES: dict[str, Any] = {
    "queue_name": "compat-q",
    "max_connection_pool_size": 7,
    "consumer_group_name": "compat-g",
    "consumer_name": "compat-c",
    "consumer_id": "0",
    "mkstream": False,
    "xread_block": 1234,
    "maxlen": 99,
    "approximate": False,
    "additional_streams": {"other": ">"},
    "keep_results": False,
    "result_ex_time": 77,
    "result_px_time": 7700,
    "serializer": PickleSerializer(),
    "prefix_str": "compat-p",
    "prefix": "compat-p",
    "buffer_size": 7,
    "skip_past_schedules": True,
    "task_id_generator": lambda: "fixed",
    "connection_kwargs": {"health_check_interval": 3},
}


def _connection_of(obj: Any) -> Any:
    for path in ("options.connection", "connection", "_connection"):
        target = obj
        try:
            for part in path.split("."):
                target = getattr(target, part)
        except AttributeError:
            continue
        return target
    raise AssertionError(f"no connection options on {obj!r}")


def _observed(obj: Any, keyword: str) -> Any:
    """Where our object keeps what ``keyword`` set."""
    if keyword == "max_connection_pool_size":
        return _connection_of(obj).max_connections
    if keyword == "connection_kwargs":
        return dict(_connection_of(obj).extra)
    if keyword in ("url", "redis_url"):
        return getattr(obj, "url", None) or obj._url
    if keyword == "prefix_str":
        return obj.prefix
    if keyword == "task_id_generator":
        return obj.id_generator
    options = getattr(obj, "options", None)
    if options is not None and hasattr(options, keyword):
        return getattr(options, keyword)
    return getattr(obj, keyword)


def _construct(cls: type[Any], keyword: str, value: Any) -> Any:
    if keyword == "connection_kwargs":
        return cls(OFFLINE_URL, **value)
    if keyword in ("url", "redis_url"):
        return cls(**{keyword: value})
    return cls(OFFLINE_URL, **{keyword: value})


KEYWORD_ROWS = [r for r in ROWS if r.kind == "keyword"]


@pytest.mark.parametrize("row", KEYWORD_ROWS, ids=[r.id for r in KEYWORD_ROWS])
def test_keyword_row(row: Row) -> None:
    theirs, ours = THEIRS[row.theirs], ours_of(row.theirs)
    if row.status == "differs":
        return  # the reason says how; test_table_is_well_formed wants one
    value = OFFLINE_URL if row.name in ("url", "redis_url") else SAMPLES[row.name]
    if row.status == "refused":
        with pytest.raises(ConfigurationError):
            _construct(ours, row.name, value)
        return
    if row.name == "connection_kwargs":
        assert any(p.kind is p.VAR_KEYWORD for p in _params(ours))
    else:
        assert row.name in _param_names(ours), f"{ours.__name__} does not take {row.name}"
    obj = _construct(ours, row.name, value)
    if row.status == "accepted, no effect":
        return
    # connection_kwargs: handed to redis-py as given.
    assert _observed(obj, row.name) == value
    if row.status == "same" and row.name in _positional(theirs):
        assert _positional(theirs).index(row.name) == _positional(ours).index(row.name), (
            f"{row.name} is positional in {theirs.__name__}: same position expected"
        )
    if row.status == "default differs":
        theirs_default = inspect.signature(theirs.__init__).parameters[row.name].default
        ours_default = _observed(ours(OFFLINE_URL), row.name)
        assert ours_default != theirs_default


def test_refused_and_unknown_keywords_name_the_alternative() -> None:
    with pytest.raises(ConfigurationError, match="one broker per queue"):
        ClusterStreamBroker(OFFLINE_URL, additional_streams={"x": ">"})
    # taskiq-redis's single-node pool option has no cluster meaning.
    for cls in (ClusterListScheduleSource, ClusterResultBackend, ClusterListQueueBroker,
                ClusterStreamBroker, ClusterPubSubBroker):
        with pytest.raises(InvalidOptionError, match="socket_timeout"):
            cls(OFFLINE_URL, timeout=1)
        with pytest.raises(InvalidOptionError, match="RedisCluster"):
            cls(OFFLINE_URL, no_such_option=1)
    # A value meant for another positional slot fails at once, not at connect.
    with pytest.raises(InvalidOptionError, match="max_connection_pool_size"):
        ClusterListScheduleSource(OFFLINE_URL, "p", PickleSerializer())  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="buffer_size"):
        ClusterListScheduleSource(OFFLINE_URL, buffer_size=0)
    with pytest.raises(InvalidOptionError, match="redis_url"):
        ClusterResultBackend()
    with pytest.raises(InvalidOptionError, match="alias"):
        ClusterResultBackend(OFFLINE_URL, url=OFFLINE_URL)
    assert ClusterResultBackend(url=OFFLINE_URL)._url == OFFLINE_URL
    # The single-node backend's pool keyword, for those who migrate from it.
    pooled = ClusterResultBackend(OFFLINE_URL, max_connection_pool_size=5)
    assert _connection_of(pooled).max_connections == 5


ATTRIBUTE_ROWS = [r for r in ROWS if r.kind == "attribute" and r.status != "differs"]


@pytest.mark.parametrize("row", ATTRIBUTE_ROWS, ids=[r.id for r in ATTRIBUTE_ROWS])
async def test_attribute_row(row: Row) -> None:
    theirs_cls, ours_cls = THEIRS[row.theirs], ours_of(row.theirs)
    keyword = row.name if row.name in SAMPLES else None
    kwargs = {keyword: SAMPLES[keyword]} if keyword else {}
    theirs, theirs_default = theirs_cls(OFFLINE_URL, **kwargs), theirs_cls(OFFLINE_URL)
    try:
        ours = ours_cls(OFFLINE_URL, **kwargs)
        assert hasattr(ours, row.name), f"{ours_cls.__name__} has no {row.name}"
        assert getattr(ours, row.name) == getattr(theirs, row.name)
        if row.status == "default differs":  # same role, another value when not given
            default = getattr(ours_cls(OFFLINE_URL), row.name)
            assert default != getattr(theirs_default, row.name)
    finally:
        await theirs.shutdown()
        await theirs_default.shutdown()


async def test_redis_attribute_is_the_running_client(cluster_url: str, unique_name: str) -> None:
    backend = ClusterResultBackend(redis_url=cluster_url, prefix_str=unique_name)
    with pytest.raises(LifecycleError):
        backend.redis  # noqa: B018 - created at start, not in the constructor
    await backend.set_result("t", TaskiqResult(is_err=False, return_value=1, execution_time=0))
    assert isinstance(backend.redis, RedisCluster)
    assert await backend.redis.exists(_keys.result_key(unique_name, "t")) == 1
    await backend.shutdown()
    with pytest.raises(LifecycleError):
        backend.redis  # noqa: B018


# ------------------------------------------------------------ behaviour rows
Scenario = Callable[..., Awaitable[None]]
COVERED: dict[str, Scenario] = {}


def covers(*row_ids: str) -> Callable[[Scenario], Scenario]:
    """Mark a scenario as the check of the ``same`` behaviour rows given."""

    def mark(fn: Scenario) -> Scenario:
        for row_id in row_ids:
            COVERED[row_id] = fn
        return fn

    return mark


def test_every_same_behaviour_row_has_a_scenario() -> None:
    same = {r.id for r in ROWS if r.kind in ("behaviour", "method") and r.status == "same"}
    assert same - COVERED.keys() == set(), "rows without a scenario"
    assert COVERED.keys() - same == set(), "scenarios for rows the table does not hold"


def raw_message(payload: bytes) -> BrokerMessage:
    """A message whose bytes are not a taskiq message, as taskiq-redis's tests send."""
    return BrokerMessage(task_id=uuid.uuid4().hex, task_name="x", message=payload, labels={})


async def first(broker: AsyncBroker) -> Any:
    async for message in broker.listen():
        return message
    raise AssertionError("listen() ended")


@covers(
    "RedisStreamClusterBroker:no `startup()` before `kick()`",
    "RedisStreamClusterBroker:no `startup()` before `listen()`",
    "RedisStreamClusterBroker:`listen()` outside a worker yields any payload",
)
async def test_stream_broker_without_startup(cluster_url: str, unique_name: str) -> None:
    broker = ClusterStreamBroker(
        url=cluster_url, queue_name=unique_name, consumer_group_name=uuid.uuid4().hex,
        xread_block=200,
    )
    # The listener and the kick race to start the broker: it starts once.
    listener = asyncio.create_task(first(broker))
    await broker.kick(raw_message(b"my_msg"))
    message = await asyncio.wait_for(listener, 20)
    assert isinstance(message, AckableMessage)
    assert message.data == b"my_msg"
    await message.ack()  # type: ignore[misc]
    await broker.shutdown()


async def test_stream_worker_still_dead_letters_raw_payloads(
    cluster_url: str, unique_name: str
) -> None:
    broker = ClusterStreamBroker(cluster_url, queue_name=unique_name, xread_block=200,
                                 shards=1)
    broker.is_worker_process = True  # what `taskiq worker` sets

    @broker.task(task_name="tests:noop")
    async def noop() -> None:
        """Known to this worker, so its message is handed out."""

    await broker.kick(raw_message(b"my_msg"))
    await broker.kick(make_message("real"))
    message = await asyncio.wait_for(first(broker), 20)
    assert task_id_of(message.data) == "real"  # the raw payload was not handed out
    await message.ack()
    [shard] = (await broker.current_plan()).shards
    dead = ShardKeys(broker.options.prefix, shard.tag).dead

    async def dead_lettered() -> bool:
        return int(await broker.redis.xlen(dead)) == 1

    await eventually(dead_lettered, "the raw payload in the dead-letter stream")
    [(_, fields)] = await broker.redis.xrange(dead)
    assert fields[b"reason"].startswith(b"not a taskiq message")
    assert fields[b"field:data"] == b"my_msg"
    await broker.shutdown()


async def test_64_concurrent_first_kicks_start_the_broker_once(
    cluster_url: str, unique_name: str
) -> None:
    broker = ClusterStreamBroker(url=cluster_url, queue_name=unique_name)
    starts: list[int] = []
    broker.on_event(TaskiqEvents.CLIENT_STARTUP)(lambda _state: starts.append(1))
    await asyncio.gather(*(broker.kick(make_message(f"k{i}")) for i in range(64)))
    assert len(starts) == 1
    plan = await broker.current_plan()
    total = 0
    for shard in plan.shards:
        total += int(await broker.redis.xlen(ShardKeys(broker.options.prefix, shard.tag).stream))
    assert total == 64
    await broker.startup()  # after a lazy start: nothing to do
    assert len(starts) == 1
    await broker.shutdown()
    with pytest.raises(LifecycleError, match="after shutdown"):
        await broker.kick(make_message("late"))
    with pytest.raises(LifecycleError):
        await broker.startup()


async def test_a_failed_lazy_start_is_retried_by_the_next_call(unique_name: str) -> None:
    # Nothing listens on this port: the start fails, and the next call tries again.
    url = f"redis://127.0.0.1:{find_free_base_port(1)}"
    broker = ClusterListQueueBroker(url, queue_name=unique_name,
                                    socket_connect_timeout=0.5)
    for _ in range(2):
        with pytest.raises(ConnectError):
            await broker.kick(make_message("x"))
    await broker.shutdown()


@covers("RedisStreamClusterBroker:`async with broker:`")
async def test_stream_broker_async_with(cluster_url: str, unique_name: str) -> None:
    broker = ClusterStreamBroker(url=cluster_url, queue_name=unique_name, xread_block=200)
    async with broker:
        await broker.kick(make_message("inside"))
        message = await asyncio.wait_for(first(broker), 20)
        assert task_id_of(message.data) == "inside"
        await message.ack()
    with pytest.raises(LifecycleError, match="after shutdown"):
        await broker.kick(make_message("outside"))


@covers(
    "ListQueueClusterBroker:no `startup()` before `kick()`",
    "ListQueueClusterBroker:no `startup()` before `listen()`",
    "ListQueueClusterBroker:`listen()` yields raw bytes",
)
async def test_list_broker_without_startup(cluster_url: str, unique_name: str) -> None:
    broker = ClusterListQueueBroker(url=cluster_url, queue_name=unique_name)
    listener = asyncio.create_task(first(broker))
    await broker.kick(raw_message(b"my_msg"))
    assert await asyncio.wait_for(listener, 20) == b"my_msg"
    await broker.shutdown()


@covers(
    "PubSubBroker:no `startup()` before `kick()`",
    "PubSubBroker:`listen()` yields raw bytes",
)
async def test_pubsub_broker_without_startup(cluster_url: str, unique_name: str) -> None:
    broker = ClusterPubSubBroker(url=cluster_url, queue_name=unique_name)
    listener = asyncio.create_task(first(broker))
    # Fire and forget: publish until the listener has subscribed and heard it.
    async def heard() -> bool:
        await broker.kick(raw_message(b"my_msg"))
        await asyncio.wait({listener}, timeout=0.2)
        return listener.done()

    await eventually(heard, "the listener hearing a message", 20, interval=0)
    assert listener.result() == b"my_msg"
    await broker.shutdown()


def _result(value: Any) -> TaskiqResult[Any]:
    return TaskiqResult(is_err=False, return_value=value, execution_time=0.1)


@covers(
    "RedisAsyncClusterResultBackend:no `startup()` before `set_result()`",
    "RedisAsyncClusterResultBackend:no `startup()` before `get_result()`",
    "RedisAsyncClusterResultBackend:no `startup()` before `is_result_ready()`",
)
async def test_result_backend_without_startup(cluster_url: str, unique_name: str) -> None:
    # As in taskiq-redis's README: redis_url and a lifetime, then use it.
    reader = ClusterResultBackend(redis_url=cluster_url, result_ex_time=1000,
                                  prefix_str=unique_name)
    assert not await reader.is_result_ready("a")
    writer = ClusterResultBackend(redis_url=cluster_url, result_ex_time=1000,
                                  prefix_str=unique_name)
    # Many first calls at once: one start, all succeed.
    await asyncio.gather(*(writer.set_result(f"t{i}", _result(i)) for i in range(64)))
    assert await reader.is_result_ready("t5")
    assert (await reader.get_result("t7")).return_value == 7
    fresh = ClusterResultBackend(redis_url=cluster_url, prefix_str=unique_name,
                                 keep_results=False)
    assert (await fresh.get_result("t9")).return_value == 9
    assert not await fresh.is_result_ready("t9")  # keep_results=False consumed it
    # A broker's startup() starts its backend: after a lazy start, a no-op.
    broker = ClusterStreamBroker(url=cluster_url, queue_name=unique_name).with_result_backend(
        reader
    )
    await broker.startup()
    await broker.shutdown()  # shuts the backend down too
    with pytest.raises(LifecycleError, match="after shutdown"):
        await reader.get_result("t7")
    await writer.shutdown()
    await fresh.shutdown()


def _schedule(schedule_id: str, **when: Any) -> ScheduledTask:
    return ScheduledTask(task_name="tests:noop", labels={}, args=[], kwargs={},
                         schedule_id=schedule_id, **when)


def _ids(schedules: list[ScheduledTask]) -> set[str]:
    return {s.schedule_id for s in schedules}


@covers(
    "ListRedisScheduleSource:no `startup()` before `add_schedule()`",
    "ListRedisScheduleSource:no `startup()` before `get_schedules()`",
    "ListRedisScheduleSource:no `startup()` before `delete_schedule()`",
    "RedisClusterScheduleSource:no `startup()` before `add_schedule()`",
)
async def test_schedule_source_without_startup(cluster_url: str, unique_name: str) -> None:
    source = ClusterListScheduleSource(cluster_url, prefix=unique_name)
    await asyncio.gather(*(
        source.add_schedule(_schedule(f"c{i}", cron="*/5 * * * *")) for i in range(16)
    ))
    other = ClusterListScheduleSource(cluster_url, prefix=unique_name)
    assert _ids(await other.get_schedules()) == {f"c{i}" for i in range(16)}
    third = ClusterListScheduleSource(cluster_url, prefix=unique_name)
    await third.delete_schedule("c0")
    assert "c0" not in _ids(await other.get_schedules())
    for s in (source, other, third):
        await s.shutdown()
    with pytest.raises(LifecycleError, match="after shutdown"):
        await source.get_schedules()


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """taskiq-redis list sources to close after the test (their shutdown leaves the pool)."""
    sources: list[Any] = []
    yield sources
    for source in sources:
        await source.shutdown()
        await source._connection_pool.disconnect()


@covers(
    "ListRedisScheduleSource:`with_migrate_from()`",
    "ListRedisScheduleSource:migrate from a single-node source",
)
async def test_migration_from_a_single_node_source(
    standalone_redis: str, cluster_url: str, unique_name: str, closing: list[Any]
) -> None:
    old = taskiq_redis.ListRedisScheduleSource(standalone_redis, prefix="legacy")
    closing.append(old)
    await old.add_schedule(_schedule("cron", cron="*/10 * * * *"))
    soon = datetime.now(timezone.utc) + timedelta(days=1)
    await old.add_schedule(_schedule("later", time=soon))
    legacy = taskiq_redis.ListRedisScheduleSource(standalone_redis, prefix="legacy")
    closing.append(legacy)
    # As taskiq-redis's README migrates, and with no explicit startup(): the
    # first call starts the source, which runs the migration.
    source = ClusterListScheduleSource(cluster_url, prefix=unique_name).with_migrate_from(
        legacy, delete_schedules=True
    )
    assert _ids(await source.get_schedules()) == {"cron"}  # "later" is not due yet
    assert await source.redis.hexists(source.keys.schedules, "later")
    check = taskiq_redis.ListRedisScheduleSource(standalone_redis, prefix="legacy")
    closing.append(check)
    assert await check.get_schedules() == []  # moved, not copied
    await source.shutdown()


async def test_shutdown_during_a_lazy_start_waits_for_it(
    cluster_url: str, unique_name: str
) -> None:
    broker = ClusterStreamBroker(url=cluster_url, queue_name=unique_name)
    kick = asyncio.create_task(broker.kick(make_message("racing")))
    await asyncio.sleep(0)  # the kick is now starting the broker
    await broker.shutdown()
    await asyncio.gather(kick, return_exceptions=True)
    # Not left running on a client nobody closes.
    with pytest.raises(LifecycleError, match="after shutdown"):
        await broker.kick(make_message("after"))


async def test_backend_and_source_as_context_managers(cluster_url: str, unique_name: str) -> None:
    async with ClusterResultBackend(redis_url=cluster_url, prefix_str=unique_name) as backend:
        await backend.set_result("t", _result(1))
        assert (await backend.get_result("t")).return_value == 1
    async with ClusterListScheduleSource(cluster_url, prefix=unique_name) as source:
        await source.add_schedule(_schedule("c", cron="* * * * *"))
        assert _ids(await source.get_schedules()) == {"c"}
    with pytest.raises(LifecycleError, match="after shutdown"):
        await backend.get_result("t")
    with pytest.raises(LifecycleError, match="after shutdown"):
        await source.get_schedules()
