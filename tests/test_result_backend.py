"""ClusterResultBackend against the real session cluster."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import eventually
from redis.asyncio import RedisCluster
from taskiq import InMemoryBroker
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.depends.progress_tracker import TaskProgress, TaskState
from taskiq.exceptions import ResultBackendError
from taskiq.result import TaskiqResult
from taskiq.task import AsyncTaskiqTask

from taskiq_redis_cluster import _keys
from taskiq_redis_cluster._errors import (
    ConfigurationError,
    InvalidOptionError,
    LifecycleError,
    NotAClusterError,
    ResultError,
    ResultNotFoundError,
)
from taskiq_redis_cluster._redis._connection import ConnectionOptions
from taskiq_redis_cluster._result_backend import DEFAULT_RESULT_EX_TIME, ClusterResultBackend

pytestmark = pytest.mark.cluster

Factory = Callable[..., ClusterResultBackend[Any]]


@pytest.fixture
async def make_backend(cluster_url: str) -> AsyncIterator[Factory]:
    """Build backends (not started); every one is shut down after the test."""
    made: list[ClusterResultBackend[Any]] = []

    def factory(**kwargs: Any) -> ClusterResultBackend[Any]:
        backend: ClusterResultBackend[Any] = ClusterResultBackend(cluster_url, **kwargs)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.shutdown()


@pytest.fixture
async def backend(make_backend: Factory) -> ClusterResultBackend[Any]:
    started = make_backend()
    await started.startup()
    return started


def _task_id() -> str:
    return uuid.uuid4().hex


def _result(value: Any = 42, **kwargs: Any) -> TaskiqResult[Any]:
    fields: dict[str, Any] = {"is_err": False, "return_value": value, "execution_time": 0.5}
    fields.update(kwargs)
    return TaskiqResult(**fields)


async def test_round_trip(backend: ClusterResultBackend[Any]) -> None:
    task_id = _task_id()
    assert not await backend.is_result_ready(task_id)
    await backend.set_result(task_id, _result({"a": [1, 2]}, log="some log", labels={"x": "y"}))

    assert await backend.is_result_ready(task_id)
    plain = await backend.get_result(task_id)
    assert plain.return_value == {"a": [1, 2]}
    assert plain.labels == {"x": "y"}
    assert plain.log is None  # with_logs=False drops the log, like taskiq-redis
    assert (await backend.get_result(task_id, with_logs=True)).log == "some log"


async def test_error_result_round_trips_without_pickle(
    backend: ClusterResultBackend[Any],
) -> None:
    task_id = _task_id()
    await backend.set_result(task_id, _result(None, is_err=True, error=ValueError("boom")))
    restored = await backend.get_result(task_id)
    assert restored.is_err
    assert isinstance(restored.error, ValueError)
    assert restored.error.args == ("boom",)


async def test_missing_result_raises_typed_error(backend: ClusterResultBackend[Any]) -> None:
    with pytest.raises(ResultNotFoundError) as caught:
        await backend.get_result(_task_id())
    assert isinstance(caught.value, ResultBackendError)


async def test_default_serializer_is_json(
    backend: ClusterResultBackend[Any], cluster_client: RedisCluster
) -> None:
    task_id = _task_id()
    await backend.set_result(task_id, _result("hello"))
    raw = await cluster_client.get(_keys.result_key(_keys.DEFAULT_PREFIX, task_id))
    assert isinstance(raw, bytes)
    assert not raw.startswith(b"\x80")  # pickle protocol 2+ header
    assert json.loads(raw)["return_value"] == "hello"


class _TaggedJSON(TaskiqSerializer):
    """A user serializer: JSON behind a marker, to see it is really used."""

    def dumpb(self, value: Any) -> bytes:
        return b"TAG" + json.dumps(value).encode()

    def loadb(self, value: bytes) -> Any:
        assert value.startswith(b"TAG")
        return json.loads(value[3:])


async def test_custom_serializer(make_backend: Factory, cluster_client: RedisCluster) -> None:
    backend = make_backend(serializer=_TaggedJSON(), prefix="tqrc-custom")
    await backend.startup()
    task_id = _task_id()
    await backend.set_result(task_id, _result([1]))
    raw = await cluster_client.get(_keys.result_key("tqrc-custom", task_id))
    assert isinstance(raw, bytes)
    assert raw.startswith(b"TAG")
    assert (await backend.get_result(task_id)).return_value == [1]


async def test_default_lifetime_is_one_day(
    backend: ClusterResultBackend[Any], cluster_client: RedisCluster
) -> None:
    task_id = _task_id()
    await backend.set_result(task_id, _result())
    await backend.set_progress(task_id, TaskProgress(state=TaskState.STARTED, meta=None))
    for key in (
        _keys.result_key(_keys.DEFAULT_PREFIX, task_id),
        _keys.progress_key(_keys.DEFAULT_PREFIX, task_id),
    ):
        ttl = await cluster_client.ttl(key)
        assert 0 < ttl <= DEFAULT_RESULT_EX_TIME


async def test_results_expire(make_backend: Factory) -> None:
    backend = make_backend(result_px_time=300)
    await backend.startup()
    task_id = _task_id()
    await backend.set_result(task_id, _result())
    # Bounded wait: expiry is checked by outcome, never by speed.
    async def expired() -> bool:
        return not await backend.is_result_ready(task_id)

    await eventually(expired, "the result expired", 10, interval=0.1)
    assert not await backend.is_result_ready(task_id)
    with pytest.raises(ResultNotFoundError):
        await backend.get_result(task_id)


async def test_expiry_off_needs_explicit_flag_and_warns(
    make_backend: Factory,
    cluster_client: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # result_ex_time=None alone still means the one-day default.
    assert make_backend(result_ex_time=None).result_ex_time == DEFAULT_RESULT_EX_TIME

    backend = make_backend(expire=False, prefix="tqrc-noexpire")
    with caplog.at_level(logging.WARNING, logger="taskiq_redis_cluster"):
        await backend.startup()
    assert any(
        rec.levelno == logging.WARNING and "forever" in rec.getMessage() for rec in caplog.records
    )
    task_id = _task_id()
    await backend.set_result(task_id, _result())
    key = _keys.result_key("tqrc-noexpire", task_id)
    try:
        assert await cluster_client.ttl(key) == -1
    finally:
        await cluster_client.delete(key)


async def test_keep_results_false_deletes_on_read(make_backend: Factory) -> None:
    backend = make_backend(keep_results=False)
    await backend.startup()
    task_id = _task_id()
    await backend.set_result(task_id, _result("once"))
    assert (await backend.get_result(task_id)).return_value == "once"
    assert not await backend.is_result_ready(task_id)
    with pytest.raises(ResultNotFoundError):
        await backend.get_result(task_id)


async def test_progress_round_trip(backend: ClusterResultBackend[Any]) -> None:
    task_id = _task_id()
    assert await backend.get_progress(task_id) is None
    await backend.set_progress(task_id, TaskProgress(state=TaskState.STARTED, meta={"done": 3}))
    progress = await backend.get_progress(task_id)
    assert progress is not None
    assert progress.state == TaskState.STARTED
    assert progress.meta == {"done": 3}


async def test_corrupt_records_raise_result_error(
    backend: ClusterResultBackend[Any], cluster_client: RedisCluster
) -> None:
    task_id = _task_id()
    result_key = _keys.result_key(_keys.DEFAULT_PREFIX, task_id)
    await cluster_client.set(result_key, b"\x80\x04not json", ex=60)
    with pytest.raises(ResultError, match="cannot be decoded") as caught:
        await backend.get_result(task_id)
    assert caught.value.task_id == task_id

    await cluster_client.set(result_key, b'{"unrelated": 1}', ex=60)
    with pytest.raises(ResultError, match="is_err"):
        await backend.get_result(task_id)

    await cluster_client.set(_keys.progress_key(_keys.DEFAULT_PREFIX, task_id), b"[", ex=60)
    with pytest.raises(ResultError, match="progress"):
        await backend.get_progress(task_id)


async def test_64_concurrent_waiters_on_a_small_pool(make_backend: Factory) -> None:
    # 64 pollers on 4 connections per node: redis-py would raise
    # MaxConnectionsError without the backend's in-flight bound.
    backend = make_backend(connection=ConnectionOptions(max_connections=4))
    await backend.startup()
    ids = [_task_id() for _ in range(64)]
    waiters = [
        asyncio.create_task(
            AsyncTaskiqTask(task_id, backend).wait_result(check_interval=0.02, timeout=60)
        )
        for task_id in ids
    ]
    await asyncio.sleep(0.1)
    await asyncio.gather(*(backend.set_result(t, _result(i)) for i, t in enumerate(ids)))
    results = await asyncio.wait_for(asyncio.gather(*waiters), timeout=90)
    assert [r.return_value for r in results] == list(range(64))


async def test_works_as_a_brokers_result_backend(make_backend: Factory) -> None:
    # The broker starts and stops its result backend itself.
    broker = InMemoryBroker(await_inplace=True).with_result_backend(make_backend())

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    await broker.startup()
    try:
        task = await add.kiq(2, 3)
        result = await task.wait_result(timeout=10)
        assert result.return_value == 5
    finally:
        await broker.shutdown()


async def test_non_cluster_url_is_rejected_at_startup(standalone_url: str) -> None:
    backend: ClusterResultBackend[Any] = ClusterResultBackend(standalone_url)
    with pytest.raises(NotAClusterError):
        await backend.startup()
    await backend.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"result_ex_time": 10, "result_px_time": 10_000}, "result_px_time"),
        ({"result_ex_time": 0}, "result_ex_time"),
        ({"result_px_time": -5}, "result_px_time"),
        ({"expire": False, "result_ex_time": 10}, "expire"),
        ({"prefix": "a", "prefix_str": "b"}, "prefix_str"),
    ],
)
def test_invalid_options(cluster_url: str, kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        ClusterResultBackend(cluster_url, **kwargs)
    assert caught.value.option == option
    assert isinstance(caught.value, ConfigurationError)


def test_prefix_str_is_an_alias(cluster_url: str) -> None:
    assert ClusterResultBackend(cluster_url, prefix_str="legacy").prefix == "legacy"
    assert ClusterResultBackend(cluster_url).prefix == _keys.DEFAULT_PREFIX


async def test_lifecycle_guards(make_backend: Factory) -> None:
    lazy = make_backend()
    # The first use starts the backend (as taskiq-redis's does), and an
    # explicit startup() after that does nothing.
    with pytest.raises(ResultNotFoundError):
        await lazy.get_result("x")
    await lazy.startup()
    await lazy.shutdown()
    backend = make_backend()
    await backend.startup()
    with pytest.raises(LifecycleError, match="twice"):
        await backend.startup()
    await backend.shutdown()
    await backend.shutdown()  # safe
    with pytest.raises(LifecycleError, match="after shutdown"):
        await backend.set_result("x", _result())
    with pytest.raises(LifecycleError):
        await backend.startup()
