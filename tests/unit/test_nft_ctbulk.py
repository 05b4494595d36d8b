"""Bulk create messages from records are byte for byte the per-flow encoder's."""

from __future__ import annotations

import itertools
import random
import struct
from ipaddress import ip_address

import pytest

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctbulk import encode_creates
from halb.dataplane.nft.flows import FlowEntry, FlowMap
from halb.flows import records
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey

pytestmark = pytest.mark.unit

VIP4, VIP6 = ip_address("10.99.0.100"), ip_address("fd99::100")
SNAT4, SNAT6 = ip_address("10.99.1.2"), ip_address("fd99:1::2")
BE4 = [Backend(ip_address(f"10.99.1.{20 + i}"), 9000) for i in range(3)]
BE6 = [Backend(ip_address(f"fd99:1::{20 + i}"), 9000) for i in range(3)]
TIMEOUTS = {Protocol.TCP: 432000, Protocol.UDP: 180}


def fmap() -> FlowMap:
    svcs = [
        Service(ServiceKey(VIP4, 80, Protocol.TCP), Scheduler.MAGLEV, Forwarding.NAT, tuple(BE4)),
        Service(ServiceKey(VIP4, 53, Protocol.UDP), Scheduler.RR, Forwarding.FULLNAT, tuple(BE4)),
        Service(
            ServiceKey(VIP6, 80, Protocol.TCP), Scheduler.MAGLEV, Forwarding.FULLNAT, tuple(BE6)
        ),
        Service(ServiceKey(VIP6, 53, Protocol.UDP), Scheduler.RR, Forwarding.NAT, tuple(BE6)),
    ]
    return FlowMap(svcs, {VIP4: SNAT4, VIP6: SNAT6})


def entries(n: int, seed: int = 1) -> list[FlowEntry]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        v6 = rnd.random() < 0.5
        proto = rnd.choice([Protocol.TCP, Protocol.UDP])
        port = 80 if proto is Protocol.TCP else 53
        be = rnd.choice(BE6 if v6 else BE4)
        src = ip_address(f"fd00::{i + 1:x}" if v6 else f"192.0.{i // 250}.{i % 250 + 1}")
        flow = Flow(proto, src, rnd.randrange(1, 65536), VIP6 if v6 else VIP4, port,
                    be.address, be.port)  # fmt: skip
        full = (proto is Protocol.UDP) != v6
        nport = rnd.choice([None, rnd.randrange(1, 65536)]) if full else None
        out.append(FlowEntry(flow, None, nport))
    return out


def test_bulk_messages_equal_the_per_flow_encoder() -> None:
    fes = entries(400)
    m = fmap()
    recs = records.from_entries((fe.flow, fe.snat_port) for fe in fes)
    counter = itertools.count(7)
    enc = encode_creates(recs, m, TIMEOUTS, lambda: next(counter))
    assert enc.others == [] and len(enc.requests) == len(fes)
    for seq, msg in enc.requests:
        fe = fes[enc.row_of_seq[seq]]
        dnat, snat = m.nat_for(fe)
        want = ctmsg.encode_create(
            seq, m.orig_tuple(fe.flow), timeout=TIMEOUTS[fe.flow.protocol],
            nat_dst=dnat, nat_src=snat,
        )  # fmt: skip
        assert msg == want, fe


def test_records_the_map_does_not_hold_are_left_to_the_per_flow_path() -> None:
    m = fmap()
    good = entries(3)
    stranger = Flow(Protocol.TCP, ip_address("192.0.2.1"), 1234, VIP4, 8080, BE4[0].address, 9000)
    odd_backend = Flow(Protocol.TCP, ip_address("192.0.2.1"), 1235, VIP4, 80,
                       ip_address("10.99.1.99"), 9000)  # fmt: skip
    flows = [stranger, *(fe.flow for fe in good), odd_backend]
    recs = records.from_flows(flows)
    enc = encode_creates(recs, m, TIMEOUTS, itertools.count(1).__next__)
    assert enc.others == [0, len(flows) - 1]
    assert sorted(enc.row_of_seq.values()) == [1, 2, 3]


def _dump_payload(fe: FlowEntry, m: FlowMap, extra: bytes = b"") -> bytes:
    """A dump message's payload as the kernel writes it: tuples first."""
    f = fe.flow
    orig = m.orig_tuple(f)
    _, snat = m.nat_for(fe)
    reply = ctmsg.CtTuple(f.backend, snat.addr if snat else f.src, f.protocol.number, f.bport,
                          snat.port if snat else f.sport)  # fmt: skip
    fam = 2 if f.src.version == 4 else 10
    return (
        ctmsg.NFGEN_HDR.pack(fam, 0, 0)
        + ctmsg._tuple(ctmsg.CTA_TUPLE_ORIG, orig)
        + ctmsg._tuple(ctmsg.CTA_TUPLE_REPLY, reply)
        + extra
    )


def test_bulk_dump_decoding_equals_entry_by_entry() -> None:
    from halb.dataplane.nft.ctdump import payload_records
    from halb.dataplane.nft.flows import entry_records

    m = fmap()
    fes = entries(300, seed=5)
    status = struct.pack("=HHI", 8, ctmsg.CTA_STATUS, 0)
    payloads = [_dump_payload(fe, m, status) for fe in fes]
    # Not a flow: traffic to the VIP itself, and a service this map does not hold.
    to_vip = ctmsg.CtTuple(ip_address("192.0.2.9"), VIP4, 6, 5555, 80)
    payloads.append(ctmsg.NFGEN_HDR.pack(2, 0, 0) + ctmsg._tuple(ctmsg.CTA_TUPLE_ORIG, to_vip)
                    + ctmsg._tuple(ctmsg.CTA_TUPLE_REPLY, to_vip.reverse()))  # fmt: skip
    other = ctmsg.CtTuple(ip_address("192.0.2.9"), VIP4, 6, 1, 81)
    be = ctmsg.CtTuple(BE4[0].address, other.src, 6, 9000, 1)
    payloads.append(ctmsg.NFGEN_HDR.pack(2, 0, 0) + ctmsg._tuple(ctmsg.CTA_TUPLE_ORIG, other)
                    + ctmsg._tuple(ctmsg.CTA_TUPLE_REPLY, be))  # fmt: skip
    got = payload_records(payloads, m)
    one_by_one = [m.flow_of(e) for p in payloads if (e := ctmsg.decode_entry(p)) is not None]
    want = entry_records(fe for fe in one_by_one if fe is not None)
    assert sorted(records.split(got)) == sorted(records.split(want))
    assert records.count(got) == len(fes)
    # fullnat entries carry their source port, nat ones none.
    ports = dict(zip(records.to_flows(got), records.nat_ports(got), strict=True))
    for fe in fes:
        _, snat = m.nat_for(fe)
        assert ports[fe.flow] == (snat.port if snat else None)
