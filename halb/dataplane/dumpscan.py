"""A flow source for any dataplane: the difference between consecutive dump_flows().

It hashes every Flow on every scan, so it suits small tables only: the in-memory fake
dataplane, and IPVS, whose kernel offers no connection events halb can subscribe to
from userspace (its sync daemon's master multicast is the only change feed; see
halb.dataplane.ipvs.adapter).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from halb.model import Flow

if TYPE_CHECKING:
    from halb.dataplane.base import Push

__all__ = ["DumpScanSource"]


class _Dumps(Protocol):
    def dump_flows(self) -> list[Flow]: ...


class DumpScanSource:
    """halb.dataplane.base.FlowSource over dump_flows(), rescanned every ``interval``."""

    def __init__(self, dataplane: _Dumps, interval: float = 0.05) -> None:
        self._dp = dataplane
        self.interval = interval
        self._flows: set[Flow] = set()
        self._scans = 0

    def snapshot_records(self) -> bytes:
        from halb.flows import records  # numpy: only once a node serves flows

        return records.from_flows(self._dp.dump_flows())

    async def run(self, push: Push) -> None:
        while True:
            cur = set(await asyncio.to_thread(self._dp.dump_flows))
            self._scans += 1
            ups, dels = list(cur - self._flows), list(self._flows - cur)
            self._flows = cur
            # A flow that changed backend is a delete of the old and an upsert of the
            # new: push the deletes first, separately, to keep that order.
            if dels:
                push([], dels)
            if ups:
                push(ups, [])
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._flows), "scans": self._scans, "interval": self.interval}
