"""The drill's client side: the traffic generator (halb.drill.traffic, run on the
client host) and an ARP capture on the client's interface outside the lab."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from halb.drill.target import DrillError, DrillOptions, Target
from halb.lab.observe import parse_arp_line

TRAFFIC_SOURCE = Path(__file__).with_name("traffic.py")

__all__ = [
    "ClientArpCapture",
    "Traffic",
    "neigh_mac",
]


class Traffic:
    """The generator running on the client; its events are collected by a thread."""

    def __init__(
        self, target: Target, opts: DrillOptions, on_tick: Callable[[dict[str, Any]], None]
    ) -> None:
        args = [
            "--vip",
            target.vip,
            "--echo-port",
            str(target.echo_port),
            "--http-port",
            str(target.http_port),
            "--connections",
            str(opts.connections),
            "--interval",
            str(opts.interval),
            "--duration",
            str(opts.warmup + opts.duration),
            "--new-interval",
            str(opts.new_interval),
            "--new-kind",
            opts.new_kind,
            "--arp-probe",
            str(opts.arp_probe),
            "--arp-iface",
            target.arp_iface,
        ]
        self.argv = [*target.client_prefix, target.client_python, "-", *args]
        self.events: list[dict[str, Any]] = []
        self.ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self.on_tick = on_tick
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(TRAFFIC_SOURCE.read_text())
        self.proc.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("ev") == "tick":
                self.on_tick(ev)
                continue
            self.events.append(ev)
            if ev.get("ev") == "ready":
                self.ready.put(ev)
        self.ready.put({})

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        try:
            ev = self.ready.get(timeout=timeout)
        except queue.Empty:
            ev = {}
        if not ev:
            self.stop()
            raise DrillError(f"the traffic generator did not start: {self.stderr()}")
        return ev

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        self._reader.join(5)
        if self.proc.returncode not in (0, None) and not any(
            e.get("ev") == "summary" for e in self.events
        ):
            raise DrillError(f"the traffic generator failed: {self.stderr()}")
        return self.events

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().strip()[-2000:] or f"exit code {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- ARP -----------------------------------------------------------------------------------


class ClientArpCapture:
    """tcpdump on the client's interface (outside the lab)."""

    def __init__(self, target: Target, out: Path) -> None:
        self.argv = [
            *target.client_prefix,
            "tcpdump",
            "-l",
            "-n",
            "-e",
            "-tt",
            "-i",
            target.arp_iface,
            "--immediate-mode",
            "arp",
        ]
        self.out = out
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ClientArpCapture:
        self._fh = self.out.open("wb")
        self._proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.PIPE)
        assert self._proc.stderr is not None
        self._proc.stderr.readline()  # "listening on ..."
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            time.sleep(0.1)
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._fh.close()

    def frames(self) -> list[Any]:
        lines = self.out.read_text(errors="replace").splitlines()
        return [f for f in map(parse_arp_line, lines) if f is not None]


def neigh_mac(target: Target) -> str | None:
    out = subprocess.run(
        [*target.client_prefix, "ip", "neigh", "show", target.vip],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout
    m = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return m.group(1) if m else None
