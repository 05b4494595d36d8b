"""Pure builders for the frames that move a VIP: gratuitous ARP and unsolicited NA.

Each returns a complete Ethernet frame (no FCS) ready for an AF_PACKET socket.
Decisions about *whether* to send live elsewhere (the runtime checks the term first);
this module only knows the wire formats:

- Gratuitous ARP (RFC 5227 "ARP announcement"): broadcast, sender and target protocol
  address both the VIP. Two forms, because neighbours differ in which they accept:
  a request (target hardware address zero) and a reply (target hardware address
  the sender's own, as ``arping -A`` sends it).
- Unsolicited neighbour advertisement (RFC 4861 7.2.6): to ff02::1 from the VIP, hop
  limit 255, Override set, Solicited clear, with a target link-layer address option.

Frames shorter than 60 bytes are zero-padded to the Ethernet minimum so the bytes on
the wire are the bytes built here, whatever the driver does.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

__all__ = [
    "ARP_REPLY",
    "ARP_REQUEST",
    "BROADCAST",
    "ETH_P_ARP",
    "ETH_P_IPV6",
    "announcement",
    "gratuitous_arp",
    "icmpv6_checksum",
    "mac_bytes",
    "mac_str",
    "unsolicited_na",
]

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
ICMPV6_NA = 136
ND_OPT_TARGET_LLADDR = 2
NA_FLAG_OVERRIDE = 0x20000000
_MIN_FRAME = 60


def mac_bytes(mac: str | bytes) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or 6 raw bytes) to 6 bytes."""
    raw = mac if isinstance(mac, bytes) else bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _pad(frame: bytes) -> bytes:
    return frame + b"\x00" * max(0, _MIN_FRAME - len(frame))


def _ethernet(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def gratuitous_arp(mac: str | bytes, vip: IPv4Address, *, reply: bool = False) -> bytes:
    """A broadcast gratuitous ARP for ``vip`` at ``mac``: request form, or reply form."""
    src = mac_bytes(mac)
    ip = vip.packed
    op = ARP_REPLY if reply else ARP_REQUEST
    tha = src if reply else b"\x00" * 6
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + src + ip + tha + ip
    return _pad(_ethernet(BROADCAST, src, ETH_P_ARP) + arp)


def icmpv6_checksum(src: IPv6Address, dst: IPv6Address, payload: bytes) -> int:
    """RFC 4443 checksum: ones' complement sum over the IPv6 pseudo-header and payload
    (whose checksum field must be zero)."""
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(payload), 58)
    data = pseudo + payload
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    # 0 is sent as 0xffff (both are zero in ones' complement; 0 means "none" in UDP).
    return checksum or 0xFFFF


def unsolicited_na(
    mac: str | bytes, vip: IPv6Address, *, source: IPv6Address | None = None
) -> bytes:
    """An unsolicited neighbour advertisement for ``vip`` at ``mac`` to all nodes.

    ``source`` is the IPv6 source address (default: the VIP itself, which is an
    address of the sending interface once it has been added).
    """
    src_mac = mac_bytes(mac)
    src_ip = source if source is not None else vip
    option = struct.pack("!BB", ND_OPT_TARGET_LLADDR, 1) + src_mac
    body = struct.pack("!I", NA_FLAG_OVERRIDE) + vip.packed + option
    icmp = struct.pack("!BBH", ICMPV6_NA, 0, 0) + body
    csum = icmpv6_checksum(src_ip, ALL_NODES, icmp)
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + src_ip.packed + ALL_NODES.packed
    return _pad(_ethernet(ALL_NODES_MAC, src_mac, ETH_P_IPV6) + ipv6 + icmp)


def announcement(mac: str | bytes, vip: IPv4Address | IPv6Address) -> list[bytes]:
    """Every frame one announcement round sends for ``vip``: both GARP forms for IPv4,
    one unsolicited NA for IPv6."""
    if isinstance(vip, IPv4Address):
        return [gratuitous_arp(mac, vip), gratuitous_arp(mac, vip, reply=True)]
    return [unsolicited_na(mac, vip)]
