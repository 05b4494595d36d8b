"""A flow source for any dataplane: the difference between consecutive dump_flows().

It hashes every Flow on every scan, so it suits small tables only: the in-memory fake
dataplane, and IPVS, whose kernel offers no connection events halb can subscribe to
from userspace (its sync daemon's master multicast is the only change feed; see
halb.dataplane.ipvs.adapter).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from halb.model import Flow

if TYPE_CHECKING:
    from halb.dataplane.base import Push

__all__ = ["DumpScanSource", "scan_pause"]


class _Dumps(Protocol):
    def dump_flows(self) -> list[Flow]: ...


def scan_pause(
    scan_seconds: float, interval: float, max_interval: float, cpu_share: float
) -> float:
    """The pause after a scan that took ``scan_seconds``: at least ``interval``, long
    enough that scanning takes at most ``cpu_share`` of one core, at most
    ``max_interval``."""
    return min(max_interval, max(interval, scan_seconds / cpu_share - scan_seconds))


class DumpScanSource:
    """halb.dataplane.base.FlowSource over dump_flows(), rescanned every ``interval``
    while scans are cheap; a large table is rescanned less often (scan_pause)."""

    def __init__(
        self,
        dataplane: _Dumps,
        interval: float = 0.05,
        *,
        max_interval: float = 1.0,
        cpu_share: float = 0.1,
    ) -> None:
        self._dp = dataplane
        self.interval = interval
        self.max_interval = max_interval
        self.cpu_share = cpu_share
        self._pause = interval
        self._last_scan = 0.0
        self._flows: set[Flow] = set()
        self._scans = 0

    def snapshot_records(self) -> bytes:
        from halb.flows import records  # numpy: only once a node serves flows

        return records.from_flows(self._dp.dump_flows())

    async def run(self, push: Push) -> None:
        while True:
            t0 = time.monotonic()
            cur = set(await asyncio.to_thread(self._dp.dump_flows))
            self._last_scan = time.monotonic() - t0
            self._pause = scan_pause(
                self._last_scan, self.interval, self.max_interval, self.cpu_share
            )
            self._scans += 1
            ups, dels = list(cur - self._flows), list(self._flows - cur)
            self._flows = cur
            # A flow that changed backend is a delete of the old and an upsert of the
            # new: push the deletes first, separately, to keep that order.
            if dels:
                push([], dels)
            if ups:
                push(ups, [])
            await asyncio.sleep(self._pause)

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._flows),
            "scans": self._scans,
            "interval": self._pause,
            "last_scan_seconds": self._last_scan,
        }
