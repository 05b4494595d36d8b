"""How full the conntrack table is, and whether it has refused entries.

A full table is the nft dataplane's quiet failure mode: new connections are dropped
(``drop``; ``early_drop`` when the kernel evicted an unassured entry to make room)
and injected entries of a standby are refused (``insert_failed``). The per-CPU
counters come from ctnetlink (what `conntrack -S` prints); the size and the count
from the namespace's sysctls.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import asdict, dataclass

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctsock import CtSocket
from halb.dataplane.nft.netns import read_sysctl

__all__ = ["TableStats", "read_table_stats"]

IPCTNL_MSG_CT_GET_STATS_CPU = 4
# enum ctattr_stats_cpu
CTA_STATS_FOUND = 2
CTA_STATS_INVALID = 4
CTA_STATS_INSERT = 8
CTA_STATS_INSERT_FAILED = 9
CTA_STATS_DROP = 10
CTA_STATS_EARLY_DROP = 11
CTA_STATS_ERROR = 12
CTA_STATS_CLASH_RESOLVE = 14
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class TableStats:
    count: int  # nf_conntrack_count: entries now
    max: int  # nf_conntrack_max: entries the table may hold
    buckets: int  # nf_conntrack_buckets: hash table size
    insert_failed: int  # entries the kernel could not insert (clashes, injected ones too)
    drop: int  # new connections dropped because the table was full
    early_drop: int  # unassured entries evicted to make room
    invalid: int  # packets that matched no valid state
    error: int
    clash_resolve: int

    @property
    def fill(self) -> float:
        return self.count / self.max if self.max else 0.0

    def doc(self) -> dict[str, int | float]:
        return {**asdict(self), "fill": round(self.fill, 4)}


def _cpu_counters(sock: CtSocket) -> dict[int, int]:
    seq = sock.next_seq()
    head = ctmsg.NFGEN_HDR.pack(socket.AF_UNSPEC, 0, 0)
    mtype = (ctmsg.NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS_CPU
    length = ctmsg.NLMSG_HDR.size + len(head)
    flags = ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_DUMP
    sock.sock.send(ctmsg.NLMSG_HDR.pack(length, mtype, flags, seq, 0) + head)
    totals: dict[int, int] = {}
    while True:
        for m in ctmsg.parse(sock.sock.recv(1 << 16)):
            if m.seq != seq:
                continue
            if m.type == ctmsg.NLMSG_DONE:
                return totals
            if m.type == ctmsg.NLMSG_ERROR:
                code = ctmsg.decode_error(m.payload)
                if code:
                    raise OSError(code, f"conntrack stats: {errno.errorcode.get(code, code)}")
                return totals
            attrs = ctmsg._attrs(m.payload, "stats", off=ctmsg.NFGEN_HDR.size)
            for kind, raw in attrs.items():
                if len(raw) == 4:
                    totals[kind] = totals.get(kind, 0) + _U32.unpack(raw)[0]


def read_table_stats(sock: CtSocket, netns: str | None) -> TableStats:
    """The table of ``sock``'s namespace (``netns``). Not thread-safe on ``sock``."""
    cpu = _cpu_counters(sock)

    def sysctl(name: str) -> int:
        return int(read_sysctl(netns, f"net.netfilter.nf_conntrack_{name}"))

    return TableStats(
        count=sysctl("count"),
        max=sysctl("max"),
        buckets=sysctl("buckets"),
        insert_failed=cpu.get(CTA_STATS_INSERT_FAILED, 0),
        drop=cpu.get(CTA_STATS_DROP, 0),
        early_drop=cpu.get(CTA_STATS_EARLY_DROP, 0),
        invalid=cpu.get(CTA_STATS_INVALID, 0),
        error=cpu.get(CTA_STATS_ERROR, 0),
        clash_resolve=cpu.get(CTA_STATS_CLASH_RESOLVE, 0),
    )
