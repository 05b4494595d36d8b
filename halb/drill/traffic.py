"""The drill's traffic generator. It runs on the client (inside the lab's client
namespace, or on any host through ``--client-cmd``), so it is one file with no imports
beyond the standard library: the drill pipes this file's source into ``python3 -``.

It keeps N long-lived TCP connections to VIP:echo_port, each sending a numbered line
every ``--interval`` and timestamping the echoes, and opens new connections (HTTP GET or
echo WHOAMI) every ``--new-interval``. It prints one JSON object per line on stdout:

- ``ready``: every long-lived connection is open (``t`` = start of the measurement)
- ``tick``: counters for the progress display, every ``--tick`` seconds
- ``newerr``: one failed new connection (``t`` = when it was started)
- ``conn``: one long-lived connection at the end: its backend at the start and the end,
  the error that ended it (if any), and its echo *runs*
- ``summary``: the end of the measurement and the new-connection counters

Echo arrival times are reduced to runs ``[first, last, count, max_interval]``: a new run
starts when two echoes are more than ``--split`` apart. No gap of ``--split`` or more is
lost, and a 60 s drill stays a few kB per connection instead of 6000 timestamps.
Times are wall-clock (``time.time()``), comparable with tcpdump's ``-tt``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
import time
from typing import Any

WHOAMI = b"WHOAMI\n"


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Runs:
    """Echo arrival times folded into runs (see the module docstring)."""

    def __init__(self, split: float) -> None:
        self.split = split
        self.runs: list[list[float]] = []
        self.last: float | None = None

    def add(self, t: float) -> None:
        if self.last is None or t - self.last > self.split:
            self.runs.append([t, t, 1, 0.0])
        else:
            run = self.runs[-1]
            run[1] = t
            run[2] += 1
            run[3] = max(run[3], t - self.last)
        self.last = t


class LongConn:
    def __init__(self, ident: int, opts: argparse.Namespace) -> None:
        self.id = ident
        self.opts = opts
        self.runs = Runs(opts.split)
        self.backend: str | None = None
        self.backend_end: str | None = None
        self.error: str | None = None
        self.error_t: float | None = None
        self.opened: float | None = None
        self.sent = 0
        self.echoed = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error, self.error_t = why, time.time()

    async def open(self) -> None:
        o = self.opts
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(o.vip, o.echo_port), o.connect_timeout
            )
            self.reader, self.writer = reader, writer
            writer.write(WHOAMI)
            line = await asyncio.wait_for(reader.readline(), o.connect_timeout)
            self.backend = line.decode(errors="replace").strip() or None
            self.opened = time.time()
        except (OSError, TimeoutError) as exc:
            self.fail(f"open: {describe(exc)}")

    async def send(self, stop: asyncio.Event) -> None:
        assert self.writer is not None
        interval = self.opts.interval
        nxt = time.monotonic()
        while not stop.is_set() and self.error is None:
            try:
                self.writer.write(f"{self.sent}\n".encode())
            except (OSError, RuntimeError) as exc:
                self.fail(f"send: {describe(exc)}")
                return
            self.sent += 1
            nxt += interval
            delay = nxt - time.monotonic()
            if delay < 0:  # fell behind (loaded machine): keep the cadence, no burst
                nxt, delay = time.monotonic(), 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def receive(self, stop: asyncio.Event) -> None:
        assert self.reader is not None
        while self.error is None:
            if stop.is_set() and self.echoed >= self.sent:
                return
            try:
                line = await asyncio.wait_for(self.reader.readline(), 0.1)
            except TimeoutError:
                continue
            except OSError as exc:
                self.fail(describe(exc))
                return
            now = time.time()
            if not line:
                self.fail("closed by peer")
                return
            if line != f"{self.echoed}\n".encode():
                self.fail(f"echo mismatch: got {line[:20]!r}, expected {self.echoed}")
                return
            self.echoed += 1
            self.runs.add(now)

    async def run(self, stop: asyncio.Event) -> None:
        if self.writer is None:
            return
        recv = asyncio.create_task(self.receive(stop))
        await self.send(stop)
        # Let the last echoes arrive; a stalled connection does not hold the drill up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(recv), self.opts.drain_timeout)
        recv.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recv
        if self.error is None:
            try:
                self.writer.write(WHOAMI)
                line = await asyncio.wait_for(self.reader.readline(), 1.0)  # type: ignore[union-attr]
                self.backend_end = line.decode(errors="replace").strip() or None
            except (OSError, TimeoutError) as exc:
                self.fail(f"whoami at end: {describe(exc)}")
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    def doc(self) -> dict[str, Any]:
        return {
            "ev": "conn",
            "id": self.id,
            "backend": self.backend,
            "backend_end": self.backend_end,
            "opened": self.opened,
            "sent": self.sent,
            "echoed": self.echoed,
            "error": self.error,
            "error_t": self.error_t,
            "runs": [
                [round(a, 6), round(b, 6), int(n), round(m, 6)] for a, b, n, m in self.runs.runs
            ],
        }


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    strerror = getattr(exc, "strerror", None)
    return type(exc).__name__ + (f": {strerror}" if strerror else "")


class ArpProbe:
    """Broadcasts an RFC 5227 ARP probe for the VIP (sender 0.0.0.0, a made-up source
    MAC) every ``--arp-probe`` seconds: every node that still answers for the VIP
    replies, so a capture on the segment sees each owner. The made-up identity keeps the
    replies away from the measured client's neighbour cache."""

    MAC = bytes.fromhex("02dd00000001")

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.sent = 0

    def frame(self) -> bytes:
        eth = b"\xff" * 6 + self.MAC + struct.pack("!H", 0x0806)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + self.MAC + bytes(4)
        return eth + arp + bytes(6) + socket.inet_aton(self.opts.vip)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            sock.bind((self.opts.arp_iface, 0))
        except OSError as exc:
            emit({"ev": "warn", "t": time.time(), "what": f"no ARP probes: {describe(exc)}"})
            return
        with sock:
            frame = self.frame()
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    sock.send(frame)
                    self.sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.opts.arp_probe)


