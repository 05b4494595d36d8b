"""A real TCP connection through the PROXY protocol programs:

    client ns ──veth── router ns ──veth── server ns
                       (nft full NAT; halb_pp_* on the backend-side veth r1)

The server parses the PROXY header with halb.proxy.codec and echoes the stream after
it. The server's veth verifies every checksum it receives (rx offload off), so a wrong
update stalls the connection instead of passing silently. Two sender set-ups:
- ``full``: the client computes every checksum itself (tx offload off): the programs
  update complete checksums;
- ``offload``: the client leaves checksums to the device and sends TSO super-packets
  (veth keeps both across namespaces): the router's programs see CHECKSUM_PARTIAL GSO
  packets, and the router's r1 (tx offload off) computes the checksums and segments
  in software after them.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest

from halb.dataplane.proxyproto.layout import PpState
from halb.dataplane.proxyproto.program import ProxyFlow, ProxyProgram
from halb.net.netns import in_netns
from halb.proxy.codec import NEED_MORE, Parsed, ProxyHeader, build_v1, build_v2, parse

pytestmark = pytest.mark.kernel

ADDR = {
    4: {"client": "10.77.1.2", "vip": "10.77.9.100", "snat": "10.77.2.1", "server": "10.77.2.2"},
    6: {"client": "fd77:1::2", "vip": "fd77:9::100", "snat": "fd77:2::1", "server": "fd77:2::2"},
}
CPORT, VPORT, SPORT = 40123, 80, 8080
STREAM = os.urandom(300_000)


def sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


@dataclass
class Topo:
    tag: str = field(default_factory=lambda: os.urandom(3).hex())

    def ns(self, role: str) -> str:
        return f"halbp-{role}-{self.tag}"

    def build(self) -> None:
        c, r, s = self.ns("c"), self.ns("r"), self.ns("s")
        for n in (c, r, s):
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "r0", "netns", r)
        sh("ip", "link", "add", "r1", "netns", r, "type", "veth", "peer", "name", "s0", "netns", s)
        for n, dev, v4, v6 in (
            (c, "c0", "10.77.1.2/24", "fd77:1::2/64"),
            (r, "r0", "10.77.1.1/24", "fd77:1::1/64"),
            (r, "r1", "10.77.2.1/24", "fd77:2::1/64"),
            (s, "s0", "10.77.2.2/24", "fd77:2::2/64"),
        ):
            sh("ip", "-n", n, "addr", "add", v4, "dev", dev)
            sh("ip", "-n", n, "addr", "add", v6, "dev", dev, "nodad")
            sh("ip", "-n", n, "link", "set", dev, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        for n, gw4, gw6 in ((c, "10.77.1.1", "fd77:1::1"), (s, "10.77.2.1", "fd77:2::1")):
            sh("ip", "-n", n, "route", "add", "default", "via", gw4)
            sh("ip", "-n", n, "-6", "route", "add", "default", "via", gw6)
        sh("ip", "netns", "exec", s, "ethtool", "-K", "s0", "tx", "off", "rx", "off")
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        rules = f"""
table inet halbp {{
  chain pre {{
    type nat hook prerouting priority dstnat;
    ip daddr {ADDR[4]["vip"]} tcp dport {VPORT} dnat ip to {ADDR[4]["server"]}:{SPORT}
    ip6 daddr {ADDR[6]["vip"]} tcp dport {VPORT} dnat ip6 to [{ADDR[6]["server"]}]:{SPORT}
  }}
  chain post {{
    type nat hook postrouting priority srcnat;
    oifname "r1" meta nfproto ipv4 snat ip to {ADDR[4]["snat"]}
    oifname "r1" meta nfproto ipv6 snat ip6 to {ADDR[6]["snat"]}
  }}
}}
"""
        subprocess.run(
            ["ip", "netns", "exec", r, "nft", "-f", "-"], input=rules, text=True, check=True
        )

    def offload(self, on: bool) -> None:
        """Client checksum / TSO offload on or off; the router's r1 the opposite, so an
        offloaded packet is completed in software after the programs."""
        state = "on" if on else "off"
        sh("ip", "netns", "exec", self.ns("c"), "ethtool", "-K", "c0", "tx", state)
        if on:
            sh("ip", "netns", "exec", self.ns("c"), "ethtool", "-K", "c0", "tso", "on")
        sh("ip", "netns", "exec", self.ns("r"), "ethtool", "-K", "r1", "tx", "off" if on else "on")

    def destroy(self) -> None:
        for role in ("c", "r", "s"):
            subprocess.run(["ip", "netns", "del", self.ns(role)], capture_output=True, check=False)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    t = Topo()
    try:
        t.build()
        yield t
    finally:
        t.destroy()


@pytest.fixture
def prog(topo: Topo) -> Iterator[ProxyProgram]:
    with ProxyProgram() as p:
        p.set_mtu(1500)
        p.attach("r1", netns=topo.ns("r"))
        yield p


class Server:
    """Accepts one connection, parses the PROXY header, echoes everything after it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.header: Parsed | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                buf = b""
                got = parse(buf)
                while got is NEED_MORE:
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise EOFError("closed inside the PROXY header")
                    buf += chunk
                    got = parse(buf)
                assert isinstance(got, Parsed)
                self.header = got
                conn.sendall(buf[got.length :])
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
        except BaseException as exc:  # reported by the test
            self.error = exc


