"""Pure ctnetlink codec: conntrack entries <-> netlink messages (no I/O).

Only what halb needs: create (with NAT), get, delete, dump requests, and decoding of
entries from dumps and events. Encoding by hand with struct is ~100x faster than
building pyroute2 message objects, which matters when a standby installs a full
snapshot before it may announce the VIP.

Installing a NATed entry (see docs in PLATFORM.md): send the original tuple, a reply
tuple that is simply its reverse, and describe the translation with CTA_NAT_DST /
CTA_NAT_SRC; the kernel rebuilds the reply tuple from them. A dumped reply tuple with
SRC_NAT/DST_NAT status bits is silently accepted without any NAT binding.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from halb.model import IPAddress

__all__ = [
    "IPS_ASSURED",
    "IPS_CONFIRMED",
    "IPS_DST_NAT",
    "IPS_SEEN_REPLY",
    "IPS_SRC_NAT",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "TCP_CONNTRACK_ESTABLISHED",
    "CtEntry",
    "CtMessageError",
    "CtTuple",
    "NatSpec",
    "NlMessage",
    "decode_entry",
    "decode_error",
    "encode_create",
    "encode_delete",
    "encode_dump",
    "encode_get",
    "is_event_new",
    "msg_kind",
    "parse",
]

# netlink
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFGEN_HDR = struct.Struct("=BBH")  # family, version, res_id (big-endian, 0)

# ctnetlink
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_NAT_DST = 13
CTA_ZONE = 18
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5
CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2

IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
TCP_CONNTRACK_ESTABLISHED = 3

_TYPE_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_TYPE_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
_TYPE_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE


@dataclass(frozen=True, slots=True)
class CtTuple:
    src: IPAddress
    dst: IPAddress
    proto: int
    sport: int
    dport: int

    def reverse(self) -> CtTuple:
        return CtTuple(self.dst, self.src, self.proto, self.dport, self.sport)


@dataclass(frozen=True, slots=True)
class CtEntry:
    """A decoded conntrack entry (the fields halb reads)."""

    orig: CtTuple
    reply: CtTuple
    status: int = 0
    timeout: int | None = None
    tcp_state: int | None = None
    zone: int = 0


@dataclass(frozen=True, slots=True)
class NatSpec:
    """A NAT binding to create with the entry: translate to exactly addr:port."""

    addr: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class NlMessage:
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


class CtMessageError(ValueError):
    """A netlink / ctnetlink message that the kernel cannot have sent (or cannot read):
    the text names the part (attribute, tuple, byte offset) that is wrong."""


# --- encoding -----------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length & 3)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _family(addr: IPAddress) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


# Fixed layouts, packed in one call each (installing a snapshot encodes one message
# per flow; building it attribute by attribute costs 3x more). Ports are converted with
# htons so the native-order "H" lands in network order.
_N = NLA_F_NESTED
_TUPLE4 = struct.Struct("=HHHHHH4sHH4sHHHHB3xHHH2xHHH2x")
_TUPLE6 = struct.Struct("=HHHHHH16sHH16sHHHHB3xHHH2xHHH2x")
_NAT4 = struct.Struct("=HHHH4sHH4sHHHHH2xHHH2x")
_NAT6 = struct.Struct("=HHHH16sHH16sHHHHH2xHHH2x")
_STATUS_TIMEOUT = struct.Struct("=HHIHHI")


def _check_tuple(t: CtTuple) -> None:
    if t.src.version != t.dst.version:
        raise CtMessageError(f"tuple {t} mixes IPv{t.src.version} and IPv{t.dst.version}")
    if not 0 <= t.proto < 256:
        raise CtMessageError(f"tuple {t}: protocol {t.proto} out of range 0-255")
    _check_port("source port", t.sport)
    _check_port("destination port", t.dport)


def _tuple(kind: int, t: CtTuple) -> bytes:
    """The packed tuple; the caller has checked it with _check_tuple."""
    sport, dport = socket.htons(t.sport), socket.htons(t.dport)
    if t.src.version == 4:
        return _TUPLE4.pack(
            52, kind | _N, 20, CTA_TUPLE_IP | _N,
            8, CTA_IP_V4_SRC, t.src.packed, 8, CTA_IP_V4_DST, t.dst.packed,
            28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM, t.proto,
            6, CTA_PROTO_SRC_PORT, sport, 6, CTA_PROTO_DST_PORT, dport,
        )  # fmt: skip
    return _TUPLE6.pack(
        76, kind | _N, 44, CTA_TUPLE_IP | _N,
        20, CTA_IP_V6_SRC, t.src.packed, 20, CTA_IP_V6_DST, t.dst.packed,
        28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM, t.proto,
        6, CTA_PROTO_SRC_PORT, sport, 6, CTA_PROTO_DST_PORT, dport,
    )  # fmt: skip


def _nat(kind: int, nat: NatSpec) -> bytes:
    port = socket.htons(nat.port)
    raw = nat.addr.packed
    if nat.addr.version == 4:
        return _NAT4.pack(
            40, kind | _N, 8, CTA_NAT_V4_MINIP, raw, 8, CTA_NAT_V4_MAXIP, raw,
            20, CTA_NAT_PROTO | _N, 6, CTA_PROTONAT_PORT_MIN, port, 6, CTA_PROTONAT_PORT_MAX, port,
        )  # fmt: skip
    return _NAT6.pack(
        64, kind | _N, 20, CTA_NAT_V6_MINIP, raw, 20, CTA_NAT_V6_MAXIP, raw,
        20, CTA_NAT_PROTO | _N, 6, CTA_PROTONAT_PORT_MIN, port, 6, CTA_PROTONAT_PORT_MAX, port,
    )  # fmt: skip


def _tcp_info(state: int) -> bytes:
    liberal = struct.pack("BB", IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)
    return _nest(
        CTA_PROTOINFO,
        _nest(
            CTA_PROTOINFO_TCP,
            _attr(CTA_PROTOINFO_TCP_STATE, struct.pack("B", state)),
            _attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, liberal),
            _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, liberal),
        ),
    )


_TCP_INFO = {state: _tcp_info(state) for state in range(1, 10)}


def _message(msg_type: int, flags: int, seq: int, family: int, attrs: bytes) -> bytes:
    if not 0 <= seq < 1 << 32:
        raise CtMessageError(f"netlink sequence number {seq} out of range 0-{(1 << 32) - 1}")
    body = NFGEN_HDR.pack(family, 0, 0) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, flags, seq, 0) + body


def _check_port(what: str, port: int) -> None:
    if not 0 < port < 65536:
        raise CtMessageError(f"{what} {port} out of range 1-65535")


def encode_create(
    seq: int,
    orig: CtTuple,
    *,
    timeout: int,
    nat_dst: NatSpec | None = None,
    nat_src: NatSpec | None = None,
    status: int = IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
    tcp_state: int = TCP_CONNTRACK_ESTABLISHED,
) -> bytes:
    """A CT_NEW create request (fails with EEXIST if the original tuple is present).

    Raises CtMessageError (a ValueError) for what the kernel could only misread (mixed
    families, ports or fields out of range), so one bad flow never poisons a batch.
    """
    _check_tuple(orig)
    for name, nat in (("nat_dst", nat_dst), ("nat_src", nat_src)):
        if nat is not None:
            _check_port(f"{name} port", nat.port)
            if nat.addr.version != orig.src.version:
                raise CtMessageError(
                    f"{name} address {nat.addr} is not IPv{orig.src.version} like {orig}"
                )
    if not 0 <= timeout < 1 << 32:
        raise CtMessageError(f"timeout {timeout} out of range 0-{(1 << 32) - 1} s")
    if not 0 <= status < 1 << 32:
        raise CtMessageError(f"status {status:#x} is not a 32-bit flag set")
    if tcp_state not in _TCP_INFO:
        raise CtMessageError(
            f"TCP state {tcp_state} out of range {min(_TCP_INFO)}-{max(_TCP_INFO)}"
        )
    attrs = [
        _tuple(CTA_TUPLE_ORIG, orig),
        _tuple(CTA_TUPLE_REPLY, orig.reverse()),
        _STATUS_TIMEOUT.pack(
            8, CTA_STATUS, socket.htonl(status), 8, CTA_TIMEOUT, socket.htonl(timeout)
        ),
    ]
    if orig.proto == socket.IPPROTO_TCP:
        attrs.append(_TCP_INFO[tcp_state])
    if nat_src is not None:
        attrs.append(_nat(CTA_NAT_SRC, nat_src))
    if nat_dst is not None:
        attrs.append(_nat(CTA_NAT_DST, nat_dst))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return _message(_TYPE_NEW, flags, seq, _family(orig.src), b"".join(attrs))


def encode_liberal(seq: int, orig: CtTuple) -> bytes:
    """Update an existing TCP entry to BE_LIBERAL window tracking in both directions.

    An entry a node kept from an earlier term tracked sequence numbers that moved on
    while another node carried the flow: strict tracking would call its packets
    invalid (and halb drops those).
    """
    liberal = struct.pack("BB", IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)
    info = _nest(
        CTA_PROTOINFO,
        _nest(
            CTA_PROTOINFO_TCP,
            _attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, liberal),
            _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, liberal),
        ),
    )
    _check_tuple(orig)
    attrs = _tuple(CTA_TUPLE_ORIG, orig) + info
    return _message(_TYPE_NEW, NLM_F_REQUEST | NLM_F_ACK, seq, _family(orig.src), attrs)


def encode_delete(seq: int, orig: CtTuple) -> bytes:
    _check_tuple(orig)
    return _message(
        _TYPE_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        _family(orig.src),
        _tuple(CTA_TUPLE_ORIG, orig),
    )


def encode_get(seq: int, orig: CtTuple) -> bytes:
    _check_tuple(orig)
    return _message(
        _TYPE_GET, NLM_F_REQUEST | NLM_F_ACK, seq, _family(orig.src), _tuple(CTA_TUPLE_ORIG, orig)
    )


def encode_dump(seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """Dump the whole table (AF_UNSPEC: IPv4 and IPv6)."""
    return _message(_TYPE_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, b"")


# --- decoding -----------------------------------------------------------------------


def parse(buf: bytes) -> Iterator[NlMessage]:
    """Split a datagram into netlink messages; a truncated one raises CtMessageError
    (silently stopping would lose the ACK or event it held)."""
    off = 0
    end = len(buf)
    while off < end:
        if off + NLMSG_HDR.size > end:
            raise CtMessageError(f"netlink message at byte {off}: {end - off} bytes, no header")
        length, mtype, flags, seq, pid = NLMSG_HDR.unpack_from(buf, off)
        if length < NLMSG_HDR.size or off + length > end:
            raise CtMessageError(
                f"netlink message at byte {off}: length {length}, {end - off} bytes left"
            )
        yield NlMessage(mtype, flags, seq, pid, buf[off + NLMSG_HDR.size : off + length])
        off += (length + 3) & ~3


def decode_error(payload: bytes) -> int:
    """The positive errno of an NLMSG_ERROR (0 is an ACK)."""
    if len(payload) < 4:
        raise CtMessageError(f"NLMSG_ERROR payload of {len(payload)} bytes, no error code")
    code: int = struct.unpack_from("=i", payload, 0)[0]
    return -code


# Names of the attributes an error can point at, built once (not per message).
_IP = "CTA_TUPLE_IP"
_PROTO = "CTA_TUPLE_PROTO"
_BE32 = struct.Struct("!I")
_BE16 = struct.Struct("!H")
_U8 = struct.Struct("B")


def _attrs(buf: bytes, where: str, part: str = "", off: int = 0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    end = len(buf)
    while off < end:
        length, kind = struct.unpack_from("=HH", buf, off) if off + 4 <= end else (0, 0)
        if length < 4 or off + length > end:
            name = f"{where}.{part}" if part else where
            raise CtMessageError(
                f"{name}: attribute {kind & NLA_TYPE_MASK} at byte {off} has length"
                f" {length}, {end - off} bytes left"
            )
        out[kind & NLA_TYPE_MASK] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


_IP_NAMES = {
    CTA_IP_V4_SRC: "CTA_IP_V4_SRC",
    CTA_IP_V4_DST: "CTA_IP_V4_DST",
    CTA_IP_V6_SRC: "CTA_IP_V6_SRC",
    CTA_IP_V6_DST: "CTA_IP_V6_DST",
}


def _tuple_error(ip: dict[int, bytes], proto: dict[int, bytes], where: str) -> CtMessageError:
    """What is wrong with a tuple that failed the fast path's combined check."""
    v4 = CTA_IP_V4_SRC in ip or CTA_IP_V4_DST in ip
    pair, size = ((CTA_IP_V4_SRC, CTA_IP_V4_DST), 4) if v4 else ((CTA_IP_V6_SRC, CTA_IP_V6_DST), 16)
    expected = [
        *((f"{_IP}.{_IP_NAMES[k]}", ip.get(k), size) for k in pair),
        (f"{_PROTO}.CTA_PROTO_NUM", proto.get(CTA_PROTO_NUM), 1),
        (f"{_PROTO}.CTA_PROTO_SRC_PORT", proto.get(CTA_PROTO_SRC_PORT), 2),
        (f"{_PROTO}.CTA_PROTO_DST_PORT", proto.get(CTA_PROTO_DST_PORT), 2),
    ]
    for name, raw, want in expected:
        if raw is None:
            return CtMessageError(f"{where} lacks {name}")
        if len(raw) != want:
            return CtMessageError(f"{where}.{name} is {len(raw)} bytes, not {want}")
    return CtMessageError(f"{where} is malformed")  # unreachable while the checks agree


