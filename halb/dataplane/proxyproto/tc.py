"""Attach a SCHED_CLS program to an interface's clsact ingress or egress (libbpf's
bpf_tc_* API over ctypes), and detach exactly that filter again."""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass
from typing import Literal

from pyroute2 import IPRoute

from halb.dataplane.xdp import libbpf as lb
from halb.dataplane.xdp.netns import in_netns

__all__ = ["Direction", "TcFilter", "tc_attach"]

Direction = Literal["ingress", "egress"]
_POINT = {"ingress": 1, "egress": 2}  # BPF_TC_INGRESS, BPF_TC_EGRESS
_EEXIST = 17


@dataclass(frozen=True, slots=True)
class TcFilter:
    """One attached filter: what bpf_tc_detach needs to remove it and nothing else."""

    ifname: str
    direction: Direction
    netns: str | None
    handle: int
    priority: int

    def detach(self) -> None:
        def do() -> None:
            try:
                hook = _hook(socket.if_nametoindex(self.ifname), self.direction)
            except OSError:
                return  # the interface is gone, and its filters with it
            opts = lb.BpfTcOpts(
                sz=ctypes.sizeof(lb.BpfTcOpts), handle=self.handle, priority=self.priority
            )
            ret = lb.lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
            if ret != -2:  # ENOENT: someone removed the clsact qdisc already
                lb.check(ret, f"detach tc {self.direction} filter from {self.ifname}")

        in_netns(self.netns, do)


def _has_clsact(ifindex: int) -> bool:
    with IPRoute() as ipr:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def _hook(ifindex: int, direction: Direction) -> lb.BpfTcHook:
    return lb.BpfTcHook(
        sz=ctypes.sizeof(lb.BpfTcHook), ifindex=ifindex, attach_point=_POINT[direction]
    )


def tc_attach(
    prog_fd: int,
    ifname: str,
    direction: Direction,
    netns: str | None = None,
    priority: int = 1,
    handle: int = 1,
) -> TcFilter:
    """Attach in direct-action mode; the clsact qdisc is created when missing and left
    in place on detach (other programs may use it)."""

    def do() -> TcFilter:
        ifindex = socket.if_nametoindex(ifname)
        hook = _hook(ifindex, direction)
        # asked first: creating an existing clsact fails noisily (libbpf prints the
        # kernel's "Exclusivity flag on" for every second direction)
        if not _has_clsact(ifindex):
            ret = lb.lib.bpf_tc_hook_create(ctypes.byref(hook))
            if ret != -_EEXIST:
                lb.check(ret, f"clsact qdisc on {ifname}")
        opts = lb.BpfTcOpts(
            sz=ctypes.sizeof(lb.BpfTcOpts), prog_fd=prog_fd, handle=handle, priority=priority
        )
        lb.check(
            lb.lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)),
            f"attach tc {direction} program to {ifname}",
        )
        return TcFilter(ifname, direction, netns, int(opts.handle), int(opts.priority))

    return in_netns(netns, do)
