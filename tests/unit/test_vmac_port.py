"""VirtualMacVips' bookkeeping with fake ports: which VIP goes where, when a group's
link is opened and deleted, and that a VIP never moves while held. The kernel side is
tests/kernel/test_vmac.py."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

import pytest

from halb.agent.vmacport import LinkPort, VirtualMacVips
from halb.config import VirtualMacConfig
from halb.model import IPAddress

pytestmark = pytest.mark.unit

A1, A2, B1, PLAIN = (IPv4Address(f"10.0.0.{i}") for i in (1, 2, 3, 9))
VA, VB = VirtualMacConfig(id=1), VirtualMacConfig(id=2, interface="vmac-b")


class Port:
    def __init__(self, name: str) -> None:
        self.name = name
        self.held: dict[IPAddress, int | None] = {}
        self.announced: list[IPAddress] = []
        self.closed = False

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        self.held[vip] = lifetime

    async def remove(self, vip: IPAddress) -> bool:
        return self.held.pop(vip, "gone") != "gone"

    def announce(self, vip: IPAddress) -> int:
        self.announced.append(vip)
        return 1

    def close(self) -> None:
        self.closed = True


class Links:
    def __init__(self) -> None:
        self.ports: dict[str, Port] = {}
        self.log: list[str] = []

    async def open(self, vm: VirtualMacConfig) -> LinkPort:
        self.log.append(f"open {vm.ifname}")
        self.ports[vm.ifname] = Port(vm.ifname)
        return self.ports[vm.ifname]

    async def delete(self, vm: VirtualMacConfig) -> bool:
        self.log.append(f"delete {vm.ifname}")
        return True


def setup() -> tuple[VirtualMacVips, Port, Links, dict[IPAddress, VirtualMacConfig]]:
    front, links = Port("front"), Links()
    groups: dict[IPAddress, VirtualMacConfig] = {A1: VA, A2: VA, B1: VB}
    return VirtualMacVips(front, lambda: groups, links), front, links, groups


def test_mac_and_default_interface_follow_the_id() -> None:
    assert (VA.mac, VA.ifname) == ("00:00:5e:00:01:01", "halb-vmac1")
    assert VirtualMacConfig(id=255).mac == "00:00:5e:00:01:ff"
    assert VB.ifname == "vmac-b"


def test_each_vip_goes_to_its_groups_link_and_others_to_the_front() -> None:
    port, front, links, _ = setup()

    async def body() -> None:
        for vip in (A1, A2, B1, PLAIN):
            await port.add(vip, 3)
        assert port.announce(A1) == 1 and port.announce(PLAIN) == 1

    asyncio.run(body())
    assert links.log == ["open halb-vmac1", "open vmac-b"]  # one link per group, once
    assert set(links.ports["halb-vmac1"].held) == {A1, A2}
    assert set(links.ports["vmac-b"].held) == {B1}
    assert set(front.held) == {PLAIN}
    assert links.ports["halb-vmac1"].announced == [A1] and front.announced == [PLAIN]
    assert port.links == ["halb-vmac1", "vmac-b"]


def test_the_link_is_deleted_with_its_last_vip_only() -> None:
    port, _, links, _ = setup()

    async def body() -> None:
        await port.add(A1, 3)
        await port.add(A2, 3)
        assert await port.remove(A1)
        assert links.log == ["open halb-vmac1"]
        assert await port.remove(A2)
        assert links.log == ["open halb-vmac1", "delete halb-vmac1"]
        # The next term opens it again.
        await port.add(A1, 3)

    asyncio.run(body())
    assert links.log == ["open halb-vmac1", "delete halb-vmac1", "open halb-vmac1"]


def test_a_held_vip_never_moves_when_the_config_changes() -> None:
    port, front, links, groups = setup()

    async def body() -> None:
        await port.add(PLAIN, 3)
        await port.add(A1, 3)
        groups[PLAIN] = VA  # a reload gives PLAIN's group a virtual MAC
        del groups[A1]  # ... and takes A1's away
        await port.add(PLAIN, 5)  # refreshes stay where the VIP is
        await port.add(A1, 5)
        assert front.held == {PLAIN: 5}
        assert links.ports["halb-vmac1"].held == {A1: 5}
        # Once removed, the next add follows the new config.
        assert await port.remove(PLAIN) and await port.remove(A1)
        await port.add(PLAIN, 3)

    asyncio.run(body())
    assert links.ports["halb-vmac1"].held == {PLAIN: 3}
    assert PLAIN not in front.held


def test_remove_of_an_unknown_vip_asks_the_front() -> None:
    port, front, _, _ = setup()
    front.held[PLAIN] = None  # left from before this process
    assert asyncio.run(port.remove(PLAIN)) is True
    assert asyncio.run(port.remove(PLAIN)) is False


def test_reconcile_deletes_only_links_not_in_use_and_close_closes_ports() -> None:
    port, _, links, _ = setup()

    async def body() -> list[str]:
        async with port:
            await port.add(A1, 3)
            gone = await port.reconcile([VA, VB])
        return gone

    assert asyncio.run(body()) == ["vmac-b"]
    assert links.ports["halb-vmac1"].closed
