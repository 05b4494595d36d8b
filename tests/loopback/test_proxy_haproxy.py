"""The PROXY codec against the reference implementation: Debian's haproxy on loopback.

- haproxy receives (``accept-proxy``) the v1 and v2 headers halb builds, and answers with
  the client and destination it parsed from them (and the UNIQUE_ID TLV); a header with
  a wrong CRC32C is refused by haproxy as by halb's parser.
- haproxy sends (``send-proxy``, ``send-proxy-v2`` with CRC32C, and LOCAL from its
  health checks) and halb's parser reads the real client's address out of each.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from halb.proxy.codec import (
    NEED_MORE,
    Command,
    Parsed,
    ProxyError,
    ProxyHeader,
    Tlv,
    TlvType,
    build_v1,
    build_v2,
    parse,
)

pytestmark = pytest.mark.loopback

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LO = IPv4Address("127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def haproxy(config: str, ports: list[int]) -> Iterator[None]:
    with tempfile.TemporaryDirectory(prefix="halbt-haproxy-") as d:
        cfg = Path(d) / "haproxy.cfg"
        cfg.write_text(config)
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        log = Path(d) / "haproxy.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 10
            for port in ports:
                while True:
                    with socket.socket() as s:
                        if s.connect_ex(("127.0.0.1", port)) == 0:
                            break
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, f"haproxy not listening on {port}"
                    time.sleep(0.05)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


DEFAULTS = """
defaults
  timeout connect 2s
  timeout client 5s
  timeout server 5s
"""


def request(port: int, header: bytes) -> bytes:
    """Send ``header`` and an HTTP request; what haproxy answered (b"" if it refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(header + b"GET / HTTP/1.0\r\n\r\n")
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                out += chunk
    return out


def test_haproxy_accepts_the_headers_halb_builds() -> None:
    port = free_port()
    # haproxy answers with what it parsed from the header (and the UNIQUE_ID TLV).
    seen = "%[src] %[src_port] %[dst] %[dst_port] %[fc_pp_unique_id]"
    config = DEFAULTS + (
        "frontend f\n  mode http\n"
        f"  bind 127.0.0.1:{port} accept-proxy\n"
        f'  http-request return status 200 content-type text/plain lf-string "{seen}"\n'
    )
    client = (IPv4Address("198.51.100.7"), 40001)
    vip = (IPv4Address("203.0.113.10"), 443)
    with haproxy(config, [port]):
        v1 = request(port, build_v1(ProxyHeader(1, source=client, destination=vip)))
        assert v1.endswith(b"198.51.100.7 40001 203.0.113.10 443 "), v1
        tlv = (Tlv(TlvType.UNIQUE_ID, b"halb-flow-42"),)
        hdr = ProxyHeader(2, source=client, destination=vip, tlvs=tlv)
        v2 = request(port, build_v2(hdr, crc=True))
        assert v2.endswith(b"198.51.100.7 40001 203.0.113.10 443 halb-flow-42"), v2
        # A corrupted CRC32C: haproxy refuses the connection, and so does halb's parser.
        bad = bytearray(build_v2(hdr, crc=True))
        bad[17] ^= 0x40
        assert b"200" not in request(port, bytes(bad))
        with pytest.raises(ProxyError) as e:
            parse(bytes(bad))
        assert e.value.reason == "crc32c"


class Backend:
    """A loopback server that parses the PROXY header of each connection with halb."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.headers: list[ProxyHeader] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                buf = b""
                try:
                    while (out := parse(buf)) is NEED_MORE:
                        chunk = conn.recv(1024)
                        if not chunk:
                            parse(buf, final=True)
                        buf += chunk
                    assert isinstance(out, Parsed)
                    self.headers.append(out.header)
                    conn.sendall(b"ok\n")
                except ProxyError as exc:
                    self.errors.append(str(exc))
                except OSError:
                    pass  # a health check closes as soon as it has connected

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2 proxy-v2-options crc32c"])
def test_halb_parses_the_headers_haproxy_sends(send: str) -> None:
    backend = Backend()
    port = free_port()
    config = (
        DEFAULTS
        + f"""
listen l
  mode tcp
  bind 127.0.0.1:{port}
  server be 127.0.0.1:{backend.port} {send}
"""
    )
    try:
        with haproxy(config, [port]), socket.create_connection(("127.0.0.1", port), 5) as c:
            me = c.getsockname()
            assert c.recv(16) == b"ok\n"
        assert backend.errors == []
        h = backend.headers[-1]
        assert h.version == (2 if "v2" in send else 1)
        assert h.command is Command.PROXY
        assert h.source == (LO, me[1]) and h.destination == (LO, port)
        if "crc32c" in send:
            assert h.tlv(TlvType.CRC32C) is not None  # and it matched, or parse refused it
    finally:
        backend.close()


def test_haproxy_health_checks_send_local() -> None:
    backend = Backend()
    port = free_port()
    config = (
        DEFAULTS
        + f"""
listen l
  mode tcp
  bind 127.0.0.1:{port}
  server be 127.0.0.1:{backend.port} send-proxy-v2 check check-send-proxy inter 100ms
"""
    )
    try:
        with haproxy(config, [port]):
            deadline = time.monotonic() + 10
            while not backend.headers and time.monotonic() < deadline:
                time.sleep(0.05)
        assert backend.errors == []
        assert backend.headers, "no health check reached the backend"
        assert backend.headers[0].command is Command.LOCAL
        assert backend.headers[0].source is None
    finally:
        backend.close()