class NewConns:
    """Short connections opened every ``--new-interval`` while the drill runs."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.ok = 0
        self.err = 0
        self.skipped = 0  # not started: too many attempts already in flight
        self.slow = 0  # succeeded after more than a second (a SYN retransmission)
        self.latency_max = 0.0
        self.inflight = 0

    async def attempt(self) -> None:
        o = self.opts
        t0 = time.time()
        self.inflight += 1
        writer: asyncio.StreamWriter | None = None
        try:
            port = o.http_port if o.new_kind == "http" else o.echo_port
            reader, w = await asyncio.wait_for(asyncio.open_connection(o.vip, port), o.new_timeout)
            writer = w
            if o.new_kind == "http":
                w.write(f"GET / HTTP/1.0\r\nHost: {o.vip}\r\n\r\n".encode())
                body = await asyncio.wait_for(reader.read(), o.new_timeout)
                if not body.startswith(b"HTTP/1.") or b" 200 " not in body.split(b"\r\n")[0]:
                    raise ValueError(f"bad reply {body[:30]!r}")
            else:
                w.write(WHOAMI)
                if not (await asyncio.wait_for(reader.readline(), o.new_timeout)).strip():
                    raise ValueError("empty WHOAMI reply")
            took = time.time() - t0
            self.ok += 1
            self.slow += took > 1.0
            self.latency_max = max(self.latency_max, took)
        except (OSError, TimeoutError, ValueError) as exc:
            self.err += 1
            emit(
                {
                    "ev": "newerr",
                    "t": round(t0, 6),
                    "error": describe(exc) if not isinstance(exc, ValueError) else str(exc),
                }
            )
        finally:
            self.inflight -= 1
            if writer is not None:
                writer.close()

    async def run(self, stop: asyncio.Event) -> None:
        o = self.opts
        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            if self.inflight < o.max_inflight:
                t = asyncio.create_task(self.attempt())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            else:
                self.skipped += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), o.new_interval)
        if tasks:
            await asyncio.wait(tasks, timeout=o.new_timeout + 1)


async def main(o: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conns = [LongConn(i, o) for i in range(o.connections)]
    await asyncio.gather(*(c.open() for c in conns))
    t_ready = time.time()
    emit(
        {
            "ev": "ready",
            "t": t_ready,
            "connections": o.connections,
            "opened": sum(c.writer is not None for c in conns),
            "backends": sorted({c.backend for c in conns if c.backend}),
        }
    )
    new = NewConns(o)
    tasks = [asyncio.create_task(c.run(stop)) for c in conns]
    if o.new_interval > 0:
        tasks.append(asyncio.create_task(new.run(stop)))
    probe = ArpProbe(o)
    if o.arp_probe > 0 and ":" not in o.vip:
        tasks.append(asyncio.create_task(probe.run(stop)))
    end = t_ready + o.duration
    while not stop.is_set() and time.time() < end:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(o.tick, max(0.0, end - time.time())))
        now = time.time()
        emit(
            {
                "ev": "tick",
                "t": now,
                "echoes": sum(c.echoed for c in conns),
                "alive": sum(c.writer is not None and c.error is None for c in conns),
                "stalled": sum(
                    c.runs.last is not None and now - c.runs.last > o.split for c in conns
                ),
                "new_ok": new.ok,
                "new_err": new.err,
            }
        )
    t_end = time.time()
    stop.set()
    await asyncio.gather(*tasks)
    for c in conns:
        emit(c.doc())
    emit(
        {
            "ev": "summary",
            "t_start": t_ready,
            "t_end": t_end,
            "connections": o.connections,
            "interval": o.interval,
            "split": o.split,
            "new_kind": o.new_kind if o.new_interval > 0 else None,
            "new_interval": o.new_interval,
            "new_ok": new.ok,
            "new_err": new.err,
            "new_skipped": new.skipped,
            "new_slow": new.slow,
            "new_latency_max": round(new.latency_max, 6),
            "arp_probes": probe.sent,
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="halb drill traffic generator")
    p.add_argument("--vip", required=True)
    p.add_argument("--echo-port", type=int, default=9000)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.01, help="seconds between lines")
    p.add_argument("--duration", type=float, default=10.0, help="seconds after ready")
    p.add_argument("--new-interval", type=float, default=0.005, help="0: no new connections")
    p.add_argument("--new-kind", choices=("http", "echo"), default="http")
    p.add_argument("--new-timeout", type=float, default=2.0)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--drain-timeout", type=float, default=1.0)
    p.add_argument("--split", type=float, default=0.025)
    p.add_argument("--arp-probe", type=float, default=0.0, help="seconds; 0: no ARP probes")
    p.add_argument("--arp-iface", default="eth0")
    p.add_argument("--tick", type=float, default=0.2)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
