"""The virtual MAC (halb.net.vmac, halb.agent.vmacport) on real links: a balancer
namespace and a client namespace joined by a veth. The client resolves the VIP to the
group's MAC, the parent keeps answering for the node's own address, announcements
leave from the virtual MAC, and the macvlan lives exactly as long as it holds a VIP."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from halb.agent.vmacport import Macvlans, VirtualMacVips
from halb.config import VirtualMacConfig
from halb.model import IPAddress
from halb.net.netns import in_netns, run_in_netns
from halb.net.vip import InterfaceVips

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

VIP4 = IPv4Address("10.99.0.100")
VIP6 = IPv6Address("fd99::100")
OTHER = IPv4Address("10.99.0.101")  # a VIP of a group without a virtual MAC
NODE = "10.99.0.11"
VM = VirtualMacConfig(id=9)
ETH_P_ARP = 0x0806


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """(balancer ns with v0, client ns with v1), joined by a veth; always deleted."""
    tag = uuid.uuid4().hex[:6]
    lb, client = f"halbt-vm-lb-{tag}", f"halbt-vm-cl-{tag}"
    sh("ip", "netns", "add", lb)
    sh("ip", "netns", "add", client)
    try:
        sh("ip", "-n", lb, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "-n", lb, "link", "set", "v1", "netns", client)
        ends = ((lb, "v0", NODE, "fd99::11"), (client, "v1", "10.99.0.50", "fd99::50"))
        for ns, dev, addr, addr6 in ends:
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield lb, client
    finally:
        subprocess.run(["ip", "netns", "del", lb], check=False)
        subprocess.run(["ip", "netns", "del", client], check=False)


def port_for(front: InterfaceVips) -> VirtualMacVips:
    groups: dict[IPAddress, VirtualMacConfig] = {VIP4: VM, VIP6: VM}
    return VirtualMacVips(front, lambda: groups, Macvlans("v0"))


def mac_of(ns: str, dev: str) -> str:
    return sh("ip", "-n", ns, "-o", "link", "show", dev).split("link/ether ")[1].split()[0]


def arping(client: str, target: str) -> set[str]:
    """The MACs that answered the client's ARP requests for ``target``."""
    out = subprocess.run(
        ["ip", "netns", "exec", client, "arping", "-c", "2", "-w", "3", "-I", "v1", target],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return {w.strip("[]").lower() for w in out.split() if w.startswith("[") and w.count(":") == 5}


def addresses(ns: str, dev: str) -> str:
    return sh("ip", "-n", ns, "-o", "addr", "show", "dev", dev)


def test_vips_of_the_group_answer_from_the_virtual_mac(pair: tuple[str, str]) -> None:
    lb, client = pair
    parent_mac = mac_of(lb, "v0")

    async def add() -> None:
        async with InterfaceVips("v0") as front, port_for(front) as port:
            for vip in (VIP4, VIP6, OTHER):
                await port.add(vip, 60)
            assert port.links == [VM.ifname]

    run_in_netns(lb, add)
    assert mac_of(lb, VM.ifname) == VM.mac == "00:00:5e:00:01:09"
    on_vmac, on_parent = addresses(lb, VM.ifname), addresses(lb, "v0")
    assert str(VIP4) in on_vmac and str(VIP6) in on_vmac and str(OTHER) not in on_vmac
    assert str(OTHER) in on_parent and str(VIP4) not in on_parent
    assert "inet6 fe80" not in on_vmac  # no link-local from the shared MAC
    for key, want in (("arp_ignore", "1"), ("arp_announce", "2")):
        got = sh("ip", "netns", "exec", lb, "sysctl", "-n", f"net.ipv4.conf.v0.{key}")
        assert got.strip() == want, key

    # ARP: the group's VIP from the virtual MAC only; the node's own address and the
    # other group's VIP from the parent only.
    assert arping(client, str(VIP4)) == {VM.mac}
    assert arping(client, NODE) == {parent_mac}
    assert arping(client, str(OTHER)) == {parent_mac}
    # IPv6: the client's neighbour entry for the VIP names the virtual MAC.
    sh("ip", "netns", "exec", client, "ping", "-6", "-c", "1", "-W", "2", str(VIP6))
    neigh = sh("ip", "-n", client, "neigh", "show", str(VIP6))
    assert VM.mac in neigh, neigh


def test_announcements_leave_from_the_virtual_mac(pair: tuple[str, str]) -> None:
    lb, client = pair

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        s.bind(("v1", 0))
        s.settimeout(3)
        return s

    rx = in_netns(client, listen)
    try:

        async def announce() -> int:
            async with InterfaceVips("v0") as front, port_for(front) as port:
                await port.add(VIP4, 60)
                return port.announce(VIP4)

        assert run_in_netns(lb, announce) >= 1
        frame = rx.recv(2048)
    finally:
        rx.close()
    vmac = bytes.fromhex(VM.mac.replace(":", ""))
    assert frame[6:12] == vmac  # Ethernet source
    assert frame[22:28] == vmac  # ARP sender hardware address
    assert frame[28:32] == VIP4.packed


def test_the_link_goes_with_its_last_vip_and_stray_links_are_reconciled(
    pair: tuple[str, str],
) -> None:
    lb, _ = pair

    def has_link() -> bool:
        r = subprocess.run(["ip", "-n", lb, "link", "show", VM.ifname], capture_output=True)
        return r.returncode == 0

    async def add_remove() -> None:
        async with InterfaceVips("v0") as front, port_for(front) as port:
            await port.add(VIP4, 60)
            await port.add(VIP6, 60)
            assert await port.remove(VIP4)
            assert has_link()  # VIP6 still on it
            await port.add(VIP4, 60)  # a refresh-style re-add lands on the same link
            assert await port.remove(VIP4) and await port.remove(VIP6)
            assert not has_link() and port.links == []
            # A crashed agent's link (its VIP still on it) is deleted at the next start.
            await port.add(VIP4, 60)
        async with InterfaceVips("v0") as front:
            fresh = port_for(front)
            assert await fresh.reconcile([VM]) == [VM.ifname]
            assert await fresh.reconcile([VM]) == []

    run_in_netns(lb, add_remove)
    assert not has_link()
    assert str(VIP4) not in addresses(lb, "v0")


def test_remove_of_a_vip_never_added_goes_to_the_front(pair: tuple[str, str]) -> None:
    lb, _ = pair

    async def body() -> None:
        async with InterfaceVips("v0") as front:
            await front.add(VIP4, 60)  # e.g. added before this process started
            port = port_for(front)
            assert await port.remove(VIP4)
            assert not await port.remove(VIP4)

    run_in_netns(lb, body)
