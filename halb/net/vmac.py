"""The virtual MAC (keepalived's ``use_vmac``): a group's VIPs on a macvlan whose MAC
moves with the term.

A group with ``virtual_mac`` holds its VIPs on a macvlan interface (``halb-vmac<id>``
by default) on top of the node's front interface, with the MAC
``00:00:5e:00:01:<id>``. ARP replies and the term's gratuitous ARP / unsolicited NA
come from that MAC on whichever node holds the term, so a client's neighbour entry for
the VIP never changes across a failover; only the switch learns that the MAC moved
(from the new owner's first announcement).

How the kernel is set up for it (why each setting):
- the macvlan exists only while the term holds a VIP on it: it is created before the
  term's first add and deleted with the term's last remove, so a standby never sends a
  frame from the shared MAC (a switch would learn it on the wrong port);
- ``arp_ignore=1`` on the parent and on the macvlan: the parent must not answer ARP for
  the VIP (it is a local address of the host) with its own MAC, and the macvlan, which
  receives every broadcast too, must not answer for the node's own address;
- ``arp_announce=2`` on the parent: an ARP request the node sends from the parent (in
  the NAT modes, to reach a client for a reply whose source is the VIP) names the
  node's own address, never the VIP; neighbours update their entry for a request's
  sender, so one naming the VIP would point the clients at the parent's MAC;
- ``rp_filter=0`` on the macvlan: clients' packets arrive on it while the route back to
  them leaves through the parent;
- ``addr_gen_mode=1`` (no IPv6 link-local address) on the macvlan: no router or
  neighbour solicitation from the shared MAC beyond the term's own announcements.

Forwarding is unchanged: an XDP program on the parent sees the frames before the
macvlan does (they carry the virtual MAC as destination, which the program never
checks), and nftables / IPVS match the VIP address whatever the input interface.

halb.agent.vmacport puts each VIP of such a group on its macvlan (the runtime's VIP
port); this module only creates and deletes the link. Neither decides ownership: the
runtime checks the term before every add and every announcement, as for any VIP.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from halb.config import ClusterConfig, VirtualMacConfig
from halb.model import IPAddress

__all__ = ["delete_link", "ensure_link", "virtual_macs"]

log = logging.getLogger(__name__)

PROC_CONF = Path("/proc/sys/net")


def virtual_macs(cfg: ClusterConfig) -> dict[IPAddress, VirtualMacConfig]:
    """VIP -> its group's virtual MAC, for the groups that have one."""
    return {v.address: g.virtual_mac for g in cfg.vip_groups if g.virtual_mac for v in g.vips}


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _sysctl_link(ifname: str, parent: str, write: Callable[[Path, str], None]) -> None:
    write(PROC_CONF / "ipv6" / "conf" / ifname / "addr_gen_mode", "1")
    write(PROC_CONF / "ipv4" / "conf" / ifname / "arp_ignore", "1")
    write(PROC_CONF / "ipv4" / "conf" / ifname / "rp_filter", "0")
    conf = PROC_CONF / "ipv4" / "conf" / parent
    for key, value, why in (
        ("arp_ignore", 1, f"only {ifname} answers ARP for its VIPs"),
        ("arp_announce", 2, "its ARP requests never name a VIP as their sender"),
    ):
        if int((conf / key).read_text()) < value:
            log.info("%s: %s=%d so that %s", parent, key, value, why)
            write(conf / key, str(value))


async def _collect(reply: Any) -> list[Any]:
    if hasattr(reply, "__aiter__"):
        return [msg async for msg in reply]
    return list(reply)


async def _index(ipr: Any, ifname: str) -> int | None:
    try:
        links = await _collect(await ipr.link("get", ifname=ifname))
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return int(links[0]["index"]) if links else None


async def ensure_link(
    parent: str, vm: VirtualMacConfig, write: Callable[[Path, str], None] = _write
) -> None:
    """Create (or adopt, after a restart in place) the group's macvlan on ``parent``,
    set up as the module docstring says, and bring it up."""
    ipr = AsyncIPRoute()
    try:
        await ipr.setup_endpoint()
        index = await _index(ipr, vm.ifname)
        if index is None:
            parent_index = await _index(ipr, parent)
            if parent_index is None:
                raise OSError(errno.ENODEV, f"parent interface {parent} not found")
            await ipr.link(
                "add",
                ifname=vm.ifname,
                kind="macvlan",
                link=parent_index,
                macvlan_mode="bridge",
                address=vm.mac,
            )
            index = await _index(ipr, vm.ifname)
            assert index is not None
            log.info("virtual MAC %s: created %s on %s", vm.mac, vm.ifname, parent)
        _sysctl_link(vm.ifname, parent, write)
        await ipr.link("set", index=index, state="up")
    finally:
        ipr.close()


async def delete_link(ifname: str) -> bool:
    """Delete the macvlan (its addresses go with it); False if it was not there."""
    ipr = AsyncIPRoute()
    try:
        await ipr.setup_endpoint()
        index = await _index(ipr, ifname)
        if index is None:
            return False
        await ipr.link("del", index=index)
        return True
    finally:
        ipr.close()
