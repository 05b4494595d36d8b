"""Pure: IPVS sync protocol version 1 messages (net/netfilter/ipvs/ip_vs_sync.c).

A message is an 8-byte header (reserved 0, sync id, total size, connection count,
version 1, spare 0) followed by connection entries, each 4-byte aligned:

    type (0 IPv4, 1 IPv6) | protocol | version:4 size:12
    flags (IP_VS_CONN_F_*, u32) | state (u16) | cport | vport | dport
    fwmark (u32) | timeout (u32, seconds; 0 = the state's default)
    caddr | vaddr | daddr (4 or 16 bytes each)

All fields are in network order. The kernel's backup daemon drops a whole message
whose size field differs from the datagram length, so messages are built complete.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from halb.model import IPAddress, Protocol

__all__ = [
    "HEADER",
    "MAX_CONNS_PER_MESSAGE",
    "SYNC_GROUP",
    "SYNC_PORT",
    "TCP_STATE",
    "SyncConn",
    "SyncError",
    "decode",
    "encode",
    "encode_all",
]

SYNC_GROUP = "224.0.0.81"  # the kernel's default multicast group and port
SYNC_PORT = 8848
SYNC_PROTO_VER = 1
HEADER = struct.Struct("!BBHBbH")
_FIXED = struct.Struct("!BBHIHHHHII")  # up to the addresses
MAX_CONNS_PER_MESSAGE = 255  # the count field is one byte
STYPE_F_INET6 = 1
IP_VS_CONN_F_TEMPLATE = 0x1000

# IP_VS_TCP_S_*; UDP and SCTP flows are synced with state 0 (NORMAL / NONE).
TCP_STATE = {
    "NONE": 0,
    "ESTABLISHED": 1,
    "SYN_SENT": 2,
    "SYN_RECV": 3,
    "FIN_WAIT": 4,
    "TIME_WAIT": 5,
    "CLOSE": 6,
    "CLOSE_WAIT": 7,
    "LAST_ACK": 8,
    "LISTEN": 9,
    "SYNACK": 10,
}


class SyncError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SyncConn:
    protocol: Protocol
    caddr: IPAddress
    cport: int
    vaddr: IPAddress
    vport: int
    daddr: IPAddress
    dport: int
    flags: int  # forwarding method in the low 3 bits
    state: int = TCP_STATE["ESTABLISHED"]
    timeout: int = 0
    fwmark: int = 0

    @property
    def size(self) -> int:
        return _FIXED.size + 3 * (4 if self.caddr.version == 4 else 16)


def _conn(c: SyncConn) -> bytes:
    v6 = c.caddr.version == 6
    if {c.vaddr.version, c.daddr.version} != {c.caddr.version}:
        raise SyncError(f"mixed address families in {c}")
    state = c.state if c.protocol is Protocol.TCP else 0
    return (
        _FIXED.pack(
            STYPE_F_INET6 if v6 else 0,
            c.protocol.number,
            c.size,  # version 0 in the top 4 bits
            c.flags,
            state,
            c.cport,
            c.vport,
            c.dport,
            c.fwmark,
            c.timeout,
        )
        + c.caddr.packed
        + c.vaddr.packed
        + c.daddr.packed
    )


def encode(conns: Iterable[SyncConn], sync_id: int, max_size: int = 65507) -> bytes:
    """One message; raises SyncError if the connections do not fit."""
    entries = [_conn(c) for c in conns]
    size = HEADER.size + sum(len(e) for e in entries)
    if len(entries) > MAX_CONNS_PER_MESSAGE or size > max_size:
        raise SyncError(f"{len(entries)} connections ({size} bytes) do not fit in one message")
    return _message(entries, sync_id)


def encode_all(conns: Iterable[SyncConn], sync_id: int, max_size: int = 65507) -> Iterator[bytes]:
    """As many messages as needed, each as full as the limits allow."""
    batch: list[bytes] = []
    size = HEADER.size
    for c in conns:
        raw = _conn(c)
        if batch and (len(batch) == MAX_CONNS_PER_MESSAGE or size + len(raw) > max_size):
            yield _message(batch, sync_id)
            batch, size = [], HEADER.size
        batch.append(raw)
        size += len(raw)
    if batch:
        yield _message(batch, sync_id)


def _message(entries: list[bytes], sync_id: int) -> bytes:
    body = b"".join(entries)
    head = HEADER.pack(0, sync_id & 0xFF, HEADER.size + len(body), len(entries), SYNC_PROTO_VER, 0)
    return head + body


def _walk(body: bytes) -> Iterator[tuple[int, int]]:
    """(offset, size) of each entry."""
    at = 0
    while at < len(body):
        if at + 4 > len(body):
            raise SyncError("truncated entry")
        (ver_size,) = struct.unpack_from("!H", body, at + 2)
        size = ver_size & 0x0FFF
        if ver_size >> 12 or size < _FIXED.size or at + size > len(body):
            raise SyncError(f"bad entry at {at}: version/size {ver_size:#x}")
        yield at, size
        at += (size + 3) & ~3


def decode(message: bytes) -> tuple[int, list[SyncConn]]:
    """(sync id, connections) of a version 1 message; options (sequence numbers,
    persistence data) are skipped."""
    if len(message) < HEADER.size:
        raise SyncError("message shorter than its header")
    reserved, sync_id, size, count, version, spare = HEADER.unpack_from(message)
    if reserved or version != SYNC_PROTO_VER or spare:
        raise SyncError("not a version 1 sync message")
    if size != len(message):
        raise SyncError(f"size field {size} != message length {len(message)}")
    body = message[HEADER.size :]
    conns = []
    for at, _ in _walk(body):
        (kind, proto, _vs, flags, state, cport, vport, dport, fwmark, timeout) = _FIXED.unpack_from(
            body, at
        )
        alen = 16 if kind & STYPE_F_INET6 else 4
        addrs = body[at + _FIXED.size : at + _FIXED.size + 3 * alen]
        ip: type[IPv4Address] | type[IPv6Address] = IPv6Address if alen == 16 else IPv4Address
        caddr, vaddr, daddr = (ip(addrs[i * alen : (i + 1) * alen]) for i in range(3))
        protocol = {6: Protocol.TCP, 17: Protocol.UDP}.get(proto)
        if protocol is None:
            raise SyncError(f"unsupported protocol {proto}")
        conns.append(
            SyncConn(
                protocol, caddr, cport, vaddr, vport, daddr, dport, flags, state, timeout, fwmark
            )
        )
    if len(conns) != count:
        raise SyncError(f"header says {count} connections, found {len(conns)}")
    return sync_id, conns
