"""Packet-in / packet-out fixtures: the real balancer program under BPF_PROG_TEST_RUN.

Each case: a description, an input frame, the expected verdict and the expected output
frame. Maps are written directly (not through the adapter) so each case controls exactly
which backend a service's ring holds.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest

from halb.dataplane.xdp import expiry
from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.clock import calibrate
from halb.dataplane.xdp.layout import (
    BACKEND_F_TUNNEL,
    BACKEND_F_VALID,
    FAMILY_V4,
    FAMILY_V6,
    FLOW_F_CLOSING,
    NO_BACKEND,
    SVC_F_TUNNEL,
    BackendInfo,
    FlowValue,
    LbConfig,
    ServiceInfo,
    VipAddr,
    VipKey,
    addr_to_words,
    mac_to_bytes,
)
from halb.dataplane.xdp.loader import BpfObject
from halb.model import FlowTimeouts, IPAddress
from halb.testing.packets import (
    ETH_P_IP,
    ETH_P_IPV6,
    TCP_ACK,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    arp_request,
    eth,
    flow_hash,
    icmp_echo,
    icmp_too_big,
    ipv4,
    ipv6,
    neighbour_solicitation,
    tcp,
    udp,
)

pytestmark = pytest.mark.kernel

PROG = "halb_balancer"
RING = 7
LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
MACS = {1: "02:00:00:00:01:01", 2: "02:00:00:00:01:02", 3: "02:00:00:00:01:03"}
CLIENT4, CLIENT6 = "192.0.2.7", "2001:db8::7"
VIP4, VIP6 = "10.0.0.100", "fd00::100"
LOCAL4, LOCAL6 = "10.1.0.1", "fd01::1"

# backend id -> (address, MAC of the next hop)
BACKENDS = {
    0: ("10.0.0.21", MACS[1]),
    1: ("10.0.0.22", MACS[2]),
    2: ("fd00::21", MACS[1]),
    3: ("10.2.0.31", MACS[3]),
    4: ("fd02::31", MACS[3]),
    5: ("10.2.0.32", MACS[3]),
    6: ("10.0.0.23", MACS[3]),
}
# (vip, port, proto) -> (service index, tunnel?, backend id in every ring slot)
SERVICES = {
    (VIP4, 80, 6): (0, False, 0),
    (VIP4, 53, 17): (1, False, 1),
    (VIP6, 80, 6): (2, False, 2),
    (VIP4, 443, 6): (3, True, 3),
    (VIP6, 443, 6): (4, True, 4),
    (VIP6, 8443, 6): (5, True, 5),
    (VIP4, 81, 6): (6, False, NO_BACKEND),
}
# backend id -> (its service's index, tunnel?): backend rows name their service, so a
# flow hit needs no services lookup. Backend 6 replaces backend 0 in ring-change cases.
OWNER = {bid: (index, tunnel) for index, tunnel, bid in SERVICES.values() if bid != NO_BACKEND}
OWNER[6] = OWNER[0]


def family(addr: IPAddress) -> int:
    return FAMILY_V4 if addr.version == 4 else FAMILY_V6


def vip_key(vip: str, port: int, proto: int) -> VipKey:
    a = ip_address(vip)
    return VipKey(addr_to_words(a), _net16(port), proto, family(a))


def _net16(port: int) -> int:
    """A port as the u16 the program compares: network byte order read natively."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def fill_ring(obj: BpfObject, index: int, backend_id: int) -> None:
    stride = obj.maps["ring"].max_entries // obj.maps["stats_service"].max_entries
    keys = [index * stride + s for s in range(RING)]
    obj.maps["ring"].update_batch(keys, [backend_id] * RING)