def _decode_tuple(raw: bytes, where: str) -> CtTuple | None:
    a = _attrs(raw, where)
    ip_raw, proto_raw = a.get(CTA_TUPLE_IP), a.get(CTA_TUPLE_PROTO)
    if ip_raw is None or proto_raw is None:
        raise CtMessageError(f"{where} lacks {_IP} or {_PROTO}")
    ip = _attrs(ip_raw, where, _IP)
    proto = _attrs(proto_raw, where, _PROTO)
    num = proto.get(CTA_PROTO_NUM)
    sport = proto.get(CTA_PROTO_SRC_PORT)
    dport = proto.get(CTA_PROTO_DST_PORT)
    if sport is None and dport is None and num is not None and len(num) == 1:
        return None  # not a port-carrying entry (ICMP has ids, not ports)
    # One combined check keeps the common case fast; _tuple_error says what is wrong.
    src = ip.get(CTA_IP_V4_SRC)
    dst = ip.get(CTA_IP_V4_DST)
    size = 4
    if src is None and dst is None:
        src, dst, size = ip.get(CTA_IP_V6_SRC), ip.get(CTA_IP_V6_DST), 16
    if (
        src is None
        or dst is None
        or len(src) != size
        or len(dst) != size
        or num is None
        or len(num) != 1
        or sport is None
        or dport is None
        or len(sport) != 2
        or len(dport) != 2
    ):
        raise _tuple_error(ip, proto, where)
    addr = IPv4Address if size == 4 else IPv6Address
    return CtTuple(addr(src), addr(dst), num[0], _BE16.unpack(sport)[0], _BE16.unpack(dport)[0])


