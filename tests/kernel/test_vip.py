"""VIP addresses, lifetimes, reconcile and GARP/NA on a real veth in a private netns."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from halb.net.frames import gratuitous_arp, unsolicited_na
from halb.net.netns import run_in_netns
from halb.net.vip import (
    IFA_F_NOPREFIXROUTE,
    INFINITY_LIFE,
    GarpSender,
    InterfaceVips,
    VipAddresses,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

VIP4 = IPv4Address("10.99.0.100")
VIP6 = IPv6Address("fd99::100")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with veth v0 <-> v1, both up; always deleted."""
    name = f"halbt-ha-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "-n", name, "link", "set", "v0", "up")
        sh("ip", "-n", name, "link", "set", "v1", "up")
        sh("ip", "-n", name, "addr", "add", "10.99.0.11/24", "dev", "v0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_add_list_remove(netns: str) -> None:
    async def body() -> None:
        async with VipAddresses("v0") as v:
            await v.add(VIP4, 30)
            await v.add(VIP6, None)
            infos = {a.address: a for a in await v.dump()}
            a4, a6 = infos[VIP4], infos[VIP6]
            assert a4.prefixlen == 32 and a4.is_host
            assert a4.flags & IFA_F_NOPREFIXROUTE
            assert 28 <= a4.valid_lft <= 30 and 28 <= a4.preferred_lft <= 30
            assert a6.prefixlen == 128 and a6.permanent and a6.valid_lft == INFINITY_LIFE
            # The node's own /24 is untouched and not a host address.
            assert not infos[IPv4Address("10.99.0.11")].is_host
            # Replace refreshes the lifetime in place (no duplicate).
            await v.add(VIP4, 5)
            again = [a for a in await v.dump() if a.address == VIP4]
            assert len(again) == 1 and again[0].valid_lft <= 5
            assert await v.remove(VIP4)
            assert not await v.remove(VIP4)
            assert not await v.present(VIP4)
            assert await v.present(VIP6)

    run_in_netns(netns, body)
    # Seen from outside too: no connected route was made for the VIP.
    out = subprocess.run(
        ["ip", "-n", netns, "route", "show", "dev", "v0"], capture_output=True, text=True
    ).stdout
    assert "10.99.0.100" not in out


def test_lifetime_expiry_removes_the_address(netns: str) -> None:
    async def gone_after(v: VipAddresses, vip: IPv4Address | IPv6Address, life: int) -> float:
        await v.add(vip, life)
        t0 = time.monotonic()
        while await v.present(vip):
            await asyncio.sleep(0.01)
            assert time.monotonic() - t0 < life + 3
        return time.monotonic() - t0

    async def body() -> dict[str, float]:
        out = {}
        async with VipAddresses("v0") as v:
            for life in (1, 2):
                out[f"v4 {life}s"] = await gone_after(v, VIP4, life)
                out[f"v6 {life}s"] = await gone_after(v, VIP6, life)
            # Refreshing keeps it: 3 s of refreshes every 0.5 s on a 1 s lifetime.
            await v.add(VIP4, 1)
            for _ in range(6):
                await asyncio.sleep(0.5)
                assert await v.present(VIP4)
                await v.add(VIP4, 1)
            t0 = time.monotonic()
            while await v.present(VIP4):
                await asyncio.sleep(0.01)
            out["v4 1s after last refresh"] = time.monotonic() - t0
        return out

    figures = run_in_netns(netns, body)
    print(
        "\naddress lifetime -> removed after: "
        + ", ".join(f"{k}: {t:.2f}s" for k, t in figures.items())
    )
    for key, took in figures.items():
        life = 1 if " 1s" in key else 2
        assert life - 0.05 <= took <= life + 1.5, (key, took)


def test_reconcile_removes_only_stray_vips(netns: str) -> None:
    other = IPv4Address("10.99.0.101")

    async def body() -> None:
        async with VipAddresses("v0") as v:
            for vip in (VIP4, other, VIP6):
                await v.add(vip, None)
            removed = await v.reconcile(configured=[VIP4, other, VIP6], owned=[other])
            assert sorted(map(str, removed)) == sorted(["10.99.0.100", "fd99::100"])
            present = {a.address for a in await v.dump()}
            assert other in present and VIP4 not in present and VIP6 not in present
            # The node's own address is never touched, configured or not.
            assert ip_address("10.99.0.11") in present
            assert await v.reconcile(configured=[VIP4, other]) == [other]

    run_in_netns(netns, body)


def test_garp_and_na_are_captured_on_the_peer(netns: str) -> None:
    async def body() -> tuple[bytes, list[bytes], list[bytes]]:
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        try:
            cap.bind(("v1", 0))
            cap.settimeout(2.0)
            async with InterfaceVips("v0") as port:
                await port.add(VIP6, None)  # NA is sent from the VIP: it must be there
                assert port.announce(VIP4) == 2
                assert port.announce(VIP6) == 1
                mac = GarpSender("v0")
                own = mac.mac
                mac.close()
            frames: list[bytes] = []
            while len(frames) < 3:
                frame = cap.recv(2048)
                if frame[6:12] == own and frame[12:14] in (b"\x08\x06", b"\x86\xdd"):
                    # Skip the kernel's own IPv6 chatter (MLD, DAD) from v0.
                    if frame[12:14] == b"\x86\xdd" and frame[54] != 136:
                        continue
                    frames.append(frame)
            expected = [
                gratuitous_arp(own, VIP4),
                gratuitous_arp(own, VIP4, reply=True),
                unsolicited_na(own, VIP6),
            ]
            return own, frames, expected
        finally:
            cap.close()

    own, frames, expected = run_in_netns(netns, body)
    assert len(own) == 6
    assert frames == expected