def set_deadline(obj: BpfObject, deadline_ns: int) -> None:
    """Raw: the program compares jiffies, which move with CLOCK_MONOTONIC_COARSE (up to
    a tick behind), so past / future offsets here are far larger than a tick."""
    cfg = obj.maps["config"].lookup(0)
    assert cfg is not None
    cfg.deadline_ns = deadline_ns
    cfg.deadline_jiffies = calibrate(obj).deadline(deadline_ns) if deadline_ns else 0
    obj.maps["config"].update(0, cfg)


def set_timeouts(obj: BpfObject, timeouts: FlowTimeouts | None) -> None:
    cfg = obj.maps["config"].lookup(0)
    assert cfg is not None
    expiry.set_timeouts(cfg, timeouts)
    obj.maps["config"].update(0, cfg)


def load(path: Path) -> BpfObject:
    """An object with this module's config, backends, services, rings and VIPs."""
    o = BpfObject(path)
    try:
        cfg = LbConfig(
            deadline_ns=0,
            local_v4=addr_to_words(IPv4Address(LOCAL4))[0],
            local_v6=addr_to_words(IPv6Address(LOCAL6)),
            local_mac=tuple(mac_to_bytes(LB_MAC)),
        )
        calibrate(o).store(cfg)
        o.maps["config"].update(0, cfg)
        for bid, (addr, bmac) in BACKENDS.items():
            a = ip_address(addr)
            index, tunnel = OWNER[bid]
            info = BackendInfo(
                addr=addr_to_words(a),
                mac=tuple(mac_to_bytes(bmac)),
                port=80,
                family=family(a),
                flags=BACKEND_F_VALID | (BACKEND_F_TUNNEL if tunnel else 0),
                service=index,
            )
            o.maps["backends"].update(bid, info)
        for (vip, port, proto), (index, tunnel, bid) in SERVICES.items():
            sinfo = ServiceInfo(index=index, ring_size=RING, flags=SVC_F_TUNNEL if tunnel else 0)
            o.maps["services"].update(vip_key(vip, port, proto), sinfo)
            fill_ring(o, index, bid)
        for vip in (VIP4, VIP6):
            a = ip_address(vip)
            o.maps["vip_addrs"].update(VipAddr(addr_to_words(a), family(a)), 1)
            o.maps["vip_filter"].update(a.packed[-1], 1)
    except BaseException:
        o.close()
        raise
    return o


@pytest.fixture(scope="module")
def obj() -> Iterator[BpfObject]:
    o = load(build_bpf())
    try:
        yield o
    finally:
        o.close()


@pytest.fixture(autouse=True)
def fresh_state(obj: BpfObject) -> None:
    """Every case starts with an empty flow table, a disarmed deadline, pristine rings."""
    flows = obj.maps["flows"]
    flows.delete_batch([k for k, _ in flows.items()])
    set_deadline(obj, 0)
    set_timeouts(obj, None)
    for index, _, bid in SERVICES.values():
        fill_ring(obj, index, bid)


# --- frames ---------------------------------------------------------------------------------


def v4_tcp(dst: str = VIP4, dport: int = 80, sport: int = 40000, flags: int = 0x02) -> bytes:
    return eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        ipv4(CLIENT4, dst, 6, tcp(CLIENT4, dst, sport, dport, flags=flags, payload=b"hello")),
    )


def v4_udp(dport: int = 53) -> bytes:
    return eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        ipv4(CLIENT4, VIP4, 17, udp(CLIENT4, VIP4, 5353, dport, b"query")),
    )


def v6_tcp(dport: int = 80, sport: int = 40000) -> bytes:
    return eth(
        LB_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(CLIENT6, VIP6, 6, tcp(CLIENT6, VIP6, sport, dport))
    )


def dsr(frame: bytes, backend_mac: str) -> bytes:
    """What dsr makes of a frame: new destination and source MAC, nothing else."""
    return (
        bytes.fromhex(backend_mac.replace(":", ""))
        + bytes.fromhex(LB_MAC.replace(":", ""))
        + frame[12:]
    )


