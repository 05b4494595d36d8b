"""Guest-side test topology: one L2 segment (a bridge in the guest's root namespace)
joining a client, two balancers and three backends, each in its own namespace.

    cl   10.0.0.2     client; also 10.9.0.2 on a point-to-point link to lb1 (NAT tests)
    lb1  10.0.0.11    active balancer (VIPs 10.0.0.100 for dsr/tunnel, 10.9.9.100 nat)
    lb2  10.0.0.12    standby balancer
    be1..be3 10.0.0.21-23   backends: the dsr/tunnel VIP on lo (arp_ignore), tunl0 up,
                      default route via lb1 for the NAT replies

Each backend runs a TCP server (ports 80 and 8080) in this process: a thread per
connection answers every line with the backend's name. Sockets are created in a
namespace by a short-lived thread (setns moves one thread only) and used from any.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address

from halb.dataplane.xdp.netns import in_netns

VIP = ip_address("10.0.0.100")
NAT_VIP = ip_address("10.9.9.100")
CLIENT = "halbt-cl"
LB1, LB2 = "halbt-lb1", "halbt-lb2"
BACKENDS = {"halbt-be1": "10.0.0.21", "halbt-be2": "10.0.0.22", "halbt-be3": "10.0.0.23"}
PORTS = (80, 8080)


def sh(*cmds: str) -> None:
    for cmd in cmds:
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd}: {proc.stderr.strip()}")


def _join(ns: str, addr: str, n: int) -> None:
    sh(
        f"ip netns add {ns}",
        f"ip link add v{n} type veth peer name eth0 netns {ns}",
        f"ip link set v{n} master halbt-br up",
        f"ip -n {ns} link set lo up",
        f"ip -n {ns} addr add {addr}/24 dev eth0",
        f"ip -n {ns} link set eth0 up",
    )


class Topology:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def build(self) -> None:
        sh("ip link add halbt-br type bridge", "ip link set halbt-br up")
        _join(CLIENT, "10.0.0.2", 1)
        _join(LB1, "10.0.0.11", 2)
        _join(LB2, "10.0.0.12", 3)
        # Client <-> lb1 routed link for NAT, so replies must come back through lb1.
        sh(
            f"ip -n {CLIENT} link add eth1 type veth peer name eth1 netns {LB1}",
            f"ip -n {CLIENT} addr add 10.9.0.2/24 dev eth1",
            f"ip -n {CLIENT} link set eth1 up",
            f"ip -n {LB1} addr add 10.9.0.1/24 dev eth1",
            f"ip -n {LB1} link set eth1 up",
            f"ip -n {CLIENT} route add {NAT_VIP}/32 via 10.9.0.1",
            f"ip -n {LB1} addr add {NAT_VIP}/32 dev lo",
            f"ip -n {LB1} addr add {VIP}/32 dev eth0",
        )
        for n, (ns, addr) in enumerate(BACKENDS.items(), start=4):
            _join(ns, addr, n)
            sh(
                f"ip -n {ns} addr add {VIP}/32 dev lo",
                f"ip netns exec {ns} sysctl -qw net.ipv4.conf.all.arp_ignore=1",
                f"ip netns exec {ns} sysctl -qw net.ipv4.conf.all.arp_announce=2",
                f"ip netns exec {ns} sysctl -qw net.ipv4.conf.tunl0.rp_filter=0",
                f"ip netns exec {ns} sysctl -qw net.ipv4.conf.all.rp_filter=0",
                f"ip -n {ns} link set tunl0 up",
                f"ip -n {ns} route add 10.9.0.0/16 via 10.0.0.11",
            )
            for port in PORTS:
                self._serve(ns, port)

    def _serve(self, ns: str, port: int) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(128)
            s.settimeout(0.2)
            return s

        listener = in_netns(ns, make)
        self._listeners.append(listener)
        name = ns.removeprefix("halbt-").encode()

        def handle(conn: socket.socket) -> None:
            with conn:
                conn.settimeout(30)
                f = conn.makefile("rb")
                with contextlib.suppress(OSError):
                    for _ in f:
                        conn.sendall(name + b"\n")

        def accept() -> None:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for s in self._listeners:
            s.close()
        for ns in (CLIENT, LB1, LB2, *BACKENDS):
            subprocess.run(f"ip netns del {ns}", shell=True, capture_output=True)
        subprocess.run("ip link del halbt-br", shell=True, capture_output=True)


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


class Client:
    """A connection from the client namespace; ``ask()`` returns the answering backend."""

    def __init__(self, vip: IPv4Address | object, port: int, sport: int = 0) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sport:
                s.bind(("0.0.0.0", sport))
            s.settimeout(5)
            return s

        self.sock = in_netns(CLIENT, make)
        try:
            self.sock.connect((str(vip), port))
        except OSError:
            self.sock.close()
            raise
        self.sport = self.sock.getsockname()[1]
        self._file = self.sock.makefile("rb")

    def ask(self) -> str:
        self.sock.sendall(b"who\n")
        return self._file.readline().decode().strip()

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def ask_once(vip: object, port: int) -> str:
    c = Client(vip, port)
    try:
        return c.ask()
    finally:
        c.close()
