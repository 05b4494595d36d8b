"""DumpScanSource: the generic flow source (IPVS, the fake dataplane), driven against
the in-memory dataplane; its pause grows with the cost of a scan."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from halb.dataplane.base import FlowSource
from halb.dataplane.dumpscan import DumpScanSource, scan_pause
from halb.flows import records
from halb.flows.records import FlowBatch
from halb.model import Flow, Protocol
from halb.testing.fake_dataplane import FakeDataplane

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address


def flow(sport: int, backend: str = "10.0.0.21") -> Flow:
    return Flow(Protocol.TCP, ip("192.0.2.7"), sport, ip("10.0.0.100"), 80, ip(backend), 8080)


@pytest.mark.parametrize(
    ("scan", "pause"),
    [
        (0.0, 0.05),  # cheap scans: the configured interval
        (0.001, 0.05),
        (0.02, 0.18),  # 20 ms per scan at 10% of a core: 180 ms between scans
        (0.5, 1.0),  # capped
    ],
)
def test_the_pause_keeps_scans_within_their_cpu_share(scan: float, pause: float) -> None:
    assert scan_pause(scan, 0.05, 1.0, 0.1) == pytest.approx(pause)


def test_the_fake_dataplane_offers_it_and_it_pushes_changes_deletes_first() -> None:
    dp = FakeDataplane()
    dp.install_flows([flow(1), flow(2)])
    source = dp.flow_source()
    assert isinstance(source, DumpScanSource) and isinstance(source, FlowSource)
    source.interval = 0.01
    pushes: list[tuple[list[Flow], list[Flow]]] = []

    def push(ups: FlowBatch, dels: FlowBatch) -> None:
        assert isinstance(ups, list) and isinstance(dels, list)
        pushes.append((sorted(ups), sorted(dels)))

    async def main() -> None:
        task = asyncio.create_task(source.run(push))
        try:
            async with asyncio.timeout(5):
                while len(pushes) < 1:
                    await asyncio.sleep(0.005)
                dp.delete_flows([flow(1)])
                dp.install_flows([flow(2, backend="10.0.0.22"), flow(3)])
                dp.delete_flows([flow(2)])
                while len(pushes) < 3:
                    await asyncio.sleep(0.005)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert pushes[0] == ([flow(1), flow(2)], [])
    assert pushes[1] == ([], [flow(1), flow(2)])
    assert pushes[2] == ([flow(2, backend="10.0.0.22"), flow(3)], [])
    assert records.to_flows(source.snapshot_records()) == [flow(2, "10.0.0.22"), flow(3)]
    assert source.stats()["entries"] == 2 and source.stats()["scans"] >= 2
