"""An in-memory Dataplane for unit-testing planning, HA and sync logic without a kernel.

Never a substitute for the integration tests of the real adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from halb.dataplane.base import ApplyResult, Counters, FlowObjectRecords, KernelStats
from halb.dataplane.dumpscan import DumpScanSource
from halb.model import Flow, Service, ServiceKey

__all__ = ["FakeDataplane"]


class FakeDataplane(FlowObjectRecords):
    name = "fake"

    def __init__(self) -> None:
        self.services: dict[ServiceKey, Service] = {}
        self.flows: set[Flow] = set()
        self.deadline_ns: int | None = None
        self.closed = False
        self.applies = 0

    def apply(self, services: Sequence[Service]) -> ApplyResult:
        self.applies += 1
        want = {s.key: s for s in services}
        added = tuple(k for k in want if k not in self.services)
        removed = tuple(k for k in self.services if k not in want)
        updated = tuple(k for k in want if k in self.services and self.services[k] != want[k])
        self.services = want
        return ApplyResult(added, removed, updated, len(added) + len(removed) + len(updated))

    def dump_flows(self) -> list[Flow]:
        return sorted(self.flows)

    def install_flows(self, flows: Iterable[Flow]) -> int:
        n = 0
        for f in flows:
            self.flows.add(f)
            n += 1
        return n

    def delete_flows(self, flows: Iterable[Flow]) -> int:
        n = 0
        for f in flows:
            if f in self.flows:
                self.flows.discard(f)
                n += 1
        return n

    def counters(self) -> Counters:
        return Counters()

    def kernel_stats(self) -> KernelStats:
        return KernelStats()

    def flow_source(self) -> DumpScanSource:
        return DumpScanSource(self)

    def set_deadline(self, monotonic_ns: int | None) -> None:
        self.deadline_ns = monotonic_ns

    def close(self) -> None:
        self.services.clear()
        self.flows.clear()
        self.closed = True
