"""What each dataplane can do (forwarding modes, schedulers, a dead-man switch), as
validation checks it."""

from __future__ import annotations

from halb import timing
from halb.model import (
    DataplaneKind,
    Forwarding,
    Scheduler,
)

__all__ = [
    "DEADMAN_DATAPLANES",
    "MIN_LEASE_TTL",
    "SUPPORTED_FORWARDING",
    "SUPPORTED_SCHEDULERS",
]


# Timing lives in halb.timing; these names stay importable from here.
MIN_LEASE_TTL = timing.MIN_LEASE_TTL
DEADMAN_DATAPLANES = timing.DEADMAN_DATAPLANES

SUPPORTED_FORWARDING: dict[DataplaneKind, tuple[Forwarding, ...]] = {
    DataplaneKind.XDP: (Forwarding.DSR, Forwarding.TUNNEL),
    DataplaneKind.NFT: (Forwarding.NAT, Forwarding.FULLNAT),
    DataplaneKind.IPVS: (Forwarding.NAT, Forwarding.DSR, Forwarding.TUNNEL),
}

SUPPORTED_SCHEDULERS: dict[DataplaneKind, tuple[Scheduler, ...]] = {
    DataplaneKind.XDP: (Scheduler.MAGLEV,),
    DataplaneKind.NFT: (Scheduler.MAGLEV, Scheduler.RR),
    DataplaneKind.IPVS: tuple(Scheduler),
}
