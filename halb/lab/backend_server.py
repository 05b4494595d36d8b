"""The lab's backend server: TCP echo, UDP echo and HTTP, each answering with its name.

Run inside a backend namespace: ``python -m halb.lab.backend_server NAME``.

- TCP echo: echoes bytes; a line ``WHOAMI`` is answered with ``NAME\\n`` instead, so a
  test can ask which backend a long-lived connection landed on, and a line ``WHOIS``
  with ``ADDRESS PORT\\n`` of the peer as this backend sees it (the client under nat,
  the balancer's floating SNAT address under fullnat).
- UDP echo: echoes datagrams (``WHOAMI`` and ``WHOIS`` likewise). Replies leave from
  the address the datagram was sent to (IP_PKTINFO), so DSR replies carry the VIP as source.
- HTTP: any GET returns ``NAME\\n``.

TCP replies naturally leave from the VIP because the socket is bound to the wildcard
address and the kernel answers from the connection's destination address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import struct
from pathlib import Path

log = logging.getLogger("halb.lab.backend")

WHOAMI = b"WHOAMI\n"
WHOIS = b"WHOIS\n"
COMMANDS = (WHOAMI, WHOIS)

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


def answer(cmd: bytes, name: bytes, peer: tuple[str, int] | None) -> bytes:
    """The reply to a command line (WHOAMI: our name; WHOIS: the peer we see)."""
    if cmd == WHOIS:
        host, port = peer[:2] if peer else ("?", 0)
        return f"{host} {port}\n".encode()
    return name + b"\n"


class EchoProtocol(asyncio.Protocol):
    def __init__(self, name: bytes) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        # Commands are only recognised at the start of a line chunk; the rest echoes.
        line = self.pending + data
        if line in COMMANDS:
            self.pending = b""
            self.transport.write(answer(line, self.name, self.transport.get_extra_info("peername")))
            return
        if any(c.startswith(line) for c in COMMANDS):
            self.pending = line
            return
        self.pending = b""
        self.transport.write(line)


async def handle_http(
    name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            first = head.split(b"\r\n", 1)[0]
            keep_alive = b"HTTP/1.1" in first and b"connection: close" not in head.lower()
            body = name + b"\n"
            status = b"200 OK" if first.startswith((b"GET", b"HEAD")) else b"405 Not Allowed"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                b"Connection: "
                + (b"keep-alive" if keep_alive else b"close")
                + b"\r\n\r\n"
                + (b"" if first.startswith(b"HEAD") else body)
            )
            await writer.drain()
            if not keep_alive:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _udp_socket(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", port))
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        s.bind(("::", port))
    s.setblocking(False)
    return s


def _udp_reply(s: socket.socket, name: bytes) -> None:
    """Answer one datagram from the address it was sent to (the VIP under DSR)."""
    try:
        data, anc, _flags, peer = s.recvmsg(65535, socket.CMSG_SPACE(64))
    except BlockingIOError:
        return
    reply = answer(data, name, peer) if data in COMMANDS else data
    cmsgs = []
    for level, kind, cdata in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr;}
            _ifindex, _spec, dst = struct.unpack("I4s4s", cdata[:12])
            cmsgs.append((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("I4s4s", 0, dst, dst)))
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            cmsgs.append((socket.IPPROTO_IPV6, IPV6_PKTINFO, cdata[:16] + b"\0\0\0\0"))
    with contextlib.suppress(OSError):
        s.sendmsg([reply], cmsgs, 0, peer)


async def serve(
    name: str, echo_port: int, http_port: int, udp_port: int, ready: Path | None
) -> None:
    loop = asyncio.get_running_loop()
    bname = name.encode()
    servers = []
    for host in ("0.0.0.0", "::"):
        servers.append(
            await loop.create_server(
                lambda: EchoProtocol(bname), host, echo_port, reuse_address=True
            )
        )
        servers.append(
            await asyncio.start_server(
                lambda r, w: handle_http(bname, r, w), host, http_port, reuse_address=True
            )
        )
    udp = [_udp_socket(socket.AF_INET, udp_port), _udp_socket(socket.AF_INET6, udp_port)]
    for s in udp:
        loop.add_reader(s.fileno(), _udp_reply, s, bname)
    if ready is not None:
        ready.write_text("ready\n")
    log.info("%s serving echo %d, http %d, udp %d", name, echo_port, http_port, udp_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in udp:
        loop.remove_reader(s.fileno())
        s.close()
    for srv in servers:
        srv.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="halb lab backend server")
    p.add_argument("name")
    p.add_argument("--echo-port", type=int, default=9000)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--udp-port", type=int, default=9001)
    p.add_argument("--ready-file", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(a.name, a.echo_port, a.http_port, a.udp_port, a.ready_file))


if __name__ == "__main__":
    main()
