"""Pure: the IPVS objects halb programs, as the kernel holds them, and their constants.

``desired_state`` turns halb's services into the exact IPVS services and real servers
("dests") the kernel must hold; halb.dataplane.ipvs.plan diffs that against a dump.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from halb.model import Backend, Forwarding, IPAddress, Scheduler, Service, ServiceKey

__all__ = [
    "FWD_METHOD",
    "SCHED_FLAGS",
    "SCHED_NAME",
    "DestSpec",
    "FwdMethod",
    "KernelService",
    "ServiceSpec",
    "desired_state",
]


class FwdMethod(enum.IntEnum):
    """IP_VS_CONN_F_* forwarding methods (the low three bits of a connection's flags)."""

    MASQ = 0
    LOCALNODE = 1
    TUNNEL = 2
    DROUTE = 3


FWD_METHOD: dict[Forwarding, FwdMethod] = {
    Forwarding.NAT: FwdMethod.MASQ,
    Forwarding.DSR: FwdMethod.DROUTE,
    Forwarding.TUNNEL: FwdMethod.TUNNEL,
}

SCHED_NAME: dict[Scheduler, str] = {
    Scheduler.MAGLEV: "mh",
    Scheduler.RR: "rr",
    Scheduler.WRR: "wrr",
    Scheduler.LC: "lc",
    Scheduler.WLC: "wlc",
    Scheduler.SH: "sh",
}

IP_VS_SVC_F_SCHED2 = 0x0010  # mh: also hash the source port (IP_VS_SVC_F_SCHED_MH_PORT)
# mh hashes the source port too, as halb's other dataplanes hash the 5-tuple: one
# client's connections spread over the backends. sh keeps its classic client-IP
# stickiness.
SCHED_FLAGS: dict[Scheduler, int] = {Scheduler.MAGLEV: IP_VS_SVC_F_SCHED2}


@dataclass(frozen=True, slots=True, order=True)
class ServiceSpec:
    """An IPVS virtual service's settable attributes."""

    key: ServiceKey
    sched: str
    flags: int = 0


@dataclass(frozen=True, slots=True, order=True)
class DestSpec:
    """An IPVS real server of one service."""

    address: IPAddress
    port: int
    fwd: FwdMethod
    weight: int


@dataclass(frozen=True, slots=True)
class KernelService:
    spec: ServiceSpec
    dests: tuple[DestSpec, ...]  # sorted: the order they are added in


def _dests(backends: Sequence[Backend], fwd: FwdMethod) -> dict[tuple[IPAddress, int], DestSpec]:
    return {(b.address, b.port): DestSpec(b.address, b.port, fwd, b.weight) for b in backends}


def desired_state(services: Sequence[Service]) -> dict[ServiceKey, KernelService]:
    """The kernel state for these services. Regular backends are always present (weight
    0 drains: IPVS sends it no new connections, existing ones go on); the sorry backends
    are added only while no regular backend has weight, as keepalived does."""
    out: dict[ServiceKey, KernelService] = {}
    for svc in services:
        if svc.key in out:
            raise ValueError(f"service {svc.key} appears twice")
        if svc.forwarding not in FWD_METHOD:
            raise ValueError(f"{svc.key}: ipvs cannot forward with {svc.forwarding}")
        fwd = FWD_METHOD[svc.forwarding]
        dests = _dests(svc.backends, fwd)
        if not any(b.weight > 0 for b in svc.backends):
            for key, dest in _dests(svc.sorry, fwd).items():
                dests.setdefault(key, dest)
        spec = ServiceSpec(svc.key, SCHED_NAME[svc.scheduler], SCHED_FLAGS.get(svc.scheduler, 0))
        out[svc.key] = KernelService(spec, tuple(sorted(dests.values())))
    return out
