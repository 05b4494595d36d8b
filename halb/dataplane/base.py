"""The dataplane adapter protocol.

A dataplane holds virtual services and their flow state in the kernel. The agent and
the sync code only ever talk to it through this protocol, so planning and HA logic are
tested against an in-memory implementation (halb.testing.fake_dataplane) while each
real adapter (xdp, nft, ipvs) is tested against the kernel.

Methods are blocking (netlink and bpf syscalls are fast); the agent calls them from a
worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

from halb.model import Backend, Flow, Service, ServiceKey

if TYPE_CHECKING:
    # Types only: the records module brings numpy, which adapters that never touch
    # records (IPVS in the VM tier, where imports are ~60x slower) should not load.
    from halb.flows.records import FlowBatch

__all__ = [
    "ApplyResult",
    "Counter",
    "Counters",
    "Dataplane",
    "FlowObjectRecords",
    "FlowSnapshot",
    "FlowSource",
    "KernelStats",
    "Push",
]

# (upserts, deletes), disjoint within one call: Flow objects or packed flow records.
Push: TypeAlias = "Callable[[FlowBatch, FlowBatch], None]"


@dataclass(frozen=True, slots=True)
class Counter:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    per_service: dict[ServiceKey, Counter] = field(default_factory=dict)
    per_backend: dict[tuple[ServiceKey, Backend], Counter] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KernelStats:
    """What the kernel side reports beyond per-service counters, for the metrics:
    ``events``, the program's own event counters by name (xdp: expired and swept flows,
    dropped fragments, relayed ICMP errors, dead-man drops...); ``conntrack``, the
    connection table's size and refusals (nft: TableStats.doc()). Empty where a
    dataplane has none."""

    events: dict[str, int] = field(default_factory=dict)
    conntrack: dict[str, Any] | None = None


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

    # The same over packed flow records (halb.flows.records: N fixed-size records back
    # to back), the form FlowSync carries: XDP converts whole batches to map entries;
    # the others take FlowObjectRecords (one Flow object per entry). Records given to
    # install_records are already validated against the config; like install_flows it
    # skips those whose service or backend this node does not hold.
    def dump_records(self) -> bytes: ...

    def install_records(self, records: bytes) -> int:
        """Write these flows; returns how many were written."""
        ...

    def delete_records(self, records: bytes) -> int:
        """Remove the flows of these records (only their connection part counts);
        returns how many existed."""
        ...

    def counters(self) -> Counters: ...

    def kernel_stats(self) -> KernelStats:
        """Event counters and table fill (blocking: called in a worker thread)."""
        ...

    def flow_source(self) -> FlowSource:
        """A live source of this dataplane's flows for the active node's FlowSync server
        (a new one per call; the caller closes it). Blocking: called in a worker thread."""
        ...

    def set_deadline(self, monotonic_ns: int | None) -> None:
        """Arm (or disarm with None) a dead-man switch: stop forwarding VIP traffic after
        this CLOCK_MONOTONIC instant unless re-armed. Adapters that cannot do it ignore it."""
        ...

    def close(self) -> None:
        """Remove everything this adapter put in the kernel."""
        ...


@runtime_checkable
class FlowSnapshot(Protocol):
    """What a FlowSync server needs from a flow source to answer a subscription."""

    def snapshot_records(self) -> bytes:
        """Every current flow as packed records (halb.flows.records). Blocking; called
        in a worker thread."""
        ...


@runtime_checkable
class FlowSource(FlowSnapshot, Protocol):
    """A dataplane's flows as the active node streams them (Dataplane.flow_source()).

    run(push) learns changes until cancelled and reports each change set with
    push(upserts, deletes) on the event-loop thread. XDP: ring-buffer creation events
    plus scans of its flow map; nft: conntrack events plus reconciles; IPVS and the
    in-memory fake: diffs of consecutive dumps (halb.dataplane.dumpscan).
    """

    async def run(self, push: Push) -> None: ...

    def stats(self) -> object:
        """Counters for the status document: a dataclass or a mapping of scalars; an
        ``entries`` field, when present, is the number of flows the source knows."""
        ...

    def close(self) -> None: ...


class _FlowMethods(Protocol):
    def dump_flows(self) -> list[Flow]: ...

    def install_flows(self, flows: Iterable[Flow]) -> int: ...

    def delete_flows(self, flows: Iterable[Flow]) -> int: ...


class FlowObjectRecords:
    """The record methods of the Dataplane protocol over its Flow methods, for adapters
    without a bulk path (nft, IPVS, the fake). The records module (numpy) loads only
    when a record method is called: IPVS in the VM tier imports ~60x slower."""

    def dump_records(self: _FlowMethods) -> bytes:
        from halb.flows.records import from_flows

        return from_flows(self.dump_flows())

    def install_records(self: _FlowMethods, records: bytes) -> int:
        from halb.flows.records import to_flows

        return self.install_flows(to_flows(records))

    def delete_records(self: _FlowMethods, records: bytes) -> int:
        from halb.flows.records import to_flows

        return self.delete_flows(to_flows(records))
