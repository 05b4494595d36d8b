"""Pure rendering of the nft table, and the pure ctnetlink / flow mapping beside it."""

from __future__ import annotations

import random
import re
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from halb.dataplane.base import Counter
from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.flows import FlowEntry, FlowMap, Refusal
from halb.dataplane.nft.ruleset import (
    HASH_SEED,
    RenderError,
    backend_counter,
    render,
    ring_slots,
    service_counter,
)
from halb.lb.maglev import build_table
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey

pytestmark = pytest.mark.unit

VIP = IPv4Address("10.99.0.100")
VIP2 = IPv4Address("10.99.0.101")
SNAT = IPv4Address("10.99.1.2")
B1 = Backend(IPv4Address("10.99.1.21"), 9000)
B2 = Backend(IPv4Address("10.99.1.22"), 9000)
B3 = Backend(IPv4Address("10.99.1.23"), 9000, weight=3)


def svc(
    vip: IPv4Address | IPv6Address = VIP,
    port: int = 9000,
    proto: Protocol = Protocol.TCP,
    sched: Scheduler = Scheduler.MAGLEV,
    fwd: Forwarding = Forwarding.NAT,
    backends: tuple[Backend, ...] = (B1, B2, B3),
    ring: int = 307,
) -> Service:
    return Service(ServiceKey(vip, port, proto), sched, fwd, backends, ring)


def _map_elements(script: str, name: str) -> dict[int, str]:
    block = script.split(f"map {name} {{", 1)[1].split("}\n", 1)[0] + "}"
    elems = re.search(r"elements = \{ (.*) \}", block)
    assert elems is not None
    out = {}
    for item in elems.group(1).split(", "):
        slot, value = item.split(" : ")
        out[int(slot)] = value
    return out


def test_render_is_deterministic_in_any_order() -> None:
    services = [
        svc(),
        svc(port=9001, proto=Protocol.UDP, sched=Scheduler.RR),
        svc(vip=VIP2, fwd=Forwarding.FULLNAT),
        svc(vip=ip_address("fd99::100"), backends=(Backend(ip_address("fd99::21"), 9000),)),
    ]
    first = render(services, {VIP2: SNAT}).script
    for seed in range(5):
        shuffled = services[:]
        random.Random(seed).shuffle(shuffled)
        assert render(shuffled, {VIP2: SNAT}).script == first
    # The script replaces the table in one transaction.
    assert first.startswith("table inet halb\ndelete table inet halb\ntable inet halb {\n")


def test_maglev_map_matches_halb_lb_maglev() -> None:
    s = svc()
    rendered = render([s]).script
    elements = _map_elements(rendered, "ring_10_99_0_100_tcp_9000")
    table = build_table({str(b): b.weight for b in s.backends}, s.ring_size)
    value_of = {str(b): f"{b.address} . {b.port}" for b in s.backends}
    expected = {i: value_of[table.names[n]] for i, n in enumerate(table.slots)}
    assert elements == expected
    assert len(elements) == s.ring_size
    # Weight 3 takes about three times the slots of weight 1.
    counts = table.counts()
    assert counts[str(B3)] > 2 * counts[str(B1)]
    # The hash uses the 5-tuple with a fixed seed, so every node agrees on the slot.
    assert (
        "meta l4proto tcp dnat ip to "
        f"jhash ip saddr . tcp sport . ip daddr . tcp dport mod 307 seed {HASH_SEED:#x} "
        "map @ring_10_99_0_100_tcp_9000\n    drop\n"
    ) in rendered
    assert "typeof numgen inc mod 307 : ip daddr . tcp dport" in rendered
    assert ring_slots(s) == table.mapped(lambda n: {str(b): b for b in s.backends}[n])


def test_each_service_has_a_dispatch_chain_and_a_counter_map() -> None:
    rendered = render([svc()]).script
    pre_nat = rendered.split("chain pre_nat {", 1)[1].split("}", 1)[0]
    assert "ip daddr 10.99.0.100 tcp dport 9000 goto d_10_99_0_100_tcp_9000" in pre_nat
    fwd = rendered.split("chain forward_filter {", 1)[1].split("}", 1)[0]
    assert "counter name ip daddr . tcp dport map @bec_10_99_0_100_tcp_9000" in fwd
    for b in (B1, B2, B3):
        assert f'{b.address} . 9000 : "{backend_counter(svc().key, b)}"' in rendered
    assert "goto" not in rendered.replace("goto d_", "")  # no per-backend chains


