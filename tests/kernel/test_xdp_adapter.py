"""XdpDataplane for real: attached to a veth in a network namespace made for the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest

from halb.dataplane.base import Dataplane
from halb.dataplane.xdp.adapter import XdpDataplane, deadline_granularity_ns, net16
from halb.dataplane.xdp.clock import Clock
from halb.dataplane.xdp.layout import addr_from_words
from halb.dataplane.xdp.loader import xdp_prog_id
from halb.dataplane.xdp.neigh import interface_mac
from halb.lb.maglev import build_table, changed_slots
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey
from halb.testing.packets import (
    ETH_P_IP,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    arp_request,
    eth,
    ipv4,
    neighbour_solicitation,
    tcp,
)

pytestmark = pytest.mark.kernel

VIP = ip_address("10.77.0.100")
CLIENT = "10.77.9.9"
B_LIVE = Backend(ip_address("10.77.0.2"), 80)  # MAC from the neighbour table
B2 = Backend(ip_address("10.77.0.3"), 80, mac="02:77:00:00:00:03")
B3 = Backend(ip_address("10.77.0.4"), 80, mac="02:77:00:00:00:04")
B4 = Backend(ip_address("10.77.0.5"), 80, weight=2, mac="02:77:00:00:00:05")
WEB = ServiceKey(VIP, 80, Protocol.TCP)
DNS = ServiceKey(VIP, 53, Protocol.UDP)


def svc(key: ServiceKey, *backends: Backend, ring: int = 1009) -> Service:
    return Service(key, Scheduler.MAGLEV, Forwarding.DSR, tuple(backends), ring_size=ring)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Topo:
    lb: str
    be: str
    pin_dir: Path
    be_mac: str


@pytest.fixture
def topo() -> Iterator[Topo]:
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    lb, be = f"halbt-xdp-{tag}-lb", f"halbt-xdp-{tag}-be"
    pin_dir = Path("/run/halb/bpffs") / f"halbt-xdp-{tag}"
    try:
        ip("netns", "add", lb)
        ip("netns", "add", be)
        ip("-n", lb, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", be)
        ip("-n", lb, "addr", "add", "10.77.0.1/24", "dev", "veth0")
        ip("-n", be, "addr", "add", "10.77.0.2/24", "dev", "veth1")
        ip("-n", lb, "link", "set", "veth0", "up")
        ip("-n", be, "link", "set", "veth1", "up")
        yield Topo(lb, be, pin_dir, interface_mac("veth1", be))
    finally:
        for ns in (lb, be):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if pin_dir.exists():
            shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture
def dp(topo: Topo) -> Iterator[XdpDataplane]:
    d = XdpDataplane("veth0", ip_address("10.77.0.1"), "native", topo.pin_dir, topo.lb)
    try:
        yield d
    finally:
        d.close()


def frame(sport: int, dport: int = 80) -> bytes:
    return eth(
        "02:00:00:00:00:01",
        "02:00:00:00:00:02",
        ETH_P_IP,
        ipv4(CLIENT, str(VIP), 6, tcp(CLIENT, str(VIP), sport, dport)),
    )


def run(d: XdpDataplane, data: bytes, repeat: int = 1) -> tuple[int, str]:
    res = d.bpf.test_run("halb_balancer", data, repeat)
    return res.retval, res.data[:6].hex(":")


def test_is_a_dataplane_attached_and_pinned(topo: Topo, dp: XdpDataplane) -> None:
    assert isinstance(dp, Dataplane)
    assert dp.mode == "native"
    # What the agent's metrics read: the program's event counters, no conntrack table.
    ks = dp.kernel_stats()
    assert ks.conntrack is None and set(ks.events) == set(dp.global_stats())
    assert {"flow_expired", "frag_drop", "icmp_relayed"} <= set(ks.events)
    assert xdp_prog_id("veth0", topo.lb) != 0
    assert {"services", "ring", "backends", "flows", "config"} <= {
        p.name for p in topo.pin_dir.iterdir()
    }


def test_apply_twice_second_writes_nothing(topo: Topo, dp: XdpDataplane) -> None:
    services = [svc(WEB, B_LIVE, B2, B3), svc(DNS, B2, B3, ring=65537)]
    first = dp.apply(services)
    assert set(first.added) == {WEB, DNS}
    # 2 services + 5 backend rows + 5 counter resets + 2 stats resets + every ring slot
    # + the one VIP address both services share and its VIP filter entry.
    assert first.writes == 2 + 5 + 5 + 2 + 1009 + 65537 + 2
    second = dp.apply(services)
    assert (second.added, second.removed, second.updated, second.writes) == ((), (), (), 0)
    # The backend without a configured MAC was resolved through the neighbour table.
    ring = {run(dp, frame(sport))[1] for sport in range(1000, 1200)}
    assert ring == {topo.be_mac, B2.mac, B3.mac}


def test_adding_a_backend_writes_only_changed_slots(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2, B3)])
    before = build_table({str(B2): 1, str(B3): 1}, 1009).mapped(str)
    after = build_table({str(B2): 1, str(B3): 1, str(B4): 2}, 1009).mapped(str)
    changed = len(changed_slots(before, after))
    result = dp.apply([svc(WEB, B2, B3, B4)])
    assert result.updated == (WEB,)
    assert result.writes == changed + 2  # the slots, the backend row, its counter reset
    assert 0 < changed < 1009
    macs = [run(dp, frame(sport))[1] for sport in range(2000, 2400)]
    share = macs.count(B4.mac or "") / len(macs)
    assert 0.35 < share < 0.65, share  # weight 2 of 4


def test_removing_a_service_passes_its_traffic(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2)])
    assert run(dp, frame(3000))[0] == XDP_TX
    result = dp.apply([])
    assert result.removed == (WEB,)
    assert run(dp, frame(3000))[0] == XDP_PASS


def test_install_dump_delete_flows(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2, B3)])
    ours = [
        Flow(Protocol.TCP, ip_address(CLIENT), 5000 + i, VIP, 80, b.address, b.port)
        for i, b in enumerate((B2, B3, B2))
    ]
    foreign = Flow(Protocol.TCP, ip_address(CLIENT), 5999, VIP, 80, ip_address("10.9.9.9"), 80)
    assert dp.install_flows([*ours, foreign]) == 3
    assert dp.dump_flows() == sorted(ours)
    # The program honours an installed flow whatever the ring says.
    for f in ours:
        backend = B2 if f.backend == B2.address else B3
        assert run(dp, frame(f.sport)) == (XDP_TX, backend.mac)
    assert dp.delete_flows(ours[:2]) == 2
    assert dp.delete_flows(ours[:1]) == 0
    assert dp.dump_flows() == [ours[2]]
    # A packet of a new connection is recorded as a flow the adapter can dump.
    run(dp, frame(6000))
    assert any(f.sport == 6000 and f.vport == 80 for f in dp.dump_flows())
    # Removing a backend forgets its flows.
    dp.apply([svc(WEB, B3)])
    assert all(f.backend == B3.address for f in dp.dump_flows())


def test_counters(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2)])
    data = frame(7000)
    run(dp, data, repeat=4)
    counters = dp.counters()
    assert counters.per_service[WEB].packets == 4
    assert counters.per_service[WEB].bytes == 4 * len(data)
    assert counters.per_backend[(WEB, B2)].packets == 4


def test_set_deadline(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2)])
    dp.set_deadline(time.monotonic_ns() + 10_000_000_000)
    assert run(dp, frame(8000))[0] == XDP_TX
    # Well past: the coarse clock may trail by a late tick on a loaded machine.
    dp.set_deadline(time.monotonic_ns() - 50_000_000)
    assert run(dp, frame(8000))[0] == XDP_DROP
    assert dp.global_stats()["deadline_drop"] == 1
    dp.set_deadline(None)
    assert run(dp, frame(8000))[0] == XDP_TX


def test_set_deadline_takes_a_coarse_tick_off(dp: XdpDataplane) -> None:
    # The program reads CLOCK_MONOTONIC_COARSE, up to about a tick behind: the adapter
    # fences two ticks early rather than up to a tick late.
    tick = deadline_granularity_ns()
    assert 1_000 <= tick <= 10_000_000  # 100 Hz .. hrtimer-coarse kernels
    target = time.monotonic_ns() + 5_000_000_000
    dp.set_deadline(target)
    cfg = dp.map("config").lookup(0)
    assert cfg is not None and cfg.deadline_ns == target - 2 * tick
    # The program tests jiffies: the same instant on its clock, rounded down, one more
    # tick off for the pairing of the two clocks.
    assert cfg.deadline_jiffies == Clock.of(cfg).deadline(cfg.deadline_ns)


def test_the_fence_starts_within_ticks_of_the_deadline(dp: XdpDataplane) -> None:
    """Measured against CLOCK_MONOTONIC: VIP traffic forwards until a few ticks before
    the deadline (2 taken off + 1 for the jiffies conversion + the coarse clock's lag)
    and drops from the deadline on."""
    dp.apply([svc(WEB, B2)])
    tick = deadline_granularity_ns()
    target = time.monotonic_ns() + 60 * tick
    dp.set_deadline(target)
    last_forwarded = first_dropped = 0
    while time.monotonic_ns() < target + 4 * tick:
        verdict = run(dp, frame(8100))[0]
        t = time.monotonic_ns()
        if verdict == XDP_TX:
            last_forwarded = t
        elif not first_dropped:
            first_dropped = t
    assert last_forwarded and first_dropped, "forwarded before and dropped after"
    assert target - 5 * tick <= first_dropped <= target + tick
    assert last_forwarded <= target


VIP6 = ip_address("fd77::100")
WEB6 = ServiceKey(VIP6, 80, Protocol.TCP)
B6 = Backend(ip_address("fd77::5"), 80, mac="02:77:00:00:00:06")


def vip_addrs(dp: XdpDataplane) -> dict[str, int]:
    return {
        str(addr_from_words(k.addr, k.family)): int(v.value) for k, v in dp.map("vip_addrs").items()
    }


def vip_filter(dp: XdpDataplane) -> dict[int, int]:
    return {int(k.value): int(v.value) for k, v in dp.map("vip_filter").items() if v.value}


def test_vip_address_maps_follow_the_services(dp: XdpDataplane) -> None:
    # VIP ends in .100 (0x64), VIP6 in ::100 (0x00); OTHER shares VIP's last byte.
    other = ServiceKey(ip_address("10.77.1.100"), 80, Protocol.TCP)
    dp.apply([svc(WEB, B2), svc(DNS, B3), svc(WEB6, B6)])
    assert vip_addrs(dp) == {str(VIP): 2, str(VIP6): 1}
    assert vip_filter(dp) == {0x64: 1, 0x00: 1}
    dp.apply([svc(WEB, B2), svc(WEB6, B6), svc(other, B3)])
    assert vip_addrs(dp) == {str(VIP): 1, str(VIP6): 1, "10.77.1.100": 1}
    assert vip_filter(dp) == {0x64: 2, 0x00: 1}
    again = dp.apply([svc(WEB, B2), svc(WEB6, B6), svc(other, B3)])
    assert again.writes == 0
    dp.apply([svc(DNS, B3)])
    assert vip_addrs(dp) == {str(VIP): 1}
    assert vip_filter(dp) == {0x64: 1}
    assert run(dp, frame(8200, dport=53))[0] == XDP_PASS  # TCP to the UDP service's port
    dp.apply([])
    assert (vip_addrs(dp), vip_filter(dp)) == ({}, {})


def test_vip_filter_passes_other_addresses_and_admits_new_vips(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2)])
    assert run(dp, frame(8300)) == (XDP_TX, B2.mac)
    # Replacing the service by one on another VIP: the new VIP is balanced at once,
    # the old one (now filtered out) passes to the stack.
    moved = ServiceKey(ip_address("10.77.0.101"), 80, Protocol.TCP)
    dp.apply([svc(moved, B3)])
    to_moved = eth(
        "02:00:00:00:00:01",
        "02:00:00:00:00:02",
        ETH_P_IP,
        ipv4(CLIENT, "10.77.0.101", 6, tcp(CLIENT, "10.77.0.101", 8301, 80)),
    )
    assert run(dp, to_moved) == (XDP_TX, B3.mac)
    assert run(dp, frame(8302))[0] == XDP_PASS


def test_deadline_fences_address_resolution_for_vips_only(dp: XdpDataplane) -> None:
    dp.apply([svc(WEB, B2), svc(WEB6, B6)])
    arp_vip = arp_request("02:00:00:00:00:02", CLIENT, str(VIP))
    arp_other = arp_request("02:00:00:00:00:02", CLIENT, "10.77.0.1")
    ns_vip = neighbour_solicitation("02:00:00:00:00:02", "fe80::2", str(VIP6))
    dp.set_deadline(time.monotonic_ns() + 10_000_000_000)
    assert [run(dp, f)[0] for f in (arp_vip, arp_other, ns_vip)] == [XDP_PASS] * 3
    dp.set_deadline(time.monotonic_ns() - 1_000_000_000)
    assert [run(dp, f)[0] for f in (arp_vip, arp_other, ns_vip)] == [XDP_DROP, XDP_PASS, XDP_DROP]
    stats = dp.global_stats()
    assert (stats["arp_fence_drop"], stats["ns_fence_drop"]) == (1, 1)
    # A VIP whose services are gone is no longer fenced; disarming lifts the fence.
    dp.apply([svc(WEB6, B6)])
    assert run(dp, arp_vip)[0] == XDP_PASS
    assert run(dp, ns_vip)[0] == XDP_DROP
    dp.set_deadline(None)
    assert run(dp, ns_vip)[0] == XDP_PASS


def arping(ns: str, target: str) -> bool:
    """Whether ``target`` answers an ARP request sent from namespace ``ns`` (iputils)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "arping", "-c", "1", "-w", "2", "-I", "veth1", target],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


