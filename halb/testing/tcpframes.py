"""Pure TCP frame helpers for the PROXY protocol fixtures and benchmark: build an
Ethernet + IPv4/IPv6 + TCP frame in one call, decode one back, and verify its checksums
by recomputing them."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from halb.model import IPAddress
from halb.testing.packets import (
    ETH_P_IP,
    ETH_P_IPV6,
    checksum,
    eth,
    ipv4,
    ipv6,
    pseudo_header,
    tcp,
)

__all__ = ["Segment", "decode", "frame", "sack_option", "skb_ctx"]

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def frame(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    seq: int,
    ack: int = 0,
    flags: int,
    payload: bytes = b"",
    options: bytes = b"",
) -> bytes:
    seg = tcp(
        src, dst, sport, dport, flags=flags, seq=seq, ack=ack, payload=payload, options=options
    )
    if ip_address(src).version == 4:
        return eth(MAC_B, MAC_A, ETH_P_IP, ipv4(src, dst, 6, seg))
    return eth(MAC_B, MAC_A, ETH_P_IPV6, ipv6(src, dst, 6, seg))


def sack_option(*blocks: tuple[int, int]) -> bytes:
    """NOP NOP SACK(blocks), as Linux sends it (a multiple of 4 bytes)."""
    body = b"".join(struct.pack("!II", left, right) for left, right in blocks)
    return b"\x01\x01" + bytes([5, 2 + len(body)]) + body


def skb_ctx(gso_size: int = 0, gso_segs: int = 0) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN (192 bytes; the kernel takes only a few
    fields from it: gso_segs at 164, gso_size at 176)."""
    raw = bytearray(192)
    struct.pack_into("=I", raw, 164, gso_segs)
    struct.pack_into("=I", raw, 176, gso_size)
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class Segment:
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    options: bytes
    payload: bytes
    ip_ok: bool  # IPv4 header checksum (IPv6: always True) and length agree
    tcp_ok: bool  # TCP checksum recomputed over pseudo header + segment

    def sack_blocks(self) -> list[tuple[int, int]]:
        i, out = 0, []
        while i < len(self.options):
            kind = self.options[i]
            if kind == 0:
                break
            if kind == 1:
                i += 1
                continue
            length = self.options[i + 1]
            if kind == 5:
                body = self.options[i + 2 : i + length]
                out += [struct.unpack_from("!II", body, j) for j in range(0, len(body), 8)]
            i += length
        return out


def decode(raw: bytes) -> Segment:
    ethertype = struct.unpack_from("!H", raw, 12)[0]
    src: IPAddress
    dst: IPAddress
    if ethertype == ETH_P_IP:
        ihl = (raw[14] & 0xF) * 4
        total = struct.unpack_from("!H", raw, 16)[0]
        src, dst = IPv4Address(raw[26:30]), IPv4Address(raw[30:34])
        seg = raw[14 + ihl : 14 + total]
        ip_ok = checksum(raw[14 : 14 + ihl]) == 0 and len(raw) >= 14 + total
    else:
        plen = struct.unpack_from("!H", raw, 18)[0]
        src, dst = IPv6Address(raw[22:38]), IPv6Address(raw[38:54])
        seg = raw[54 : 54 + plen]
        ip_ok = len(raw) >= 54 + plen
    sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", seg)
    doff = (off >> 4) * 4
    tcp_ok = checksum(pseudo_header(src, dst, 6, len(seg)) + seg) == 0
    return Segment(src, dst, sport, dport, seq, ack, flags, seg[20:doff], seg[doff:], ip_ok, tcp_ok)
