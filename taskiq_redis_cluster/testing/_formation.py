"""Formation: from fresh ``redis-server`` processes to a healthy cluster.

Node ``i < masters`` starts as a master with an even share of the 16384
slots; the remaining nodes replicate the masters round-robin.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import ResponseError

from ._health import Health
from ._model import SLOTS, text
from ._process import Processes

__all__ = ["Formation"]


class Formation(Processes, Health):
    """Meet the nodes, assign the slots, attach the replicas, wait for health."""

    async def _form(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.form_timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        await self._wait_ping(self._ports, left())
        ids = {p: text(await self._cmd(p, "CLUSTER", "MYID")) for p in self._ports}
        masters = self._ports[: self.masters_count]
        for i, port in enumerate(self._ports):
            # Distinct epochs up front, as redis-cli does, so that nodes need
            # no epoch-collision rounds before the slot map settles.
            with contextlib.suppress(ResponseError):
                await self._cmd(port, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for i, port in enumerate(masters):
            lo = i * SLOTS // len(masters)
            hi = (i + 1) * SLOTS // len(masters) - 1
            await self._cmd(port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
        first = self._ports[0]
        for port in self._ports[1:]:
            await self._cmd(first, "CLUSTER", "MEET", self.host, port)
            await self._cmd(port, "CLUSTER", "MEET", self.host, first)
        count = len(self._ports)

        id_set = set(ids.values())

        async def all_known_ids() -> str | None:
            self._check_alive(self._ports)
            for port in self._ports:
                view = await self._view(port)
                seen = {e.node_id for e in view if "handshake" not in e.flags}
                if not id_set <= seen:
                    return f"{self.host}:{port} knows {len(seen & id_set)} of {count} nodes"
            return None

        await self._wait("all nodes meeting each other", all_known_ids, left())
        replica_ports = self._ports[self.masters_count :]
        wanted = {rp: ids[masters[i % len(masters)]] for i, rp in enumerate(replica_ports)}

        async def replicated() -> str | None:
            self._check_alive(self._ports)
            for rp, master_id in wanted.items():
                me = next(e for e in await self._view(rp) if "myself" in e.flags)
                if me.master_id != master_id:
                    try:
                        await self._cmd(rp, "CLUSTER", "REPLICATE", master_id)
                    except ResponseError as exc:
                        return f"{self.host}:{rp} cannot replicate yet ({exc})"
                    return f"{self.host}:{rp} told to replicate {master_id}"
            return None

        if wanted:
            await self._wait("replicas attached", replicated, left())
        await self.wait_healthy(timeout=left())
