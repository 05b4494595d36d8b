"""The nft adapter against the real kernel: NAT and fullnat traffic through a VIP,
atomic and idempotent applies, counters, dropping mid-flow packets without state."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address

import pytest

from halb.dataplane.nft import delta, nftcmd, ruleset
from halb.dataplane.nft.adapter import NftDataplane
from halb.dataplane.nft.libnft import Nft
from halb.dataplane.nft.netns import read_sysctl
from halb.dataplane.nft.nfnl import NfTables
from halb.dataplane.nft.ruleset import RenderError
from halb.model import Backend, Forwarding, Protocol, Scheduler, Service, ServiceKey
from halb.testing.nft_topo import BACKENDS, SNAT, VIP, Topology

pytestmark = pytest.mark.kernel

CLIENT = "10.98.0.2"
FULLNAT_VIP = IPv4Address("10.98.0.101")


def services(ring: int = 251) -> list[Service]:
    tcp = tuple(Backend(a, 9000) for a in BACKENDS.values())
    udp = tuple(Backend(a, 9001) for a in BACKENDS.values())
    return [
        Service(ServiceKey(VIP, 9000, Protocol.TCP), Scheduler.MAGLEV, Forwarding.NAT, tcp, ring),
        Service(ServiceKey(VIP, 9001, Protocol.UDP), Scheduler.RR, Forwarding.NAT, udp),
        Service(
            ServiceKey(FULLNAT_VIP, 9000, Protocol.TCP),
            Scheduler.MAGLEV,
            Forwarding.FULLNAT,
            tcp,
            ring,
        ),
        Service(ServiceKey(FULLNAT_VIP, 9001, Protocol.UDP), Scheduler.RR, Forwarding.FULLNAT, udp),
    ]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology.build(f"halbt-nft-{uuid.uuid4().hex[:6]}")
    try:
        t.ip("client", "route", "add", f"{FULLNAT_VIP}/32", "via", "10.98.0.11")
        yield t
    finally:
        t.destroy()


@pytest.fixture
def dp(topo: Topology) -> Iterator[NftDataplane]:
    topo.exec("lba", "conntrack", "-F", check=False)
    d = NftDataplane({VIP: SNAT, FULLNAT_VIP: SNAT}, netns=topo.ns("lba"))
    try:
        yield d
    finally:
        d.close()


def whoami_tcp(topo: Topology, vip: IPv4Address) -> tuple[str, str]:
    """(backend name, the client address the backend saw) for a fresh connection."""
    with topo.tcp_connect() if vip == VIP else _connect(topo, vip) as s:
        s.sendall(b"WHOAMI\n")
        name = s.recv(100).decode().strip()
        return name, s.getsockname()[0]


def _connect(topo: Topology, vip: IPv4Address) -> socket.socket:
    s = topo.client_socket(socket.SOCK_STREAM)
    s.connect((str(vip), 9000))
    return s


def whoami_udp(topo: Topology, vip: IPv4Address) -> str:
    with topo.client_socket(socket.SOCK_DGRAM) as s:
        s.sendto(b"WHOAMI\n", (str(vip), 9001))
        data, peer = s.recvfrom(100)
        assert peer == (str(vip), 9001)  # the reply is un-NATed back to the VIP
        return data.decode().strip()


def backend_peers(topo: Topology, be: str, port: int = 9000) -> set[str]:
    """Remote addresses of established TCP connections on a backend's port."""
    out = topo.exec(be, "ss", "-Htn", "state", "established", f"( sport = :{port} )")
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_nat_tcp_and_udp_reach_backends_with_client_address(
    topo: Topology, dp: NftDataplane
) -> None:
    result = dp.apply(services())
    assert result.writes == 1 and len(result.added) == 4
    assert read_sysctl(topo.ns("lba"), "net.netfilter.nf_conntrack_tcp_loose") == "0"

    seen = set()
    for _ in range(12):
        name, _ = whoami_tcp(topo, VIP)
        seen.add(name)
    assert seen <= set(BACKENDS) and len(seen) == 2, seen  # Maglev spreads clients

    # nat keeps the client address: a live connection shows up on its backend from it.
    with topo.tcp_connect() as s:
        s.sendall(b"WHOAMI\n")
        name = s.recv(100).decode().strip()
        assert CLIENT in backend_peers(topo, name)

    udp = [whoami_udp(topo, VIP) for _ in range(4)]
    assert set(udp) == set(BACKENDS)  # round robin alternates


def test_fullnat_backend_sees_snat_address(topo: Topology, dp: NftDataplane) -> None:
    dp.apply(services())
    with _connect(topo, FULLNAT_VIP) as s:
        s.sendall(b"WHOAMI\n")
        name = s.recv(100).decode().strip()
        assert name in BACKENDS
        peers = backend_peers(topo, name)
        assert str(SNAT) in peers and CLIENT not in peers
    assert whoami_udp(topo, FULLNAT_VIP) in BACKENDS
    flows = dp.dump_entries()
    full = [fe for fe in flows if fe.flow.vip == FULLNAT_VIP]
    assert full and all(fe.snat == SNAT for fe in full)