@pytest.mark.skipif(shutil.which("arping") is None, reason="needs arping (iputils)")
def test_fenced_node_stops_answering_arp_for_its_vip(topo: Topo, dp: XdpDataplane) -> None:
    # End to end: the kernel of the balancer's namespace holds the VIP and answers ARP
    # for it, until the program drops the requests past the deadline.
    ip("-n", topo.lb, "addr", "add", f"{VIP}/32", "dev", "veth0")
    dp.apply([svc(WEB, B2)])
    dp.set_deadline(time.monotonic_ns() + 10_000_000_000)
    assert arping(topo.be, str(VIP))
    dp.set_deadline(time.monotonic_ns() - 1_000_000_000)
    assert not arping(topo.be, str(VIP))
    assert dp.global_stats()["arp_fence_drop"] >= 1
    assert arping(topo.be, "10.77.0.1"), "the node's own address still answers"
    dp.set_deadline(None)
    assert arping(topo.be, str(VIP))


def test_close_leaves_nothing(topo: Topo) -> None:
    d = XdpDataplane("veth0", ip_address("10.77.0.1"), "generic", topo.pin_dir, topo.lb)
    assert d.mode == "generic"
    d.apply([svc(WEB, B2)])
    assert xdp_prog_id("veth0", topo.lb) != 0
    d.close()
    d.close()  # idempotent
    assert xdp_prog_id("veth0", topo.lb) == 0
    assert not topo.pin_dir.exists()


