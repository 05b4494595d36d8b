"""Pure: parse /proc/net/ip_vs_conn into halb Flows.

    Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
    TCP 0A000002 D431 0A000064 0050 0A010102 0050 ESTABLISHED     899

IPv4 addresses are 8 hex digits (network order), IPv6 ones are bracket-less full
colon notation, ports are 4 hex digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from halb.model import Flow, IPAddress, Protocol

__all__ = ["ENDED_STATES", "ConnEntry", "parse_conns"]

# Connections in these states carry no more data worth moving to a standby.
ENDED_STATES = frozenset({"CLOSE", "TIME_WAIT"})
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP}


@dataclass(frozen=True, slots=True)
class ConnEntry:
    flow: Flow
    state: str  # ESTABLISHED, SYN_RECV, ... (UDP: UDP)
    expires: int  # seconds


def _addr(text: str) -> IPAddress:
    if ":" in text:
        return ip_address(text)
    return IPv4Address(int(text, 16))


def parse_conns(text: str) -> list[ConnEntry]:
    """Every TCP/UDP connection; templates (persistence) and other protocols are skipped."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 9 or cols[0] not in _PROTOCOLS:
            continue
        sport = int(cols[2], 16)
        if sport == 0 and cols[1] in ("00000000", "0000:0000:0000:0000:0000:0000:0000:0000"):
            continue  # a persistence template
        flow = Flow(
            protocol=_PROTOCOLS[cols[0]],
            src=_addr(cols[1]),
            sport=sport,
            vip=_addr(cols[3]),
            vport=int(cols[4], 16),
            backend=_addr(cols[5]),
            bport=int(cols[6], 16),
        )
        out.append(ConnEntry(flow, cols[7], int(cols[8])))
    return out