_ports = itertools.count(CPORT)


def transfer(
    topo: Topo, prog: ProxyProgram, family: int, version: int, first: int = 0
) -> dict[str, int]:
    """One connection through the router: the header the server parsed is the one the
    entry held, the echo is the stream byte for byte; returns the programs' counters.
    ``first``: the client writes that many bytes alone first (a small first segment)."""
    prog.reset_stats()
    a = ADDR[family]
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    cport = next(_ports)  # a fresh 4-tuple each time (no TIME_WAIT or conntrack reuse)
    hdr = ProxyHeader(
        version=version,
        source=(ip_address(a["client"]), cport),
        destination=(ip_address(a["vip"]), VPORT),
    )
    raw = build_v1(hdr) if version == 1 else build_v2(hdr)
    # full NAT keeps the client's port here (nothing else uses it on the SNAT address);
    # the ISN is learnt from the SYN, as when the control plane writes the entry late
    flow = ProxyFlow(
        local=ip_address(a["snat"]),
        lport=cport,
        backend=ip_address(a["server"]),
        bport=SPORT,
        header=raw,
        isn_next=None,
        state=PpState.PENDING,
    )
    prog.put_flow(flow)

    def listen() -> socket.socket:
        s = socket.socket(af, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a["server"], SPORT))
        s.listen(1)
        return s

    def connect() -> socket.socket:
        s = socket.socket(af, socket.SOCK_STREAM)
        s.settimeout(10)
        s.bind((a["client"], cport))
        return s

    lsock = in_netns(topo.ns("s"), listen)
    server = Server(lsock)
    client = in_netns(topo.ns("c"), connect)
    try:
        client.connect((a["vip"], VPORT))

        def send() -> None:
            if first:
                client.sendall(STREAM[:first])
                time.sleep(0.05)
            client.sendall(STREAM[first:])
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while chunk := client.recv(65536):
            got += chunk
        sender.join(10)
    finally:
        client.close()
        server.thread.join(10)
        lsock.close()
    assert server.error is None, repr(server.error)
    assert server.header is not None
    assert server.header.header == parse(raw).header  # type: ignore[union-attr]
    assert server.header.length == len(raw)
    assert len(got) == len(STREAM) and bytes(got) == STREAM  # no second header, no gap
    stats = prog.stats()
    assert stats["inserted"] + stats["inserted_data"] + stats["trimmed"] == 1
    assert stats["seq_adjusted"] > 0 and stats["ack_adjusted"] > 0
    assert stats["error"] == 0 and stats["missed"] == 0
    final = prog.get_flow(flow.local, flow.lport, flow.backend, flow.bport)
    assert final is not None and final.state is PpState.ACKED
    prog.delete_flow(flow.local, flow.lport, flow.backend, flow.bport)
    return stats


