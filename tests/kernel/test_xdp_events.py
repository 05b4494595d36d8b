"""Flow-creation events: the program writes each flow it records to the flow_events
ring buffer while a flow source is armed, and XdpFlowSource pushes them as upserts
without waiting for a scan; scans still bring deletions, and a full ring (lost events)
makes the source rescan at once. Packets go through the real program
(BPF_PROG_TEST_RUN) on a real XdpDataplane."""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest

from halb.dataplane.xdp.adapter import PROGRAM, XdpDataplane
from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.flowsource import XdpFlowSource
from halb.dataplane.xdp.layout import CFG_F_FLOW_EVENTS, FlowEvent, FlowValue
from halb.dataplane.xdp.ringbuf import RingBuffer
from halb.flows.records import to_flows
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey
from halb.testing.packets import ETH_P_IP, XDP_TX, eth, ipv4, tcp

pytestmark = pytest.mark.kernel

VIP = ip_address("10.79.0.100")
BACKENDS = tuple(
    Backend(ip_address(f"10.79.0.{10 + i}"), 80, mac=f"02:79:00:00:00:{10 + i:02x}")
    for i in range(4)
)
WEB = ServiceKey(VIP, 80, Protocol.TCP)
SMALL_RING = 4096  # bytes: 64 records of 64 (8 header + 56)


def frame(i: int) -> bytes:
    src = IPv4Address(0x0A4F0900 + i // 50000)
    sport = 1024 + i % 50000
    return eth(
        "02:79:00:00:00:01",
        "02:79:00:00:00:02",
        ETH_P_IP,
        ipv4(src, VIP, 6, tcp(src, VIP, sport, 80)),
    )


def client(i: int) -> tuple[IPv4Address, int]:
    return IPv4Address(0x0A4F0900 + i // 50000), 1024 + i % 50000


def send(dp: XdpDataplane, ids: range) -> None:
    """New flows, through the program as packets would make them."""
    for i in ids:
        assert dp.bpf.test_run(PROGRAM, frame(i)).retval == XDP_TX


def clients(flows: list[Flow]) -> list[tuple[IPv4Address, int]]:
    return sorted((IPv4Address(int(f.src)), f.sport) for f in flows)


@pytest.fixture
def make_dp() -> Iterator[Callable[..., XdpDataplane]]:
    made: list[tuple[XdpDataplane, str, Path]] = []

    def make(object_path: Path | None = None) -> XdpDataplane:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        ns = f"halbt-fev-{tag}"
        pin_dir = Path("/run/halb/bpffs") / f"halbt-fev-{tag}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "add", "veth0", "type", "veth", "peer",
                            "name", "veth1"], check=True)  # fmt: skip
            subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "up"], check=True)
            d = XdpDataplane(
                "veth0", ip_address("10.79.0.1"), "generic", pin_dir, ns, object_path=object_path
            )
        except BaseException:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            raise
        made.append((d, ns, pin_dir))
        d.apply([Service(WEB, Scheduler.MAGLEV, Forwarding.DSR, BACKENDS, ring_size=1009)])
        return d

    try:
        yield make
    finally:
        for d, ns, pin_dir in made:
            d.close()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture
def dp(make_dp: Callable[..., XdpDataplane]) -> XdpDataplane:
    return make_dp()


@pytest.fixture
def small_ring_dp(make_dp: Callable[..., XdpDataplane], tmp_path: Path) -> XdpDataplane:
    return make_dp(build_bpf(tmp_path, defines=[f"HALB_FLOW_EVENTS_BYTES={SMALL_RING}"]))


def test_a_miss_writes_its_map_entry_as_an_event_only_while_armed(dp: XdpDataplane) -> None:
    fd = dp.flow_events_fd()
    size = ctypes.sizeof(FlowEvent)
    ring = RingBuffer(fd, size)
    try:
        send(dp, range(1))  # disarmed (a standby's program): nothing written, nothing lost
        assert ring.consume() == b""
        dp.set_flow_events(True)
        assert dp.map("config").lookup(0).flags & CFG_F_FLOW_EVENTS
        send(dp, range(1, 4))
        send(dp, range(1, 4))  # hits: no event
        raw = ring.consume()
        assert len(raw) == 3 * size == 3 * 56 and ring.malformed == 0
        # Each record is the map's key and value as recorded (the hits since may have
        # moved the stamp on by a tick).
        entries = {bytes(k): v for k, v in dp.map("flows").items()}
        for j in range(3):
            key, raw_value = raw[j * size : j * size + 40], raw[j * size + 40 : (j + 1) * size]
            value = FlowValue.from_buffer_copy(raw_value)
            assert (entries[key].backend_id, entries[key].flags) == (value.backend_id, value.flags)
            assert 0 < value.last_seen <= entries[key].last_seen
        dp.set_flow_events(False)
        send(dp, range(4, 6))
        assert ring.consume() == b""
        assert dp.global_stats()["event_lost"] == 0
    finally:
        ring.close()
        os.close(fd)


