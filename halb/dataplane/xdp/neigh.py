"""Next-hop MAC of a backend, from the neighbour table of the balancer's namespace.

dsr needs the backend's own MAC (it is on the same segment); tunnel needs the MAC of the
next hop on the route to the backend (its gateway, or the backend when on-link). A
missing entry is provoked with one empty UDP datagram to the discard port (9) from
inside the namespace -- the kernel then resolves the address by ARP / neighbour
discovery like any ping would -- and polled for until the timeout.
"""

from __future__ import annotations

import contextlib
import socket
import time

from pyroute2 import IPRoute

from halb.dataplane.xdp.netns import in_netns
from halb.model import IPAddress

__all__ = ["interface_mac", "resolve_mac"]

# NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80


def interface_mac(ifname: str, netns: str | None = None) -> str:
    def get() -> str:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise LookupError(f"no interface {ifname!r}")
            return str(ipr.link("get", index=idx[0])[0].get_attr("IFLA_ADDRESS"))

    return in_netns(netns, get)


def _lookup(ipr: IPRoute, addr: IPAddress, ifindex: int) -> str | None:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    for msg in ipr.get_neighbours(family=family, ifindex=ifindex):
        if msg.get_attr("NDA_DST") == str(addr) and msg["state"] & _USABLE:
            lladdr = msg.get_attr("NDA_LLADDR")
            if lladdr:
                return str(lladdr)
    return None


def _provoke(addr: IPAddress) -> None:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(b"", (str(addr), 9))


def resolve_mac(
    addr: IPAddress,
    ifname: str,
    netns: str | None = None,
    *,
    via_route: bool = False,
    timeout: float = 1.0,
) -> str | None:
    """The MAC to send frames for ``addr`` to on ``ifname``, or None when unresolved."""

    def resolve() -> str | None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise LookupError(f"no interface {ifname!r}")
            hop = addr
            if via_route:
                routes = ipr.route("get", dst=str(addr))
                gateway = routes[0].get_attr("RTA_GATEWAY") if routes else None
                if gateway:
                    hop = type(addr)(gateway)
            found = _lookup(ipr, hop, idx[0])
            deadline = time.monotonic() + timeout
            tries = 0
            while found is None and time.monotonic() < deadline:
                if tries % 5 == 0:  # one datagram per ~250 ms, not a flood
                    _provoke(hop)
                tries += 1
                time.sleep(0.05)
                found = _lookup(ipr, hop, idx[0])
            return found

    return in_netns(netns, resolve)