def test_round_robin_rendering() -> None:
    s = svc(port=9001, proto=Protocol.UDP, sched=Scheduler.RR, backends=(B2, B1))
    rendered = render([s]).script
    assert (
        "meta l4proto udp dnat ip to numgen inc mod 2 map "
        "{ 0 : 10.99.1.21 . 9000, 1 : 10.99.1.22 . 9000 }"
    ) in rendered
    assert "ring_" not in rendered and "jhash" not in rendered


def test_fullnat_snat_rule_present_only_for_fullnat() -> None:
    rendered = render([svc(), svc(vip=VIP2, fwd=Forwarding.FULLNAT)], {VIP2: SNAT}).script
    post = rendered.split("chain post_nat {", 1)[1]
    assert (
        "meta l4proto tcp ct original ip daddr 10.99.0.101 ct original proto-dst 9000 "
        "snat ip to 10.99.1.2"
    ) in post
    assert "10.99.0.100" not in post  # the nat service gets no SNAT
    with pytest.raises(RenderError, match="SNAT address"):
        render([svc(vip=VIP2, fwd=Forwarding.FULLNAT)], {})


def test_invalid_state_is_dropped_for_vip_and_backend_traffic() -> None:
    rendered = render([svc()]).script
    assert (
        'ip daddr . meta l4proto . th dport @services4 ct state invalid counter name "invalid" drop'
    ) in rendered
    assert "ip saddr . meta l4proto . th sport @backends4 ct state invalid" in rendered


def test_counters_are_named_and_carried() -> None:
    s = svc()
    r = render([s], carry={service_counter(s.key): Counter(5, 500)})
    assert r.service_counters == {service_counter(s.key): s.key}
    assert set(r.backend_counters.values()) == {(s.key, b) for b in s.backends}
    assert f"counter {service_counter(s.key)} {{\n    packets 5 bytes 500\n  }}" in r.script
    assert f"counter {backend_counter(s.key, B1)} {{\n  }}" in r.script


def test_no_live_backend_drops_new_flows_and_sorry_backend_takes_over() -> None:
    down = tuple(Backend(b.address, b.port, weight=0) for b in (B1, B2))
    r = render([svc(backends=down)]).script
    # The ring is empty: the lookup misses and the next rule of the dispatch chain drops.
    assert (
        "map ring_10_99_0_100_tcp_9000 {\n    typeof numgen inc mod 307 : ip daddr . tcp dport\n  }"
        in r
    )
    assert "map @ring_10_99_0_100_tcp_9000\n    drop\n  }" in r
    rr = render([svc(backends=down, sched=Scheduler.RR)]).script
    assert "chain d_10_99_0_100_tcp_9000 {\n    drop\n  }" in rr
    sorry = Backend(IPv4Address("10.99.1.99"), 9000)
    s = Service(svc().key, Scheduler.MAGLEV, Forwarding.NAT, down, 307, sorry=(sorry,))
    assert {b for b in ring_slots(s)} == {sorry}


def test_render_refuses_what_nft_cannot_hold() -> None:
    with pytest.raises(RenderError, match="not an nft mode"):
        render([svc(fwd=Forwarding.DSR)])
    with pytest.raises(RenderError, match="scheduler"):
        render([svc(sched=Scheduler.WLC)])
    with pytest.raises(RenderError, match="IPv4"):
        render([svc(backends=(Backend(ip_address("fd99::1"), 80),))])


# --- ctnetlink codec and flow mapping --------------------------------------------------


def _flow(src: str = "10.99.0.2", sport: int = 40000, backend: Backend = B1) -> Flow:
    return Flow(Protocol.TCP, ip_address(src), sport, VIP, 9000, backend.address, backend.port)


