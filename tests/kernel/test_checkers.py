"""Each checker against the lab backend server in a namespace of our own (reached over a
veth pair); timeouts are made with nftables drop rules inside that namespace. The
corner cases that loopback servers cover need no root: tests/loopback/test_checkers_loopback.py."""

from __future__ import annotations

import asyncio
import contextlib
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
