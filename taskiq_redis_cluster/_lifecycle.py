"""Lifecycle guard shared by every component that owns a client.

A component moves NEW -> STARTING -> RUNNING -> STOPPING -> STOPPED; a failed
startup returns it to NEW so that it can be retried. The guard turns misuse
(startup twice, use after shutdown) into :class:`LifecycleError` instead of
an obscure failure deep inside redis-py, and makes ``shutdown()`` idempotent.

Components also start themselves on first use, as taskiq-redis's do (its
classes build their connection pool in ``__init__``, so a producer never
calls ``startup()``). :meth:`Lifecycle.ensure_started` is that lazy start,
written once: the first call that needs the client runs the component's
public ``startup()`` under one lock, so many concurrent first calls start it
exactly once and all wait for it (several tasks opening a cluster client at
the same moment is where redis-py's first-use race bites). Use after
``shutdown()`` still raises :class:`LifecycleError`; an explicit
``startup()`` after a lazy start does nothing, since taskiq's
``AsyncBroker.startup()`` starts the result backend the user may already
have used.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis.asyncio import RedisCluster

from ._errors import InvalidOptionError, LifecycleError
from ._redis import ConnectionOptions, connect

logger = logging.getLogger(__name__)


class State(enum.Enum):
    """Where a component is in its life."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Lifecycle:
    """Tracks and guards the state of one component."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.state = State.NEW
        # Serialises explicit and lazy starts. asyncio.Lock binds to a loop
        # only on first contended use, so creating it here is safe.
        self._start_lock = asyncio.Lock()
        # The task running a start (lazy or explicit): its own nested calls
        # (the public startup() from a lazy start) must not wait for the
        # lock it already holds.
        self._start_owner: asyncio.Task[Any] | None = None
        #: True once the component started itself on first use.
        self.lazily_started = False

    def starting(self) -> None:
        """Enter STARTING; raise if the component was started before."""
        if self.state is State.STOPPED:
            raise LifecycleError(
                component=self.component,
                message="startup() after shutdown(); create a new instance instead",
            )
        if self.state is not State.NEW:
            raise LifecycleError(
                component=self.component,
                message=f"startup() called twice (state is {self.state.value})",
            )
        self.state = State.STARTING

    def started(self) -> None:
        """Enter RUNNING after a successful startup."""
        self.state = State.RUNNING

    def failed(self) -> None:
        """Go back to NEW after a failed startup, so it may be retried."""
        self.state = State.NEW

    def stopping(self) -> bool:
        """Enter STOPPING; return False when there is nothing to stop.

        Calling ``shutdown()`` twice, or on a component that never started,
        is therefore a no-op rather than an error.
        """
        if self.state in (State.STOPPING, State.STOPPED):
            return False
        if self.state is State.NEW:
            self.state = State.STOPPED
            return False
        self.state = State.STOPPING
        return True

    def stopped(self) -> None:
        """Enter STOPPED."""
        self.state = State.STOPPED

    @property
    def running(self) -> bool:
        """True between a successful startup and the start of shutdown."""
        return self.state is State.RUNNING

    async def start(self, body: Callable[[], Awaitable[None]]) -> None:
        """Run a component's startup ``body``, serialised with lazy starts.

        Components call this from their public ``startup()``. It waits for a
        lazy start in progress, and does nothing once the component started
        itself on first use; otherwise ``body`` runs, and its call of
        :meth:`starting` raises for a second explicit startup.
        """
        if self._holds_start():
            await body()  # called by ensure_started(), which holds the lock
            return
        async with self._start_lock:
            if self.state is State.RUNNING and self.lazily_started:
                return
            self._start_owner = asyncio.current_task()
            try:
                await body()
            finally:
                self._start_owner = None

    async def ensure_started(self, startup: Callable[[], Awaitable[None]], action: str) -> None:
        """Start the component on first use; raise after ``shutdown()``.

        ``startup`` is the component's public ``startup()`` (so overrides and
        taskiq's own startup work run as usual). Concurrent first calls all
        wait for one start; a start that fails raises to the call that ran
        it and leaves the component NEW, so the next call tries again.
        """
        if self.state is State.RUNNING:
            return
        if self.state in (State.STOPPING, State.STOPPED):
            self.require_running(action)
        async with self._start_lock:
            # Re-read after the wait: another call may have started it.
            if self.running:
                return
            if self.state in (State.STOPPING, State.STOPPED):
                self.require_running(action)
            logger.debug("%s: %s before startup(); starting it now", self.component, action)
            self._start_owner = asyncio.current_task()
            try:
                await startup()
            finally:
                self._start_owner = None
            self.lazily_started = self.running
        # A startup() override that did not reach RUNNING must not pass as one.
        self.require_running(action)

    def _holds_start(self) -> bool:
        return self._start_owner is not None and self._start_owner is asyncio.current_task()

    async def wait_for_start(self) -> None:
        """Let a start in progress finish before the component is closed.

        Otherwise a ``shutdown()`` racing a first ``kick()`` would close
        nothing (the client is still being opened), and the start would then
        finish into RUNNING on a client nobody closes.
        """
        if self._start_lock.locked() and not self._holds_start():
            async with self._start_lock:
                pass

    def require_running(self, action: str = "this call") -> None:
        """Raise unless the component is RUNNING."""
        if self.state is State.RUNNING:
            return
        if self.state in (State.STOPPING, State.STOPPED):
            message = f"{action} after shutdown()"
        else:
            message = f"{action} before startup()"
        raise LifecycleError(component=self.component, message=message)


class OwnedClient:
    """The one cluster client a component owns, tied to its lifecycle.

    Brokers, the result backend and the schedule source all open one client
    at startup, hand it out only while running, and close it exactly once;
    this class is that logic, written once.
    """

    def __init__(self, component: str) -> None:
        self.lifecycle = Lifecycle(component)
        self._client: RedisCluster | None = None

    async def open(self, url: str, options: ConnectionOptions) -> RedisCluster:
        """Enter STARTING and connect; on failure the component stays NEW.

        The caller finishes its own startup, then calls ``lifecycle.started()``
        (or :meth:`abort` if a later step fails).
        """
        self.lifecycle.starting()
        try:
            self._client = await connect(url, options)
        except BaseException:
            self.lifecycle.failed()
            raise
        return self._client

    async def abort(self) -> None:
        """Undo :meth:`open` after a later startup step failed."""
        await self._close()
        self.lifecycle.failed()

    async def close(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``before`` (e.g. flush buffers), then close; safe to call twice."""
        await self.lifecycle.wait_for_start()
        if not self.lifecycle.stopping():
            return
        try:
            if before is not None:
                await before()
        finally:
            await self._close()
            self.lifecycle.stopped()

    async def ready(self, startup: Callable[[], Awaitable[None]], action: str) -> RedisCluster:
        """The client, starting the component first if it is still NEW.

        :raises LifecycleError: after ``shutdown()``.
        """
        if self.lifecycle.state is not State.RUNNING:
            await self.lifecycle.ensure_started(startup, action)
        assert self._client is not None  # set by open(), checked by RUNNING
        return self._client

    def get(self, action: str = "this call") -> RedisCluster:
        """The client; raises :class:`LifecycleError` unless running."""
        self.lifecycle.require_running(action)
        assert self._client is not None  # set by open(), checked by RUNNING
        return self._client

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.aclose()
        except Exception:  # closing must not mask the error that led here
            logger.debug("Error while closing a cluster client", exc_info=True)