def test_apply_is_idempotent_and_counters_move(topo: Topology, dp: NftDataplane) -> None:
    assert dp.apply(services()).writes == 1
    before = topo.exec("lba", "nft", "list", "table", "inet", "halb")
    again = dp.apply(list(reversed(services())))
    assert again.writes == 0 and not (again.added or again.removed or again.updated)
    assert topo.exec("lba", "nft", "list", "table", "inet", "halb") == before

    for _ in range(3):
        whoami_tcp(topo, VIP)
    c = dp.counters()
    key = ServiceKey(VIP, 9000, Protocol.TCP)
    assert c.per_service[key].packets >= 3 * 4  # SYN, ACK, data, FIN at least
    per_be = [c.per_backend[(key, Backend(a, 9000))].packets for a in BACKENDS.values()]
    assert sum(per_be) >= 3 * 4
    assert c.per_service[ServiceKey(FULLNAT_VIP, 9001, Protocol.UDP)].packets == 0

    # A change that reloads the table keeps the counters (carried over).
    changed = services()
    changed[1] = Service(changed[1].key, Scheduler.MAGLEV, Forwarding.NAT, changed[1].backends, 251)
    r = dp.apply(changed)
    assert r.writes == 1 and r.updated == (changed[1].key,)
    assert dp.counters().per_service[key].packets >= c.per_service[key].packets


def ring_map(topo: Topology, key: ServiceKey) -> dict[int, str]:
    """The kernel's ring map of a service: slot -> "address . port"."""
    name = f"ring_{ruleset.service_id(key)}"
    out = json.loads(topo.exec("lba", "nft", "-j", "list", "map", "inet", "halb", name))
    (m,) = [i["map"] for i in out["nftables"] if "map" in i]
    return {int(k): "{} . {}".format(*v["concat"]) for k, v in m.get("elem", [])}


def expected_ring(svc: Service) -> dict[int, str]:
    ring = ruleset.ring_slots(svc)
    return {i: f"{b.address} . {b.port}" for i, b in enumerate(ring) if b is not None}


def test_backend_change_rewrites_ring_in_place_and_keeps_pinned_flows(
    topo: Topology, dp: NftDataplane
) -> None:
    """A backend going down, coming back and a backend added: each is an in-place
    update (the table and its counters stay), the ring map is exactly the new Maglev
    table, and a connection pinned in conntrack keeps its backend throughout."""
    first = services()
    dp.apply(first)
    key = first[0].key
    assert ring_map(topo, key) == expected_ring(first[0])
    handle = topo.exec("lba", "nft", "-a", "list", "chain", "inet", "halb", "pre_nat")
    with topo.tcp_connect() as s:
        s.sendall(b"WHOAMI\n")
        pinned = s.recv(100).decode().strip()
        other = next(n for n in BACKENDS if n != pinned)
        counted = ruleset.service_counter(key)
        before = nftcmd.list_counters(topo.ns("lba"))[counted].packets
        down = [
            Backend(b.address, b.port, weight=0 if b.address == BACKENDS[pinned] else 1)
            for b in first[0].backends
        ]
        changed = [Service(key, Scheduler.MAGLEV, Forwarding.NAT, tuple(down), 251), *first[1:]]
        r = dp.apply(changed)
        assert r.writes == 1 and r.updated == (key,) and not (r.added or r.removed)
        assert ring_map(topo, key) == expected_ring(changed[0])
        assert set(ring_map(topo, key).values()) == {f"{BACKENDS[other]} . 9000"}
        s.sendall(b"WHOAMI\n")
        assert s.recv(100).decode().strip() == pinned  # conntrack kept its backend
        assert all(whoami_tcp(topo, VIP)[0] == other for _ in range(4))  # new flows avoid it
        # Not a reload: the base chain kept its rule handles, the counters their values.
        assert topo.exec("lba", "nft", "-a", "list", "chain", "inet", "halb", "pre_nat") == handle
        assert nftcmd.list_counters(topo.ns("lba"))[counted].packets > before

        extra = Backend(IPv4Address("10.98.1.23"), 9000)
        grown = [Service(key, Scheduler.MAGLEV, Forwarding.NAT, (*first[0].backends, extra), 251)]
        dp.apply([*grown, *first[1:]])
        assert ring_map(topo, key) == expected_ring(grown[0])
        dp.apply(first)
        assert ring_map(topo, key) == expected_ring(first[0])
        assert dp.apply(first).writes == 0
        s.sendall(b"WHOAMI\n")
        assert s.recv(100).decode().strip() == pinned
    listed = topo.exec("lba", "nft", "list", "table", "inet", "halb")
    assert "10_98_1_23" not in listed  # the extra backend's counter is gone


