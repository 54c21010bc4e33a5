"""What a dev cluster is made of, and how its ``CLUSTER NODES`` replies read.

Value objects (:class:`TLSConfig`, :class:`Node`, :class:`NodeStatus`), the
port and slot constants every other module of this package shares, and the
parsing of the raw ``CLUSTER NODES`` / ``INFO`` replies the launcher asks the
nodes for. Nothing here talks to a process or a socket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUS_PORT_OFFSET",
    "SLOTS",
    "STATE_FILE",
    "Entry",
    "Node",
    "NodeRef",
    "NodeStatus",
    "TLSConfig",
    "format_slots",
    "parse_kv",
    "parse_nodes",
    "text",
]

SLOTS = 16384
#: Node ``i``'s cluster bus listens on its port plus this (the Redis default).
BUS_PORT_OFFSET = 10000
#: Launch options of a cluster, kept in its directory for ``cluster status|down``.
STATE_FILE = "devcluster.json"


@dataclass(frozen=True)
class TLSConfig:
    """Certificate files for a TLS cluster (PEM paths).

    The nodes use them for clients, the cluster bus and replication; clients
    may connect without a certificate of their own (``tls-auth-clients
    optional``).
    """

    cert_file: Path
    key_file: Path
    ca_cert_file: Path


@dataclass(frozen=True)
class Node:
    """One node process of a :class:`DevCluster`.

    ``pid`` is ``None`` while the process is not running. A restart gives the
    node a new pid, so take a fresh value from :attr:`DevCluster.nodes` or
    :meth:`DevCluster.node_for_port` instead of keeping an old one.
    """

    host: str
    port: int
    pid: int | None
    node_dir: Path

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeStatus:
    """What :meth:`DevCluster.status` reports about one node."""

    host: str
    port: int
    up: bool
    node_id: str | None = None
    role: str = "unknown"  #: "master", "replica" or "unknown"
    master_id: str | None = None
    master_address: str | None = None
    slots: tuple[tuple[int, int], ...] = ()

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


#: A node given as a :class:`Node` or as its port.
NodeRef = Node | int


@dataclass
class Entry:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    link_connected: bool
    slots: tuple[tuple[int, int], ...]
    open_slots: tuple[str, ...] = field(default=())

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def is_failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def parse_nodes(reply: str) -> list[Entry]:
    """The entries of a ``CLUSTER NODES`` reply; short lines are skipped."""
    entries = []
    for line in reply.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        addr = parts[1].split(",", 1)[0].split("@", 1)[0]
        host, _, port_text = addr.rpartition(":")
        slots: list[tuple[int, int]] = []
        open_slots: list[str] = []
        for item in parts[8:]:
            if item.startswith("["):
                open_slots.append(item)
            elif "-" in item:
                lo, hi = item.split("-", 1)
                slots.append((int(lo), int(hi)))
            else:
                slots.append((int(item), int(item)))
        entries.append(
            Entry(
                node_id=parts[0],
                host=host,
                port=int(port_text) if port_text.isdigit() else 0,
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                link_connected=parts[7] == "connected",
                slots=tuple(sorted(slots)),
                open_slots=tuple(open_slots),
            )
        )
    return entries


def parse_kv(reply: str) -> dict[str, str]:
    """``key:value`` lines of an ``INFO`` / ``CLUSTER INFO`` reply."""
    result = {}
    for line in reply.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            result[key] = value
    return result


def text(reply: Any) -> str:
    """A raw reply as text (the admin clients keep replies undecoded)."""
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


def format_slots(slots: Sequence[tuple[int, int]]) -> str:
    """``0-5460,6000`` style text for slot ranges."""
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in slots) or "-"