def _field(a: dict[int, bytes], kind: int, fmt: struct.Struct, where: str) -> int | None:
    raw = a.get(kind)
    if raw is None:
        return None
    if len(raw) < fmt.size:
        raise CtMessageError(f"{where} is {len(raw)} bytes, want {fmt.size}")
    value: int = fmt.unpack_from(raw)[0]
    return value


def decode_entry(payload: bytes) -> CtEntry | None:
    """A CT_NEW / CT_DELETE message body (after nlmsghdr) -> entry, or None if it is not
    a port-carrying entry. Malformed bodies raise CtMessageError naming the attribute."""
    if len(payload) < NFGEN_HDR.size:
        raise CtMessageError(f"ctnetlink message of {len(payload)} bytes, no nfgenmsg header")
    a = _attrs(payload, "ctnetlink entry", off=NFGEN_HDR.size)
    orig_raw, reply_raw = a.get(CTA_TUPLE_ORIG), a.get(CTA_TUPLE_REPLY)
    if orig_raw is None or reply_raw is None:
        raise CtMessageError("ctnetlink entry lacks CTA_TUPLE_ORIG or CTA_TUPLE_REPLY")
    orig = _decode_tuple(orig_raw, "CTA_TUPLE_ORIG")
    reply = _decode_tuple(reply_raw, "CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    status = _field(a, CTA_STATUS, _BE32, "CTA_STATUS")
    timeout = _field(a, CTA_TIMEOUT, _BE32, "CTA_TIMEOUT")
    zone = _field(a, CTA_ZONE, _BE16, "CTA_ZONE")
    tcp_state = None
    info_raw = a.get(CTA_PROTOINFO)
    if info_raw is not None:
        tcp_raw = _attrs(info_raw, "CTA_PROTOINFO").get(CTA_PROTOINFO_TCP, b"")
        tcp = _attrs(tcp_raw, "CTA_PROTOINFO", "CTA_PROTOINFO_TCP")
        tcp_state = _field(tcp, CTA_PROTOINFO_TCP_STATE, _U8, "CTA_PROTOINFO_TCP_STATE")
    return CtEntry(orig, reply, status or 0, timeout, tcp_state, zone or 0)


def msg_kind(msg: NlMessage) -> str | None:
    """'new' / 'update' / 'destroy' for a ctnetlink event, None otherwise."""
    if msg.type == _TYPE_DELETE:
        return "destroy"
    if msg.type == _TYPE_NEW:
        return "new" if is_event_new(msg) else "update"
    return None


def is_event_new(msg: NlMessage) -> bool:
    # ctnetlink flags the event of a new entry with CREATE|EXCL; updates carry neither.
    return bool(msg.flags & NLM_F_CREATE)
