"""VIP addresses and announcements on one interface (netlink + AF_PACKET).

Works in the network namespace of the calling thread (the agent runs inside its
namespace, ``ip netns exec``; tests use halb.net.netns.run_in_netns).

- ``VipAddresses``: add / refresh / remove / list host-prefix VIPs with pyroute2's
  AsyncIPRoute (the sync IPRoute of pyroute2 0.9 cannot be used inside a running event
  loop). VIPs are added as /32 or /128 with IFA_F_NOPREFIXROUTE (no connected route for
  a host address), IPv6 also with IFA_F_NODAD (usable at once; the term, not DAD,
  decides ownership), and with ``valid_lft = preferred_lft = lifetime`` whole seconds
  so the kernel withdraws the address of a leader that stopped refreshing it. Adding
  is a netlink *replace*, so refreshing a lifetime is the same call.
- ``GarpSender``: sends the frames of halb.net.frames on the interface through an
  AF_PACKET raw socket; the MAC is the socket's own bound hardware address.

Neither decides ownership: the runtime checks the term before calling them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from halb.model import IPAddress
from halb.net.frames import announcement, mac_str

__all__ = [
    "IFA_F_NODAD",
    "IFA_F_NOPREFIXROUTE",
    "INFINITY_LIFE",
    "AddressInfo",
    "GarpSender",
    "InterfaceVips",
    "VipAddresses",
]

log = logging.getLogger(__name__)

IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200
INFINITY_LIFE = 0xFFFFFFFF
ETH_P_ALL = 0x0003


@dataclass(frozen=True, slots=True)
class AddressInfo:
    address: IPAddress
    prefixlen: int
    flags: int
    valid_lft: int  # seconds, INFINITY_LIFE for permanent
    preferred_lft: int

    @property
    def is_host(self) -> bool:
        return self.prefixlen == self.address.max_prefixlen

    @property
    def permanent(self) -> bool:
        return self.valid_lft == INFINITY_LIFE


async def _collect(reply: Any) -> list[Any]:
    # AsyncIPRoute answers dumps with an async generator and some requests with a list.
    if hasattr(reply, "__aiter__"):
        return [msg async for msg in reply]
    return list(reply)


def _host_prefix(vip: IPAddress) -> int:
    return 32 if isinstance(vip, IPv4Address) else 128


class VipAddresses:
    """Host-prefix VIP addresses on ``interface``. Use as ``async with``."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._ipr: Any = None
        self.index = 0

    async def open(self) -> VipAddresses:
        ipr = AsyncIPRoute()
        try:
            await ipr.setup_endpoint()
            links = await _collect(await ipr.link("get", ifname=self.interface))
        except BaseException:
            ipr.close()
            raise
        self._ipr = ipr
        self.index = int(links[0]["index"])
        return self

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def __aenter__(self) -> VipAddresses:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def add(self, vip: IPAddress, lifetime: int | None = None) -> None:
        """Add (or replace, refreshing the lifetime of) ``vip``; None = permanent."""
        life = INFINITY_LIFE if lifetime is None else max(1, int(lifetime))
        flags = IFA_F_NOPREFIXROUTE | (IFA_F_NODAD if isinstance(vip, IPv6Address) else 0)
        await self._ipr.addr(
            "replace",
            index=self.index,
            address=str(vip),
            prefixlen=_host_prefix(vip),
            IFA_FLAGS=flags,
            IFA_CACHEINFO={
                "ifa_preferred": life,
                "ifa_valid": life,
                "cstamp": 0,
                "tstamp": 0,
            },
        )

    async def remove(self, vip: IPAddress) -> bool:
        """Remove ``vip``; False if it was not there (expired, or never added)."""
        try:
            await self._ipr.addr(
                "del", index=self.index, address=str(vip), prefixlen=_host_prefix(vip)
            )
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True

    async def dump(self) -> list[AddressInfo]:
        """Every address on the interface (both families)."""
        out = []
        for msg in await _collect(await self._ipr.addr("dump", index=self.index)):
            if msg.get("index") != self.index:
                continue
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if addr is None:
                continue
            cache = msg.get("IFA_CACHEINFO") or {}
            out.append(
                AddressInfo(
                    address=ip_address(addr),
                    prefixlen=int(msg["prefixlen"]),
                    flags=int(msg.get("IFA_FLAGS") or msg["flags"]),
                    valid_lft=int(cache.get("ifa_valid", INFINITY_LIFE)),
                    preferred_lft=int(cache.get("ifa_preferred", INFINITY_LIFE)),
                )
            )
        return out

    async def present(self, vip: IPAddress) -> bool:
        return any(a.address == vip and a.is_host for a in await self.dump())

    async def reconcile(
        self, configured: Iterable[IPAddress], owned: Iterable[IPAddress] = ()
    ) -> list[IPAddress]:
        """Remove every configured VIP present here that is not ``owned`` (start-up:
        a node never assumes it was the leader). Returns what was removed."""
        stray = set(configured) - set(owned)
        removed: list[IPAddress] = []
        for info in await self.dump():
            if info.is_host and info.address in stray and await self.remove(info.address):
                log.info("removed stray VIP %s from %s", info.address, self.interface)
                removed.append(info.address)
        return removed


class GarpSender:
    """Sends gratuitous ARP / unsolicited NA for VIPs out of ``interface``."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            # Protocol 0: send only, never receive (no copy of every frame to us).
            self._sock.bind((interface, 0))
            self._sock.setblocking(False)
            self.mac: bytes = self._sock.getsockname()[4][:6]
        except BaseException:
            self._sock.close()
            raise

    def frames(self, vip: IPAddress) -> list[bytes]:
        return announcement(self.mac, vip)

    def send(self, vip: IPAddress) -> int:
        """Send one announcement round for ``vip``; returns frames sent."""
        sent = 0
        for frame in self.frames(vip):
            try:
                self._sock.send(frame)
                sent += 1
            except BlockingIOError:
                # A full queue: the next round of the announce loop repeats it.
                log.warning("%s: tx queue full, announcement for %s dropped", self.interface, vip)
        log.debug("announced %s at %s on %s", vip, mac_str(self.mac), self.interface)
        return sent

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> GarpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InterfaceVips:
    """The runtime's VIP port on one interface: addresses plus announcements.

    ``async with InterfaceVips("eth0") as port: await port.add(vip, 2); port.announce(vip)``
    """

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.addresses = VipAddresses(interface)
        self._garp: GarpSender | None = None

    async def __aenter__(self) -> InterfaceVips:
        await self.addresses.open()
        try:
            self._garp = GarpSender(self.interface)
        except BaseException:
            self.addresses.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._garp is not None:
            self._garp.close()
            self._garp = None
        self.addresses.close()

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        await self.addresses.add(vip, lifetime)

    async def remove(self, vip: IPAddress) -> bool:
        return await self.addresses.remove(vip)

    def announce(self, vip: IPAddress) -> int:
        assert self._garp is not None, "InterfaceVips used outside 'async with'"
        return self._garp.send(vip)
