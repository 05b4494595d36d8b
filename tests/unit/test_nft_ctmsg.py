"""The pure ctnetlink codec (halb.dataplane.nft.ctmsg): round trips, NAT attributes,
and malformed input rejected with errors that name the part.

pyroute2's own nfct_msg is the independent reading: what ctmsg encodes by hand must
decode there to the same fields, and what pyroute2 encodes must decode here.
"""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctmsg import CtMessageError, CtTuple, NatSpec
from halb.model import IPAddress

pytestmark = pytest.mark.unit

CLIENT = IPv4Address("10.99.0.2")
VIP = IPv4Address("10.99.0.100")
BACKEND = IPv4Address("10.99.2.11")
SNAT = IPv4Address("10.99.1.2")
ORIG = CtTuple(CLIENT, VIP, socket.IPPROTO_TCP, 40000, 80)
ORIG6 = CtTuple(IPv6Address("fd99::2"), IPv6Address("fd99::100"), socket.IPPROTO_UDP, 5353, 53)
NEW = ctmsg.NFNL_SUBSYS_CTNETLINK << 8 | ctmsg.IPCTNL_MSG_CT_NEW
GET = ctmsg.NFNL_SUBSYS_CTNETLINK << 8 | ctmsg.IPCTNL_MSG_CT_GET
DELETE = ctmsg.NFNL_SUBSYS_CTNETLINK << 8 | ctmsg.IPCTNL_MSG_CT_DELETE


def _pyroute2(buf: bytes) -> Any:
    msg = nfct_msg(buf)
    msg.decode()
    return msg


def _tuple_of(nla: Any) -> CtTuple:
    ip = nla.get_attr("CTA_TUPLE_IP")
    proto = nla.get_attr("CTA_TUPLE_PROTO")
    v4 = ip.get_attr("CTA_IP_V4_SRC") is not None
    src = ip.get_attr("CTA_IP_V4_SRC" if v4 else "CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST" if v4 else "CTA_IP_V6_DST")
    return CtTuple(
        ip_address(src),
        ip_address(dst),
        proto.get_attr("CTA_PROTO_NUM"),
        proto.get_attr("CTA_PROTO_SRC_PORT"),
        proto.get_attr("CTA_PROTO_DST_PORT"),
    )


def _nat_of(nla: Any, v6: bool = False) -> tuple[IPAddress, IPAddress, int, int]:
    lo, hi = (
        ("CTA_NAT_V6_MINIP", "CTA_NAT_V6_MAXIP") if v6 else ("CTA_NAT_V4_MINIP", "CTA_NAT_V4_MAXIP")
    )
    ports = nla.get_attr("CTA_NAT_PROTO")
    return (
        ip_address(nla.get_attr(lo)),
        ip_address(nla.get_attr(hi)),
        ports.get_attr("CTA_PROTONAT_PORT_MIN"),
        ports.get_attr("CTA_PROTONAT_PORT_MAX"),
    )


def _tuple_nla(t: CtTuple, ports: bool = True) -> dict[str, Any]:
    v = "V4" if t.src.version == 4 else "V6"
    proto: list[tuple[str, int]] = [("CTA_PROTO_NUM", t.proto)]
    if ports:
        proto += [("CTA_PROTO_SRC_PORT", t.sport), ("CTA_PROTO_DST_PORT", t.dport)]
    return {
        "attrs": [
            (
                "CTA_TUPLE_IP",
                {"attrs": [(f"CTA_IP_{v}_SRC", str(t.src)), (f"CTA_IP_{v}_DST", str(t.dst))]},
            ),
            ("CTA_TUPLE_PROTO", {"attrs": proto}),
        ]
    }


def _kernel_like(
    attrs: list[tuple[str, Any]], family: int = socket.AF_INET, flags: int = 0
) -> bytes:
    """An entry the way the kernel sends it in a dump or event, encoded by pyroute2."""
    msg = nfct_msg()
    msg["header"]["type"] = NEW
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = 9
    msg["nfgen_family"] = family
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def _only(buf: bytes) -> ctmsg.NlMessage:
    (m,) = list(ctmsg.parse(buf))
    return m


# --- encoding, read back by pyroute2 ---------------------------------------------------