@functools.cache
def _cluster_client_keywords() -> frozenset[str]:
    """Keyword names ``RedisCluster`` accepts (its public signature)."""
    params = inspect.signature(RedisCluster.__init__).parameters
    return frozenset(name for name in params if name != "self")


def check_client_kwargs(extra: Mapping[str, Any]) -> None:
    """Refuse, before any I/O, keywords the cluster client would not take.

    taskiq-redis passes its ``**connection_kwargs`` to redis-py; so do we,
    to ``RedisCluster``. A name it does not know (a typo, or an option of
    the single-node ``BlockingConnectionPool`` such as ``timeout``) would
    otherwise only fail at the first connect, deep inside redis-py.

    :raises InvalidOptionError: naming the keyword and the alternative.
    """
    known = _cluster_client_keywords()
    for name in extra:
        if name in known:
            continue
        if name == "timeout":
            reason = (
                "is an option of redis-py's single-node BlockingConnectionPool; the "
                "cluster client does not wait for a free connection: use "
                "socket_timeout / socket_connect_timeout, or a larger "
                "max_connection_pool_size"
            )
        else:
            reason = "is not an option of redis-py's RedisCluster client"
        raise InvalidOptionError(option=name, reason=reason)


def client_options(
    connection: ConnectionOptions | None,
    connection_kwargs: dict[str, Any],
    *,
    max_connections: int | None = None,
) -> ConnectionOptions:
    """Client options from taskiq-redis-style keywords, or ``connection=``.

    ``max_connections`` is taskiq-redis's ``max_connection_pool_size``; the
    remaining keywords go to redis-py as in taskiq-redis. ``connection=``
    excludes both, so that nothing is silently ignored.

    :raises InvalidOptionError: for both forms at once, or a keyword the
        cluster client does not take.
    """
    if connection is not None:
        if connection_kwargs or max_connections is not None:
            given = sorted([*connection_kwargs, *(
                ["max_connection_pool_size"] if max_connections is not None else []
            )])
            raise InvalidOptionError(
                option="connection",
                reason=f"connection= excludes client keyword arguments: {given}",
            )
        return connection
    kwargs = dict(connection_kwargs)
    # redis-py's own name for the pool size is taken as the pool size too.
    pool = kwargs.pop("max_connections", None)
    if max_connections is None:
        max_connections = pool
    check_client_kwargs(kwargs)
    if max_connections is not None and (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or max_connections < 1
    ):
        # Also catches a value that was meant for another positional slot.
        raise InvalidOptionError(
            option="max_connection_pool_size",
            reason=f"must be an int > 0, got {max_connections!r}",
        )
    return ConnectionOptions(
        max_connections=max_connections or ConnectionOptions.max_connections,
        extra=kwargs,
    )