def ipip4(frame: bytes, backend: str) -> bytes:
    inner = frame[14:]
    proto = 4 if frame[12:14] == b"\x08\x00" else 41
    tos = inner[1] if proto == 4 else 0
    outer = ipv4(LOCAL4, backend, proto, inner, ttl=64, ident=0, flags_frag=0x4000, tos=tos)
    return eth(MACS[3], LB_MAC, ETH_P_IP, outer)


def ipip6(frame: bytes, backend: str, label: int) -> bytes:
    inner = frame[14:]
    proto = 4 if frame[12:14] == b"\x08\x00" else 41
    return eth(MACS[3], LB_MAC, ETH_P_IPV6, ipv6(LOCAL6, backend, proto, inner, flow_label=label))


def label_of(src: str, dst: str, sport: int, dport: int) -> int:
    return flow_hash(ip_address(src), ip_address(dst), sport, dport, 6) & 0xFFFFF


@dataclass(frozen=True)
class Case:
    description: str
    frame: bytes
    verdict: int
    expected: bytes | None  # None: the input frame, untouched


def _frag(flags_frag: int, dst: str = VIP4) -> bytes:
    return eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        ipv4(CLIENT4, dst, 6, tcp(CLIENT4, dst, 40000, 80), flags_frag=flags_frag),
    )


def _raw_v4_header(ihl: int, total: int) -> bytes:
    head = bytes([0x40 | ihl, 0]) + total.to_bytes(2, "big") + b"\0\0\x40\0\x40\x06\0\0"
    return head + IPv4Address(CLIENT4).packed + IPv4Address(VIP4).packed


