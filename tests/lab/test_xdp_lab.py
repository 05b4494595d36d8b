"""End to end: real TCP connections through the XDP balancer (dsr) to real backends.

A small topology of its own (namespaces prefixed halbt-xdp-): a bridge, a client, one
balancer holding the VIP on eth0 with the program attached (generic XDP, so neither a
peer program nor checksum-offload changes are needed), and backends that hold the VIP
on lo (arp_ignore) and answer `WHOAMI` with their name straight to the client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import pytest

from halb.dataplane.xdp.adapter import XdpDataplane
from halb.dataplane.xdp.netns import in_netns
from halb.model import Backend, Forwarding, Protocol, Scheduler, Service, ServiceKey

pytestmark = pytest.mark.lab

VIP = "10.88.0.100"
PORT = 9000
KEY = ServiceKey(ip_address(VIP), PORT, Protocol.TCP)

SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(512)
def serve(c):
    with c, c.makefile("rwb") as f:
        for line in f:
            f.write((name if line.strip() == b"WHOAMI" else line.decode().strip()).encode() + b"\n")
            f.flush()
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Lab:
    tag: str
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"halbt-xdp-{self.tag}-{role}"

    def add_host(self, role: str, addr: str) -> None:
        ns = self.ns(role)
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sw = self.ns("sw")
        sh(
            "ip",
            "-n",
            sw,
            "link",
            "add",
            f"{role}-p",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        sh("ip", "-n", sw, "link", "set", f"{role}-p", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def add_backend(self, name: str, addr: str) -> Backend:
        self.add_host(name, addr)
        ns = self.ns(name)
        sh("ip", "-n", ns, "addr", "add", f"{VIP}/32", "dev", "lo")
        for knob in ("net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"):
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", knob)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, name, str(PORT)],
            stdout=subprocess.PIPE,
        )
        self.servers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        return Backend(ip_address(addr), PORT)

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(f"{os.getpid() % 10000}{uuid.uuid4().hex[:3]}")
    try:
        sw = lab.ns("sw")
        sh("ip", "netns", "add", sw)
        lab.namespaces.append(sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        lab.add_host("cl", "10.88.0.2")
        lab.add_host("lb", "10.88.0.10")
        # The balancer owns the VIP (answers ARP); XDP takes its TCP before the stack.
        sh("ip", "-n", lab.ns("lb"), "addr", "add", f"{VIP}/32", "dev", "eth0")
        yield lab
    finally:
        lab.close()


@pytest.fixture
def dp(lab: Lab) -> Iterator[XdpDataplane]:
    pin = Path("/run/halb/bpffs") / f"halbt-xdp-{lab.tag}"
    d = XdpDataplane("eth0", ip_address("10.88.0.10"), "generic", pin, lab.ns("lb"))
    try:
        yield d
    finally:
        d.close()


def service(*backends: Backend) -> Service:
    return Service(KEY, Scheduler.MAGLEV, Forwarding.DSR, backends, ring_size=1009)


def whoami_many(lab: Lab, n: int) -> Counter[str]:
    def run() -> Counter[str]:
        got: Counter[str] = Counter()
        for _ in range(n):
            with socket.create_connection((VIP, PORT), timeout=3) as s:
                s.sendall(b"WHOAMI\n")
                got[s.makefile().readline().strip()] += 1
        return got

    return in_netns(lab.ns("cl"), run)


def link_stats(ns: str) -> tuple[int, int]:
    """(rx, tx) packets of eth0 in ns (through ip: /sys shows the mounter's namespace)."""
    out = subprocess.run(
        ["ip", "-n", ns, "-s", "-j", "link", "show", "eth0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["packets"]), int(stats["tx"]["packets"])


def test_connections_spread_and_replies_bypass_the_balancer(lab: Lab, dp: XdpDataplane) -> None:
    backends = [lab.add_backend(f"be{i}", f"10.88.0.{20 + i}") for i in (1, 2, 3)]
    dp.apply([service(*backends)])
    whoami_many(lab, 1)  # warm ARP caches so the counts below are only the connections
    lb_rx0, _ = link_stats(lab.ns("lb"))
    cl_rx0, cl_tx0 = link_stats(lab.ns("cl"))
    got = whoami_many(lab, 100)
    lb_rx1, _ = link_stats(lab.ns("lb"))
    cl_rx1, cl_tx1 = link_stats(lab.ns("cl"))
    assert sum(got.values()) == 100
    assert set(got) == {"be1", "be2", "be3"}
    for name, n in got.items():
        assert 20 <= n <= 46, f"{name} got {n} of 100 ({dict(got)})"
    # The balancer saw the client's packets only; the replies went straight to the client.
    client_sent, client_got = cl_tx1 - cl_tx0, cl_rx1 - cl_rx0
    assert client_got >= 300  # SYN-ACK, data, FIN... from the backends
    assert lb_rx1 - lb_rx0 <= client_sent + 10
    assert dp.counters().per_service[KEY].packets >= client_sent - 10


def test_flow_keeps_backend_while_ring_changes_and_new_backend_gets_flows(
    lab: Lab, dp: XdpDataplane
) -> None:
    be1, be2 = (lab.add_backend(f"be{i}", f"10.88.0.{20 + i}") for i in (1, 2))
    dp.apply([service(be1, be2)])

    def long_lived() -> tuple[str, str]:
        with socket.create_connection((VIP, PORT), timeout=3) as s:
            f = s.makefile("rw")
            f.write("WHOAMI\n")
            f.flush()
            first = f.readline().strip()
            # Drain the connection's backend: weight 0 leaves it no ring slot at all.
            drained = [
                Backend(b.address, b.port, weight=0 if name == first else 1)
                for b, name in ((be1, "be1"), (be2, "be2"))
            ]
            dp.apply([service(*drained)])
            time.sleep(0.1)
            f.write("WHOAMI\n")
            f.flush()
            return first, f.readline().strip()

    first, again = in_netns(lab.ns("cl"), long_lived)
    assert first == again, "an established connection must keep its backend"
    drained_name = first
    assert drained_name not in whoami_many(lab, 10), "a drained backend takes no new flows"

    be3 = lab.add_backend("be3", "10.88.0.23")
    dp.apply([service(be1, be2, be3)])
    got = whoami_many(lab, 60)
    assert got["be3"] >= 8, dict(got)


def test_a_connection_idle_past_its_timeout_resumes_on_its_backend(
    lab: Lab, dp: XdpDataplane
) -> None:
    """Its flow expires (the active's scan deletes it, flow_swept); the next packet takes
    the ring, which still names the same backend, and the connection goes on."""
    from halb.dataplane.xdp.flowsource import XdpFlowSource
    from halb.model import FlowTimeouts

    backends = [lab.add_backend(f"be{i}", f"10.88.0.{20 + i}") for i in (1, 2, 3)]
    dp.apply([service(*backends)])
    dp.set_flow_timeouts(FlowTimeouts(tcp_established=0.5, tcp_closing=0.5, udp=0.5))
    source = XdpFlowSource.from_dataplane(dp, events=False)

    def idle_then_resume() -> tuple[str, str, int]:
        with socket.create_connection((VIP, PORT), timeout=3) as s:
            f = s.makefile("rw")
            f.write("WHOAMI\n")
            f.flush()
            first = f.readline().strip()
            time.sleep(1.0)  # idle: twice the timeout
            swept = source.accept(source.scan()).swept
            f.write("WHOAMI\n")
            f.flush()
            return first, f.readline().strip(), swept

    try:
        first, again, swept = in_netns(lab.ns("cl"), idle_then_resume)
    finally:
        source.close()
    assert swept >= 1 and dp.global_stats()["flow_swept"] >= 1
    assert first == again, "the ring fallback keeps an expired connection on its backend"
    assert len(list(dp.map("flows").items())) >= 1  # re-recorded by its next packet


def test_a_flood_that_fills_the_flow_table_leaves_established_connections_alone(
    lab: Lab, tmp_path: Path
) -> None:
    """A 1024-entry build; the client floods 6000 new UDP flows while two established
    TCP connections keep talking, and mid-flood the TCP ring moves wholly to a third
    backend (the first two drained): the connections stay on their backends (one whose
    entry went would follow the ring to be3 and be reset there). The kernel's LRU keeps
    entries that were hit since insertion (its active list) ahead of one-packet flood
    entries; measured by hand, connections that stay quiet through the whole flood
    survive it too, so this shows a flood cannot push out established flows, not the
    order among them."""
    from halb.dataplane.xdp.build import build_bpf

    obj = build_bpf(tmp_path, defines=["HALB_MAX_FLOWS=1024"])
    pin = Path("/run/halb/bpffs") / f"halbt-xdp-{lab.tag}"
    d = XdpDataplane(
        "eth0", ip_address("10.88.0.10"), "generic", pin, lab.ns("lb"), object_path=obj
    )
    try:
        be1, be2 = (lab.add_backend(f"be{i}", f"10.88.0.{20 + i}") for i in (1, 2))
        be3 = lab.add_backend("be3", "10.88.0.23")
        udp_key = ServiceKey(ip_address(VIP), 5353, Protocol.UDP)

        def services(*tcp: Backend) -> list[Service]:
            flood = Service(udp_key, Scheduler.MAGLEV, Forwarding.DSR, (be1, be2), ring_size=1009)
            return [service(*tcp), flood]

        d.apply(services(be1, be2))

        def run() -> list[tuple[str, ...]]:
            conns = [socket.create_connection((VIP, PORT), timeout=3) for _ in range(2)]
            files = [c.makefile("rw") for c in conns]
            answers: list[tuple[str, ...]] = []
            try:
                for i in range(30):
                    row = []
                    for f in files:
                        f.write("WHOAMI\n")
                        f.flush()
                        row.append(f.readline().strip())
                    answers.append(tuple(row))
                    if i == 15:  # every ring slot now names be3
                        drained = (Backend(b.address, b.port, weight=0) for b in (be1, be2))
                        d.apply(services(*drained, be3))
                    for n in range(200):  # 200 new flows between two exchanges
                        port = 1024 + i * 200 + n
                        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        s.bind(("10.88.0.2", port))
                        s.sendto(b"x", (VIP, 5353))
                        s.close()
            finally:
                for f in files:
                    f.close()
                for c in conns:
                    c.close()
            return answers

        answers = in_netns(lab.ns("cl"), run)
        assert len(set(answers)) == 1, f"a connection changed backend: {answers}"
        assert "be3" not in answers[0]
        assert set(whoami_many(lab, 3)) == {"be3"}  # new connections follow the ring
        assert len(list(d.map("flows").items())) <= 1024
        assert d.counters().per_service[udp_key].packets >= 5000  # through the table
    finally:
        d.close()