def test_rejected_in_place_update_leaves_the_rules(topo: Topology, dp: NftDataplane) -> None:
    dp.apply(services())
    before = topo.exec("lba", "nft", "list", "ruleset")
    assert dp._rendered is not None
    upd = delta.update(dp._rendered, _one_down(), dp.snat)
    assert upd is not None and upd.rings and upd.head  # ring slots and the RR rule
    key = services()[0].key
    # Text path: a valid update whose last command the kernel refuses (the dispatch
    # chain is still referenced): nothing of it may stay, the ring slots included.
    with pytest.raises(nftcmd.NftError):
        Nft(topo.ns("lba")).run(
            upd.script() + f"delete chain inet halb d_{ruleset.service_id(key)}\n"
        )
    assert topo.exec("lba", "nft", "list", "ruleset") == before
    # Raw batch path: the ring's real edit plus a slot that is already there (with
    # other data: the kernel refuses it with EEXIST, and the edit's slots with it).
    (edit,) = upd.rings
    kept = next(i for i in range(251) if i not in edit.delete)
    elsewhere = (IPv4Address("10.98.1.99"), 9000)
    bad = delta.RingEdit(edit.map, edit.delete, (*edit.add, (elsewhere, (kept,))))
    nf = NfTables(topo.ns("lba"))
    try:
        with pytest.raises(nftcmd.NftError, match="EEXIST"):
            nf.ring_edits("halb", [bad])
        assert topo.exec("lba", "nft", "list", "ruleset") == before
        assert nf.ring_edits("halb", [edit]) > 0  # the same socket still works
        assert ring_map(topo, key) == expected_ring(_one_down()[0])
    finally:
        nf.close()


def _one_down() -> list[Service]:
    """be1 down in the first two services (a Maglev ring and a round robin)."""
    out = services()
    for i in (0, 1):
        s = out[i]
        bs = s.backends
        down = (Backend(bs[0].address, bs[0].port, weight=0), *bs[1:])
        out[i] = Service(s.key, s.scheduler, s.forwarding, down, s.ring_size)
    return out


def test_rejected_apply_keeps_previous_table(topo: Topology, dp: NftDataplane) -> None:
    dp.apply(services())
    before = topo.exec("lba", "nft", "list", "ruleset")
    bad = services()
    # Port 70000 is refused before the kernel sees anything (the kernel's own refusals
    # of in-place updates: test_rejected_in_place_update_leaves_the_rules).
    bad[0] = Service(
        bad[0].key, Scheduler.MAGLEV, Forwarding.NAT, (Backend(BACKENDS["be1"], 70000),), 251
    )
    with pytest.raises(RenderError, match="no valid port"):
        dp.apply(bad)
    assert topo.exec("lba", "nft", "list", "ruleset") == before
    assert dp.services[bad[0].key] == services()[0]  # the adapter's view is unchanged
    assert whoami_tcp(topo, VIP)[0] in BACKENDS  # and traffic still flows

    # A script broken in its last line leaves the table as it was too.
    rendered = topo.exec("lba", "nft", "list", "table", "inet", "halb")
    with pytest.raises(nftcmd.NftError):
        nftcmd.load(
            topo.ns("lba"),
            "flush table inet halb\nadd element inet halb services4 { 1.2.3.4 . tcp . 99999 }\n",
        )
    assert topo.exec("lba", "nft", "list", "table", "inet", "halb") == rendered

    with pytest.raises(RenderError):
        dp.apply([*services(), services()[0]])  # duplicate service


def test_mid_flow_packet_without_state_is_dropped(topo: Topology, dp: NftDataplane) -> None:
    dp.apply(services())
    with topo.tcp_connect() as s:
        s.sendall(b"WHOAMI\n")
        assert s.recv(100).decode().strip() in BACKENDS
        # Forget the connection on the balancer: the next segment is mid-flow.
        topo.exec("lba", "conntrack", "-F")
        dropped = dp.invalid_dropped().packets
        s.sendall(b"WHOAMI\n")
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.recv(100)  # neither an answer from another backend nor a reset
        assert dp.invalid_dropped().packets > dropped
        assert dp.dump_flows() == []  # and no new flow was created for it


def test_close_removes_table(topo: Topology) -> None:
    d = NftDataplane({VIP: SNAT}, netns=topo.ns("lba"))
    d.apply(services()[:2])
    assert nftcmd.table_exists(topo.ns("lba"))
    d.close()
    assert not nftcmd.table_exists(topo.ns("lba"))