CASES = [
    Case("dsr tcp v4: MACs rewritten, XDP_TX", v4_tcp(), XDP_TX, dsr(v4_tcp(), MACS[1])),
    Case(
        "dsr tcp v4 mid-flow ack",
        v4_tcp(flags=TCP_ACK),
        XDP_TX,
        dsr(v4_tcp(flags=TCP_ACK), MACS[1]),
    ),
    Case("dsr udp v4", v4_udp(), XDP_TX, dsr(v4_udp(), MACS[2])),
    Case("dsr tcp v6", v6_tcp(), XDP_TX, dsr(v6_tcp(), MACS[1])),
    Case(
        "tunnel v4 in v4 (IPIP, outer checksum)",
        v4_tcp(dport=443),
        XDP_TX,
        ipip4(v4_tcp(dport=443), "10.2.0.31"),
    ),
    Case(
        "tunnel v6 in v6 (flow label = flow hash)",
        v6_tcp(dport=443),
        XDP_TX,
        ipip6(v6_tcp(dport=443), "fd02::31", label_of(CLIENT6, VIP6, 40000, 443)),
    ),
    Case(
        "tunnel v6 in v4 (6in4)", v6_tcp(dport=8443), XDP_TX, ipip4(v6_tcp(dport=8443), "10.2.0.32")
    ),
    Case("non-VIP address passes", v4_tcp(dst="10.0.0.99"), XDP_PASS, None),
    Case(
        "non-VIP address ending like a VIP passes (filter hit, no service)",
        v4_tcp(dst="10.0.1.100"),
        XDP_PASS,
        None,
    ),
    Case("VIP, other port passes", v4_tcp(dport=8080), XDP_PASS, None),
    Case("VIP tcp port, udp passes", v4_udp(dport=80), XDP_PASS, None),
    Case("VIP service without backends drops", v4_tcp(dport=81), XDP_DROP, None),
    Case("first fragment (MF) for a VIP drops", _frag(0x2000), XDP_DROP, None),
    Case("later fragment (offset) for a VIP drops", _frag(0x0010), XDP_DROP, None),
    Case("fragment for another address passes", _frag(0x2000, "10.0.0.99"), XDP_PASS, None),
    Case(
        "fragment for an address ending like a VIP's passes",
        _frag(0x0010, "10.0.1.100"),
        XDP_PASS,
        None,
    ),
    Case(
        "IPv6 fragment header passes",
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            ipv6(
                CLIENT6, VIP6, 44, bytes([6, 0, 0, 1, 0, 0, 0, 1]) + tcp(CLIENT6, VIP6, 40000, 80)
            ),
        ),
        XDP_PASS,
        None,
    ),
    Case(
        "ICMP echo to the VIP passes",
        eth(LB_MAC, CLIENT_MAC, ETH_P_IP, ipv4(CLIENT4, VIP4, 1, icmp_echo())),
        XDP_PASS,
        None,
    ),
    Case(
        "ICMPv6 echo to the VIP passes",
        eth(LB_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(CLIENT6, VIP6, 58, icmp_echo(v6=True))),
        XDP_PASS,
        None,
    ),
    Case("ARP passes", eth("ff:ff:ff:ff:ff:ff", CLIENT_MAC, 0x0806, bytes(28)), XDP_PASS, None),
    Case("ethernet header only", eth(LB_MAC, CLIENT_MAC, ETH_P_IP, b""), XDP_PASS, None),
    Case("truncated IPv4 header", v4_tcp()[: 14 + 12], XDP_PASS, None),
    Case("truncated IPv6 header", v6_tcp()[: 14 + 30], XDP_PASS, None),
    Case("ports cut off", v4_tcp()[: 14 + 20 + 3], XDP_PASS, None),
    Case(
        "IPv4 ihl < 5",
        eth(LB_MAC, CLIENT_MAC, ETH_P_IP, _raw_v4_header(4, 40) + bytes(20)),
        XDP_PASS,
        None,
    ),
    Case(
        "IPv4 ihl beyond the frame",
        eth(LB_MAC, CLIENT_MAC, ETH_P_IP, _raw_v4_header(15, 40) + bytes(4)),
        XDP_PASS,
        None,
    ),
    Case(
        "version 6 in an IPv4 ethertype",
        eth(LB_MAC, CLIENT_MAC, ETH_P_IP, ipv6(CLIENT6, VIP6, 6, tcp(CLIENT6, VIP6, 1, 80))),
        XDP_PASS,
        None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_fixture(obj: BpfObject, case: Case) -> None:
    res = obj.test_run(PROG, case.frame)
    assert res.retval == case.verdict
    if case.verdict != XDP_DROP:
        assert res.data.hex() == (case.expected or case.frame).hex()


def test_tunnel_outer_ipv4_checksum_verifies(obj: BpfObject) -> None:
    out = obj.test_run(PROG, v4_tcp(dport=443)).data
    outer = out[14:34]
    assert sum(int.from_bytes(outer[i : i + 2], "big") for i in range(0, 20, 2)) % 0xFFFF == 0
    assert int.from_bytes(outer[2:4], "big") == len(out) - 14


def test_flow_table_keeps_backend_across_ring_change(obj: BpfObject) -> None:
    first = v4_tcp(sport=41000)
    assert obj.test_run(PROG, first).data[:6].hex(":") == MACS[1]
    fill_ring(obj, 0, 6)  # every slot of the service now names backend 6
    again = v4_tcp(sport=41000, flags=TCP_ACK)
    assert obj.test_run(PROG, again).data == dsr(again, MACS[1]), "flow hit keeps backend 0"
    newcomer = v4_tcp(sport=41001)
    assert obj.test_run(PROG, newcomer).data == dsr(newcomer, MACS[3]), "new flow takes the ring"


def test_flow_to_removed_backend_falls_back_to_ring(obj: BpfObject) -> None:
    frame = v4_tcp(sport=42000)
    obj.test_run(PROG, frame)
    fill_ring(obj, 0, 6)
    backends = obj.maps["backends"]
    old = backends.lookup(0)
    assert old is not None
    dead = BackendInfo.from_buffer_copy(old)
    dead.flags = 0
    backends.update(0, dead)
    try:
        assert obj.test_run(PROG, frame).data == dsr(frame, MACS[3])
    finally:
        backends.update(0, old)


@pytest.mark.parametrize(
    ("offset_ns", "verdict"),
    [(-1_000_000_000, XDP_DROP), (10_000_000_000, XDP_TX), (None, XDP_TX)],
    ids=["deadline-past-drops", "deadline-future-forwards", "disarmed-forwards"],
)
def test_dead_man_deadline(obj: BpfObject, offset_ns: int | None, verdict: int) -> None:
    set_deadline(obj, 0 if offset_ns is None else time.monotonic_ns() + offset_ns)
    assert obj.test_run(PROG, v4_tcp()).retval == verdict
    # Non-VIP traffic is never affected by the deadline.
    assert obj.test_run(PROG, v4_tcp(dst="10.0.0.99")).retval == XDP_PASS


def test_counters_count_forwarded_packets_and_bytes(obj: BpfObject) -> None:
    def total(name: str, key: int) -> tuple[int, int]:
        per_cpu = obj.maps[name].lookup(key)
        assert per_cpu is not None
        return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)

    before_s, before_b = total("stats_service", 1), total("stats_backend", 1)
    frame = v4_udp()
    obj.test_run(PROG, frame, repeat=5)
    after_s, after_b = total("stats_service", 1), total("stats_backend", 1)
    assert (after_s[0] - before_s[0], after_s[1] - before_s[1]) == (5, 5 * len(frame))
    assert (after_b[0] - before_b[0], after_b[1] - before_b[1]) == (5, 5 * len(frame))