def test_create_with_dnat_and_snat_reads_back_in_pyroute2() -> None:
    buf = ctmsg.encode_create(
        7, ORIG, timeout=300, nat_dst=NatSpec(BACKEND, 8080), nat_src=NatSpec(SNAT, 61000)
    )
    msg = _pyroute2(buf)
    hdr = msg["header"]
    assert (hdr["type"], hdr["sequence_number"], hdr["length"]) == (NEW, 7, len(buf))
    want = ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_ACK | ctmsg.NLM_F_CREATE | ctmsg.NLM_F_EXCL
    assert hdr["flags"] == want
    assert msg["nfgen_family"] == socket.AF_INET
    assert _tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == ORIG
    # The reply is the plain reverse: the kernel rebuilds it from the NAT attributes.
    assert _tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == ORIG.reverse()
    assert msg.get_attr("CTA_STATUS") == (
        ctmsg.IPS_CONFIRMED | ctmsg.IPS_SEEN_REPLY | ctmsg.IPS_ASSURED
    )
    assert msg.get_attr("CTA_TIMEOUT") == 300
    assert _nat_of(msg.get_attr("CTA_NAT_DST")) == (BACKEND, BACKEND, 8080, 8080)
    assert _nat_of(msg.get_attr("CTA_NAT_SRC")) == (SNAT, SNAT, 61000, 61000)
    tcp = msg.get_attr("CTA_PROTOINFO").get_attr("CTA_PROTOINFO_TCP")
    assert tcp.get_attr("CTA_PROTOINFO_TCP_STATE") == ctmsg.TCP_CONNTRACK_ESTABLISHED
    liberal = (ctmsg.IP_CT_TCP_FLAG_BE_LIBERAL, ctmsg.IP_CT_TCP_FLAG_BE_LIBERAL)
    assert tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL") == liberal
    assert tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_REPLY") == liberal


def test_create_ipv6_udp_has_no_tcp_info_and_v6_nat() -> None:
    backend = IPv6Address("fd99:2::11")
    buf = ctmsg.encode_create(1, ORIG6, timeout=30, nat_dst=NatSpec(backend, 5300), status=0x8)
    msg = _pyroute2(buf)
    assert msg["nfgen_family"] == socket.AF_INET6
    assert _tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == ORIG6
    assert _tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == ORIG6.reverse()
    assert msg.get_attr("CTA_PROTOINFO") is None
    assert msg.get_attr("CTA_NAT_SRC") is None
    assert _nat_of(msg.get_attr("CTA_NAT_DST"), v6=True) == (backend, backend, 5300, 5300)
    assert (msg.get_attr("CTA_STATUS"), msg.get_attr("CTA_TIMEOUT")) == (0x8, 30)


def test_create_carries_the_tcp_state_asked_for() -> None:
    for state in range(1, 10):
        entry = ctmsg.decode_entry(
            _only(ctmsg.encode_create(1, ORIG, timeout=5, tcp_state=state)).payload
        )
        assert entry is not None and entry.tcp_state == state


_PORT = st.integers(1, 65535)
_U32 = st.integers(0, (1 << 32) - 1)


@st.composite
def _flows(draw: st.DrawFn) -> tuple[CtTuple, NatSpec, NatSpec]:
    bits, addr = draw(st.sampled_from([(32, IPv4Address), (128, IPv6Address)]))
    ips = st.integers(0, (1 << bits) - 1).map(addr)
    proto = draw(st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP]))
    orig = CtTuple(draw(ips), draw(ips), proto, draw(_PORT), draw(_PORT))
    return orig, NatSpec(draw(ips), draw(_PORT)), NatSpec(draw(ips), draw(_PORT))


