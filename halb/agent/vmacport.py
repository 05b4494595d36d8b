"""VIPs of groups with a virtual MAC live on their group's macvlan (a VipPort for
GroupRuntime); see halb.net.vmac for the link and why it is set up as it is.

Like halb.agent.floating, this wraps the front port rather than teaching the runtime
about it, so the runtime's discipline holds unchanged: each add after a term check,
with the kernel lifetime, refreshed on every keepalive, removed when the term ends. The
macvlan exists exactly while it holds a VIP: created before the first add on it,
deleted after the last remove (a standby never has it, so never sends from the MAC).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from halb.config import ClusterConfig, VirtualMacConfig
from halb.ha.runtime import VipPort
from halb.model import IPAddress
from halb.net import vmac
from halb.net.vip import InterfaceVips

__all__ = ["LinkPort", "Macvlans", "VirtualMacVips"]

log = logging.getLogger(__name__)


class LinkPort(VipPort, Protocol):
    def close(self) -> None: ...


class Links(Protocol):
    """Opens a group's link and its VIP port, and deletes the link (fakes in tests)."""

    async def open(self, vm: VirtualMacConfig) -> LinkPort: ...

    async def delete(self, vm: VirtualMacConfig) -> bool: ...


class Macvlans:
    """The real links: a macvlan on ``parent`` and an InterfaceVips on it."""

    def __init__(self, parent: str) -> None:
        self.parent = parent

    async def open(self, vm: VirtualMacConfig) -> LinkPort:
        await vmac.ensure_link(self.parent, vm)
        port = InterfaceVips(vm.ifname)
        await port.__aenter__()
        return port

    async def delete(self, vm: VirtualMacConfig) -> bool:
        return await vmac.delete_link(vm.ifname)


class VirtualMacVips:
    """VipPort: each VIP of a group with a virtual MAC on that group's link, every
    other VIP on ``front``.

    ``groups`` is read when a VIP is first added, so a reload's VIP list is followed; a
    VIP stays on the port it was added to until it is removed (a refresh never moves
    it, so an address is never on two interfaces at once).
    """

    def __init__(
        self,
        front: VipPort,
        groups: Callable[[], Mapping[IPAddress, VirtualMacConfig]],
        links: Links,
    ) -> None:
        self.front = front
        self._groups = groups
        self._links = links
        self._open: dict[str, tuple[VirtualMacConfig, LinkPort]] = {}  # ifname -> link
        self._held: dict[IPAddress, VirtualMacConfig | None] = {}  # VIP -> link (None: front)

    @classmethod
    def for_node(
        cls, front: VipPort, parent: str, config: Callable[[], ClusterConfig | None]
    ) -> VirtualMacVips:
        def groups() -> Mapping[IPAddress, VirtualMacConfig]:
            cfg = config()
            return vmac.virtual_macs(cfg) if cfg is not None else {}

        return cls(front, groups, Macvlans(parent))

    @property
    def links(self) -> list[str]:
        """The interfaces open now (status, tests)."""
        return sorted(self._open)

    def _port_of(self, vip: IPAddress) -> VipPort:
        vm = self._held.get(vip)
        return self.front if vm is None else self._open[vm.ifname][1]

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        if vip not in self._held:
            vm = self._groups().get(vip)
            if vm is not None and vm.ifname not in self._open:
                self._open[vm.ifname] = (vm, await self._links.open(vm))
            # Recorded before the add: a cancellation mid-add still removes it.
            self._held[vip] = vm
        await self._port_of(vip).add(vip, lifetime)

    async def remove(self, vip: IPAddress) -> bool:
        if vip not in self._held:
            return await self.front.remove(vip)
        port = self._port_of(vip)
        vm = self._held.pop(vip)
        removed = await port.remove(vip)
        if vm is not None and vm not in self._held.values():
            _, link = self._open.pop(vm.ifname)
            link.close()
            if await self._links.delete(vm):
                log.info("virtual MAC %s: %s deleted (no VIP left on it)", vm.mac, vm.ifname)
        return removed

    def announce(self, vip: IPAddress) -> int:
        return self._port_of(vip).announce(vip)

    async def reconcile(self, stray: Iterable[VirtualMacConfig]) -> list[str]:
        """Start-up: delete the links of groups this node has no term for (left by a
        crash; their VIPs go with them). Returns the interfaces deleted."""
        gone = []
        for vm in stray:
            if vm.ifname not in self._open and await self._links.delete(vm):
                gone.append(vm.ifname)
        return gone

    async def __aenter__(self) -> VirtualMacVips:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Agent exit: close the open ports (a detached term leaves its link and VIPs
        to their lifetime; the next start adopts or deletes the link)."""
        for _, port in self._open.values():
            port.close()
        self._open.clear()
