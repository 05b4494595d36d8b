from __future__ import annotations

from halb.lab.observe import ArpFrame, parse_arp_line

LINES = [
    "1795713278.228192 02:99:00:00:02:02 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), "
    "length 60: Request who-has 10.99.0.100 tell 10.99.0.100, length 46",
    "1795713278.228228 02:99:00:00:02:02 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), "
    "length 60: Reply 10.99.0.100 is-at 02:99:00:00:02:02, length 46",
    "1795713279.000001 02:99:00:00:01:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), "
    "length 42: Request who-has 10.99.0.100 tell 10.99.0.2, length 28",
    "1795713279.5 02:99:00:00:01:01 > 02:99:00:00:02:02, ethertype IPv4 (0x0800), length 74: x",
]


def test_tcpdump_arp_lines_are_parsed() -> None:
    frames = [parse_arp_line(line) for line in LINES]
    assert frames == [
        ArpFrame(1795713278.228192, "02:99:00:00:02:02", "request", "10.99.0.100", "10.99.0.100"),
        ArpFrame(1795713278.228228, "02:99:00:00:02:02", "reply", "10.99.0.100", "10.99.0.100"),
        ArpFrame(1795713279.000001, "02:99:00:00:01:01", "request", "10.99.0.2", "10.99.0.100"),
        None,
    ]
