"""Packed flow records: the layout the proto documents, round trips with Flow, bulk
validation against the config (each drop counted by reason), malformed buffers, and
the dispatch to a dataplane's record methods or its Flow methods."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest

from halb.config import parse_config
from halb.flows import records
from halb.flows.records import RECORD_SIZE, DropReason, RecordIndex
from halb.model import Flow, Protocol
from halb.testing.fake_dataplane import FakeDataplane
from halb.testing.sync_cluster import validation_doc

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address


@pytest.fixture(scope="module")
def index() -> RecordIndex:
    return RecordIndex(parse_config(validation_doc()).services())


def v4(sport: int = 40000, backend: str = "10.0.0.21", bport: int = 8080) -> Flow:
    return Flow(Protocol.TCP, ip("192.0.2.7"), sport, ip("10.0.0.100"), 80, ip(backend), bport)


V6 = Flow(
    Protocol.TCP, ip("2001:db8:9::7"), 50000, ip("2001:db8::100"), 443, ip("2001:db8:1::21"), 443
)


def test_layout_is_the_documented_one() -> None:
    mapped = bytes(10) + b"\xff\xff"
    expected = (
        mapped + bytes([192, 0, 2, 7])  # src, v4-mapped
        + (40000).to_bytes(2, "big")  # sport
        + bytes([6, 0])  # protocol, reserved
        + (80).to_bytes(2, "big")  # vport
        + mapped + bytes([10, 0, 0, 100])  # vip
        + (8080).to_bytes(2, "big")  # bport
        + mapped + bytes([10, 0, 0, 21])  # backend
        + bytes(8)  # nat_port, nat_flags, reserved: no source translation
    )  # fmt: skip
    assert records.from_flows([v4()]) == expected
    assert len(expected) == RECORD_SIZE
    assert records.from_flows([V6])[:16] == ip("2001:db8:9::7").packed
    translated = records.from_entries([(v4(), 61000)])
    assert translated[:56] == expected[:56]
    assert translated[56:] == (61000).to_bytes(2, "big") + bytes([1]) + bytes(5)


def test_nat_ports_round_trip() -> None:
    flows = [v4(), v4(sport=40001), V6]
    buf = records.from_entries(zip(flows, [None, 1024, 65535], strict=True))
    assert records.nat_ports(buf) == [None, 1024, 65535]
    assert records.to_flows(buf) == flows


@pytest.mark.parametrize(
    "flow",
    [
        v4(),
        v4(sport=65535, backend="10.0.0.22", bport=80),
        Flow(Protocol.UDP, ip("192.0.2.9"), 5353, ip("10.0.0.100"), 53, ip("10.0.0.21"), 53),
        V6,
        # a 4in6 tunnel: IPv6 client and VIP, IPv4 backend; each address keeps its family
        Flow(Protocol.TCP, ip("2001:db8::1"), 1, ip("2001:db8::100"), 443, ip("10.0.0.21"), 1),
        # an IPv6 address that merely ends like an IPv4 one is not mistaken for one
        Flow(Protocol.TCP, ip("::1:0:0:0:a00:1"), 1, ip("2001:db8::100"), 1, ip("::2"), 2),
    ],
)
def test_flow_round_trip(flow: Flow) -> None:
    (back,) = records.to_flows(records.from_flows([flow]))
    assert back == flow
    assert back.src.version == flow.src.version
    assert back.backend.version == flow.backend.version


def test_batch_round_trip_keeps_order() -> None:
    flows = [v4(sport=1000 + i, backend=f"10.0.0.{21 + i % 2}") for i in range(50)] + [V6]
    recs = records.from_flows(flows)
    assert records.count(recs) == 51
    assert records.to_flows(recs) == flows
    assert records.as_records(flows) == recs and records.as_records(recs) is recs


def test_to_flows_refuses_a_partial_record() -> None:
    with pytest.raises(ValueError, match="whole number"):
        records.to_flows(records.from_flows([v4()])[:-1])


def _set(rec: bytes, offset: int, value: bytes) -> bytes:
    return rec[:offset] + value + rec[offset + len(value) :]


def record(**fields: Any) -> bytes:
    """A record of v4() with some fields replaced by raw bytes or ints."""
    rec = records.from_flows([v4()])
    offsets = {"src": 0, "sport": 16, "protocol": 18, "reserved": 19, "vport": 20,
               "vip": 22, "bport": 38, "backend": 40, "nat_port": 56, "nat_flags": 58,
               "nat_reserved": 63}  # fmt: skip
    one_byte = ("protocol", "reserved", "nat_flags", "nat_reserved")
    for name, value in fields.items():
        if isinstance(value, int):
            value = value.to_bytes(1 if name in one_byte else 2, "big")
        rec = _set(rec, offsets[name], value)
    return rec


def a16(addr: str) -> bytes:
    return records.addr16(ip(addr))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"protocol": 1}, DropReason.UNKNOWN_PROTOCOL),
        ({"protocol": 0}, DropReason.UNKNOWN_PROTOCOL),
        ({"protocol": 17}, DropReason.UNKNOWN_SERVICE),  # udp/80 is not configured
        ({"vport": 81}, DropReason.UNKNOWN_SERVICE),
        ({"vip": a16("10.0.0.101")}, DropReason.UNKNOWN_SERVICE),
        ({"vip": ip("::a00:64").packed}, DropReason.MALFORMED_ADDRESS),  # v4-compatible, not mapped
        ({"backend": a16("10.0.0.23")}, DropReason.UNKNOWN_BACKEND),
        ({"backend": a16("::ffff:a00:16").replace(b"\xff", b"\0")}, DropReason.UNKNOWN_BACKEND),
        ({"bport": 8081}, DropReason.UNKNOWN_BACKEND),
        # a backend of another service (udp/53 uses port 53) is not a backend of this one
        ({"bport": 53}, DropReason.UNKNOWN_BACKEND),
        ({"reserved": 1}, DropReason.MALFORMED_RECORD),
        ({"nat_flags": 2}, DropReason.MALFORMED_RECORD),
        ({"nat_reserved": 1}, DropReason.MALFORMED_RECORD),
        ({"nat_port": 5000}, DropReason.MALFORMED_RECORD),  # a port without the flag
        ({"nat_flags": 1}, DropReason.MALFORMED_PORT),  # the flag with port 0
        ({"src": a16("2001:db8::1")}, DropReason.MALFORMED_ADDRESS),  # family mismatch
        ({"sport": 0}, DropReason.MALFORMED_PORT),
        ({"vport": 0}, DropReason.MALFORMED_PORT),
        ({"bport": 0}, DropReason.MALFORMED_PORT),
    ],
)
def test_invalid_records_are_dropped_with_a_reason(
    fields: dict[str, Any], reason: DropReason, index: RecordIndex
) -> None:
    drops: Counter[DropReason] = Counter()
    assert index.validate(record(**fields), drops) == b""
    assert drops == {reason: 1}


@pytest.mark.parametrize(
    "flow",
    [
        v4(),
        v4(backend="10.0.0.22", bport=80),  # backend port defaults to the service port
        v4(backend="10.0.0.29", bport=9000),  # the sorry backend is a backend too
        Flow(Protocol.UDP, ip("192.0.2.9"), 5353, ip("10.0.0.100"), 53, ip("10.0.0.21"), 53),
        V6,
    ],
)
def test_configured_flows_pass(flow: Flow, index: RecordIndex) -> None:
    drops: Counter[DropReason] = Counter()
    rec = records.from_flows([flow])
    assert index.validate(rec, drops) == rec
    assert not drops


def test_a_mixed_batch_keeps_the_valid_records_in_order(index: RecordIndex) -> None:
    good = [v4(sport=i) for i in range(1, 6)] + [V6]
    bad = [record(vport=81), record(vport=81), record(sport=0), record(protocol=1)]
    buf = b"".join(
        [*records.split(records.from_flows(good[:2])), bad[0], bad[1],
         *records.split(records.from_flows(good[2:5])), bad[2], bad[3],
         records.from_flows(good[5:])]
    )  # fmt: skip
    drops: Counter[DropReason] = Counter()
    kept = index.validate(buf, drops)
    assert kept is not None and records.to_flows(kept) == good
    assert drops == {
        DropReason.UNKNOWN_SERVICE: 2,
        DropReason.MALFORMED_PORT: 1,
        DropReason.UNKNOWN_PROTOCOL: 1,
    }


def test_deletes_need_only_be_well_formed(index: RecordIndex) -> None:
    # A service removed from the config must still be able to lose its flows.
    drops: Counter[DropReason] = Counter()
    gone = record(vport=81)
    assert index.validate(gone, drops, in_config=False) == gone
    assert not drops
    assert index.validate(record(reserved=3), drops, in_config=False) == b""
    assert drops == {DropReason.MALFORMED_RECORD: 1}


@pytest.mark.parametrize("size", [1, RECORD_SIZE - 1, RECORD_SIZE + 1, 3 * RECORD_SIZE - 7])
def test_a_partial_buffer_is_dropped_whole_and_counted_once(size: int, index: RecordIndex) -> None:
    drops: Counter[DropReason] = Counter()
    buf = (records.from_flows([v4()]) * 3)[:size]
    assert index.validate(buf, drops) is None
    assert drops == {DropReason.MALFORMED_MESSAGE: 1}


def test_an_empty_buffer_is_valid(index: RecordIndex) -> None:
    drops: Counter[DropReason] = Counter()
    assert index.validate(b"", drops) == b""
    assert not drops


def test_by_conn_keys_a_moved_flow_by_its_connection() -> None:
    before, after = v4(backend="10.0.0.21"), v4(backend="10.0.0.22", bport=80)
    mirror = records.by_conn(records.from_flows([before]))
    mirror.update(records.by_conn(records.from_flows([after])))
    assert list(mirror.values()) == [records.from_flows([after])]
    assert records.conn_keys(records.from_flows([after])) == list(mirror)


def test_adapters_without_a_bulk_path_take_records_as_flow_objects() -> None:
    fake = FakeDataplane()
    recs = records.from_flows([v4(), V6])
    assert fake.install_records(recs) == 2
    assert fake.flows == {v4(), V6}
    assert fake.delete_records(records.from_flows([V6])) == 1
    assert fake.flows == {v4()}
    assert fake.dump_records() == records.from_flows([v4()])


def test_with_vips_keeps_the_records_of_those_vips_in_order() -> None:
    other = Flow(Protocol.TCP, ip("192.0.2.9"), 1, ip("10.0.0.101"), 80, ip("10.0.0.21"), 8080)
    v6 = Flow(Protocol.TCP, ip("2001:db8:9::7"), 2, ip("2001:db8::100"), 443,
              ip("2001:db8:1::21"), 443)  # fmt: skip
    recs = records.from_flows([v4(1), other, v4(2), v6])
    mine = frozenset({records.addr16(ip("10.0.0.100")), records.addr16(ip("2001:db8::100"))})
    assert records.to_flows(records.with_vips(recs, mine)) == [v4(1), v4(2), v6]
    assert records.with_vips(recs, frozenset({records.addr16(ip("10.0.0.101"))})) == (
        records.from_flows([other])
    )
    assert records.with_vips(recs, frozenset()) == b""
    assert records.with_vips(b"", mine) == b""
