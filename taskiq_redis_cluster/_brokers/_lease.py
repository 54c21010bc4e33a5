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
  ``pre_execute`` until its ack or the end of the asyncio task that runs
  it (seen at the next tick), whichever comes first. For ``when_executed``
  and ``when_saved`` the ack comes first;
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
import math
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

    __slots__ = ("data", "entry_id", "since", "state", "stream", "task")

    def __init__(self, stream: str, entry_id: bytes) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.state = LeaseState.HELD
        #: The message bytes, once handed out: they name the task to match.
        self.data = b""
        #: The renewal tick at which it was handed out.
        self.since = 0
        #: The asyncio task running the entry's taskiq task, once started.
        self.task: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"Lease({self.stream!r}, {self.entry_id!r}, {self.state.value})"


class LeaseRenewer:
    """The leases of one broker and the background task that renews them.

    The per-task methods (:meth:`hold`, :meth:`handed_out`, :meth:`started`,
    :meth:`end`) are synchronous and do a dict or deque operation each; the
    rest (which leases to renew, which tasks ended, which handed-out entries
    were forgotten) is sorted out once per tick.

    :param stale_after: seconds after which a handed-out entry whose task
        never started is forgotten (a ``listen()`` consumer that neither
        runs nor acks what it takes).
    """

    def __init__(self, renew: RenewFn, interval: float, stale_after: float) -> None:
        self._renew = renew
        self.interval = interval
        self._stale_ticks = max(1, math.ceil(stale_after / interval))
        self._ticks = 0
        # stream -> entry id -> lease, for every lease not ended; a tick
        # renews those HELD or RUNNING.
        self._leases: dict[str, dict[bytes, Lease]] = {}
        # Handed-out leases whose task has not started, in hand-out order.
        self._waiting: deque[Lease] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------ transitions
    def hold(self, lease: Lease) -> None:
        """Renew ``lease`` from now on (its entry was just read)."""
        held = self._leases.get(lease.stream)
        if held is None:
            held = self._leases[lease.stream] = {}
        held[lease.entry_id] = lease
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tqrc-lease-renewer"
            )

    def handed_out(self, lease: Lease, data: bytes) -> None:
        """taskiq took the entry (message ``data``): not renewed until its task starts."""
        if lease.state is LeaseState.HELD:
            lease.state = LeaseState.WAITING
            lease.data = data
            lease.since = self._ticks
            self._waiting.append(lease)

    def started(
        self,
        task_id: str,
        task: asyncio.Task[Any],
        loads: Callable[[bytes], Any] | None = None,
    ) -> Lease | None:
        """The task ``task_id`` starts in ``task``: renew its entry until that ends.

        The end is checked at each renewal tick (``task.done()``), not
        reported: a done callback per task cost more than the leases of all
        the short tasks that end between two ticks.

        taskiq's receiver starts tasks in the order ``listen()`` gave them,
        so the match is the oldest waiting entry, found without decoding
        it: its bytes contain the task id. Only with a serializer that does
        not store the id as text (compressed, say) are the waiting messages
        decoded with ``loads``, the broker's formatter.
        """
        waiting = self._waiting
        if not waiting:
            return None
        found = None
        wanted = task_id.encode()
        if wanted in waiting[0].data:
            found = waiting.popleft()
        else:
            found = self._search(task_id, wanted, loads)
            if found is None:
                return None
            waiting.remove(found)
        found.state = LeaseState.RUNNING
        found.task = task
        return found

    def _search(
        self, task_id: str, wanted: bytes, loads: Callable[[bytes], Any] | None
    ) -> Lease | None:
        for lease in self._waiting:
            if wanted in lease.data:
                return lease
        if loads is None:
            return None
        for lease in self._waiting:
            try:
                if str(loads(lease.data).task_id) == task_id:
                    return lease
            except Exception:  # not this one; the receiver reports bad data itself
                continue
        return None

    def end(self, lease: Lease) -> None:
        """Stop renewing ``lease`` for good (acked, task ended, released)."""
        state = lease.state
        if state is LeaseState.ENDED:
            return
        lease.state = LeaseState.ENDED
        lease.task = None
        if state is LeaseState.WAITING:
            waiting = self._waiting
            if waiting[0] is lease:
                waiting.popleft()
            else:
                waiting.remove(lease)
        held = self._leases.get(lease.stream)
        if held is not None and held.get(lease.entry_id) is lease:
            del held[lease.entry_id]

    def find(self, stream: str, entry_id: bytes) -> Lease | None:
        """The lease of an entry, if it has one."""
        return self._leases.get(stream, {}).get(entry_id)

    # ---------------------------------------------------------------- figures
    def renewed_count(self) -> int:
        """How many entries the next tick renews (held, or their task running)."""
        return sum(1 for held in self._leases.values() for lease in held.values()
                   if lease.state is not LeaseState.WAITING)

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

    def _due(self) -> dict[str, list[bytes]]:
        """The ids to renew now, per stream; ends the leases whose work ended."""
        self._ticks += 1
        due: dict[str, list[bytes]] = {}
        over: list[Lease] = []
        waiting_state, running_state = LeaseState.WAITING, LeaseState.RUNNING
        for stream, held in self._leases.items():
            ids = []
            for entry_id, lease in held.items():
                state = lease.state
                if state is waiting_state:
                    if self._ticks - lease.since > self._stale_ticks:
                        over.append(lease)
                elif state is running_state and lease.task is not None and lease.task.done():
                    over.append(lease)  # ended without an ack (manual, or it failed)
                else:
                    ids.append(entry_id)
            if ids:
                due[stream] = ids
        for lease in over:
            self.end(lease)
        for stream in [s for s, held in self._leases.items() if not held]:
            del self._leases[stream]
        return due

    async def renew_now(self) -> None:
        """One tick: one script call per stream (per chunk of ids), concurrently."""
        calls = [
            self._renew_chunk(stream, ids[start:start + _CHUNK])
            for stream, ids in self._due().items()
            for start in range(0, len(ids), _CHUNK)
        ]
        if calls:
            await asyncio.gather(*calls)

    async def _renew_chunk(self, stream: str, ids: list[bytes]) -> None:
        try:
            lost = await self._renew(stream, ids)
        except Exception as exc:
            logger.warning("Could not renew the leases of %d entries of %s (%r); the next "
                           "tick retries, and they are reclaimed by others if this persists "
                           "past idle_timeout", len(ids), stream, exc)
            return
        held = self._leases.get(stream, {})
        for entry_id in lost:
            lease = held.get(entry_id)
            if lease is None or lease.state is LeaseState.WAITING:
                continue  # acked or ended while the script ran
            self.end(lease)  # never renewed again, even if its task starts later
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
    """Tells the renewer when a task starts, and which asyncio task runs it.

    Its ``pre_execute`` runs inside taskiq's receiver callback, the asyncio
    task that runs the task and then acks it, whatever the ack type: that
    task's end is the end of the work on the entry, whether the task
    returned, raised or was cancelled. The broker installs it first among
    the middlewares, once it reads its first entry.
    """

    def __init__(self, renewer: LeaseRenewer) -> None:
        super().__init__()
        self.renewer = renewer

    def _loads(self, data: bytes) -> TaskiqMessage:
        return self.broker.formatter.loads(message=data)

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        task = asyncio.current_task()
        if task is not None:  # outside a task nothing would tell the end: no lease
            self.renewer.started(message.task_id, task, self._loads)
        return message
