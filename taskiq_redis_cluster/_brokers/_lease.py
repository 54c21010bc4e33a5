"""Leases: a worker keeps the stream entries it holds from being reclaimed.

A stream entry that stays pending for ``idle_timeout`` ms is reclaimed by
any worker (``XAUTOCLAIM``): that is how a crashed worker's tasks come back.
Without more, a task that runs longer than ``idle_timeout`` is reclaimed
too and runs again, so ``idle_timeout`` had to exceed the longest task and
a crash cost that long. With leases the holder resets the idle time of its
entries every ``interval`` seconds (a third of ``idle_timeout`` by default):
the entries of a live worker never look idle, those of a dead one do after
``idle_timeout``.

What is renewed, per entry (:class:`Lease`):

* from the read until taskiq takes it from ``listen()`` (``HELD``): the
  entry waits in the broker's buffer behind running tasks, and another
  worker reclaiming it would run it while this one also does later;
* between the hand-out and the start of its task (``WAITING``): not
  renewed. Only taskiq's receiver reports a start, so a consumer of
  ``listen()`` that never acks gets its entries redelivered after
  ``idle_timeout`` as before; taskiq starts a handed-out task at once
  unless ``--max-prefetch`` queues it behind full ``--max-async-tasks``;
* while the task runs (``RUNNING``), from :class:`TaskStartWatcher`'s
  ``pre_execute`` until the task's asyncio task ends, or its ack, whichever
  comes first. For ``when_executed`` and ``when_saved`` the ack comes first;
  ``when_received`` acks at once, so nothing is renewed at all; a
  ``manual`` task is renewed until ``Context.ack()`` and, if it never acks,
  until it returns (or raises), after which its entry is redelivered after
  ``idle_timeout`` and dead-lettered after ``max_deliveries``.

Renewal costs no command per task: every tick sends one script per shard
stream with all its held ids. The script renews only the ids still pending
on this consumer: a plain ``XCLAIM`` would take back an entry another
worker had already reclaimed. Ids found taken are dropped and logged (their
task may run twice, as at-least-once allows). A failed tick is logged and
the next one tries again; nothing here stops the worker.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from taskiq import TaskiqMessage, TaskiqMiddleware

logger = logging.getLogger(__name__)

#: Renews ``ids`` of one stream; returns the ids no longer pending on us.
RenewFn = Callable[[str, list[bytes]], Awaitable[list[bytes]]]

#: Most ids one renewal script call carries (its reply and Lua stack stay small).
_CHUNK = 1000


class LeaseState(enum.Enum):
    HELD = "held"
    WAITING = "waiting"
    RUNNING = "running"
    ENDED = "ended"


class Lease:
    """One stream entry this worker holds, and whether it is renewed now."""

    __slots__ = ("data", "entry_id", "since", "state", "stream")

    def __init__(self, stream: str, entry_id: bytes) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.state = LeaseState.HELD
        #: The message bytes, once handed out: they name the task to match.
        self.data = b""
        self.since = 0.0

    def __repr__(self) -> str:
        return f"Lease({self.stream!r}, {self.entry_id!r}, {self.state.value})"


class LeaseRenewer:
    """The leases of one broker and the background task that renews them.

    Every method but :meth:`close` is synchronous and cheap: they run per
    task on the hot path. The renewing task starts with the first lease.

    :param stale_after: seconds after which a handed-out entry whose task
        never started is forgotten (a ``listen()`` consumer that neither
        runs nor acks what it takes).
    """

    def __init__(self, renew: RenewFn, interval: float, stale_after: float) -> None:
        self._renew = renew
        self.interval = interval
        self.stale_after = stale_after
        # stream -> entry id -> lease, for the leases renewed on each tick.
        self._renewing: dict[str, dict[bytes, Lease]] = {}
        # Handed-out leases whose task has not started, in hand-out order.
        self._waiting: deque[Lease] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------ transitions
    def hold(self, lease: Lease) -> None:
        """Renew ``lease`` from now on (an entry was just read)."""
        lease.state = LeaseState.HELD
        self._renewing.setdefault(lease.stream, {})[lease.entry_id] = lease
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tqrc-lease-renewer"
            )

    def handed_out(self, lease: Lease, data: bytes) -> None:
        """taskiq took the entry (message ``data``): stop renewing until its task starts."""
        if lease.state is not LeaseState.HELD:
            return
        self._stop_renewing(lease)
        now = time.monotonic()
        waiting = self._waiting
        while waiting and now - waiting[0].since > self.stale_after:
            waiting.popleft().state = LeaseState.ENDED
        lease.state = LeaseState.WAITING
        lease.data = data
        lease.since = now
        waiting.append(lease)

    def started(self, task_id: str, loads: Callable[[bytes], Any] | None = None) -> Lease | None:
        """The task ``task_id`` starts: renew its entry again until it ends.

        taskiq's receiver starts tasks in the order ``listen()`` gave them,
        so the match is the oldest waiting entry, found without decoding
        it: its bytes contain the task id. Only with a serializer that does
        not store the id as text (compressed, say) are the waiting messages
        decoded with ``loads``, the broker's formatter.
        """
        waiting = self._waiting
        found = None
        wanted = task_id.encode()
        for lease in waiting:
            if wanted in lease.data:
                found = lease
                break
        if found is None and loads is not None:
            for lease in waiting:
                try:
                    if str(loads(lease.data).task_id) == task_id:
                        found = lease
                        break
                except Exception:  # not this one; the receiver reports bad data itself
                    continue
        if found is None:
            return None
        if waiting[0] is found:
            waiting.popleft()
        else:
            waiting.remove(found)
        self.hold(found)
        found.state = LeaseState.RUNNING
        return found

    def end(self, lease: Lease) -> None:
        """Stop renewing ``lease`` for good (acked, task ended, released)."""
        state = lease.state
        if state is LeaseState.ENDED:
            return
        lease.state = LeaseState.ENDED
        if state is LeaseState.WAITING:
            waiting = self._waiting
            if waiting and waiting[0] is lease:
                waiting.popleft()
            elif lease in waiting:
                waiting.remove(lease)
        else:
            self._stop_renewing(lease)

    def find(self, stream: str, entry_id: bytes) -> Lease | None:
        """The renewed lease of an entry, if any."""
        return self._renewing.get(stream, {}).get(entry_id)

    def _stop_renewing(self, lease: Lease) -> None:
        held = self._renewing.get(lease.stream)
        if held is not None and held.get(lease.entry_id) is lease:
            del held[lease.entry_id]

    # ---------------------------------------------------------------- figures
    def renewed_count(self) -> int:
        """How many entries the next tick renews."""
        return sum(len(ids) for ids in self._renewing.values())

    def waiting_count(self) -> int:
        """How many handed-out entries wait for their task to start."""
        return len(self._waiting)

    # ---------------------------------------------------------------- renewal
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            started = time.monotonic()
            await self.renew_now()
            took = time.monotonic() - started
            if took > self.interval:
                logger.warning("Renewing leases took %.2fs, longer than the renewal interval "
                               "(%.2fs); entries may be reclaimed by other workers", took,
                               self.interval)

    async def renew_now(self) -> None:
        """One tick: one script call per stream (per chunk of ids), concurrently."""
        calls = []
        for stream, held in self._renewing.items():
            ids = list(held)
            for start in range(0, len(ids), _CHUNK):
                calls.append(self._renew_chunk(stream, ids[start:start + _CHUNK]))
        if calls:
            await asyncio.gather(*calls)
        # Forget streams whose leases all ended.
        for stream in [s for s, held in self._renewing.items() if not held]:
            del self._renewing[stream]

    async def _renew_chunk(self, stream: str, ids: list[bytes]) -> None:
        try:
            lost = await self._renew(stream, ids)
        except Exception as exc:
            logger.warning("Could not renew the leases of %d entries of %s (%r); the next "
                           "tick retries, and they are reclaimed by others if this persists "
                           "past idle_timeout", len(ids), stream, exc)
            return
        if not lost:
            return
        held = self._renewing.get(stream, {})
        for entry_id in lost:
            lease = held.get(entry_id)
            if lease is None:
                continue  # acked or ended while the script ran
            del held[entry_id]
            lease.state = LeaseState.ENDED  # never renewed again, even if its task starts
            logger.warning("Entry %s of %s is no longer pending on this worker (reclaimed "
                           "by another, acknowledged, or its group was lost); its task may "
                           "run twice", entry_id.decode(), stream)

    async def close(self) -> None:
        """Stop renewing (the broker shuts down); held entries age from now."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class TaskStartWatcher(TaskiqMiddleware):
    """Tells the renewer when a task starts and, through its asyncio task, when it ends.

    Its ``pre_execute`` runs inside taskiq's receiver callback, the asyncio
    task that runs the task and then acks it, whatever the ack type: that
    task's end is the end of the work on the entry, whether the task
    returned, raised or was cancelled. The broker installs it first among
    the middlewares, once it hands out its first message.
    """

    def __init__(self, renewer: LeaseRenewer) -> None:
        super().__init__()
        self.renewer = renewer

    def _loads(self, data: bytes) -> TaskiqMessage:
        return self.broker.formatter.loads(message=data)

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        lease = self.renewer.started(message.task_id, self._loads)
        if lease is not None:
            task = asyncio.current_task()
            if task is None:  # not in a task: nothing tells the end; do not renew
                self.renewer.end(lease)
            else:
                task.add_done_callback(_ender(self.renewer, lease))
        return message


def _ender(renewer: LeaseRenewer, lease: Lease) -> Callable[[Any], None]:
    def end(_: Any) -> None:
        renewer.end(lease)

    return end