def test_large_ring_loads(topo: Topology, dp: NftDataplane) -> None:
    t0 = time.monotonic()
    dp.apply(services(ring=65537))
    took = time.monotonic() - t0
    assert took < 30, took
    assert whoami_tcp(topo, VIP)[0] in BACKENDS


def _arp_answered(topo: Topology, vip: IPv4Address) -> bool:
    """Whether an ARP request for ``vip`` from the client gets a reply."""
    out = topo.exec("client", "arping", "-c", "1", "-w", "1", "-I", "eth0", str(vip), check=False)
    return "reply from" in out.lower()


def test_dead_man_switch_fences_vip_traffic_and_arp(topo: Topology, dp: NftDataplane) -> None:
    """Disarmed: traffic and ARP pass. Armed: they pass until the deadline, then the
    kernel drops them by itself (the set elements expire, nobody refreshes them);
    re-armed or disarmed, they pass again. A table reload does not reset the switch."""
    dp.apply(services())
    # lba answers ARP for the VIP only if it holds it (as the active node does).
    topo.ip("lba", "addr", "add", f"{VIP}/32", "dev", "eth0")
    try:
        assert whoami_tcp(topo, VIP)[0] in BACKENDS
        assert _arp_answered(topo, VIP)
        dp.set_deadline(time.monotonic_ns() + 1_500_000_000)
        dp.apply(services(ring=257))  # a reload in between keeps the armed switch
        assert whoami_tcp(topo, VIP)[0] in BACKENDS
        assert _arp_answered(topo, VIP)
        time.sleep(1.6)
        assert not _arp_answered(topo, VIP)
        with pytest.raises(OSError), topo.tcp_connect(timeout=1.0) as s:
            s.sendall(b"WHOAMI\n")
            s.recv(100)
        counted = topo.exec("lba", "nft", "list", "counter", "inet", "halb_fence", "fenced")
        assert "packets 0 " not in counted, counted
        dp.set_deadline(None)
        assert whoami_tcp(topo, VIP)[0] in BACKENDS
        assert _arp_answered(topo, VIP)
    finally:
        topo.ip("lba", "addr", "del", f"{VIP}/32", "dev", "eth0")


VIP6 = ip_address("fd98::100")


def _nd_answered(topo: Topology) -> bool:
    """Whether a neighbour solicitation for VIP6 from the client gets an advertisement:
    the client's kernel solicits for the ping and keeps the answer's MAC."""
    topo.ip("client", "-6", "neigh", "flush", "dev", "eth0")
    topo.exec("client", "ping", "-6", "-c", "1", "-W", "1", str(VIP6), check=False)
    entry = topo.ip("client", "-6", "neigh", "show", str(VIP6), "dev", "eth0")
    return "lladdr" in entry


def test_dead_man_switch_fences_ipv6_neighbour_solicitations(
    topo: Topology, dp: NftDataplane
) -> None:
    """An IPv6 VIP: solicitations for it go to its solicited-node multicast address and
    are matched by their target. Answered while armed, dropped past the deadline (and
    counted), answered again once re-armed."""
    v6 = Service(
        ServiceKey(VIP6, 9000, Protocol.TCP),
        Scheduler.MAGLEV,
        Forwarding.NAT,
        (Backend(ip_address("fd98:1::21"), 9000),),
        251,
    )
    topo.ip("client", "addr", "add", "fd98::2/64", "dev", "eth0", "nodad")
    topo.ip("lba", "addr", "add", f"{VIP6}/64", "dev", "eth0", "nodad")
    try:
        dp.apply([*services(), v6])
        assert _nd_answered(topo)
        dp.set_deadline(time.monotonic_ns() + 1_000_000_000)
        assert _nd_answered(topo)
        before = topo.exec("lba", "nft", "list", "counter", "inet", "halb_fence", "fenced")
        time.sleep(1.1)
        assert not _nd_answered(topo)
        after = topo.exec("lba", "nft", "list", "counter", "inet", "halb_fence", "fenced")
        assert after != before
        dp.set_deadline(time.monotonic_ns() + 5_000_000_000)
        assert _nd_answered(topo)
        # A disarmed switch passes for good.
        dp.set_deadline(None)
        assert _nd_answered(topo)
    finally:
        topo.ip("lba", "addr", "del", f"{VIP6}/64", "dev", "eth0")
        topo.ip("client", "addr", "del", "fd98::2/64", "dev", "eth0")


def test_close_removes_the_fence_tables(topo: Topology) -> None:
    d = NftDataplane({VIP: SNAT, FULLNAT_VIP: SNAT}, netns=topo.ns("lba"))
    d.apply(services())
    d.set_deadline(time.monotonic_ns())  # armed and passed
    listed = topo.exec("lba", "nft", "list", "tables")
    assert "halb_fence" in listed
    d.close()
    listed = topo.exec("lba", "nft", "list", "tables")
    assert "halb_fence" not in listed