def test_flow_recorded_with_client_tuple(obj: BpfObject) -> None:
    obj.test_run(PROG, v4_tcp(sport=43210))
    keys = [k for k, _ in obj.maps["flows"].items()]
    assert len(keys) == 1
    key = keys[0]
    assert bytes(key.src)[:4] == IPv4Address(CLIENT4).packed
    assert bytes(key.dst)[:4] == IPv4Address(VIP4).packed
    assert (key.sport, key.dport, key.proto) == (_net16(43210), _net16(80), 6)
    assert ctypes.sizeof(key) == 40


def _global(obj: BpfObject, index: int) -> int:
    per_cpu = obj.maps["stats_global"].lookup(index)
    assert per_cpu is not None
    return sum(c.packets for c in per_cpu)


def test_deadline_drops_a_flow_hit_too(obj: BpfObject) -> None:
    frame = v4_tcp(sport=44000)
    assert obj.test_run(PROG, frame).retval == XDP_TX  # recorded: now a flow hit
    set_deadline(obj, time.monotonic_ns() - 1_000_000_000)
    before = _global(obj, 0)
    assert obj.test_run(PROG, frame).retval == XDP_DROP
    assert _global(obj, 0) == before + 1


ARP_FOR_VIP = arp_request(CLIENT_MAC, "10.0.0.7", VIP4)
NS_FOR_VIP = neighbour_solicitation(CLIENT_MAC, "fe80::7", VIP6)
FENCE_CASES = [
    # (description, frame, dropped past the deadline?, stats_global index)
    ("ARP request for a VIP", ARP_FOR_VIP, True, 3),
    ("ARP request for another address", arp_request(CLIENT_MAC, "10.0.0.7", "10.0.0.99"), False, 3),
    ("ARP reply from a VIP", arp_request(CLIENT_MAC, VIP4, "10.0.0.7", op=2), False, 3),
    ("ARP request, truncated", ARP_FOR_VIP[: 14 + 27], False, 3),
    ("neighbour solicitation for a VIP", NS_FOR_VIP, True, 4),
    (
        "neighbour solicitation for another address",
        neighbour_solicitation(CLIENT_MAC, "fe80::7", "fd00::99"),
        False,
        4,
    ),
    ("neighbour solicitation, truncated", NS_FOR_VIP[: 14 + 40 + 23], False, 4),
]


