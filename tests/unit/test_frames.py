"""Byte-exact checks of the GARP and unsolicited-NA builders."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from halb.net.frames import (
    announcement,
    gratuitous_arp,
    icmpv6_checksum,
    mac_bytes,
    mac_str,
    unsolicited_na,
)

pytestmark = pytest.mark.unit

MAC = "02:00:5e:10:00:01"
VIP4 = IPv4Address("10.99.0.100")
VIP6 = IPv6Address("fd99::100")


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def test_garp_request_bytes() -> None:
    expected = h(
        """
        ffffffffffff 02005e100001 0806
        0001 0800 06 04 0001
        02005e100001 0a630064
        000000000000 0a630064
        """
    ) + bytes(18)
    frame = gratuitous_arp(MAC, VIP4)
    assert frame == expected
    assert len(frame) == 60


def test_garp_reply_bytes() -> None:
    expected = h(
        """
        ffffffffffff 02005e100001 0806
        0001 0800 06 04 0002
        02005e100001 0a630064
        02005e100001 0a630064
        """
    ) + bytes(18)
    assert gratuitous_arp(MAC, VIP4, reply=True) == expected


def _independent_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += int.from_bytes(data[i : i + 2], "big")
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_unsolicited_na_bytes_and_checksum() -> None:
    frame = unsolicited_na(MAC, VIP6)
    # Ethernet to the all-nodes multicast MAC.
    assert frame[:14] == h("333300000001 02005e100001 86dd")
    ip6 = frame[14:54]
    assert ip6[:8] == h("60000000 0020 3a ff")  # v6, payload 32, ICMPv6, hop limit 255
    assert ip6[8:24] == VIP6.packed
    assert ip6[24:40] == IPv6Address("ff02::1").packed
    icmp = frame[54:86]
    assert len(frame) == 86
    assert icmp[0] == 136 and icmp[1] == 0
    assert icmp[4:8] == h("20000000")  # Override only: unsolicited, not a router
    assert icmp[8:24] == VIP6.packed
    assert icmp[24:32] == h("0201 02005e100001")  # target link-layer address option
    # The checksum verifies: the ones' complement sum with it included is all ones.
    pseudo = VIP6.packed + IPv6Address("ff02::1").packed + (32).to_bytes(4, "big") + h("0000003a")
    assert _independent_sum(pseudo + icmp) == 0xFFFF
    # Pinned value, so a change of layout is noticed even if it still verifies.
    assert icmp[2:4] == h("f95a")  # tcpdump -vvv: "[icmp6 sum ok]"


def test_na_with_link_local_source_changes_checksum_and_source() -> None:
    ll = IPv6Address("fe80::1")
    frame = unsolicited_na(MAC, VIP6, source=ll)
    assert frame[22:38] == ll.packed
    assert frame[62:78] == VIP6.packed  # the target is still the VIP
    pseudo = ll.packed + IPv6Address("ff02::1").packed + (32).to_bytes(4, "big") + h("0000003a")
    assert _independent_sum(pseudo + frame[54:86]) == 0xFFFF


def test_checksum_known_answer() -> None:
    # RFC 1071 style example: an all-zero payload sums to the pseudo-header only.
    src = IPv6Address("::1")
    dst = IPv6Address("::2")
    pseudo_sum = 1 + 2 + 4 + 58
    assert icmpv6_checksum(src, dst, bytes(4)) == 0xFFFF - pseudo_sum


def test_mac_helpers() -> None:
    assert mac_bytes(MAC) == h("02005e100001")
    assert mac_bytes(h("02005e100001")) == h("02005e100001")
    assert mac_str(h("02005e100001")) == MAC
    with pytest.raises(ValueError):
        mac_bytes("02:00")


def test_announcement_per_family() -> None:
    assert announcement(MAC, VIP4) == [
        gratuitous_arp(MAC, VIP4),
        gratuitous_arp(MAC, VIP4, reply=True),
    ]
    assert announcement(MAC, VIP6) == [unsolicited_na(MAC, VIP6)]
