"""Health and topology: what the live cluster looks like right now.

Every answer here comes from the nodes (``CLUSTER INFO``, ``CLUSTER NODES``,
``INFO replication``), never from what the launcher intended, so the queries
stay true after kills, failovers and slot migrations.
"""

from __future__ import annotations

import contextlib

from redis.crc import key_slot
from redis.exceptions import RedisError

from .._errors import DevClusterError
from ._model import SLOTS, Entry, Node, NodeRef, NodeStatus
from ._nodes import NodeSet

__all__ = ["Health"]


class Health(NodeSet):
    """Health checks, per-node status and topology queries."""

    async def _health_problem(self) -> str | None:
        live = self._live_ports()
        if not live:
            return "no node is running"
        total = len(self._ports)
        views: dict[int, list[Entry]] = {}
        for port in live:
            info = await self._info(port, "CLUSTER", "INFO")
            addr = f"{self.host}:{port}"
            if info.get("cluster_state") != "ok":
                return f"{addr} reports cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_slots_assigned") != str(SLOTS):
                return f"{addr} has {info.get('cluster_slots_assigned')} slots assigned"
            if info.get("cluster_known_nodes") != str(total):
                return f"{addr} knows {info.get('cluster_known_nodes')} of {total} nodes"
            views[port] = await self._view(port)
        live_set = set(live)
        maps = {}
        for port, view in views.items():
            for e in view:
                if e.open_slots:
                    return f"{self.host}:{e.port} has open slots {e.open_slots}"
                if e.port in live_set and e.is_failing:
                    return f"{self.host}:{port} flags {e.port} as {sorted(e.flags)}"
                if e.port in live_set and "myself" not in e.flags and not e.link_connected:
                    return f"{self.host}:{port} has no link to {e.port}"
            maps[port] = sorted((e.node_id, e.slots) for e in view if e.is_master and e.slots)
        ref_port = live[0]
        for port, slot_map in maps.items():
            if slot_map != maps[ref_port]:
                return f"{self.host}:{port} and {ref_port} disagree on the slot map"
        ref = views[ref_port]
        if self.replicas_count > 0:
            for master in (e for e in ref if e.is_master and e.slots):
                reps = [
                    e
                    for e in ref
                    if e.master_id == master.node_id and not e.is_failing and e.port in live_set
                ]
                if not reps:
                    return f"master {master.host}:{master.port} has no live replica"
        for e in ref:
            if e.is_master or e.port not in live_set:
                continue
            info = await self._info(e.port, "INFO", "replication")
            if info.get("role") != "slave":
                return f"{self.host}:{e.port} is listed as a replica but says {info.get('role')}"
            if info.get("master_link_status") != "up":
                return f"replica {self.host}:{e.port} has master_link_status down"
            if info.get("master_sync_in_progress") != "0":
                return f"replica {self.host}:{e.port} is still syncing"
        return None

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until the running, unpaused nodes form a healthy cluster.

        Healthy means: ``cluster_state:ok`` on every such node, all 16384
        slots assigned, every node known to all, no failing flags or open
        slots, one slot map everywhere, every master (with replicas
        configured) has a live replica, and every replica's link is up and
        not syncing.

        :raises ClusterFormationError: on timeout, with the last problem seen.
        """
        await self._wait("a healthy cluster", self._health_problem, timeout)

    async def status(self) -> list[NodeStatus]:
        """One :class:`NodeStatus` per configured node (live data)."""
        views: dict[int, list[Entry]] = {}
        for port in self._ports:
            with contextlib.suppress(RedisError, OSError):
                views[port] = await self._view(port)
        by_id: dict[str, Entry] = {}
        by_port: dict[int, Entry] = {}
        for port, view in views.items():
            for e in view:
                if "myself" in e.flags:
                    by_port[port] = e
                by_id.setdefault(e.node_id, e)
        for view in views.values():
            for e in view:
                by_port.setdefault(e.port, e)
        result = []
        for port in self._ports:
            entry = by_port.get(port)
            if entry is None:
                result.append(NodeStatus(self.host, port, up=port in views))
                continue
            master = by_id.get(entry.master_id) if entry.master_id else None
            role = "master" if entry.is_master else "replica" if entry.master_id else "unknown"
            result.append(
                NodeStatus(
                    host=self.host,
                    port=port,
                    up=port in views,
                    node_id=entry.node_id,
                    role=role,
                    master_id=entry.master_id,
                    master_address=f"{master.host}:{master.port}" if master else None,
                    slots=entry.slots,
                )
            )
        return result

    # ---- topology queries -------------------------------------------------

    async def masters(self) -> list[Node]:
        """Masters that own slots and are not failing, from live CLUSTER NODES."""
        _, view = await self._any_view()
        return [
            self._entry_node(e)
            for e in sorted(view, key=lambda e: e.port)
            if e.is_master and e.slots and not e.is_failing
        ]

    async def replicas(self) -> list[Node]:
        """Replicas that are not failing, from live CLUSTER NODES."""
        _, view = await self._any_view()
        return [
            self._entry_node(e)
            for e in sorted(view, key=lambda e: e.port)
            if not e.is_master and e.master_id and not e.is_failing
        ]

    async def master_of_slot(self, slot: int) -> Node:
        """The master currently owning ``slot``."""
        _, view = await self._any_view()
        for e in view:
            if e.is_master and any(lo <= slot <= hi for lo, hi in e.slots):
                return self._entry_node(e)
        raise DevClusterError(message=f"slot {slot} is not covered")

    async def master_of_key(self, key: str | bytes) -> Node:
        """The master currently owning ``key``'s slot."""
        raw = key.encode() if isinstance(key, str) else key
        return await self.master_of_slot(key_slot(raw))

    async def replica_of(self, master: NodeRef) -> Node:
        """A live replica of ``master`` (the first by port)."""
        port = self._port(master)
        _, view = await self._any_view()
        by_port = {e.port: e for e in view}
        if port not in by_port:
            raise DevClusterError(message=f"node {port} is unknown to the cluster")
        master_id = by_port[port].node_id
        for e in sorted(view, key=lambda e: e.port):
            if e.master_id == master_id and not e.is_failing and e.port in self._live_ports():
                return self._entry_node(e)
        raise DevClusterError(message=f"master {self.host}:{port} has no live replica")