@pytest.mark.parametrize(
    ("frame", "fenced", "stat"),
    [c[1:] for c in FENCE_CASES],
    ids=[c[0] for c in FENCE_CASES],
)
def test_address_resolution_fence(obj: BpfObject, frame: bytes, fenced: bool, stat: int) -> None:
    # Before the deadline (and when disarmed) every ARP / NS frame passes untouched.
    for deadline in (0, time.monotonic_ns() + 10_000_000_000):
        set_deadline(obj, deadline)
        res = obj.test_run(PROG, frame)
        assert (res.retval, res.data) == (XDP_PASS, frame)
    set_deadline(obj, time.monotonic_ns() - 1_000_000_000)
    before = _global(obj, stat)
    res = obj.test_run(PROG, frame)
    assert res.retval == (XDP_DROP if fenced else XDP_PASS)
    assert _global(obj, stat) == before + (1 if fenced else 0)


def test_fence_follows_the_vip_address_map(obj: BpfObject) -> None:
    set_deadline(obj, time.monotonic_ns() - 1_000_000_000)
    key = VipAddr(addr_to_words(ip_address(VIP4)), FAMILY_V4)
    assert obj.test_run(PROG, ARP_FOR_VIP).retval == XDP_DROP
    obj.maps["vip_addrs"].delete(key)
    try:
        assert obj.test_run(PROG, ARP_FOR_VIP).retval == XDP_PASS
    finally:
        obj.maps["vip_addrs"].update(key, 1)


def test_vip_filter_gates_the_lookups(obj: BpfObject) -> None:
    """A VIP whose last byte is missing from vip_filter is not looked up at all."""
    vf = obj.maps["vip_filter"]
    end = IPv4Address(VIP4).packed[-1]
    assert obj.test_run(PROG, v4_tcp(sport=45000)).retval == XDP_TX
    vf.update(end, 0)
    try:
        assert obj.test_run(PROG, v4_tcp(sport=45000)).retval == XDP_PASS
    finally:
        vf.update(end, 1)


# --- flow expiry (bpf/expiry.h) ---------------------------------------------------------

TIMEOUTS = FlowTimeouts(tcp_established=900.0, tcp_closing=10.0, udp=30.0)
FLOW_EXPIRED = 6  # stats_global index


def only_flow(obj: BpfObject) -> tuple[object, FlowValue]:
    entries = list(obj.maps["flows"].items())
    assert len(entries) == 1
    key, value = entries[0]
    return key, value


def age(obj: BpfObject, seconds: float) -> None:
    """Move the only flow's last-seen stamp ``seconds`` into the past."""
    key, value = only_flow(obj)
    clock = calibrate(obj)
    value.last_seen = clock.now() - clock.ticks(seconds)
    obj.maps["flows"].update(key, value)


