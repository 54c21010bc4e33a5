"""Faults for chaos tests: kill, pause, resume, restart, failover, slot migration.

Each helper returns once the cluster has absorbed the fault (a restarted node
rejoined, a promoted replica is the master everywhere, a migrated slot has
one owner everywhere), so a test can act on the new state right away.
:meth:`DevCluster.heal` undoes kills and pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from redis.exceptions import RedisError, ResponseError

from .._errors import DevClusterError
from ._model import SLOTS, NodeRef
from ._nodes import ADMIN_TIMEOUT
from ._pidfiles import KILL_GRACE, remove_pid_files
from ._process import Processes, check_redis_server

__all__ = ["Faults"]

logger = logging.getLogger(__name__)


class Faults(Processes):
    """Fault injection on the node processes and the slot map."""

    async def kill_node(self, node: NodeRef) -> None:
        """SIGKILL the node (no shutdown, no AOF flush beyond what the OS has)."""
        port = self._port(node)
        proc = self._procs.get(port)
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        await asyncio.to_thread(proc.wait, KILL_GRACE)
        self._paused.discard(port)
        remove_pid_files(self._node_dir(port))
        logger.info("Killed node %d", port)

    async def pause_node(self, node: NodeRef) -> None:
        """SIGSTOP the node: it stays up but stops answering."""
        port = self._port(node)
        proc = self._procs.get(port)
        if proc is None or proc.poll() is not None:
            raise DevClusterError(message=f"node {port} is not running")
        proc.send_signal(signal.SIGSTOP)
        self._paused.add(port)
        logger.info("Paused node %d", port)

    async def resume_node(self, node: NodeRef) -> None:
        """SIGCONT a paused node."""
        port = self._port(node)
        proc = self._procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        self._paused.discard(port)
        logger.info("Resumed node %d", port)

    async def restart_node(self, node: NodeRef, *, timeout: float | None = None) -> None:
        """Start the node's process again with the same config and data.

        A node that still runs (or is paused) is SIGKILLed first. Returns once
        the node answers PING, reports ``cluster_state:ok`` and no other live
        node flags it as failing.
        """
        port = self._port(node)
        timeout = self.form_timeout if timeout is None else timeout
        if self._running(port):
            await self.kill_node(port)
        if self._server_path is None:
            self._server_path, _ = await asyncio.to_thread(check_redis_server, self.redis_server)
        self._spawn(port)
        await self._wait_ping([port], timeout)

        async def rejoined() -> str | None:
            self._check_alive([port])
            info = await self._info(port, "CLUSTER", "INFO")
            if info.get("cluster_state") != "ok":
                return f"{self.host}:{port} reports cluster_state:{info.get('cluster_state')}"
            for other in self._live_ports():
                for e in await self._view(other):
                    if e.port == port and e.is_failing:
                        return f"{self.host}:{other} flags {port} as {sorted(e.flags)}"
            return None

        await self._wait(f"node {port} rejoining", rejoined, timeout)
        logger.info("Restarted node %d", port)

    async def failover(
        self, replica_node: NodeRef, force: bool = False, *, timeout: float | None = None
    ) -> None:
        """Promote ``replica_node`` with ``CLUSTER FAILOVER [FORCE]``.

        Returns when it reports the master role and the live nodes agree on
        a slot map with ``cluster_state:ok``.
        """
        port = self._port(replica_node)
        timeout = self.form_timeout if timeout is None else timeout
        args: list[Any] = ["CLUSTER", "FAILOVER"] + (["FORCE"] if force else [])
        loop = asyncio.get_running_loop()
        # A manual failover gives up after 5 s inside Redis; ask again then.
        next_request = 0.0

        async def promoted() -> str | None:
            nonlocal next_request
            role = (await self._info(port, "INFO", "replication")).get("role")
            if role != "master":
                if loop.time() >= next_request:
                    next_request = loop.time() + 6.0
                    try:
                        await self._cmd(port, *args)
                    except ResponseError as exc:
                        return f"CLUSTER FAILOVER refused: {exc}"
                return f"{self.host}:{port} is still a {role}"
            maps = set()
            for other in self._live_ports():
                info = await self._info(other, "CLUSTER", "INFO")
                if info.get("cluster_state") != "ok":
                    return f"{self.host}:{other} reports cluster_state:{info.get('cluster_state')}"
                view = await self._view(other)
                me = [e for e in view if e.port == port]
                if not me or not me[0].is_master:
                    return f"{self.host}:{other} does not see {port} as master yet"
                maps.add(tuple(sorted((e.node_id, e.slots) for e in view if e.is_master)))
            if len(maps) > 1:
                return "the live nodes disagree on the slot map"
            return None

        await self._wait(f"failover to {port}", promoted, timeout)
        logger.info("Node %d is now a master", port)

    async def migrate_slot(
        self, slot: int, target_master: NodeRef, *, batch: int = 100, timeout_ms: int = 5000
    ) -> None:
        """Move ``slot`` and its keys to ``target_master`` by hand.

        The documented protocol: ``SETSLOT IMPORTING`` on the target,
        ``MIGRATING`` on the source, ``GETKEYSINSLOT`` + ``MIGRATE`` in
        batches, then ``SETSLOT NODE`` on the target, the source and the
        other masters. While it runs, clients get ASK/TRYAGAIN and follow
        them, so it is safe under load. Returns when every live node sees the
        target as the owner.
        """
        if not 0 <= slot < SLOTS:
            raise DevClusterError(message=f"slot {slot} is outside 0..{SLOTS - 1}")
        target = self._port(target_master)
        _, view = await self._any_view()
        by_port = {e.port: e for e in view}
        owner = next(
            (e for e in view if e.is_master and any(lo <= slot <= hi for lo, hi in e.slots)),
            None,
        )
        if owner is None:
            raise DevClusterError(message=f"slot {slot} is not covered")
        dst = by_port.get(target)
        if dst is None or not dst.is_master:
            raise DevClusterError(message=f"node {target} is not a master")
        if owner.port == target:
            return
        source = owner.port
        await self._cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", owner.node_id)
        await self._cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst.node_id)
        auth: list[Any] = []
        if self.password is not None:
            auth = (
                ["AUTH2", self.username, self.password]
                if self.username
                else ["AUTH", self.password]
            )
        moved = 0
        # Keys only leave the source (new keys go to the target via ASK), so
        # this ends; the bound guards against a misbehaving server.
        for _ in range(SLOTS * 100):
            keys = await self._cmd(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            await self._cmd(
                source,
                "MIGRATE",
                self.host,
                target,
                "",
                0,
                timeout_ms,
                *auth,
                "KEYS",
                *keys,
                timeout=timeout_ms / 1000 + ADMIN_TIMEOUT,
            )
            moved += len(keys)
        else:
            raise DevClusterError(message=f"slot {slot} kept receiving keys; migration stuck")
        # Target first, so the slot is never without an owner that knows it.
        await self._cmd(target, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)
        await self._cmd(source, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)
        for e in view:
            if e.is_master and e.port not in (source, target) and e.port in self._live_ports():
                with contextlib.suppress(RedisError, OSError):
                    await self._cmd(e.port, "CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)

        async def settled() -> str | None:
            for port in self._live_ports():
                for e in await self._view(port):
                    if e.open_slots:
                        return f"{self.host}:{e.port} still has open slots {e.open_slots}"
                    owns = any(lo <= slot <= hi for lo, hi in e.slots)
                    if owns and e.node_id != dst.node_id:
                        return f"{self.host}:{port} still maps slot {slot} to {e.port}"
            return None

        await self._wait(f"slot {slot} owned by {target}", settled, self.form_timeout)
        logger.info("Moved slot %d (%d keys) from %d to %d", slot, moved, source, target)
