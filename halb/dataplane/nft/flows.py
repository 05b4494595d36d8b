"""Pure mapping between halb flows and conntrack entries, for nat and fullnat.

A flow is the client 5-tuple and its backend. In conntrack it is one entry whose
original tuple is client:sport -> VIP:vport and whose reply tuple comes back from the
backend:

- nat:     reply = backend:bport -> client:sport   (DNAT only)
- fullnat: reply = backend:bport -> SNAT:port      (DNAT + SNAT to the floating
  backend-side address; ``port`` is the client's port unless nf_nat had to pick
  another one to keep the tuple unique)

`Flow` carries no SNAT port, so `FlowEntry` adds it on this side, and the synced
records carry it (halb.flows.records, bytes [56, 64)). A flow synced without one is
installed with the client's port, which is what nf_nat keeps whenever it can.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from halb.dataplane.nft.ctmsg import CtEntry, CtTuple, NatSpec
from halb.flows.records import from_entries
from halb.model import Flow, Forwarding, IPAddress, Protocol, Service, ServiceKey

__all__ = ["FlowEntry", "FlowMap", "Refusal", "entry_records"]

_PROTOCOLS = {p.number: p for p in Protocol}


class Refusal(enum.StrEnum):
    """Why a flow was not installed (before the kernel saw it)."""

    UNKNOWN_SERVICE = "unknown_service"
    UNKNOWN_BACKEND = "unknown_backend"
    NO_SNAT_ADDRESS = "no_snat_address"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True, order=True)
class FlowEntry:
    """A flow plus the fullnat source binding the balancer used toward the backend."""

    flow: Flow
    snat: IPAddress | None = None
    snat_port: int | None = None


def entry_records(entries: Iterable[FlowEntry]) -> bytes:
    """Packed flow records carrying each fullnat source port."""
    return from_entries((fe.flow, fe.snat_port) for fe in entries)


def _port_ok(port: int) -> bool:
    return 0 < port < 65536


class FlowMap:
    """Which conntrack entries are halb's flows, and how a flow becomes an entry.

    Built from the services the dataplane holds and each VIP's SNAT address.
    """

    def __init__(
        self, services: Sequence[Service], snat: Mapping[IPAddress, IPAddress] | None = None
    ) -> None:
        self.services: dict[ServiceKey, Service] = {s.key: s for s in services}
        self.snat: dict[IPAddress, IPAddress] = dict(snat or {})
        self._backends: dict[ServiceKey, set[tuple[IPAddress, int]]] = {
            s.key: {(b.address, b.port) for b in (*s.backends, *s.sorry)} for s in services
        }
        self.vips: frozenset[IPAddress] = frozenset(k.vip for k in self.services)

    def flow_of(self, entry: CtEntry) -> FlowEntry | None:
        """The flow an entry carries, or None if it is not a NATed flow of a service."""
        proto = _PROTOCOLS.get(entry.orig.proto)
        if proto is None:
            return None
        key = ServiceKey(entry.orig.dst, entry.orig.dport, proto)
        svc = self.services.get(key)
        if svc is None:
            return None
        reply = entry.reply
        if reply.src == key.vip and reply.sport == key.port:
            return None  # not translated: traffic to the VIP itself, not a balanced flow
        flow = Flow(
            protocol=proto,
            src=entry.orig.src,
            sport=entry.orig.sport,
            vip=key.vip,
            vport=key.port,
            backend=reply.src,
            bport=reply.sport,
        )
        if reply.dst != entry.orig.src or reply.dport != entry.orig.sport:
            return FlowEntry(flow, reply.dst, reply.dport)
        return FlowEntry(flow)

    def refusal(self, fe: FlowEntry) -> Refusal | None:
        """Why this flow must not be installed here, or None."""
        f = fe.flow
        v = f.vip.version
        if f.src.version != v or f.backend.version != v:
            return Refusal.MALFORMED
        if not all(_port_ok(p) for p in (f.sport, f.vport, f.bport)):
            return Refusal.MALFORMED
        svc = self.services.get(f.service)
        if svc is None:
            return Refusal.UNKNOWN_SERVICE
        if (f.backend, f.bport) not in self._backends[svc.key]:
            return Refusal.UNKNOWN_BACKEND
        if svc.forwarding is Forwarding.FULLNAT:
            if self.snat.get(f.vip) is None:
                return Refusal.NO_SNAT_ADDRESS
            if fe.snat_port is not None and not _port_ok(fe.snat_port):
                return Refusal.MALFORMED
        return None

    def orig_tuple(self, f: Flow) -> CtTuple:
        return CtTuple(f.src, f.vip, f.protocol.number, f.sport, f.vport)

    def nat_for(self, fe: FlowEntry) -> tuple[NatSpec, NatSpec | None]:
        """(DNAT, SNAT or None) bindings to create the entry with; call after refusal()."""
        f = fe.flow
        dnat = NatSpec(f.backend, f.bport)
        svc = self.services[f.service]
        if svc.forwarding is not Forwarding.FULLNAT:
            return dnat, None
        # The floating address of this node's config is authoritative; the port is the
        # one the active used (or the client's when the sender did not say).
        addr = self.snat[f.vip]
        return dnat, NatSpec(addr, fe.snat_port if fe.snat_port is not None else f.sport)