def test_arming_is_counted_and_keeps_the_deadline(dp: XdpDataplane) -> None:
    dp.set_deadline(time.monotonic_ns() + 3600 * 10**9)
    deadline = dp.map("config").lookup(0).deadline_ns
    dp.set_flow_events(True)
    dp.set_flow_events(True)
    dp.set_flow_events(False)  # one listener left: still armed
    cfg = dp.map("config").lookup(0)
    assert cfg.flags & CFG_F_FLOW_EVENTS and cfg.deadline_ns == deadline
    dp.set_flow_events(False)
    dp.set_deadline(None)
    cfg = dp.map("config").lookup(0)
    assert not cfg.flags & CFG_F_FLOW_EVENTS and cfg.deadline_ns == 0


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


def run_source(
    src: XdpFlowSource,
    push: Callable[[bytes, bytes], None],
    body: Callable[[], Awaitable[None]],
) -> None:
    """Run the source's loop; after its first scan, body(); then 50 ms more (anything
    pushed twice would show), and cancel it."""

    async def main() -> None:
        task = asyncio.create_task(src.run(push))
        try:
            await _until(lambda: src.stats().scans == 1)
            await body()
            await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_source_pushes_events_without_waiting_for_a_scan(dp: XdpDataplane) -> None:
    src = XdpFlowSource.from_dataplane(dp, interval=60.0)  # no second scan in this test
    pushed: list[tuple[float, bytes, bytes]] = []

    async def body() -> None:
        t0 = time.monotonic()
        send(dp, range(5))
        await _until(lambda: sum(len(to_flows(u)) for _, u, _ in pushed) >= 5)
        assert pushed[-1][0] - t0 < 0.5  # milliseconds in practice; the scan is a minute away

    try:
        run_source(src, lambda u, d: pushed.append((time.monotonic(), u, d)), body)
        ups = [f for _, u, _ in pushed for f in to_flows(u)]
        assert clients(ups) == [client(i) for i in range(5)]
        assert all(not d for _, _, d in pushed)
        assert set(ups) == set(dp.dump_flows())  # with the backends the program chose
        st = src.stats()
        assert st.scans == 1 and st.events == 5 and st.upserts == 5
        # Released when the source stops: the program goes back to writing no events.
        assert not dp.map("config").lookup(0).flags & CFG_F_FLOW_EVENTS
    finally:
        src.close()


def test_a_scan_does_not_resend_what_events_pushed_and_brings_deletes(dp: XdpDataplane) -> None:
    src = XdpFlowSource.from_dataplane(dp)
    dp.set_flow_events(True)  # as run() arms it; driven step by step here
    try:
        src.accept(src.scan())
        assert src.open_events()
        send(dp, range(10))
        ev = src.take_events()
        assert clients(to_flows(ev)) == [client(i) for i in range(10)]
        # The scan compares with what the events told: nothing new.
        d = src.accept(src.scan())
        assert d.upserts == b"" and d.deletes == b""
        # A scan that read the map before an event was pushed (the event came while
        # the scan ran in its thread) leaves that event's flow out as well.
        send(dp, range(10, 12))
        cut = len(src._pushed)
        d = src.scan(cut)
        ev = src.take_events()
        assert clients(to_flows(ev)) == [client(10), client(11)]
        assert clients(to_flows(d.upserts)) == [client(10), client(11)]  # seen by the scan
        d = src.accept(d, cut)
        assert d.upserts == b""  # ... but already pushed by the event
        assert src.accept(src.scan()).upserts == b""
        # Deletions (an ended flow, an eviction) come from scans.
        gone = [f for f in dp.dump_flows() if (IPv4Address(int(f.src)), f.sport) == client(3)]
        dp.delete_flows(gone)
        d = src.accept(src.scan())
        assert d.upserts == b"" and to_flows(d.deletes) == gone
    finally:
        dp.set_flow_events(False)
        src.close()


def test_lost_events_trigger_an_immediate_rescan(small_ring_dp: XdpDataplane) -> None:
    dp = small_ring_dp
    src = XdpFlowSource.from_dataplane(dp, interval=60.0, max_interval=60.0)
    pushed: list[bytes] = []
    n = 300  # four times what the ring holds, sent while the loop cannot consume

    async def body() -> None:
        send(dp, range(n))
        await _until(lambda: sum(len(to_flows(u)) for u in pushed) >= n)

    try:
        run_source(src, lambda u, d: pushed.append(u), body)
        ups = [f for u in pushed for f in to_flows(u)]
        assert clients(ups) == [client(i) for i in range(n)]  # each flow once
        st = src.stats()
        lost = dp.global_stats()["event_lost"]
        assert lost > 0 and st.event_lost == lost
        assert st.events + lost == n  # the ring took some, the rest the program counted
        assert st.rescans == 1 and st.scans == 2  # the second scan at once, not in 60 s
    finally:
        src.close()
