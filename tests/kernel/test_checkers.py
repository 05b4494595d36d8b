"""Each checker against real servers: the lab backend server in a namespace of our own
(reached over a veth pair) and small loopback servers for the HTTP/HTTPS corner cases.
Timeouts are made with nftables drop rules inside that namespace."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from halb.checks.base import CheckResult
from halb.checks.exec import ExecChecker
from halb.checks.factory import CheckTarget
from halb.checks.http import HttpChecker
from halb.checks.scheduler import CheckScheduler
from halb.checks.state import NO_DAMPING, Health, Thresholds
from halb.checks.tcp import TcpChecker
from halb.checks.udp import UdpChecker
from halb.lab.netns import kill_pids, netns_pids

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], stdin: str | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, input=stdin, timeout=30)


def aio(coro: Coroutine[Any, Any, CheckResult]) -> CheckResult:
    return asyncio.run(coro)


class BackendNs:
    """A namespace ``halbt-chk-*`` with eth0 = ADDR/30, its veth peer in the root
    namespace, and the lab backend server (TCP echo 9000, HTTP 80, UDP echo 9001)."""

    def __init__(self, tmp: Path) -> None:
        tag = secrets.token_hex(3)
        self.ns = f"halbt-chk-{tag}"
        self.host_if = f"hck{tag}"
        third = secrets.randbelow(200) + 20
        self.host_addr = f"10.253.{third}.1"
        self.addr = f"10.253.{third}.2"
        self.name = f"be-{tag}"
        self.tmp = tmp
        self.server: subprocess.Popen[bytes] | None = None

    def create(self) -> None:
        run(["ip", "netns", "add", self.ns])
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
             "netns", self.ns])  # fmt: skip
        run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        run(["ip", "-n", self.ns, "addr", "add", f"{self.addr}/30", "dev", "eth0"])
        run(["ip", "-n", self.ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        # ICMP errors are rate-limited per destination; the UDP test wants each one.
        run(["ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])

    def destroy(self) -> None:
        self.stop_server()
        kill_pids(netns_pids(self.ns))
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    def start_server(self) -> None:
        ready = self.tmp / f"{self.ns}.ready"
        ready.unlink(missing_ok=True)
        log = (self.tmp / f"{self.ns}.log").open("ab")
        with log:
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m",
                 "halb.lab.backend_server", self.name, "--ready-file", str(ready)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.tmp / f"{self.ns}.log").read_text())
            time.sleep(0.02)

    def stop_server(self) -> None:
        if self.server is None:
            return
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=5)
        self.server = None

    def drop(self, proto: str, port: int) -> None:
        """Silently drop ``proto`` to ``port`` inside the namespace (a black hole)."""
        rules = (
            "table inet halbt_chk {\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            f"    {proto} dport {port} drop\n"
            "  }\n}\n"
        )
        run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], stdin=rules)

    def undrop(self) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "halbt_chk"],
            capture_output=True,
            check=False,
        )


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendNs]:
    b = BackendNs(tmp_path_factory.mktemp("chk"))
    try:
        b.create()
        b.start_server()
        yield b
    finally:
        b.destroy()


@pytest.fixture
def serving(backend: BackendNs) -> Iterator[BackendNs]:
    """The backend with its server running and no drop rules, also after the test."""
    backend.undrop()
    if backend.server is None or backend.server.poll() is not None:
        backend.start_server()
    yield backend
    backend.undrop()
    if backend.server is None or backend.server.poll() is not None:
        backend.start_server()


# --- TCP ------------------------------------------------------------------------------


def test_tcp_up_refused_and_timeout(serving: BackendNs) -> None:
    chk = TcpChecker(serving.addr, 9000)
    r = aio(chk.check(1.0))
    assert r.up and r.reason == "connected" and r.latency < 1.0

    serving.drop("tcp", 9000)
    t0 = time.monotonic()
    r = aio(chk.check(0.3))
    assert not r.up and r.reason == "no answer within 0.3s"
    assert 0.25 <= time.monotonic() - t0 < 2.0
    serving.undrop()

    serving.stop_server()
    r = aio(chk.check(1.0))
    assert not r.up and r.reason == "connection refused"


# --- HTTP -----------------------------------------------------------------------------


def test_http_against_the_backend_server(serving: BackendNs) -> None:
    r = aio(HttpChecker(serving.addr, 80, expect_body=serving.name).check(1.0))
    assert r.up and r.reason == "HTTP 200, body matches", r
    r = aio(HttpChecker(serving.addr, 80).check(1.0))
    assert r.up and r.reason == "HTTP 200"

    r = aio(HttpChecker(serving.addr, 80, expect_status=204).check(1.0))
    assert not r.up and r.reason == "HTTP 200, expected 204"
    r = aio(HttpChecker(serving.addr, 80, expect_body="someone-else").check(1.0))
    assert not r.up and r.reason == "HTTP 200 but the body lacks 'someone-else'"

    serving.drop("tcp", 80)
    r = aio(HttpChecker(serving.addr, 80).check(0.3))
    assert not r.up and r.reason == "no answer within 0.3s"
    serving.undrop()

    serving.stop_server()
    r = aio(HttpChecker(serving.addr, 80).check(1.0))
    assert not r.up and r.reason == "connection refused"


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


def test_udp_reply_unreachable_and_silence(serving: BackendNs) -> None:
    r = aio(UdpChecker(serving.addr, 9001).check(1.0))
    assert r.up and r.reason == "reply received"
    r = aio(
        UdpChecker(serving.addr, 9001, payload=b"WHOAMI\n", expect=serving.name.encode()).check(1.0)
    )
    assert r.up
    r = aio(UdpChecker(serving.addr, 9001, payload=b"ping", expect=b"pong").check(1.0))
    assert not r.up and r.reason == "reply lacks 'pong'"

    serving.drop("udp", 9001)
    r = aio(UdpChecker(serving.addr, 9001).check(0.3))
    assert not r.up and r.reason == "no reply within 0.3s"
    serving.undrop()

    serving.stop_server()
    t0 = time.monotonic()
    r = aio(UdpChecker(serving.addr, 9001).check(2.0))
    assert not r.up and r.reason == "port unreachable (ICMP)"
    assert time.monotonic() - t0 < 1.0  # ICMP, not the timeout


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


# --- scheduler timing -----------------------------------------------------------------


async def _wait_for(sched: CheckScheduler, key: str, health: Health, limit: float) -> float:
    """Poll until ``key`` is in ``health``; return the monotonic time it was seen."""
    t0 = time.monotonic()
    while sched.state(key).health is not health:
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"{key} not {health} after {limit}s: {sched.state(key)}")
        await asyncio.sleep(0.005)
    return time.monotonic()


@pytest.mark.parametrize("kind", ["tcp", "http", "udp"])
def test_scheduler_detects_stop_and_restart_in_time(serving: BackendNs, kind: str) -> None:
    interval, timeout, rise, fall = 0.2, 0.1, 2, 3
    checker: Any = {
        "tcp": TcpChecker(serving.addr, 9000),
        "http": HttpChecker(serving.addr, 80, expect_body=serving.name),
        "udp": UdpChecker(serving.addr, 9001),
    }[kind]
    key = f"svc/{kind}"
    target = CheckTarget(key, checker, interval, timeout, Thresholds(rise=rise, fall=fall))
    # Also a crashing neighbour: it must not disturb the measured backend.
    crash = CheckTarget("svc/crash", _Crash(), interval, timeout, Thresholds(1, 1))

    async def body() -> dict[str, float]:
        sched = CheckScheduler([target, crash], damping=NO_DAMPING)
        task = asyncio.create_task(sched.run())
        try:
            await _wait_for(sched, key, Health.UP, 5.0)
            await asyncio.sleep(interval * 3)  # settle: the streak is at 0
            assert sched.state(key).health is Health.UP
            t_stop = time.monotonic()
            await asyncio.to_thread(serving.stop_server)
            t_stopped = time.monotonic()
            t_down = await _wait_for(sched, key, Health.DOWN, 10.0)
            t_start = time.monotonic()
            await asyncio.to_thread(serving.start_server)
            t_ready = time.monotonic()
            t_up = await _wait_for(sched, key, Health.UP, 10.0)
            assert sched.state("svc/crash").health is Health.DOWN
            assert not task.done()
            return {
                "down_from_stop": t_down - t_stop,
                "down_from_stopped": t_down - t_stopped,
                "up_from_start": t_up - t_start,
                "up_from_ready": t_up - t_ready,
            }
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    m = asyncio.run(body())
    print(
        f"{kind}: down {m['down_from_stopped']:.3f}s after the server exited "
        f"(interval x fall = {interval * fall:.1f}s); up {m['up_from_ready']:.3f}s after it "
        f"was ready (interval x rise = {interval * rise:.1f}s)"
    )
    # `fall` failing probes span at least (fall - 1) intervals, all after the stop began.
    assert m["down_from_stop"] >= (fall - 1) * interval - 0.02
    assert m["down_from_stopped"] <= interval * fall + timeout + 1.0
    assert m["up_from_start"] >= (rise - 1) * interval - 0.02
    assert m["up_from_ready"] <= interval * rise + 1.0


class _Crash:
    target = "crash"

    async def check(self, timeout: float) -> CheckResult:
        raise ZeroDivisionError("checker bug")
