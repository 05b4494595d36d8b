"""The NAT modes' floating addresses follow the VIP (a VipPort for GroupRuntime).

A group's ``nat.gateway`` (the backends' route back, nat) and ``nat.snat`` (the source
toward backends, fullnat) must sit on the active node's ``backend_interface`` for as
long as it holds the term, exactly like the VIPs. Rather than teach the runtime about
them, this port wraps the VIP port: adding, refreshing, removing or announcing a VIP
does the same to the floating addresses of that VIP's group on the backend interface.
So they inherit the runtime's discipline unchanged: added only after a term check,
with the VIP's kernel lifetime (a killed leader's copies expire by themselves),
refreshed on every keepalive, removed when the term ends, left to their lifetime on
a detach, and gratuitously ARPed on the backend segment so backends' neighbour caches
follow the takeover.

Floating addresses are added as host addresses (/32, /128, no prefix route): the node's
own address on the backend segment provides the route to the backends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType

from halb.config import ClusterConfig, NodeConfig
from halb.ha.runtime import VipPort
from halb.model import IPAddress
from halb.net.vip import InterfaceVips

__all__ = ["FloatingVips", "floating_addresses"]

log = logging.getLogger(__name__)


def floating_addresses(cfg: ClusterConfig) -> dict[IPAddress, tuple[IPAddress, ...]]:
    """VIP -> the floating backend-side addresses of its group (gateway, SNAT)."""
    out: dict[IPAddress, tuple[IPAddress, ...]] = {}
    for g in cfg.vip_groups:
        if g.nat is None:
            continue
        addrs = tuple(dict.fromkeys(a.ip for a in (g.nat.gateway, g.nat.snat) if a is not None))
        for vip in g.vips:
            out[vip.address] = addrs
    return out


class FloatingVips:
    """VipPort: VIPs on the front port, their groups' floating addresses on ``back``.

    ``floating`` is read on every add, so a config reload takes effect at the next
    refresh. Each floating address is held while any VIP that needs it is held (two
    VIPs of a group share the gateway; removing one must not take it away).
    """

    def __init__(
        self,
        front: VipPort,
        back: InterfaceVips | None,
        floating: Callable[[], Mapping[IPAddress, tuple[IPAddress, ...]]],
    ) -> None:
        self.front = front
        self.back = back
        self._floating = floating
        self._held: dict[IPAddress, tuple[IPAddress, ...]] = {}  # VIP -> what we added
        self._stack = AsyncExitStack()

    @classmethod
    def for_node(
        cls, front: VipPort, node: NodeConfig, config: Callable[[], ClusterConfig | None]
    ) -> FloatingVips:
        """The agent's port: floating addresses only when the node has a backend
        interface (NAT modes); otherwise a plain pass-through."""
        back = InterfaceVips(node.backend_interface) if node.backend_interface else None

        def floating() -> Mapping[IPAddress, tuple[IPAddress, ...]]:
            cfg = config()
            return floating_addresses(cfg) if cfg is not None else {}

        return cls(front, back, floating)

    async def __aenter__(self) -> FloatingVips:
        if self.back is not None:
            await self._stack.enter_async_context(self.back)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def _wanted(self, vip: IPAddress) -> tuple[IPAddress, ...]:
        if self.back is None:
            return ()
        return self._floating().get(vip, ())

    def _still_needed(self, addr: IPAddress) -> bool:
        return any(addr in held for held in self._held.values())

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        """Add (or refresh) the VIP, then its group's floating addresses."""
        await self.front.add(vip, lifetime)
        wanted = self._wanted(vip)
        if not wanted and vip not in self._held:
            return
        assert self.back is not None
        before = self._held.get(vip, ())
        self._held[vip] = wanted
        for addr in wanted:
            await self.back.add(addr, lifetime)
            if addr not in before:
                log.info("floating %s added on %s with VIP %s", addr, self.back.interface, vip)
        # The config moved the group to other floating addresses.
        for addr in before:
            if addr not in wanted and not self._still_needed(addr):
                await self.back.remove(addr)

    async def remove(self, vip: IPAddress) -> bool:
        """Remove the VIP and every floating address no other held VIP needs."""
        gone = await self.front.remove(vip)
        held = self._held.pop(vip, ())
        if self.back is not None:
            for addr in held:
                if not self._still_needed(addr) and await self.back.remove(addr):
                    log.info("floating %s removed from %s", addr, self.back.interface)
        return gone

    def announce(self, vip: IPAddress) -> int:
        """Announce the VIP on the front and its floating addresses on the back."""
        sent = self.front.announce(vip)
        if self.back is not None:
            for addr in self._held.get(vip, ()):
                sent += self.back.announce(addr)
        return sent