@pytest.mark.parametrize(
    ("first", "later", "idle", "expired"),
    [
        (v4_tcp(sport=46000), v4_tcp(sport=46000, flags=TCP_ACK), 5.0, False),
        (v4_tcp(sport=46000), v4_tcp(sport=46000, flags=TCP_ACK), 901.0, True),
        # A FIN puts the flow in the closing phase: 10 s instead of 900.
        (v4_tcp(sport=46000, flags=0x11), v4_tcp(sport=46000, flags=TCP_ACK), 15.0, True),
        (v4_tcp(sport=46000, flags=0x11), v4_tcp(sport=46000, flags=TCP_ACK), 5.0, False),
        (v4_udp(), v4_udp(), 25.0, False),
        (v4_udp(), v4_udp(), 35.0, True),
    ],
    ids=[
        "tcp-fresh-kept",
        "tcp-aged-ring",
        "closing-aged-ring",
        "closing-fresh-kept",
        "udp-fresh-kept",
        "udp-aged-ring",
    ],
)
def test_an_aged_flow_takes_the_ring_and_a_fresh_one_is_kept(
    obj: BpfObject, first: bytes, later: bytes, idle: float, expired: bool
) -> None:
    set_timeouts(obj, TIMEOUTS)
    tcp_flow = first[23] == 6
    index = 0 if tcp_flow else 1
    old_backend, new_backend = (0, 6) if tcp_flow else (1, 0)
    assert obj.test_run(PROG, first).retval == XDP_TX
    _, recorded = only_flow(obj)
    assert recorded.backend_id == old_backend and recorded.last_seen > 0
    fill_ring(obj, index, new_backend)  # a ring change: only a miss can see it
    age(obj, idle)
    before = _global(obj, FLOW_EXPIRED)
    res = obj.test_run(PROG, later)
    want = new_backend if expired else old_backend
    assert res.data == dsr(later, BACKENDS[want][1])
    assert _global(obj, FLOW_EXPIRED) == before + (1 if expired else 0)
    _, now = only_flow(obj)
    assert now.backend_id == want  # re-recorded on the ring's backend, or kept
    clock = calibrate(obj)
    assert now.last_seen >= clock.now() - clock.ticks(1)  # stamped by this packet


def test_the_closing_phase_is_recorded_and_a_new_syn_ends_it(obj: BpfObject) -> None:
    obj.test_run(PROG, v4_tcp(sport=46100))
    assert only_flow(obj)[1].flags == 0
    obj.test_run(PROG, v4_tcp(sport=46100, flags=0x04))  # RST
    assert only_flow(obj)[1].flags == FLOW_F_CLOSING
    obj.test_run(PROG, v4_tcp(sport=46100, flags=TCP_ACK))
    assert only_flow(obj)[1].flags == FLOW_F_CLOSING
    obj.test_run(PROG, v4_tcp(sport=46100))  # SYN: the port reused by a new connection
    assert only_flow(obj)[1].flags == 0


def test_a_synced_flow_never_seen_here_is_not_expired_and_gets_stamped(obj: BpfObject) -> None:
    """User space writes stamp 0 (a flow synced from the previous active)."""
    set_timeouts(obj, TIMEOUTS)
    frame = v4_tcp(sport=46200, flags=TCP_ACK)
    obj.test_run(PROG, frame)
    key, value = only_flow(obj)
    value.backend_id, value.last_seen = 6, 0  # installed by sync: another backend
    obj.maps["flows"].update(key, value)
    assert obj.test_run(PROG, frame).data == dsr(frame, MACS[3])  # kept: backend 6
    assert only_flow(obj)[1].last_seen > 0


def test_without_timeouts_flows_never_expire(obj: BpfObject) -> None:
    frame = v4_tcp(sport=46300)
    obj.test_run(PROG, frame)
    fill_ring(obj, 0, 6)
    age(obj, 10 * 365 * 86400.0)
    assert obj.test_run(PROG, frame).data == dsr(frame, MACS[1])


# --- fragments and ICMP errors (bpf/icmp.h) -----------------------------------------------

FRAG_DROP, ICMP_RELAYED = 8, 9  # stats_global indices
ROUTER4, ROUTER6 = "198.51.100.1", "2001:db8:ff::1"


def test_a_fragment_for_a_vip_is_dropped_and_counted(obj: BpfObject) -> None:
    before = _global(obj, FRAG_DROP)
    assert obj.test_run(PROG, _frag(0x2000)).retval == XDP_DROP
    assert obj.test_run(PROG, _frag(0x0020)).retval == XDP_DROP
    assert obj.test_run(PROG, _frag(0x2000, "10.0.0.99")).retval == XDP_PASS
    assert _global(obj, FRAG_DROP) == before + 2