@settings(max_examples=300, deadline=None)
@given(flow=_flows(), seq=_U32, timeout=_U32, status=_U32)
def test_create_round_trips_any_flow(
    flow: tuple[CtTuple, NatSpec, NatSpec], seq: int, timeout: int, status: int
) -> None:
    orig, dnat, snat = flow
    buf = ctmsg.encode_create(seq, orig, timeout=timeout, nat_dst=dnat, nat_src=snat, status=status)
    m = _only(buf)
    assert m.seq == seq and m.type == NEW
    tcp = orig.proto == socket.IPPROTO_TCP
    state = ctmsg.TCP_CONNTRACK_ESTABLISHED if tcp else None
    assert ctmsg.decode_entry(m.payload) == ctmsg.CtEntry(
        orig, orig.reverse(), status, timeout, state
    )
    msg = _pyroute2(buf)
    v6 = orig.src.version == 6
    assert _nat_of(msg.get_attr("CTA_NAT_DST"), v6) == (dnat.addr, dnat.addr, dnat.port, dnat.port)
    assert _nat_of(msg.get_attr("CTA_NAT_SRC"), v6) == (snat.addr, snat.addr, snat.port, snat.port)


def test_get_delete_dump_and_liberal_requests() -> None:
    get = _pyroute2(ctmsg.encode_get(3, ORIG))
    assert (get["header"]["type"], get["header"]["flags"]) == (
        GET,
        ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_ACK,
    )
    assert _tuple_of(get.get_attr("CTA_TUPLE_ORIG")) == ORIG
    assert get.get_attr("CTA_TUPLE_REPLY") is None
    delete = _pyroute2(ctmsg.encode_delete(4, ORIG6))
    assert delete["header"]["type"] == DELETE and delete["nfgen_family"] == socket.AF_INET6
    assert _tuple_of(delete.get_attr("CTA_TUPLE_ORIG")) == ORIG6
    dump = _only(ctmsg.encode_dump(5))
    assert (dump.type, dump.flags, dump.payload) == (
        GET,
        ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_DUMP,
        bytes([socket.AF_UNSPEC, 0, 0, 0]),
    )
    assert _only(ctmsg.encode_dump(6, socket.AF_INET6)).payload[0] == socket.AF_INET6
    # An update (no CREATE: the entry must exist) that only loosens window tracking.
    liberal = _pyroute2(ctmsg.encode_liberal(8, ORIG))
    assert liberal["header"]["flags"] == ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_ACK
    tcp = liberal.get_attr("CTA_PROTOINFO").get_attr("CTA_PROTOINFO_TCP")
    assert tcp.get_attr("CTA_PROTOINFO_TCP_STATE") is None
    assert tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL") == (8, 8)
    assert liberal.get_attr("CTA_STATUS") is None and liberal.get_attr("CTA_NAT_DST") is None


# --- decoding what the kernel sends (encoded by pyroute2) ------------------------------


def test_decode_a_dumped_dnat_entry_with_attributes_halb_skips() -> None:
    reply = CtTuple(BACKEND, CLIENT, socket.IPPROTO_TCP, 8080, 40000)
    buf = _kernel_like(
        [
            ("CTA_TUPLE_ORIG", _tuple_nla(ORIG)),
            ("CTA_TUPLE_REPLY", _tuple_nla(reply)),
            ("CTA_STATUS", ctmsg.IPS_CONFIRMED | ctmsg.IPS_DST_NAT),
            ("CTA_MARK", 0x42),
            ("CTA_TIMEOUT", 431999),
            ("CTA_ID", 0xDEADBEEF),
            ("CTA_ZONE", 3),
            (
                "CTA_PROTOINFO",
                {"attrs": [("CTA_PROTOINFO_TCP", {"attrs": [("CTA_PROTOINFO_TCP_STATE", 7)]})]},
            ),
        ]
    )
    m = _only(buf)
    assert m.type == NEW and m.seq == 9
    assert ctmsg.decode_entry(m.payload) == ctmsg.CtEntry(
        ORIG, reply, ctmsg.IPS_CONFIRMED | ctmsg.IPS_DST_NAT, 431999, 7, 3
    )


def test_decode_defaults_and_ipv6() -> None:
    buf = _kernel_like(
        [("CTA_TUPLE_ORIG", _tuple_nla(ORIG6)), ("CTA_TUPLE_REPLY", _tuple_nla(ORIG6.reverse()))],
        family=socket.AF_INET6,
    )
    entry = ctmsg.decode_entry(_only(buf).payload)
    assert entry == ctmsg.CtEntry(
        ORIG6, ORIG6.reverse(), status=0, timeout=None, tcp_state=None, zone=0
    )


