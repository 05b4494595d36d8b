"""Frozen value types shared by planning, dataplanes, sync and the HA core.

These carry no behaviour beyond small derived properties: they are what pure logic
consumes and produces, and what adapters translate to and from the kernel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address

__all__ = [
    "Backend",
    "DataplaneKind",
    "Flow",
    "FlowTimeouts",
    "Forwarding",
    "IPAddress",
    "Protocol",
    "Scheduler",
    "Service",
    "ServiceKey",
    "Term",
]


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        """IP protocol number (IPPROTO_*)."""
        return 6 if self is Protocol.TCP else 17


class DataplaneKind(enum.StrEnum):
    XDP = "xdp"
    NFT = "nft"
    IPVS = "ipvs"


class Forwarding(enum.StrEnum):
    DSR = "dsr"
    TUNNEL = "tunnel"
    NAT = "nat"
    FULLNAT = "fullnat"


class Scheduler(enum.StrEnum):
    MAGLEV = "maglev"
    RR = "rr"
    WRR = "wrr"
    LC = "lc"
    WLC = "wlc"
    SH = "sh"


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """VIP:port/protocol, the identity of a virtual service."""

    vip: IPAddress
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        host = f"[{self.vip}]" if self.vip.version == 6 else str(self.vip)
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    address: IPAddress
    port: int
    weight: int = 1
    mac: str | None = None

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    """A virtual service as the dataplane must hold it."""

    key: ServiceKey
    scheduler: Scheduler
    forwarding: Forwarding
    backends: tuple[Backend, ...]
    ring_size: int = 65537
    # Backends that take new flows only when every other backend is down.
    sorry: tuple[Backend, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Flow:
    """One connection as seen by a dataplane: client 5-tuple and chosen backend."""

    protocol: Protocol
    src: IPAddress
    sport: int
    vip: IPAddress
    vport: int
    backend: IPAddress
    bport: int

    def sort_key(self) -> tuple[object, ...]:
        # IPv4Address and IPv6Address do not compare with each other: order by family.
        return (
            self.protocol.value,
            self.src.version, self.src, self.sport,
            self.vip.version, self.vip, self.vport,
            self.backend.version, self.backend, self.bport,
        )  # fmt: skip

    def __lt__(self, other: Flow) -> bool:
        return self.sort_key() < other.sort_key()

    @property
    def service(self) -> ServiceKey:
        return ServiceKey(self.vip, self.vport, self.protocol)


@dataclass(frozen=True, slots=True)
class FlowTimeouts:
    """Idle timeouts of a dataplane's flows, in seconds: a flow that carried no packet
    for longer is forgotten (the next packet is scheduled again, by the same Maglev
    ring unless it changed). TCP is ``tcp_closing`` once a FIN or RST was seen."""

    tcp_established: float = 900.0
    tcp_closing: float = 10.0
    udp: float = 30.0


@dataclass(frozen=True, slots=True, order=True)
class Term:
    """A leadership term: the etcd lease and the leader key's create revision."""

    lease_id: int
    revision: int

    def __str__(self) -> str:
        return f"{self.lease_id:x}@{self.revision}"