@pytest.mark.parametrize("offload", [False, True], ids=["full", "offload"])
@pytest.mark.parametrize(
    ("family", "version"), [(4, 1), (4, 2), (6, 2)], ids=["v4-v1", "v4-v2", "v6-v2"]
)
def test_server_sees_the_header_once_and_an_intact_stream(
    topo: Topo, prog: ProxyProgram, family: int, version: int, offload: bool
) -> None:
    topo.offload(offload)
    transfer(topo, prog, family, version)


LOSS = """
table inet halbp_loss {
  chain lossy {
    type filter hook forward priority 0;
    tcp dport 8080 meta length > 200 numgen random mod 20 == 0 drop
  }
}
"""


@pytest.mark.parametrize(("family", "version"), [(4, 1), (6, 2)], ids=["v4-v1", "v6-v2"])
def test_loss_toward_the_backend_makes_sacks_that_are_shifted(
    topo: Topo, prog: ProxyProgram, family: int, version: int
) -> None:
    """5% of the client's data segments dropped in the router before the programs: the
    server SACKs what came after each hole (in its shifted space) and the client
    retransmits the holes, which only works if the SACK edges reach it moved back."""
    topo.offload(False)
    r = topo.ns("r")
    subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=LOSS, text=True, check=True)
    try:
        stats = transfer(topo, prog, family, version)
    finally:
        sh("ip", "netns", "exec", r, "nft", "delete", "table", "inet", "halbp_loss")
    assert stats["sack_adjusted"] > 0