def test_entries_without_ports_are_skipped_not_errors() -> None:
    icmp = CtTuple(CLIENT, VIP, socket.IPPROTO_ICMP, 0, 0)
    buf = _kernel_like(
        [
            ("CTA_TUPLE_ORIG", _tuple_nla(icmp, ports=False)),
            ("CTA_TUPLE_REPLY", _tuple_nla(icmp.reverse(), ports=False)),
        ]
    )
    assert ctmsg.decode_entry(_only(buf).payload) is None


def test_parse_splits_a_datagram_on_aligned_boundaries() -> None:
    # A 5-byte payload needs 3 bytes of padding before the next message.
    odd = ctmsg.NLMSG_HDR.pack(16 + 5, 0x10, 0, 1, 77) + b"hello" + b"\0" * 3
    buf = odd + ctmsg.encode_get(2, ORIG) + ctmsg.encode_delete(3, ORIG)
    msgs = list(ctmsg.parse(buf))
    assert [(m.type, m.seq) for m in msgs] == [(0x10, 1), (GET, 2), (DELETE, 3)]
    assert msgs[0].payload == b"hello" and msgs[0].pid == 77
    # The last message may end unpadded.
    assert [m.payload for m in ctmsg.parse(odd[:-3])] == [b"hello"]
    assert list(ctmsg.parse(b"")) == []


def test_errors_acks_and_event_kinds() -> None:
    def error(code: int) -> ctmsg.NlMessage:
        return _only(
            ctmsg.NLMSG_HDR.pack(36, ctmsg.NLMSG_ERROR, 0, 4, 0)
            + struct.pack("=i", code)
            + b"\0" * 16
        )

    assert ctmsg.decode_error(error(0).payload) == 0
    assert ctmsg.decode_error(error(-errno.EEXIST).payload) == errno.EEXIST
    created = _only(_kernel_like([], flags=ctmsg.NLM_F_CREATE | ctmsg.NLM_F_EXCL))
    assert ctmsg.is_event_new(created) and ctmsg.msg_kind(created) == "new"
    updated = _only(_kernel_like([]))
    assert not ctmsg.is_event_new(updated) and ctmsg.msg_kind(updated) == "update"
    destroyed = _only(ctmsg.encode_delete(1, ORIG))
    assert ctmsg.msg_kind(destroyed) == "destroy"
    assert ctmsg.msg_kind(_only(ctmsg.encode_get(1, ORIG))) is None
    assert ctmsg.msg_kind(error(0)) is None


# --- malformed input -------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) & 3)


def _body(*attrs: bytes) -> bytes:
    return bytes([socket.AF_INET, 0, 0, 0]) + b"".join(attrs)


def _raw_tuple(kind: int, ip: list[bytes], proto: list[bytes]) -> bytes:
    nested = ctmsg.NLA_F_NESTED
    return _attr(
        kind | nested,
        _attr(ctmsg.CTA_TUPLE_IP | nested, b"".join(ip))
        + _attr(ctmsg.CTA_TUPLE_PROTO | nested, b"".join(proto)),
    )


V4 = [_attr(ctmsg.CTA_IP_V4_SRC, CLIENT.packed), _attr(ctmsg.CTA_IP_V4_DST, VIP.packed)]
PORTS = [
    _attr(ctmsg.CTA_PROTO_NUM, b"\x06"),
    _attr(ctmsg.CTA_PROTO_SRC_PORT, struct.pack("!H", 40000)),
    _attr(ctmsg.CTA_PROTO_DST_PORT, struct.pack("!H", 80)),
]
REPLY = _raw_tuple(ctmsg.CTA_TUPLE_REPLY, V4, PORTS)


