"""Feed connections to this node's IPVS through the kernel's own backup sync daemon.

IPVS has no netlink command to create a connection; the only way in is the sync
protocol. The standby runs the kernel's backup daemon on a private dummy interface
(``halbsync0``, MTU 65535 so one datagram carries 255 connections, a link-local
address so multicast has a source) and halb sends it version 1 sync messages
(halb.dataplane.ipvs.syncproto) built from the flows of its authenticated FlowSync
stream. Nothing from the network reaches a dummy interface: only local processes can
inject. The kernel's master daemon is not used: it multicasts unauthenticated state
outside halb's term checks.

The daemon's socket has a finite receive buffer: sending waits for the queue to drain
every few messages, and ``drain()`` waits until the kernel has taken every datagram.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterable
from typing import IO

from halb.dataplane.ipvs.netlink import DaemonState, IpvsNetlink
from halb.dataplane.ipvs.syncproto import SYNC_GROUP, SYNC_PORT, SyncConn, encode_all
from halb.dataplane.xdp.netns import in_netns

__all__ = ["SYNC_ADDRESS", "SYNC_INTERFACE", "SyncInjector"]

SYNC_INTERFACE = "halbsync0"
SYNC_ADDRESS = "169.254.88.48"  # link-local, never routed: only a multicast source
_PACE = 8  # messages (~2000 connections, ~75 KB) between waits for the queue to drain


def _udp_rx_queue(proc_udp: IO[str], port: int) -> int | None:
    """Receive-queue bytes of the UDP socket bound to ``port`` (None: no such socket)."""
    proc_udp.seek(0)
    total = None
    for line in proc_udp.read().splitlines()[1:]:
        cols = line.split()
        if len(cols) > 4 and int(cols[1].rsplit(":", 1)[1], 16) == port:
            total = (total or 0) + int(cols[4].split(":")[1], 16)
    return total


class SyncInjector:
    def __init__(self, netlink: IpvsNetlink, netns: str | None, sync_id: int) -> None:
        self.netns = netns
        self.sync_id = sync_id
        self._nl = netlink
        self._created_link = False
        self._daemon = False
        self._sock: socket.socket | None = None
        self._proc_udp: IO[str] | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        from pyroute2 import IPRoute

        def link() -> int:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=SYNC_INTERFACE)
                if not found:
                    ipr.link("add", ifname=SYNC_INTERFACE, kind="dummy")
                    self._created_link = True
                    found = ipr.link_lookup(ifname=SYNC_INTERFACE)
                index = int(found[0])
                # IFF_MULTICAST: the dummy driver clears it; the group join needs it.
                ipr.link("set", index=index, mtu=65535, flags=0x1001, change=0x1001)
                if not ipr.get_addr(index=index, address=SYNC_ADDRESS):
                    ipr.addr("add", index=index, address=SYNC_ADDRESS, prefixlen=32)
                return index

        index = in_netns(self.netns, link)
        for d in self._nl.daemons():
            if d.state == DaemonState.BACKUP and (
                d.interface != SYNC_INTERFACE or d.sync_id != self.sync_id
            ):
                self._nl.stop_daemon(DaemonState.BACKUP)  # someone else's: restart as ours
        if not any(d.state == DaemonState.BACKUP for d in self._nl.daemons()):
            self._nl.start_daemon(DaemonState.BACKUP, SYNC_INTERFACE, self.sync_id)
        self._daemon = True

        def sock() -> tuple[socket.socket, IO[str]]:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            mreqn = struct.pack("4s4si", b"\0" * 4, socket.inet_aton(SYNC_ADDRESS), index)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            # /proc/<tid>/net binds to the namespace at open: reading it later from
            # any thread still shows this namespace.
            return s, open("/proc/thread-self/net/udp")

        self._sock, self._proc_udp = in_netns(self.netns, sock)

    def send(self, conns: Iterable[SyncConn]) -> int:
        assert self._sock is not None
        sent = 0
        for n, message in enumerate(encode_all(conns, self.sync_id), start=1):
            while True:
                try:
                    self._sock.sendto(message, (SYNC_GROUP, SYNC_PORT))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                        raise
                    time.sleep(0.001)
            sent += message[4]  # the header's connection count
            if n % _PACE == 0:
                self.drain()
        return sent

    def drain(self, timeout: float = 2.0) -> bool:
        """Wait until the backup daemon has taken every datagram sent so far."""
        assert self._proc_udp is not None
        deadline = time.monotonic() + timeout
        while True:
            queued = _udp_rx_queue(self._proc_udp, SYNC_PORT)
            if not queued:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc_udp is not None:
            self._proc_udp.close()
            self._proc_udp = None
        if self._daemon:
            self._daemon = False
            self._nl.stop_daemon(DaemonState.BACKUP)
        if self._created_link:
            self._created_link = False

            def remove() -> None:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    ipr.link("del", ifname=SYNC_INTERFACE)

            in_netns(self.netns, remove)
