"""Watching the lab from outside: who leads, whether the VIP answers, who sends ARP.

Used by the lab tests, drills and benchmarks. Everything here observes; faults are in
halb.lab.faults.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from halb.agent import etcdio
from halb.agent.status import cluster_view
from halb.config import ClusterConfig, load_config
from halb.lab.netns import netns_exec, run
from halb.lab.topology import site_from_env

__all__ = ["ArpCapture", "ArpFrame", "cluster_status", "http_get", "leader", "wait_until"]

T = TypeVar("T")


def cluster_status(config: Path | str) -> dict[str, Any]:
    """What `halb status --output json` prints, read straight from etcd."""
    cfg = load_config(config)
    return asyncio.run(_status(cfg))


async def _status(cfg: ClusterConfig) -> dict[str, Any]:
    client = etcdio.connect(cfg)
    try:
        snap = await etcdio.read_cluster(client, cfg)
    finally:
        await client.close()
    return cluster_view(cfg, snap.leaders, snap.statuses, snap.drained)


def leader(config: Path | str, group: str = "lab") -> str | None:
    for g in cluster_status(config)["groups"]:
        if g["name"] == group:
            return g["active"]  # type: ignore[no-any-return]
    return None


def wait_until(what: str, probe: Callable[[], T], timeout: float, every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; raise TimeoutError naming
    ``what`` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(every)
        last = probe()
    return last


def http_get(url: str, ns: str = "client", timeout: float = 1.0) -> str | None:
    """GET from inside a lab namespace; the body, or None when it failed."""
    ns = site_from_env().ns(ns)
    proc = subprocess.run(
        netns_exec(ns, ["curl", "-s", "-m", f"{timeout:g}", url]),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout + 5,
    )
    return proc.stdout if proc.returncode == 0 else None


@dataclass(frozen=True, slots=True)
class ArpFrame:
    time: float
    src_mac: str
    kind: str  # "request" | "reply"
    sender_ip: str  # for a reply: the address announced; for a request: "tell" address
    target_ip: str


_ARP_RE = re.compile(
    r"^(?P<t>\d+\.\d+) (?P<src>[0-9a-f:]{17}) > [0-9a-f:]{17}, .*?length \d+: "
    r"(?:(?P<req>Request who-has (?P<rq_target>\S+) (?:\(\S+\) )?tell (?P<rq_sender>\S+))"
    r"|(?P<rep>Reply (?P<rp_sender>\S+) is-at (?P<rp_mac>[0-9a-f:]{17})))"
)


def parse_arp_line(line: str) -> ArpFrame | None:
    m = _ARP_RE.match(line.strip())
    if m is None:
        return None
    if m.group("req"):
        return ArpFrame(
            float(m.group("t")),
            m.group("src"),
            "request",
            m.group("rq_sender").rstrip(","),
            m.group("rq_target"),
        )
    return ArpFrame(
        float(m.group("t")), m.group("src"), "reply", m.group("rp_sender"), m.group("rp_sender")
    )


class ArpCapture:
    """tcpdump on the front bridge (in halb-sw): every ARP frame on the segment.

    ``with ArpCapture() as cap: ...; frames = cap.frames()``. Times are wall-clock
    (tcpdump -tt), comparable with the agents' log timestamps.
    """

    def __init__(self, bridge: str = "br-front", out: Path | None = None) -> None:
        self.bridge = bridge
        self.out = out or site_from_env().lab_dir / f"arp-{time.time_ns()}.txt"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ArpCapture:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.out.open("wb")
        self._proc = subprocess.Popen(
            netns_exec(
                site_from_env().switch_ns,
                ["tcpdump", "-l", "-n", "-e", "-tt", "-i", self.bridge, "--immediate-mode", "arp"],
            ),
            stdout=self._fh,
            stderr=subprocess.PIPE,
        )
        # tcpdump says "listening on" once the capture is open.
        assert self._proc.stderr is not None
        self._proc.stderr.readline()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is not None:
            time.sleep(0.1)  # let the last frames drain
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None
            self._fh.close()

    def frames(self) -> list[ArpFrame]:
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            f = parse_arp_line(line)
            if f is not None:
                out.append(f)
        return out

    def announcements(self, vip: str) -> list[ArpFrame]:
        """Frames that claim ``vip``: gratuitous requests (sender == vip) and replies."""
        return [f for f in self.frames() if f.sender_ip == vip]


def mac_of(ns: str, ifname: str = "eth0") -> str:
    out = run(["ip", "-n", ns, "-br", "link", "show", ifname])
    return out.split()[2]