def test_hand_built_body_matches_the_codec() -> None:
    # The fixtures below are only meaningful if their well-formed form decodes.
    entry = ctmsg.decode_entry(_body(_raw_tuple(ctmsg.CTA_TUPLE_ORIG, V4, PORTS), REPLY))
    assert entry is not None and entry.orig == ORIG


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x02\0", "2 bytes, no nfgenmsg header"),
        (_body(REPLY), "lacks CTA_TUPLE_ORIG or CTA_TUPLE_REPLY"),
        (_body(REPLY + b"\x01\0"), "ctnetlink entry: .* 2 bytes left"),
        (_body(REPLY[:-4]), "ctnetlink entry: attribute 2 at byte 4 has length"),
        (
            _body(_attr(ctmsg.CTA_TUPLE_ORIG | ctmsg.NLA_F_NESTED, b""), REPLY),
            "CTA_TUPLE_ORIG lacks CTA_TUPLE_IP or CTA_TUPLE_PROTO",
        ),
        (
            _body(_raw_tuple(ctmsg.CTA_TUPLE_ORIG, V4[:1], PORTS), REPLY),
            r"CTA_TUPLE_ORIG lacks CTA_TUPLE_IP\.CTA_IP_V4_DST",
        ),
        (
            _body(_raw_tuple(ctmsg.CTA_TUPLE_ORIG, [], PORTS), REPLY),
            "CTA_TUPLE_ORIG lacks CTA_TUPLE_IP.CTA_IP_V6_SRC",
        ),
        (
            _body(
                _raw_tuple(
                    ctmsg.CTA_TUPLE_ORIG,
                    [V4[0], _attr(ctmsg.CTA_IP_V4_DST, b"\x0a\x63\x00")],
                    PORTS,
                ),
                REPLY,
            ),
            r"CTA_TUPLE_ORIG\.CTA_TUPLE_IP\.CTA_IP_V4_DST is 3 bytes, not 4",
        ),
        (
            _body(
                _raw_tuple(
                    ctmsg.CTA_TUPLE_ORIG,
                    [_attr(ctmsg.CTA_IP_V6_SRC, b"\0" * 16), _attr(ctmsg.CTA_IP_V6_DST, b"\0" * 4)],
                    PORTS,
                ),
                REPLY,
            ),
            r"CTA_IP_V6_DST is 4 bytes, not 16",
        ),
        (
            _body(_raw_tuple(ctmsg.CTA_TUPLE_ORIG, V4, PORTS[1:]), REPLY),
            r"CTA_TUPLE_ORIG lacks CTA_TUPLE_PROTO\.CTA_PROTO_NUM",
        ),
        (
            _body(_raw_tuple(ctmsg.CTA_TUPLE_ORIG, V4, PORTS[:2]), REPLY),
            r"CTA_TUPLE_ORIG lacks CTA_TUPLE_PROTO\.CTA_PROTO_DST_PORT",
        ),
        (
            _body(
                _raw_tuple(
                    ctmsg.CTA_TUPLE_ORIG,
                    V4,
                    [*PORTS[:2], _attr(ctmsg.CTA_PROTO_DST_PORT, b"\0\0\0\x50")],
                ),
                REPLY,
            ),
            r"CTA_PROTO_DST_PORT is 4 bytes, not 2",
        ),
        (
            _body(
                _raw_tuple(ctmsg.CTA_TUPLE_ORIG, V4, PORTS),
                REPLY,
                _attr(ctmsg.CTA_STATUS, b"\0\x08"),
            ),
            "CTA_STATUS is 2 bytes, want 4",
        ),
        (
            _body(
                _raw_tuple(ctmsg.CTA_TUPLE_ORIG, V4, PORTS),
                REPLY,
                _attr(ctmsg.CTA_PROTOINFO | ctmsg.NLA_F_NESTED, b"\x09\0\x01\0"),
            ),
            "CTA_PROTOINFO: attribute 1 at byte 0 has length 9, 4 bytes left",
        ),
    ],
    ids=[
        "no-nfgenmsg",
        "no-orig",
        "stray-bytes",
        "cut-attribute",
        "empty-tuple",
        "one-address",
        "no-address",
        "short-v4",
        "short-v6",
        "no-protonum",
        "one-port",
        "long-port",
        "short-status",
        "cut-protoinfo",
    ],
)
def test_malformed_entries_are_rejected_naming_the_part(body: bytes, message: str) -> None:
    with pytest.raises(CtMessageError, match=message):
        ctmsg.decode_entry(body)


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (ctmsg.encode_get(1, ORIG)[:-1], r"message at byte 0: length 72, 71 bytes left"),
        (ctmsg.encode_get(1, ORIG) + b"\0" * 8, "message at byte 72: 8 bytes, no header"),
        (ctmsg.NLMSG_HDR.pack(8, 3, 0, 1, 0), "message at byte 0: length 8, 16 bytes left"),
    ],
    ids=["cut-short", "stray-bytes", "length-below-header"],
)
def test_truncated_datagrams_are_rejected(buf: bytes, message: str) -> None:
    # A silent stop would drop the ACK or event the tail held.
    with pytest.raises(CtMessageError, match=message):
        list(ctmsg.parse(buf))


