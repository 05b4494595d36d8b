"""Pure frame builders and a model of the program's flow hash.

Used by the packet fixtures (BPF_PROG_TEST_RUN) and the benchmark; no I/O.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from halb.model import IPAddress

__all__ = [
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_TX",
    "arp_request",
    "checksum",
    "eth",
    "flow_hash",
    "icmp_echo",
    "icmp_too_big",
    "ipv4",
    "ipv6",
    "mac",
    "neighbour_solicitation",
    "pseudo_header",
    "tcp",
    "udp",
]

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def eth(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", ethertype) + payload


def ipv4(
    src: str | IPv4Address,
    dst: str | IPv4Address,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = 0x4000,
    tos: int = 0,
) -> bytes:
    s, d = IPv4Address(src).packed, IPv4Address(dst).packed
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, flags_frag, ttl, proto, 0, s, d
    )
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def ipv6(
    src: str | IPv6Address,
    dst: str | IPv6Address,
    nexthdr: int,
    payload: bytes,
    *,
    hop: int = 64,
    flow_label: int = 0,
) -> bytes:
    first = (6 << 28) | (flow_label & 0xFFFFF)
    return (
        struct.pack("!IHBB", first, len(payload), nexthdr, hop)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + payload
    )


def pseudo_header(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    """The pseudo header a TCP / UDP checksum covers (IPv4 or IPv6 by the addresses)."""
    return _pseudo(src, dst, proto, length)


def _pseudo(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def _addr(a: str | IPAddress) -> IPAddress:
    if isinstance(a, IPv4Address | IPv6Address):
        return a
    return IPv6Address(a) if ":" in a else IPv4Address(a)


def tcp(
    src: str | IPAddress,
    dst: str | IPAddress,
    sport: int,
    dport: int,
    *,
    flags: int = TCP_SYN,
    seq: int = 1,
    payload: bytes = b"",
    ack: int = 0,
    options: bytes = b"",
) -> bytes:
    """A TCP segment with a correct checksum; ``options`` (a multiple of 4 bytes) follow
    the fixed header and set the data offset."""
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"TCP options of {len(options)} bytes (a multiple of 4, <= 40)")
    doff = 5 + len(options) // 4
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
    seg = head + options + payload
    csum = checksum(_pseudo(_addr(src), _addr(dst), 6, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def udp(
    src: str | IPAddress, dst: str | IPAddress, sport: int, dport: int, payload: bytes = b""
) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = checksum(_pseudo(_addr(src), _addr(dst), 17, len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def icmp_echo(ident: int = 1, seq: int = 1, v6: bool = False) -> bytes:
    head = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq) + b"ping"
    if v6:
        return head  # the checksum needs the pseudo header; the program never reads it
    return head[:2] + struct.pack("!H", checksum(head)) + head[4:]


def icmp_too_big(router: str, to: str, quoted: bytes, mtu: int = 1400) -> bytes:
    """An ICMPv4 fragmentation-needed (3/4) or ICMPv6 packet-too-big (2/0) IP packet from
    ``router`` to ``to``, quoting ``quoted`` (an IP packet, cut as routers do: the IPv4
    header + 8 bytes; IPv6 keeps as much as fits, here all of it)."""
    src, dst = _addr(router), _addr(to)
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        inner = quoted[: (quoted[0] & 0x0F) * 4 + 8]
        msg = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + inner
        msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
        return ipv4(src, dst, 1, msg)
    assert isinstance(src, IPv6Address) and isinstance(dst, IPv6Address)
    msg = struct.pack("!BBHI", 2, 0, 0, mtu) + quoted
    csum = checksum(_pseudo(src, dst, 58, len(msg)) + msg)
    msg = msg[:2] + struct.pack("!H", csum) + msg[4:]
    return ipv6(src, dst, 58, msg)


def arp_request(sender_mac: str, sender: str, target: str, *, op: int = 1) -> bytes:
    """An Ethernet/IPv4 ARP frame (broadcast), a request unless ``op`` says otherwise."""
    body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
    body += mac(sender_mac) + IPv4Address(sender).packed + bytes(6) + IPv4Address(target).packed
    return eth("ff:ff:ff:ff:ff:ff", sender_mac, ETH_P_ARP, body)


def neighbour_solicitation(sender_mac: str, sender: str, target: str) -> bytes:
    """An ICMPv6 neighbour solicitation for ``target`` to its solicited-node group, with
    the source link-layer address option (RFC 4861 4.3)."""
    t = IPv6Address(target)
    group = IPv6Address(b"\xff\x02" + bytes(9) + b"\x01\xff" + t.packed[13:])
    group_mac = "33:33:" + ":".join(f"{b:02x}" for b in group.packed[12:])
    src = IPv6Address(sender)
    msg = struct.pack("!BBHI", 135, 0, 0, 0) + t.packed + bytes([1, 1]) + mac(sender_mac)
    csum = checksum(_pseudo(src, group, 58, len(msg)) + msg)
    msg = msg[:2] + struct.pack("!H", csum) + msg[4:]
    return eth(group_mac, sender_mac, ETH_P_IPV6, ipv6(src, group, 58, msg, hop=255))


# --- model of bpf/hash.h ------------------------------------------------------------------


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & 0xFFFFFFFF
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & 0xFFFFFFFF
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & 0xFFFFFFFF


def flow_hash(src: IPAddress, dst: IPAddress, sport: int, dport: int, proto: int) -> int:
    """The program's 5-tuple hash (bpf/hash.h), for predicting ring slots in tests."""
    sw = struct.unpack("=4I", src.packed.ljust(16, b"\0"))
    dw = struct.unpack("=4I", dst.packed.ljust(16, b"\0"))
    h = 0x9747B28C ^ proto
    for i in range(4):
        h = _mix(h, sw[i])
        h = _mix(h, dw[i])
    # The key holds the ports in network order; the program reads them as host u16s.
    ns = struct.unpack("=H", struct.pack("!H", sport))[0]
    nd = struct.unpack("=H", struct.pack("!H", dport))[0]
    h = _mix(h, (ns << 16) | nd)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h
