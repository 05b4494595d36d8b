from __future__ import annotations

from ipaddress import ip_address

from halb.dataplane.ipvs.conntab import parse_conns
from halb.model import Flow, Protocol

TABLE = """\
Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
TCP 0A000002 D431 0A000064 0050 0A000015 1F90 ESTABLISHED     899
UDP 0A000002 3039 0A000064 0035 0A000016 0035 UDP             299
TCP 00000000 0000 0A000064 0050 0A000015 0050 NONE            359
IP  0A000002 0000 0A000064 0000 0A000015 0000 NONE             10
"""
V6 = "fd00:0000:0000:0000:0000:0000:0000:"
TABLE += f"TCP {V6}0002 D431 {V6}0100 0050 {V6}0021 0050 TIME_WAIT   119\n"


def test_parse_ipv4_ipv6_and_skip_templates() -> None:
    entries = parse_conns(TABLE)
    assert [e.flow for e in entries[:2]] == [
        Flow(
            Protocol.TCP,
            ip_address("10.0.0.2"),
            0xD431,
            ip_address("10.0.0.100"),
            80,
            ip_address("10.0.0.21"),
            8080,
        ),
        Flow(
            Protocol.UDP,
            ip_address("10.0.0.2"),
            12345,
            ip_address("10.0.0.100"),
            53,
            ip_address("10.0.0.22"),
            53,
        ),
    ]
    assert (entries[0].state, entries[0].expires) == ("ESTABLISHED", 899)
    assert len(entries) == 3  # the persistence template and the non-TCP/UDP line are gone
    assert entries[2].flow.src == ip_address("fd00::2")
    assert entries[2].state == "TIME_WAIT"


def test_empty_table() -> None:
    assert parse_conns(TABLE.splitlines()[0]) == []