def test_short_error_message_is_rejected() -> None:
    with pytest.raises(CtMessageError, match="NLMSG_ERROR payload of 2 bytes"):
        ctmsg.decode_error(b"\0\0")


# --- bad requests refused before they reach the kernel --------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orig": CtTuple(CLIENT, ORIG6.dst, 6, 1, 2)}, "mixes IPv4 and IPv6"),
        ({"orig": CtTuple(CLIENT, VIP, 256, 1, 2)}, "protocol 256 out of range 0-255"),
        ({"orig": CtTuple(CLIENT, VIP, 6, 0, 80)}, "source port 0 out of range 1-65535"),
        ({"orig": CtTuple(CLIENT, VIP, 6, 1, 65536)}, "destination port 65536 out of range"),
        ({"nat_dst": NatSpec(ORIG6.dst, 80)}, "nat_dst address fd99::100 is not IPv4"),
        ({"nat_src": NatSpec(SNAT, 0)}, "nat_src port 0 out of range"),
        ({"timeout": -1}, "timeout -1 out of range"),
        ({"timeout": 1 << 32}, "timeout 4294967296 out of range"),
        ({"status": -1}, "status -0x1 is not a 32-bit flag set"),
        ({"tcp_state": 0}, "TCP state 0 out of range 1-9"),
        ({"seq": 1 << 32}, "netlink sequence number 4294967296 out of range"),
    ],
)
def test_bad_create_requests_raise_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"seq": 1, "orig": ORIG, "timeout": 60, **kwargs}
    with pytest.raises(CtMessageError, match=message):
        ctmsg.encode_create(args.pop("seq"), args.pop("orig"), **args)
    assert issubclass(CtMessageError, ValueError)  # callers' per-flow `except ValueError`


def test_bad_tuples_are_refused_by_every_request() -> None:
    bad = CtTuple(CLIENT, VIP, 6, 0, 80)
    for encode in (ctmsg.encode_get, ctmsg.encode_delete, ctmsg.encode_liberal):
        with pytest.raises(CtMessageError, match="source port 0"):
            encode(1, bad)


# --- fuzz: no input makes the decoder fail with anything but CtMessageError -----------

_SAMPLES = [
    ctmsg.encode_create(1, ORIG, timeout=9, nat_dst=NatSpec(BACKEND, 8080)),
    ctmsg.encode_create(2, ORIG6, timeout=9, nat_src=NatSpec(ORIG6.src, 1)),
    ctmsg.encode_liberal(3, ORIG),
    ctmsg.encode_delete(4, ORIG6),
]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["length", "flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(buf)))
        if op == "length" and len(buf) >= 22:
            # An attribute's length field (every attribute starts 4-aligned after the
            # 20 bytes of headers): the mutation that trips decoders the most.
            at = 20 + 4 * draw(st.integers(0, (len(buf) - 22) // 4))
            length = int.from_bytes(buf[at : at + 2], "little") + draw(st.integers(-6, 6))
            buf[at : at + 2] = (length % 65536).to_bytes(2, "little")
        elif op == "flip" and at < len(buf):
            buf[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at < len(buf):
            del buf[at : at + draw(st.integers(1, 8))]
    return bytes(buf)


@settings(max_examples=1500, deadline=None)
@given(buf=st.one_of(_mutated(), st.binary(max_size=200)))
def test_mutated_messages_decode_or_raise_ctmessageerror(buf: bytes) -> None:
    try:
        for m in ctmsg.parse(buf):
            entry = ctmsg.decode_entry(m.payload)
            assert entry is None or isinstance(entry, ctmsg.CtEntry)
            if m.type == ctmsg.NLMSG_ERROR:
                ctmsg.decode_error(m.payload)
    except CtMessageError as exc:
        assert str(exc)  # says what is wrong
