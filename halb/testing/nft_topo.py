"""A small namespace topology for the nft dataplane's kernel tests and benchmark.

    client ──br-front── lba, lbb ──br-back── be1, be2       (bridges in the sw namespace)

- front 10.98.0.0/24: client .2, lba .11, lbb .12; the client reaches the VIP through a
  host route whose next hop is the active balancer (``use_balancer`` moves it).
- back 10.98.1.0/24: lba .11, lbb .12, be1 .21, be2 .22; the floating gateway .1 (nat:
  the backends' default route) and SNAT address .2 (fullnat) sit on the active
  balancer's back interface.
- Backends run `python -m halb.lab.backend_server NAME` (TCP echo 9000, UDP 9001).

Every namespace is named ``<prefix>-<role>`` and removed by ``Topology.destroy``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path

from halb.dataplane.nft.netns import in_netns

__all__ = ["BACKENDS", "GATEWAY", "SNAT", "VIP", "Topology"]

VIP = IPv4Address("10.98.0.100")
GATEWAY = IPv4Address("10.98.1.1")
SNAT = IPv4Address("10.98.1.2")
CLIENT = IPv4Address("10.98.0.2")
BALANCERS = {"lba": ("10.98.0.11", "10.98.1.11"), "lbb": ("10.98.0.12", "10.98.1.12")}
BACKENDS = {"be1": IPv4Address("10.98.1.21"), "be2": IPv4Address("10.98.1.22")}


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Topology:
    prefix: str
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    active: str = "lba"
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def ip(self, role: str, *args: str) -> str:
        return sh("ip", "-n", self.ns(role), *args)

    def exec(self, role: str, *argv: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.ns(role), *argv, check=check)

    # -- build --------------------------------------------------------------------------

    @classmethod
    def build(cls, prefix: str, backends: bool = True) -> Topology:
        topo = cls(prefix)
        try:
            topo._build(backends)
        except BaseException:
            topo.destroy()
            raise
        return topo

    def _link(self, role: str, ifname: str, bridge: str, addr: str) -> None:
        # Switch-side names must fit IFNAMSIZ and be unique inside the sw namespace.
        peer = f"{role}-{ifname}"[:15]
        sh("ip", "link", "add", peer, "netns", self.ns("sw"), "type", "veth",
           "peer", "name", ifname, "netns", self.ns(role))  # fmt: skip
        self.ip("sw", "link", "set", peer, "master", bridge, "up")
        self.ip(role, "addr", "add", addr, "dev", ifname)
        self.ip(role, "link", "set", ifname, "up")

    def _build(self, backends: bool) -> None:
        roles = ["sw", "client", *BALANCERS, *(BACKENDS if backends else ())]
        for role in roles:
            sh("ip", "netns", "add", self.ns(role))
            self.ip(role, "link", "set", "lo", "up")
        for br in ("br-front", "br-back"):
            self.ip("sw", "link", "add", br, "type", "bridge", "stp_state", "0")
            self.ip("sw", "link", "set", br, "up")
        self._link("client", "eth0", "br-front", f"{CLIENT}/24")
        for lb, (front, back) in BALANCERS.items():
            self._link(lb, "eth0", "br-front", f"{front}/24")
            self._link(lb, "eth1", "br-back", f"{back}/24")
            self.exec(lb, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ip("client", "route", "add", f"{VIP}/32", "via", BALANCERS["lba"][0])
        self.ip("lba", "addr", "add", f"{GATEWAY}/24", "dev", "eth1")
        self.ip("lba", "addr", "add", f"{SNAT}/24", "dev", "eth1")
        if not backends:
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="halbt-nft-")
        for be, addr in BACKENDS.items():
            self._link(be, "eth0", "br-back", f"{addr}/24")
            self.ip(be, "route", "add", "default", "via", str(GATEWAY))
            ready = Path(self._tmp.name) / f"{be}.ready"
            self.servers[be] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(be), sys.executable, "-m",
                 "halb.lab.backend_server", be, "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        for be in BACKENDS:
            ready = Path(self._tmp.name) / f"{be}.ready"
            while not ready.exists():
                if time.monotonic() > deadline or self.servers[be].poll() is not None:
                    raise RuntimeError(f"backend server {be} did not start")
                time.sleep(0.05)

    def destroy(self) -> None:
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.servers.clear()
        for line in sh("ip", "netns", "list", check=False).splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(self.prefix + "-"):
                for pid in sh("ip", "netns", "pids", name, check=False).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), 9)
                sh("ip", "netns", "del", name, check=False)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- failover -----------------------------------------------------------------------

    def use_balancer(self, lb: str) -> None:
        """Move the client's next hop and the floating back-side addresses to ``lb``,
        and make the backends re-resolve them (stands in for gratuitous ARP)."""
        old = self.active
        if lb == old:
            return
        for addr in (GATEWAY, SNAT):
            self.ip(old, "addr", "del", f"{addr}/24", "dev", "eth1")
            self.ip(lb, "addr", "add", f"{addr}/24", "dev", "eth1")
        for be in BACKENDS:
            if self.ns(be) in sh("ip", "netns", "list"):
                self.ip(be, "neigh", "flush", "dev", "eth0")
        self.ip("client", "route", "replace", f"{VIP}/32", "via", BALANCERS[lb][0])
        self.ip("client", "neigh", "flush", "dev", "eth0")
        self.active = lb

    # -- client sockets -----------------------------------------------------------------

    def client_socket(self, kind: int, timeout: float = 5.0) -> socket.socket:
        s = in_netns(self.ns("client"), lambda: socket.socket(socket.AF_INET, kind))
        s.settimeout(timeout)
        return s

    def tcp_connect(self, port: int = 9000, timeout: float = 5.0) -> socket.socket:
        s = self.client_socket(socket.SOCK_STREAM, timeout)
        try:
            s.connect((str(VIP), port))
        except BaseException:
            s.close()
            raise
        return s

    def backend_of(self, addr: str) -> str:
        a = ip_address(addr)
        return next(name for name, b in BACKENDS.items() if b == a)
