"""Lifecycle guard shared by every component that owns a client.

A component moves NEW -> STARTING -> RUNNING -> STOPPING -> STOPPED; a failed
startup returns it to NEW so that it can be retried. The guard turns misuse
(startup twice, use after shutdown) into :class:`LifecycleError` instead of
an obscure failure deep inside redis-py, and makes ``shutdown()`` idempotent.
"""

from __future__ import annotations

import enum

from ._errors import LifecycleError


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
