"""Result backend that stores task results in Redis Cluster.

One record per task, at ``_keys.result_key`` (and ``_keys.progress_key`` for
progress reports). The keys carry no hash tag, so results spread over every
slot by task id and no command here ever spans two slots.

Differences from taskiq-redis's ``RedisAsyncClusterResultBackend``, whose
keyword names are kept where the meaning is the same:

* results expire after one day unless told otherwise; keeping them forever
  needs ``expire=False`` and is logged as a warning at startup;
* the default serializer is JSON, not pickle;
* one client is created at ``startup()`` (or at the first call, which starts
  the backend) and closed in ``shutdown()``;
* the URL keyword is ``redis_url``, as in taskiq-redis; ``url`` is accepted
  too;
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
from ._lifecycle import OwnedClient, client_options
from ._redis import ConnectionOptions, redact_url, validate_url
from ._serialization import default_serializer, dump_model, load_model

logger = logging.getLogger(__name__)

_ReturnType = TypeVar("_ReturnType")

#: Results live one day unless the user picks another lifetime.
DEFAULT_RESULT_EX_TIME = 86_400


class ClusterResultBackend(AsyncResultBackend[_ReturnType]):
    """Store taskiq results and progress reports in Redis Cluster.

    Keywords and their order follow taskiq-redis's
    ``RedisAsyncClusterResultBackend``; docs/brokers.md lists every
    difference. No ``startup()`` is needed: the first call starts the
    backend (a broker's ``startup()`` starts its backend anyway).

    :param redis_url: ``redis://`` or ``rediss://`` URL of any cluster node
        (taskiq-redis's name; ``url=`` is the same).
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
    :param url: the same as ``redis_url``.
    :param max_connection_pool_size: connections per cluster node (the name
        taskiq-redis's single-node ``RedisAsyncResultBackend`` uses).
    :param connection: client options (pool size, timeouts, TLS ...).
    :param connection_kwargs: as in taskiq-redis, further keywords go to
        redis-py's ``RedisCluster`` (e.g. ``password``, ``ssl_ca_certs``,
        ``max_connections``); not together with ``connection``.

    :raises InvalidOptionError: for a non-positive lifetime, both lifetimes
        at once, a lifetime together with ``expire=False``, both ``prefix``
        and ``prefix_str``, no URL or two, or a keyword the cluster client
        does not take.
    :raises InvalidURLError: if ``url`` cannot be used.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = None,
        *,
        url: str | None = None,
        expire: bool = True,
        prefix: str | None = None,
        max_connection_pool_size: int | None = None,
        connection: ConnectionOptions | None = None,
        **connection_kwargs: Any,
    ) -> None:
        if redis_url is not None and url is not None:
            raise InvalidOptionError(option="url", reason="is an alias of redis_url; give one")
        chosen_url = redis_url if redis_url is not None else url
        if chosen_url is None:
            raise InvalidOptionError(option="redis_url", reason="the cluster URL is required")
        validate_url(chosen_url)
        self._url = chosen_url
        self.keep_results = keep_results
        self.serializer: TaskiqSerializer = serializer or default_serializer()
        self._connection = client_options(
            connection, connection_kwargs, max_connections=max_connection_pool_size
        )
        self.prefix = _pick_prefix(prefix, prefix_str)
        self.result_ex_time, self.result_px_time = _expiry(result_ex_time, result_px_time, expire)
        self._owned = OwnedClient("ClusterResultBackend")
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"ClusterResultBackend({redact_url(self._url)!r}, prefix={self.prefix!r})"

    @property
    def redis(self) -> RedisCluster:
        """The backend's cluster client, under taskiq-redis's attribute name.

        Only while running (:class:`LifecycleError` otherwise); the backend
        owns it and closes it in ``shutdown()``.
        """
        return self._owned.get("redis")

    async def __aenter__(self) -> ClusterResultBackend[_ReturnType]:
        await self.startup()
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.shutdown()

    async def startup(self) -> None:
        """Connect to the cluster.

        Optional: the first call that needs the cluster starts the backend,
        and after such a lazy start this does nothing.

        :raises LifecycleError: if called twice, or after ``shutdown()``.
        :raises NotAClusterError: if the URL is not a cluster node.
        :raises ConnectError: if the cluster cannot be reached.
        """
        await self._owned.lifecycle.start(self._start)

    async def _start(self) -> None:
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

    async def _started_client(self, action: str) -> tuple[RedisCluster, asyncio.Semaphore]:
        """The client and the in-flight bound, starting on the first use."""
        client = await self._owned.ready(self.startup, action)
        # Set by the same successful startup() that get() just checked.
        assert self._slots is not None
        return client, self._slots

    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        """Store ``result`` for ``task_id`` with the configured lifetime."""
        client, slots = await self._started_client("set_result()")
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
        client, slots = await self._started_client("is_result_ready()")
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
        client, slots = await self._started_client("get_result()")
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
        client, slots = await self._started_client("set_progress()")
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
        client, slots = await self._started_client("get_progress()")
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