def _filters(topo: Topo, direction: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", topo.ns("r"), "tc", "filter", "show", "dev", "r1", direction],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_attach_puts_both_programs_on_clsact_and_close_removes_them(topo: Topo) -> None:
    with ProxyProgram() as a:
        a.attach("r1", netns=topo.ns("r"))
        assert "halb_pp_egress" in _filters(topo, "egress")
        assert "halb_pp_ingress" in _filters(topo, "ingress")
    assert "halb_pp" not in _filters(topo, "egress") + _filters(topo, "ingress")


def test_lost_header_segment_is_recovered(topo: Topo, prog: ProxyProgram) -> None:
    """The pure ACK that carries the header is dropped on its way to the server (once).
    The client's full-sized first data segment moves (the header is presumed there); the
    server's dup ack of the insertion point flags the loss, the client's retransmission
    of that segment then carries the header alone, and the stream comes out intact."""
    topo.offload(False)
    # every client port here has five digits, so every v1 line has this length
    hdr_len = len(
        build_v1(
            ProxyHeader(
                version=1,
                source=(ip_address(ADDR[4]["client"]), CPORT),
                destination=(ip_address(ADDR[4]["vip"]), VPORT),
            )
        )
    )
    # IPv4 + TCP with timestamps (Linux's default) + the header: that pure ACK, once
    drop = f"""
table ip halbp_drop {{
  chain pre {{
    type filter hook prerouting priority -300;
    tcp dport {SPORT} ip length {20 + 32 + hdr_len} limit rate 1/hour burst 1 packets \\
      counter drop
  }}
}}
"""
    s = topo.ns("s")
    subprocess.run(["ip", "netns", "exec", s, "nft", "-f", "-"], input=drop, text=True, check=True)
    try:
        stats = transfer(topo, prog, 4, 1)
        dropped = subprocess.run(
            ["ip", "netns", "exec", s, "nft", "list", "table", "ip", "halbp_drop"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        sh("ip", "netns", "exec", s, "nft", "delete", "table", "ip", "halbp_drop")
    assert "packets 1 " in dropped, dropped
    assert stats["reinserted"] >= 1


@pytest.mark.parametrize("first", [100, 0], ids=["small-first", "bulk-first"])
@pytest.mark.parametrize("offload", [False, True], ids=["full", "offload"])
def test_first_segment_with_data_when_the_final_ack_was_lost(
    topo: Topo, prog: ProxyProgram, offload: bool, first: int
) -> None:
    """The handshake's final pure ACK is lost before the balancer (dropped once in the
    router's forward chain), so the client's first data segment completes the
    handshake. A small one (100 bytes) gets the header in front of its payload; a bulk
    one (a full MTU, or with offload a TSO super-packet: GSO at the programs) is
    replaced by the header alone and the client retransmits its data. Offload on
    (CHECKSUM_PARTIAL through the rewrite) and off."""
    topo.offload(offload)
    drop = f"""
table ip halbp_ack {{
  chain lossy {{
    type filter hook forward priority 0;
    tcp dport {SPORT} tcp flags == ack ip length 52 limit rate 1/hour burst 1 packets \\
      counter drop
  }}
}}
"""
    r = topo.ns("r")
    subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=drop, text=True, check=True)
    try:
        stats = transfer(topo, prog, 4, 1, first=first)
        dropped = subprocess.run(
            ["ip", "netns", "exec", r, "nft", "list", "table", "ip", "halbp_ack"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        sh("ip", "netns", "exec", r, "nft", "delete", "table", "ip", "halbp_ack")
    assert "packets 1 " in dropped, dropped
    assert stats["inserted_data" if first else "trimmed"] == 1, stats


def test_flow_state_moved_to_a_fresh_program_keeps_the_connection(topo: Topo) -> None:
    """What a standby gets through sync: mid-connection the programs are replaced by a
    fresh instance holding only the ProxyFlow read from the old one (header, ISN,
    state); the stream continues intact and the header is not sent again."""
    topo.offload(False)
    a = ADDR[4]
    cport = next(_ports)
    raw = build_v2(
        ProxyHeader(
            version=2,
            source=(ip_address(a["client"]), cport),
            destination=(ip_address(a["vip"]), VPORT),
        )
    )
    old = ProxyProgram()
    old.set_mtu(1500)
    old.attach("r1", netns=topo.ns("r"))
    old.put_flow(
        ProxyFlow(
            ip_address(a["snat"]), cport, ip_address(a["server"]), SPORT, raw, None, PpState.PENDING
        )
    )

    def listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a["server"], SPORT))
        s.listen(1)
        return s

    def connect() -> socket.socket:
        s = socket.socket()
        s.settimeout(10)
        s.bind((a["client"], cport))
        return s

    def exchange(sock: socket.socket, data: bytes) -> bytes:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = sock.recv(65536)
            assert chunk, "closed early"
            got += chunk
        sender.join(10)
        return bytes(got)

    new: ProxyProgram | None = None
    lsock = in_netns(topo.ns("s"), listen)
    server = Server(lsock)
    client = in_netns(topo.ns("c"), connect)
    try:
        client.connect((a["vip"], VPORT))
        first, second = STREAM[:100_000], STREAM[100_000:200_000]
        assert exchange(client, first) == first
        (synced,) = list(old.flows())
        assert synced.state is PpState.ACKED and synced.isn_next is not None
        old.close()  # the old active is gone
        new = ProxyProgram()
        new.set_mtu(1500)
        new.put_flow(synced)  # the standby installs the synced state before it takes over
        new.attach("r1", netns=topo.ns("r"))
        assert exchange(client, second) == second
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        stats = new.stats()
    finally:
        client.close()
        server.thread.join(10)
        lsock.close()
        old.close()
        if new is not None:
            new.close()
    assert server.error is None, repr(server.error)
    assert server.header is not None and server.header.length == len(raw)
    assert stats["inserted"] + stats["inserted_data"] + stats["reinserted"] == 0
    assert stats["seq_adjusted"] > 0 and stats["ack_adjusted"] > 0 and stats["error"] == 0
