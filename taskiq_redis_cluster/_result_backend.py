"""Result backend that stores task results in Redis Cluster.

One record per task, at ``_keys.result_key`` (and ``_keys.progress_key`` for
progress reports). The keys carry no hash tag, so results spread over every
slot by task id and no command here ever spans two slots.

Differences from taskiq-redis's ``RedisAsyncClusterResultBackend``, whose
keyword names are kept where the meaning is the same:

* results expire after one day unless told otherwise; keeping them forever
  needs ``expire=False`` and is logged as a warning at startup;
* the default serializer is JSON, not pickle;
* one client is created in ``startup()`` and closed in ``shutdown()``;
* a missing result raises :class:`ResultNotFoundError` and a record that
  cannot be decoded raises :class:`ResultError`, both ``ResultBackendError``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from redis.asyncio import RedisCluster
from taskiq import AsyncResultBackend
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.result import TaskiqResult

from . import _keys
from ._errors import InvalidOptionError, ResultError, ResultNotFoundError
from ._lifecycle import OwnedClient
from ._redis import ConnectionOptions, redact_url, validate_url
from ._serialization import default_serializer, dump_model, load_model

logger = logging.getLogger(__name__)

_ReturnType = TypeVar("_ReturnType")

#: Results live one day unless the user picks another lifetime.
DEFAULT_RESULT_EX_TIME = 86_400


class ClusterResultBackend(AsyncResultBackend[_ReturnType]):
    """Store taskiq results and progress reports in Redis Cluster.

    :param url: ``redis://`` or ``rediss://`` URL of any cluster node.
    :param keep_results: keep a result after it was read; ``False`` deletes
        it on the first successful read (``GETDEL``).
    :param result_ex_time: lifetime of results and progress in seconds.
        Defaults to one day when neither this nor ``result_px_time`` is set.
    :param result_px_time: lifetime in milliseconds (instead of seconds).
    :param expire: ``False`` keeps results until they are read with
        ``keep_results=False`` or deleted by hand. This is an explicit
        opt-out because results that never expire fill the cluster's memory;
        a warning is logged at startup.
    :param serializer: how records are encoded; taskiq's ``JSONSerializer``
        by default. Pass e.g. ``PickleSerializer()`` only if you trust every
        client that can write to the cluster.
    :param prefix: first part of every key (see ``_keys``).
    :param prefix_str: taskiq-redis's name for ``prefix``; accepted so the
        class is a drop-in replacement. Give at most one of the two.
    :param connection: client options (pool size, timeouts, TLS ...).

    :raises InvalidOptionError: for a non-positive lifetime, both lifetimes
        at once, a lifetime together with ``expire=False``, or both
        ``prefix`` and ``prefix_str``.
    :raises InvalidURLError: if ``url`` cannot be used.
    """

    def __init__(
        self,
        url: str,
        *,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        expire: bool = True,
        serializer: TaskiqSerializer | None = None,
        prefix: str | None = None,
        prefix_str: str | None = None,
        connection: ConnectionOptions | None = None,
    ) -> None:
        validate_url(url)
        self._url = url
        self.keep_results = keep_results
        self.serializer: TaskiqSerializer = serializer or default_serializer()
        self._connection = connection or ConnectionOptions()
        self.prefix = _pick_prefix(prefix, prefix_str)
        self.result_ex_time, self.result_px_time = _expiry(result_ex_time, result_px_time, expire)
        self._owned = OwnedClient("ClusterResultBackend")
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"ClusterResultBackend({redact_url(self._url)!r}, prefix={self.prefix!r})"

    async def startup(self) -> None:
        """Connect to the cluster.

        :raises LifecycleError: if called twice.
        :raises NotAClusterError: if the URL is not a cluster node.
        :raises ConnectError: if the cluster cannot be reached.
        """
        await self._owned.open(self._url, self._connection)
        # redis-py raises MaxConnectionsError instead of waiting when more
        # commands run at once than a node's pool holds; many concurrent
        # wait_result() pollers would hit that. Bounding in-flight commands
        # to the pool size keeps every node within its pool.
        self._slots = asyncio.Semaphore(self._connection.max_connections)
        if self.result_ex_time is None and self.result_px_time is None:
            logger.warning(
                "ClusterResultBackend on %s keeps results forever (expire=False): "
                "they are only removed when read with keep_results=False",
                redact_url(self._url),
            )
        self._owned.lifecycle.started()

    async def shutdown(self) -> None:
        """Close the client; safe to call twice or without startup."""
        try:
            await self._owned.close()
        finally:
            await super().shutdown()

    def _ready_client(self, action: str) -> tuple[RedisCluster, asyncio.Semaphore]:
        client = self._owned.get(action)
        # Set by the same successful startup() that get() just checked.
        assert self._slots is not None
        return client, self._slots

    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        """Store ``result`` for ``task_id`` with the configured lifetime."""
        client, slots = self._ready_client("set_result()")
        value = dump_model(result, self.serializer)
        async with slots:
            await client.set(
                _keys.result_key(self.prefix, task_id),
                value,
                ex=self.result_ex_time,
                px=self.result_px_time,
            )

    async def is_result_ready(self, task_id: str) -> bool:
        """Whether a result is stored for ``task_id``."""
        client, slots = self._ready_client("is_result_ready()")
        async with slots:
            found = await client.exists(_keys.result_key(self.prefix, task_id))
        return bool(found)

    async def get_result(
        self,
        task_id: str,
        with_logs: bool = False,
    ) -> TaskiqResult[_ReturnType]:
        """Return the stored result of ``task_id``.

        With ``keep_results=False`` the record is deleted in the same step
        (``GETDEL``), so only one reader gets it.

        :raises ResultNotFoundError: if nothing is stored (not finished yet,
            expired, or already consumed).
        :raises ResultError: if the stored record cannot be decoded.
        """
        client, slots = self._ready_client("get_result()")
        key = _keys.result_key(self.prefix, task_id)
        async with slots:
            if self.keep_results:
                raw = await client.get(key)
            else:
                raw = await client.getdel(key)
        if raw is None:
            raise ResultNotFoundError(task_id=task_id)
        try:
            result: TaskiqResult[Any] = load_model(TaskiqResult[Any], raw, self.serializer)
        except ValueError as exc:
            raise ResultError(task_id=task_id, reason=f"stored result {exc}") from exc
        if not with_logs:
            result.log = None
        return result

    async def set_progress(self, task_id: str, progress: TaskProgress[Any]) -> None:
        """Store a progress report; it lives as long as a result would."""
        client, slots = self._ready_client("set_progress()")
        value = dump_model(progress, self.serializer)
        async with slots:
            await client.set(
                _keys.progress_key(self.prefix, task_id),
                value,
                ex=self.result_ex_time,
                px=self.result_px_time,
            )

    async def get_progress(self, task_id: str) -> TaskProgress[Any] | None:
        """Return the last progress report of ``task_id``, or None.

        :raises ResultError: if the stored report cannot be decoded.
        """
        client, slots = self._ready_client("get_progress()")
        async with slots:
            raw = await client.get(_keys.progress_key(self.prefix, task_id))
        if raw is None:
            return None
        try:
            return load_model(TaskProgress[Any], raw, self.serializer)
        except ValueError as exc:
            raise ResultError(task_id=task_id, reason=f"stored progress {exc}") from exc


def _pick_prefix(prefix: str | None, prefix_str: str | None) -> str:
    if prefix is not None and prefix_str is not None and prefix != prefix_str:
        raise InvalidOptionError(
            option="prefix_str",
            reason="is an alias of prefix; give only one of them",
        )
    chosen = prefix if prefix is not None else prefix_str
    if chosen is None:
        return _keys.DEFAULT_PREFIX
    if not chosen:
        raise InvalidOptionError(option="prefix", reason="must not be empty")
    return chosen


def _expiry(ex: int | None, px: int | None, expire: bool) -> tuple[int | None, int | None]:
    """The (ex, px) pair to pass to SET; (None, None) means no expiry."""
    for option, value in (("result_ex_time", ex), ("result_px_time", px)):
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise InvalidOptionError(option=option, reason=f"must be > 0, got {value!r}")
    if ex is not None and px is not None:
        raise InvalidOptionError(
            option="result_px_time", reason="give either result_ex_time or result_px_time"
        )
    if not expire:
        if ex is not None or px is not None:
            raise InvalidOptionError(
                option="expire", reason="expire=False conflicts with a result lifetime"
            )
        return None, None
    if px is not None:
        return None, px
    return (ex if ex is not None else DEFAULT_RESULT_EX_TIME), None
