"""Lifecycle guard shared by every component that owns a client.

A component moves NEW -> STARTING -> RUNNING -> STOPPING -> STOPPED; a failed
startup returns it to NEW so that it can be retried. The guard turns misuse
(startup twice, use after shutdown) into :class:`LifecycleError` instead of
an obscure failure deep inside redis-py, and makes ``shutdown()`` idempotent.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import RedisCluster

from ._errors import LifecycleError
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
        if not self.lifecycle.stopping():
            return
        try:
            if before is not None:
                await before()
        finally:
            await self._close()
            self.lifecycle.stopped()

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