def test_create_message_carries_nat_and_reverse_reply_tuple() -> None:
    orig = ctmsg.CtTuple(ip_address("10.99.0.2"), VIP, 6, 40000, 9000)
    msg = ctmsg.encode_create(7, orig, timeout=300, nat_dst=ctmsg.NatSpec(B1.address, 9000))
    (m,) = list(ctmsg.parse(msg))
    assert m.seq == 7 and m.flags & ctmsg.NLM_F_CREATE and m.flags & ctmsg.NLM_F_EXCL
    entry = ctmsg.decode_entry(m.payload)
    assert entry is not None
    assert entry.orig == orig and entry.reply == orig.reverse()
    assert entry.status & ctmsg.IPS_CONFIRMED and entry.timeout == 300
    assert entry.tcp_state == ctmsg.TCP_CONNTRACK_ESTABLISHED
    assert B1.address.packed in m.payload  # the NAT binding
    with pytest.raises(ValueError):
        ctmsg.encode_create(1, ctmsg.CtTuple(orig.src, orig.dst, 6, 0, 9000), timeout=1)
    with pytest.raises(ValueError):
        ctmsg.encode_create(1, orig, timeout=1, nat_dst=ctmsg.NatSpec(ip_address("fd99::1"), 9000))


def test_flow_mapping_nat_and_fullnat() -> None:
    nat = svc()
    full = svc(vip=VIP2, fwd=Forwarding.FULLNAT)
    fmap = FlowMap([nat, full], {VIP2: SNAT})
    client = ip_address("10.99.0.2")
    orig = ctmsg.CtTuple(client, VIP, socket.IPPROTO_TCP, 40000, 9000)
    e = ctmsg.CtEntry(orig, ctmsg.CtTuple(B1.address, client, 6, 9000, 40000))
    assert fmap.flow_of(e) == FlowEntry(_flow())
    orig2 = ctmsg.CtTuple(client, VIP2, 6, 40000, 9000)
    e2 = ctmsg.CtEntry(orig2, ctmsg.CtTuple(B2.address, SNAT, 6, 9000, 1234))
    fe2 = fmap.flow_of(e2)
    assert fe2 is not None and (fe2.snat, fe2.snat_port) == (SNAT, 1234)
    assert fe2.flow.backend == B2.address
    dnat, snat = fmap.nat_for(fe2)
    assert dnat == ctmsg.NatSpec(B2.address, 9000) and snat == ctmsg.NatSpec(SNAT, 1234)
    # A synced flow without a SNAT port keeps the client's.
    assert fmap.nat_for(FlowEntry(fe2.flow))[1] == ctmsg.NatSpec(SNAT, 40000)
    # Untranslated traffic to the VIP and other services are not flows.
    assert fmap.flow_of(ctmsg.CtEntry(orig, orig.reverse())) is None
    other = ctmsg.CtTuple(client, VIP, 6, 40000, 22)
    assert fmap.flow_of(ctmsg.CtEntry(other, other.reverse())) is None


def test_refusals() -> None:
    fmap = FlowMap([svc(), svc(vip=VIP2, fwd=Forwarding.FULLNAT)], {})
    assert fmap.refusal(FlowEntry(_flow())) is None
    assert fmap.refusal(FlowEntry(_flow(backend=Backend(ip_address("10.9.9.9"), 9000)))) is (
        Refusal.UNKNOWN_BACKEND
    )
    f = _flow()
    wrong_service = Flow(f.protocol, f.src, f.sport, f.vip, 9999, f.backend, f.bport)
    assert fmap.refusal(FlowEntry(wrong_service)) is Refusal.UNKNOWN_SERVICE
    bad_port = Flow(f.protocol, f.src, 0, f.vip, f.vport, f.backend, f.bport)
    assert fmap.refusal(FlowEntry(bad_port)) is Refusal.MALFORMED
    v6 = Flow(f.protocol, ip_address("fd99::2"), 1, f.vip, f.vport, f.backend, f.bport)
    assert fmap.refusal(FlowEntry(v6)) is Refusal.MALFORMED
    full = Flow(f.protocol, f.src, f.sport, VIP2, 9000, f.backend, f.bport)
    assert fmap.refusal(FlowEntry(full)) is Refusal.NO_SNAT_ADDRESS