def test_ports_are_stored_in_network_order() -> None:
    assert net16(80).to_bytes(2, "little") == (80).to_bytes(2, "big")


def test_cli_show_reads_the_pinned_maps(topo: Topo, dp: XdpDataplane) -> None:
    from click.testing import CliRunner

    from halb.cli.main import cli

    dp.apply([svc(WEB, B2, B4)])
    run(dp, frame(9000), repeat=2)
    result = CliRunner().invoke(
        cli, ["dataplane", "show", "--pin-dir", str(topo.pin_dir), "--output", "json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (service,) = report["services"]
    assert service["service"] == "10.77.0.100:80/tcp"
    assert service["packets"] == 2
    shares = {b["backend"]: b["share_pct"] for b in service["backends"]}
    assert set(shares) == {str(B2), str(B4)}
    assert sum(b["slots"] for b in service["backends"]) == 1009
    assert abs(shares[str(B4)] - 200 / 3) < 1  # weight 2 of 3
    assert report["flows"] == 1
    assert report["vip_addrs"] == [str(VIP)]
    table = CliRunner().invoke(cli, ["dataplane", "show", "--pin-dir", str(topo.pin_dir)])
    assert table.exit_code == 0
    assert "10.77.0.5:80" in table.output


def test_show_reads_each_ring_exactly(topo: Topo, dp: XdpDataplane) -> None:
    """Every slot of a service's ring region belongs to that service (the batch read
    starts at the region's first slot, not one past it)."""
    from halb.dataplane.xdp.inspect import read_pinned
    from halb.lb.maglev import build_table

    dp.apply([svc(WEB, B2, B3), svc(DNS, B4, ring=1009)])
    report = read_pinned(topo.pin_dir)
    by_service = {s["service"]: s for s in report["services"]}
    web = by_service["10.77.0.100:80/tcp"]
    dns = by_service["10.77.0.100:53/udp"]
    assert {b["backend"] for b in web["backends"]} == {str(B2), str(B3)}
    assert {b["backend"] for b in dns["backends"]} == {str(B4)}
    table = build_table({str(B2): 1, str(B3): 1}, 1009)
    counts = {str(B2): 0, str(B3): 0}
    for name in table.mapped(lambda n: n):
        counts[name] += 1
    assert {b["backend"]: b["slots"] for b in web["backends"]} == counts
