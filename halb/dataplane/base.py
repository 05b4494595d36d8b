"""The dataplane adapter protocol.

A dataplane holds virtual services and their flow state in the kernel. The agent and
the sync code only ever talk to it through this protocol, so planning and HA logic are
tested against an in-memory implementation (halb.testing.fake_dataplane) while each
real adapter (xdp, nft, ipvs) is tested against the kernel.

Methods are blocking (netlink and bpf syscalls are fast); the agent calls them from a
worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from halb.model import Backend, Flow, Service, ServiceKey

__all__ = ["ApplyResult", "Counter", "Counters", "Dataplane"]


@dataclass(frozen=True, slots=True)
class Counter:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    per_service: dict[ServiceKey, Counter] = field(default_factory=dict)
    per_backend: dict[tuple[ServiceKey, Backend], Counter] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply changed: services added/removed/updated and kernel writes made."""

    added: tuple[ServiceKey, ...] = ()
    removed: tuple[ServiceKey, ...] = ()
    updated: tuple[ServiceKey, ...] = ()
    writes: int = 0


@runtime_checkable
class Dataplane(Protocol):
    name: str

    def apply(self, services: Sequence[Service]) -> ApplyResult:
        """Make the kernel hold exactly these services; idempotent and minimal."""
        ...

    def dump_flows(self) -> list[Flow]: ...

    def install_flows(self, flows: Iterable[Flow]) -> int:
        """Write flows learned from a peer; returns how many were written."""
        ...

    def delete_flows(self, flows: Iterable[Flow]) -> int: ...

    def counters(self) -> Counters: ...

    def set_deadline(self, monotonic_ns: int | None) -> None:
        """Arm (or disarm with None) a dead-man switch: stop forwarding VIP traffic after
        this CLOCK_MONOTONIC instant unless re-armed. Adapters that cannot do it ignore it."""
        ...

    def close(self) -> None:
        """Remove everything this adapter put in the kernel."""
        ...