def too_big_v4(vport: int, cport: int) -> bytes:
    """A router's frag-needed about the backend's reply (from the VIP) to the client."""
    reply = ipv4(
        VIP4, CLIENT4, 6, tcp(VIP4, CLIENT4, vport, cport, flags=TCP_ACK, payload=b"x" * 64)
    )
    return eth(LB_MAC, CLIENT_MAC, ETH_P_IP, icmp_too_big(ROUTER4, VIP4, reply))


def too_big_v6(vport: int, cport: int) -> bytes:
    reply = ipv6(VIP6, CLIENT6, 6, tcp(VIP6, CLIENT6, vport, cport, flags=TCP_ACK))
    return eth(LB_MAC, CLIENT_MAC, ETH_P_IPV6, icmp_too_big(ROUTER6, VIP6, reply))


def test_frag_needed_goes_to_the_flows_backend_dsr(obj: BpfObject) -> None:
    obj.test_run(PROG, v4_tcp(sport=47000))  # the flow: backend 0
    fill_ring(obj, 0, 6)  # new flows now go to backend 6: the relay must use the entry
    before = _global(obj, ICMP_RELAYED)
    frame = too_big_v4(80, 47000)
    res = obj.test_run(PROG, frame)
    assert (res.retval, res.data) == (XDP_TX, dsr(frame, MACS[1]))
    assert _global(obj, ICMP_RELAYED) == before + 1
    # A flow not in the table: where its next packet would go (the ring), not recorded.
    other = too_big_v4(80, 47001)
    assert obj.test_run(PROG, other).data == dsr(other, MACS[3])
    assert len(list(obj.maps["flows"].items())) == 1


def test_frag_needed_goes_to_the_flows_backend_tunnel(obj: BpfObject) -> None:
    obj.test_run(PROG, v4_tcp(dport=443, sport=47100))
    frame = too_big_v4(443, 47100)
    res = obj.test_run(PROG, frame)
    assert (res.retval, res.data.hex()) == (XDP_TX, ipip4(frame, "10.2.0.31").hex())


def test_packet_too_big_goes_to_the_flows_backend_dsr_and_tunnel(obj: BpfObject) -> None:
    obj.test_run(PROG, v6_tcp(sport=47200))
    frame = too_big_v6(80, 47200)
    assert obj.test_run(PROG, frame).data == dsr(frame, MACS[1])
    obj.test_run(PROG, v6_tcp(dport=443, sport=47201))
    frame = too_big_v6(443, 47201)
    label = label_of(CLIENT6, VIP6, 47201, 443)
    assert obj.test_run(PROG, frame).data.hex() == ipip6(frame, "fd02::31", label).hex()


@pytest.mark.parametrize(
    "frame",
    [
        too_big_v4(8080, 47300),  # quotes a port that is no service
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            icmp_too_big(
                ROUTER4,
                "10.0.0.99",
                ipv4("10.0.0.99", CLIENT4, 6, tcp("10.0.0.99", CLIENT4, 80, 47300)),
            ),
        ),  # not a VIP
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            icmp_too_big(
                ROUTER4, VIP4, ipv4(CLIENT4, "10.0.0.99", 6, tcp(CLIENT4, "10.0.0.99", 47300, 80))
            ),
        ),  # no VIP quoted
        too_big_v4(80, 47300)[:-10],  # quoted ports cut off
    ],
    ids=["other-port", "not-to-a-vip", "quotes-no-vip", "truncated"],
)
def test_other_icmp_errors_pass_to_the_stack(obj: BpfObject, frame: bytes) -> None:
    before = _global(obj, ICMP_RELAYED)
    res = obj.test_run(PROG, frame)
    assert (res.retval, res.data) == (XDP_PASS, frame)
    assert _global(obj, ICMP_RELAYED) == before


def test_icmp_relay_stops_at_the_deadline(obj: BpfObject) -> None:
    obj.test_run(PROG, v4_tcp(sport=47400))
    set_deadline(obj, time.monotonic_ns() - 1_000_000_000)
    assert obj.test_run(PROG, too_big_v4(80, 47400)).retval == XDP_DROP
