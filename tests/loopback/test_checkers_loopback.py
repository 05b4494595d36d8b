"""Checkers against small loopback servers (no root): HTTP and HTTPS corner cases, UDP
port unreachable, exec. The checks against the lab backend server in a namespace are in
tests/kernel/test_checkers.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from halb.checks.base import CheckResult
from halb.checks.exec import ExecChecker
from halb.checks.http import HttpChecker
from halb.checks.udp import UdpChecker

pytestmark = pytest.mark.loopback


def aio(coro: Coroutine[Any, Any, CheckResult]) -> CheckResult:
    return asyncio.run(coro)


# --- HTTP -----------------------------------------------------------------------------


class RecordingHttp:
    """A loopback HTTP(S) server that records request heads and answers as told."""

    def __init__(self, status: int = 200, body: bytes = b"ok\n", chunked: bool = False) -> None:
        self.status, self.body, self.chunked = status, body, chunked
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await r.readuntil(b"\r\n\r\n"))
            if self.chunked:
                half = len(self.body) // 2
                parts = [self.body[:half], self.body[half:]]
                payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
                head = b"Transfer-Encoding: chunked\r\n"
            else:
                payload, head = self.body, b"Content-Length: %d\r\n" % len(self.body)
            w.write(
                b"HTTP/1.1 %d X\r\n%sConnection: close\r\n\r\n%s" % (self.status, head, payload)
            )
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(w.wait_closed(), 2.0)

    async def start(self, ssl_ctx: Any = None) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_http_host_header_path_and_chunked_body() -> None:
    async def body() -> tuple[CheckResult, CheckResult, list[bytes]]:
        srv = RecordingHttp(body=b"<html>status: healthy</html>", chunked=True)
        await srv.start()
        try:
            a = await HttpChecker(
                "127.0.0.1", srv.port, path="/healthz", expect_body="status: healthy"
            ).check(1.0)
            b = await HttpChecker(
                "127.0.0.1", srv.port, host="app.example", expect_body="nope"
            ).check(1.0)
        finally:
            await srv.close()
        return a, b, srv.heads

    a, b, heads = asyncio.run(body())
    assert a.up and a.reason == "HTTP 200, body matches"
    assert not b.up and "lacks 'nope'" in b.reason
    first = heads[0].decode()
    assert first.startswith("GET /healthz HTTP/1.1\r\n")
    assert "\r\nHost: 127.0.0.1:" in first
    assert "\r\nHost: app.example:" in heads[1].decode()


def test_http_server_error_status() -> None:
    async def body() -> CheckResult:
        srv = RecordingHttp(status=503, body=b"down for maintenance")
        await srv.start()
        try:
            return await HttpChecker("127.0.0.1", srv.port).check(1.0)
        finally:
            await srv.close()

    r = asyncio.run(body())
    assert not r.up and r.reason == "HTTP 503, expected 200"


def test_http_garbage_answer_is_down() -> None:
    async def body() -> CheckResult:
        async def junk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await w.drain()
            w.close()
            await w.wait_closed()

        server = await asyncio.start_server(junk, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await HttpChecker("127.0.0.1", port).check(1.0)
        finally:
            server.close()
            await server.wait_closed()

    r = asyncio.run(body())
    assert not r.up and r.reason.startswith("bad HTTP response: status line")


# --- HTTPS ----------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "halbt-chk")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_verification(tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def body() -> dict[str, CheckResult]:
        srv = RecordingHttp(body=b"tls ok")
        await srv.start(ctx)
        p = srv.port
        try:
            return {
                "default": await HttpChecker("127.0.0.1", p, tls=True).check(2.0),
                "no-verify": await HttpChecker(
                    "127.0.0.1", p, tls=True, verify_tls=False, expect_body="tls ok"
                ).check(2.0),
                "trusted": await HttpChecker("127.0.0.1", p, tls=True, ca_file=str(cert)).check(
                    2.0
                ),
                "wrong-name": await HttpChecker(
                    "127.0.0.1", p, tls=True, ca_file=str(cert), host="app.example"
                ).check(2.0),
                "plain-to-tls": await HttpChecker("127.0.0.1", p).check(2.0),
            }
        finally:
            await srv.close()

    r = asyncio.run(body())
    assert not r["default"].up
    assert r["default"].reason == "TLS certificate rejected: self-signed certificate"
    assert r["no-verify"].up and r["no-verify"].reason == "HTTP 200, body matches"
    assert r["trusted"].up and r["trusted"].reason == "HTTP 200"
    assert not r["wrong-name"].up and "TLS certificate rejected" in r["wrong-name"].reason
    assert "app.example" in r["wrong-name"].reason or "mismatch" in r["wrong-name"].reason
    assert not r["plain-to-tls"].up
    print({k: v.reason for k, v in r.items()})


# --- UDP ------------------------------------------------------------------------------


def test_udp_on_loopback_unreachable() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = aio(UdpChecker("127.0.0.1", port).check(1.0))
    assert not r.up and r.reason == "port unreachable (ICMP)"


# --- exec -----------------------------------------------------------------------------


def test_exec_substitutes_and_reports_exit_codes(tmp_path: Path) -> None:
    script = (
        "import sys, os\n"
        "ok = sys.argv[1:] == ['10.1.2.3', '8080', 'addr=10.1.2.3', '{other}']\n"
        "ok = ok and os.environ['HALB_PORT'] == '8080'\n"
        "print('args', sys.argv[1:])\n"
        "sys.exit(0 if ok else 3)\n"
    )
    cmd = [sys.executable, "-c", script, "{address}", "{port}", "addr={address}", "{other}"]
    r = aio(ExecChecker(cmd, "10.1.2.3", 8080).check(5.0))
    assert r.up and r.reason == "exit 0", r
    r = aio(ExecChecker(cmd, "10.9.9.9", 8080).check(5.0))
    assert not r.up and r.reason.startswith("exit 3: args ['10.9.9.9'"), r

    r = aio(ExecChecker(["/nonexistent/halbt-check"], "10.1.2.3", 80).check(1.0))
    assert not r.up and r.reason == "cannot run /nonexistent/halbt-check: no such file or directory"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_exec_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The shell is the *command* here (the checker itself never uses one): it starts a
    # background child, records both pids, and hangs.
    cmd = ["sh", "-c", f"sleep 300 & echo $$ $! > {pids}; wait"]
    t0 = time.monotonic()
    r = aio(ExecChecker(cmd, "127.0.0.1", 1).check(0.5))
    took = time.monotonic() - t0
    assert not r.up and r.reason == "no exit within 0.5s; killed"
    assert 0.45 <= took < 3.0
    shell, child = (int(x) for x in pids.read_text().split())
    deadline = time.monotonic() + 3
    while (_alive(shell) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(shell) and not _alive(child)
