"""FlowSync benchmark: real gRPC + mTLS over loopback, FakeDataplane at both ends.

The active (this process) and the standby (a child process, so each side has its own
core and GIL, as on two nodes) run the real server and client. Flows travel as packed
records (halb.flows.records). Measured:

  baseline    encode + decode (parse and validate the records) of the same delta
              batches in one process, no gRPC
  throughput  delta entries per second from push() on the active until acknowledged
              (installed) by the standby, per batch size
  lag         push-to-install latency p50 / p99 while RATE new flows/s are created
  resync      a fresh standby subscribing to an active with FLOWS flows: time until
              every snapshot entry is installed

Every figure is printed beside its ratio to the baseline measured in the same run.
Targets from the issue: >= 200k entries/s, p99 lag <= 20 ms, 1M flows in <= 10 s.

The standby sink: 'fake' is FakeDataplane, reached through the Flow-object fallback
(records -> Flow, as nft and IPVS are); 'null' takes records and stores nothing (the
stream's own cost).

With --xdp (root), the same three again with real XDP flow maps at both ends, each
XdpDataplane attached (generic mode) to a veth in a namespace of its own, streamed by
XdpFlowSource and installed into the standby's map. Throughput: flows written into the
active's map by user space, so only its scans see them. Lag: new flows made by the
active's program itself, one packet each (BPF_PROG_TEST_RUN), so the source learns
them from its flow_events ring buffer while the map is large (the throughput run's
flows stay). Printed beside the FakeDataplane figures of the same run.

    .venv/bin/python bench/sync.py                  # full run (1M-flow resync)
    .venv/bin/python bench/sync.py --resync-flows 200000   # scaled down, extrapolated
    .venv/bin/python bench/sync.py --resync-flows 100000 --xdp   # plus the XDP-map ends
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halb.config import ClusterConfig, TlsFiles, parse_config
from halb.dataplane.xdp.adapter import XdpDataplane
from halb.flows import records
from halb.model import Flow, Protocol, Service, Term
from halb.sync import certs, codec
from halb.sync.client import ClientOptions, FlowSyncClient
from halb.sync.server import FlowSyncServer, ServerOptions
from halb.sync.tls import SyncSecurity
from halb.testing.fake_dataplane import FakeDataplane
from halb.testing.sync_cluster import NODES, two_node_doc

TERM = Term(lease_id=0xBE7C, revision=1)
BACKENDS = [f"10.0.0.{21 + i}" for i in range(8)]
CONFIG: dict[str, Any] = two_node_doc("bench", BACKENDS)
VIP = ipaddress.ip_address("10.0.0.100")
BACKEND_IPS = [ipaddress.ip_address(b) for b in BACKENDS]


def flow(i: int) -> Flow:
    # 100.64.0.0/10 sources: i identifies the flow at both ends (lag matching).
    return Flow(
        Protocol.TCP,
        ipaddress.IPv4Address(0x64400000 + i),
        1024 + i % 64000,
        VIP,
        80,
        BACKEND_IPS[i % len(BACKEND_IPS)],
        8080,
    )


def xdp_services() -> list[Service]:
    """The bench config's services with backend MACs (no neighbour resolution)."""
    return [
        dataclasses.replace(
            svc,
            backends=tuple(
                dataclasses.replace(b, mac=f"02:00:00:00:00:{i + 1:02x}")
                for i, b in enumerate(svc.backends)
            ),
        )
        for svc in parse_config(CONFIG).services()
    ]


def xdp_dataplane(ns: str, address: str) -> XdpDataplane:
    """An XdpDataplane on veth0 of namespace ns (made by XdpNamespaces)."""
    dp = XdpDataplane("veth0", ipaddress.ip_address(address), "generic", None, ns)
    dp.apply(xdp_services())
    return dp


class XdpNamespaces:
    """Two namespaces, each with a veth pair, for the active's and standby's maps."""

    def __init__(self) -> None:
        self.names = [f"halbt-bsync-{os.getpid()}-{side}" for side in ("a", "b")]

    def __enter__(self) -> list[str]:
        try:
            for ns in self.names:
                subprocess.run(["ip", "netns", "add", ns], check=True)
                subprocess.run(["ip", "-n", ns, "link", "add", "veth0", "type", "veth",
                                "peer", "name", "veth1"], check=True)  # fmt: skip
                subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "up"], check=True)
        except BaseException:
            self.__exit__()
            raise
        return self.names

    def __exit__(self, *exc: object) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def flow_id(f: Flow) -> int:
    return int(f.src) - 0x64400000


def record_ids(recs: bytes) -> list[int]:
    """flow_id of each record (the v4-mapped source's low 32 bits), without Flows."""
    import numpy as np

    src = records.rows(recs)[:, records.SRC + 12 : records.SRC + 16]
    ids: list[int] = (np.ascontiguousarray(src).view(">u4").ravel() - 0x64400000).tolist()
    return ids


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# --- the standby (child process) -------------------------------------------------


class TimedSink(FakeDataplane):
    """Records when each flow was installed, when asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.record = False
        self.times: dict[int, float] = {}

    def install_flows(self, flows: Iterable[Flow]) -> int:
        flows = list(flows)
        n = super().install_flows(flows)
        if self.record:
            now = time.monotonic()
            for f in flows:
                self.times[flow_id(f)] = now
        return n


class NullSink(TimedSink):
    """Takes records and stores nothing: the stream's cost without a dataplane's."""

    def install_records(self, recs: bytes) -> int:
        if self.record:
            now = time.monotonic()
            self.times.update(dict.fromkeys(record_ids(recs), now))
        self.count = getattr(self, "count", 0) + records.count(recs)
        return records.count(recs)

    def delete_records(self, recs: bytes) -> int:
        return records.count(recs)


class XdpSink(TimedSink):
    """A real XdpDataplane (in namespace ``ns``) that records install times; it takes
    records as they come off the wire (XdpDataplane.install_records)."""

    def __init__(self, ns: str) -> None:
        super().__init__()
        self.dp = xdp_dataplane(ns, "10.0.0.12")

    def install_records(self, recs: bytes) -> int:
        n = self.dp.install_records(recs)
        if self.record:
            now = time.monotonic()
            self.times.update(dict.fromkeys(record_ids(recs), now))
        return n

    def delete_records(self, recs: bytes) -> int:
        return self.dp.delete_records(recs)

    def close(self) -> None:
        self.dp.close()


async def standby(target: str, pki: str, sink_kind: str) -> None:
    kind, _, ns = sink_kind.partition(":")
    sinks: list[TimedSink] = []

    def make_sink() -> TimedSink:
        for old in sinks:
            old.close()  # one XDP program per veth
        sinks[:] = [XdpSink(ns) if kind == "xdp" else NullSink() if kind == "null" else TimedSink()]
        return sinks[0]

    cfg = parse_config(CONFIG)
    files = TlsFiles(ca=f"{pki}/ca.pem", cert=f"{pki}/{{node}}.pem", key=f"{pki}/{{node}}-key.pem")
    sec = SyncSecurity.from_files(files, "lb2", NODES)
    opts = ClientOptions(heartbeat_timeout=30.0)  # a 1M snapshot has long gaps on 2 cores

    def new_client(sink: TimedSink) -> FlowSyncClient:
        return FlowSyncClient(
            config=cfg,
            node="lb2",
            peer="lb1",
            target=target,
            dataplane=sink,
            security=sec,
            known_term=TERM,
            options=opts,
        )

    sink = make_sink()
    client = new_client(sink)

    def say(**msg: Any) -> None:
        print(json.dumps(msg), flush=True)

    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        cmd, *args = line.split()
        if cmd == "start":
            t0 = time.monotonic()
            client.start()
            await client.wait_synced()
            say(event="synced", seconds=time.monotonic() - t0, flows=client.stats().flows)
        elif cmd == "record":
            sink.record = args[0] == "on"
            sink.times.clear()
            say(event="ok")
        elif cmd == "dump":
            Path(args[0]).write_text(json.dumps(sink.times))
            say(event="ok")
        elif cmd == "resync":
            await client.stop()
            sink = make_sink()
            client = new_client(sink)
            t0 = time.monotonic()
            client.start()
            await client.wait_synced()
            say(event="synced", seconds=time.monotonic() - t0, flows=client.stats().flows)
        elif cmd == "stats":
            st = client.stats()
            say(event="stats", dropped=st.dropped, installed=st.entries_installed)
        elif cmd == "quit":
            break
    await client.stop()
    for old in sinks:
        old.close()


# --- the active (this process) ---------------------------------------------------


class Source:
    """The active's table as packed records (what XdpFlowSource hands over)."""

    def __init__(self) -> None:
        self.recs = bytearray()

    def add(self, recs: bytes) -> None:
        self.recs += recs

    def snapshot_records(self) -> bytes:
        return bytes(self.recs)

    def snapshot(self) -> list[Flow]:
        return records.to_flows(self.snapshot_records())


class Child:
    def __init__(self, target: str, pki: str, gc_mode: str, sink: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--standby",
                target,
                "--pki",
                pki,
                "--gc",
                gc_mode,
                "--sink",
                sink,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise RuntimeError(f"standby exited during {cmd!r}")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def baseline(n: int, batch_size: int, index: codec.RecordIndex) -> dict[str, float]:
    """Encode + decode of the same delta batches, no gRPC, no dataplane: the server's
    batching and message building from records, the client's parse and validation."""
    recs = records.from_flows(flow(i) for i in range(n))
    step = batch_size * records.RECORD_SIZE
    t0 = time.perf_counter()
    msgs = [
        codec.delta_message(
            term=TERM, session=1, sequence=s + 1, upserts=recs[i : i + step], deletes=b""
        )
        for s, i in enumerate(range(0, len(recs), step))
    ]
    t1 = time.perf_counter()
    drops: Counter[codec.DropReason] = Counter()
    got = 0
    for m in msgs:
        b = codec.decode_response(m, index, drops, TERM)
        assert isinstance(b, codec.DecodedBatch)
        got += records.count(b.upserts)
    t2 = time.perf_counter()
    assert got == n and not drops
    return {
        "encode_per_s": n / (t1 - t0),
        "decode_per_s": n / (t2 - t1),
        "pipeline_per_s": n / max(t1 - t0, t2 - t1),  # encode and decode on two cores
        "serial_per_s": n / (t2 - t0),
        "bytes_per_flow": sum(map(len, msgs)) / n,
    }


async def wait_acked(server: FlowSyncServer, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = server.stats()
        if st.peers and st.peers[0].acked_sequence >= st.head_sequence:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("standby did not catch up")
        await asyncio.sleep(0.0005)


async def throughput(server: FlowSyncServer, n: int, start: int) -> float:
    """Push n new flows as fast as the loop allows; entries/s until all are acked."""
    chunk = 1000
    # Made before the clock starts: the adapter's own cost is not the stream's.
    chunks = [
        records.from_flows(flow(j) for j in range(i, min(i + chunk, start + n)))
        for i in range(start, start + n, chunk)
    ]
    t0 = time.monotonic()
    for fl in chunks:
        server.push(upserts=fl)
        await asyncio.sleep(0)  # let the streams write while we produce
    server.flush()
    await wait_acked(server)
    return n / (time.monotonic() - t0)


async def lag(
    server: FlowSyncServer, source: Source, child: Child, rate: int, seconds: float, start: int
) -> dict[str, float]:
    await child.ask("record on")
    pushed: dict[int, float] = {}
    tick = 0.001
    per_tick = max(1, round(rate * tick))
    t_start = time.monotonic()
    i = start
    next_tick = t_start
    while time.monotonic() - t_start < seconds:
        fl = records.from_flows(flow(j) for j in range(i, i + per_tick))
        now = time.monotonic()
        for j in range(i, i + per_tick):
            pushed[j] = now
        i += per_tick
        source.add(fl)
        server.push(upserts=fl)
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    server.flush()
    await wait_acked(server)
    achieved = len(pushed) / (time.monotonic() - t_start)
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        await child.ask(f"dump {tmp.name}")
        installed = {int(k): v for k, v in json.loads(Path(tmp.name).read_text()).items()}
    await child.ask("record off")
    lags = [(installed[k] - t) * 1000 for k, t in pushed.items() if k in installed]
    missing = len(pushed) - len(lags)
    return {
        "rate": achieved,
        "p50_ms": pct(lags, 50),
        "p99_ms": pct(lags, 99),
        "max_ms": max(lags),
        "mean_ms": statistics.fmean(lags),
        "missing": missing,
    }


async def active(args: argparse.Namespace) -> None:
    cfg: ClusterConfig = parse_config(CONFIG)
    index = codec.RecordIndex(cfg.services())
    with tempfile.TemporaryDirectory() as pki:
        files = certs.write_cluster_certs(cfg, pki)
        sec = SyncSecurity.from_files(files, "lb1", NODES)

        print(
            f"# FlowSync bench: {os.cpu_count()} cores, mTLS over 127.0.0.1, standby in a "
            f"child process, GC {args.gc}, standby sink {args.sink}"
        )
        base = baseline(args.flows, args.batch_sizes[0], index)
        print(
            f"baseline (codec only, batch {args.batch_sizes[0]}): "
            f"encode {base['encode_per_s']:,.0f}/s, decode+validate {base['decode_per_s']:,.0f}/s, "
            f"both on one core {base['serial_per_s']:,.0f}/s, "
            f"{base['bytes_per_flow']:.1f} bytes/flow"
        )
        ref = base["pipeline_per_s"]
        print(f"  reference for ratios: the slower stage on its own core = {ref:,.0f}/s")

        results: dict[str, Any] = {"baseline": base, "throughput": {}}
        next_id = 0
        for bs in args.batch_sizes:
            source = Source()
            opts = ServerOptions(batch_size=bs, snapshot_batch_size=args.snapshot_batch_size)
            server = FlowSyncServer(
                source, term=TERM, security=sec, address="127.0.0.1:0", options=opts
            )
            port = await server.start()
            child = Child(f"127.0.0.1:{port}", pki, args.gc, args.sink)
            try:
                await child.ask("start")
                rates = []
                for _ in range(args.repeats):
                    rates.append(await throughput(server, args.flows, next_id))
                    next_id += args.flows
                best = max(rates)
                results["throughput"][bs] = rates
                print(
                    f"throughput batch {bs:>5}: {best:>10,.0f} entries/s "
                    f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}; "
                    f"{best / ref:.2f}x baseline; target 200,000: "
                    f"{'met' if best >= 200_000 else 'NOT met'})"
                )
            finally:
                child.close()
                await server.stop(0)

        # lag: a fresh pair (an empty table), so the figure is the stream's, not the
        # cost of a large FakeDataplane set rehashing or GC walking the earlier runs.
        source = Source()
        opts = ServerOptions(batch_size=args.batch_sizes[-1])
        server = FlowSyncServer(
            source, term=TERM, security=sec, address="127.0.0.1:0", options=opts
        )
        port = await server.start()
        child = Child(f"127.0.0.1:{port}", pki, args.gc, args.sink)
        try:
            await child.ask("start")
            lg = await lag(server, source, child, args.rate, args.lag_seconds, next_id)
            results["lag"] = lg
            print(
                f"lag at {lg['rate']:,.0f} new flows/s (batch {opts.batch_size}, flush "
                f"{opts.flush_interval * 1000:.0f} ms): p50 {lg['p50_ms']:.2f} ms, "
                f"p99 {lg['p99_ms']:.2f} ms, max {lg['max_ms']:.2f} ms "
                f"(target p99 <= 20 ms: {'met' if lg['p99_ms'] <= 20 else 'NOT met'}; "
                f"{lg['missing']} unmatched)"
            )
        finally:
            child.close()
            await server.stop(0)

        # resync: a fresh standby against an active holding args.resync_flows flows
        source = Source()
        source.add(records.from_flows(flow(i) for i in range(args.resync_flows)))
        opts = ServerOptions(snapshot_batch_size=args.snapshot_batch_size)
        server = FlowSyncServer(
            source, term=TERM, security=sec, address="127.0.0.1:0", options=opts
        )
        port = await server.start()
        child = Child(f"127.0.0.1:{port}", pki, args.gc, args.sink)
        try:
            r = await child.ask("start")
            assert r["flows"] == args.resync_flows, r
            secs = float(r["seconds"])
            per_s = args.resync_flows / secs
            est_1m = 1_000_000 / per_s
            scaled = (
                ""
                if args.resync_flows == 1_000_000
                else (f"; 1M extrapolated linearly: {est_1m:.1f} s")
            )
            print(
                f"resync {args.resync_flows:,} flows (snapshot batch {args.snapshot_batch_size}): "
                f"{secs:.2f} s = {per_s:,.0f} entries/s ({per_s / ref:.2f}x baseline){scaled} "
                f"(target 1M in <= 10 s: {'met' if est_1m <= 10 else 'NOT met'})"
            )
            results["resync"] = {"flows": args.resync_flows, "seconds": secs}
        finally:
            child.close()
            await server.stop(0)
        if args.xdp:
            results["xdp"] = await xdp_section(args, sec, pki, results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


async def xdp_written(server: FlowSyncServer, source: Any, total: int) -> float:
    """Wait until the scans have published ``total`` upserts and the standby acked;
    returns when the scans had (monotonic)."""
    deadline = time.monotonic() + 300
    while source.stats().upserts < total:
        if time.monotonic() > deadline:
            raise TimeoutError("the scans did not see every written flow")
        await asyncio.sleep(0.001)
    scanned = time.monotonic()
    server.flush()  # the last partial batch counts in head_sequence only once published
    await wait_acked(server)
    return scanned


class ProgramPackets:
    """New flows made by the active's XDP program: one TCP SYN per flow through
    BPF_PROG_TEST_RUN, frames built up front (src address and port patched into one
    template: the program checks no checksum), one syscall each."""

    def __init__(self, dp: XdpDataplane, first: int, count: int) -> None:
        import ctypes

        from halb.dataplane.xdp import libbpf as lb
        from halb.dataplane.xdp.adapter import PROGRAM
        from halb.testing.packets import ETH_P_IP, eth, ipv4, tcp

        f0 = flow(0)
        tmpl = eth("02:00:00:00:00:01", "02:00:00:00:00:02", ETH_P_IP,
                   ipv4(f0.src, VIP, 6, tcp(f0.src, VIP, f0.sport, 80)))  # fmt: skip
        self.size = len(tmpl)
        buf = bytearray(tmpl * count)
        for n, i in enumerate(range(first, first + count)):
            f = flow(i)
            off = n * self.size
            buf[off + 26 : off + 30] = f.src.packed
            buf[off + 34 : off + 36] = f.sport.to_bytes(2, "big")
        self.first = first
        self._frames = ctypes.create_string_buffer(bytes(buf), len(buf))
        self._base = ctypes.addressof(self._frames)
        self._out = ctypes.create_string_buffer(self.size + 512)
        self._opts = lb.BpfTestRunOpts(
            sz=ctypes.sizeof(lb.BpfTestRunOpts),
            data_out=ctypes.addressof(self._out),
            data_size_in=self.size,
            repeat=1,
        )
        self._fd = dp.bpf.prog_fd(PROGRAM)
        self._run = lb.lib.bpf_prog_test_run_opts
        self._byref = ctypes.byref(self._opts)

    def send(self, i: int) -> None:
        """The packet of flow(i) (first <= i < first + count)."""
        self._opts.data_in = self._base + (i - self.first) * self.size
        self._opts.data_size_out = len(self._out)
        if self._run(self._fd, self._byref) != 0 or self._opts.retval != 3:  # XDP_TX
            raise RuntimeError(f"flow {i}: test run failed (verdict {self._opts.retval})")


async def xdp_section(
    args: argparse.Namespace, sec: SyncSecurity, pki: str, fake: dict[str, Any]
) -> dict[str, Any]:
    """Throughput, lag and resync again, active's XDP map -> standby's XDP map."""
    from halb.dataplane.xdp import flowrecords
    from halb.dataplane.xdp.flowsource import XdpFlowSource

    out: dict[str, Any] = {}
    with XdpNamespaces() as (ns_a, ns_b):
        dp = await asyncio.to_thread(xdp_dataplane, ns_a, "10.0.0.11")
        source = XdpFlowSource.from_dataplane(dp)
        opts = ServerOptions(batch_size=args.batch_sizes[-1])
        server = FlowSyncServer(source, term=TERM, security=sec, address="127.0.0.1:0",
                                options=opts)  # fmt: skip
        port = await server.start()
        scans = asyncio.create_task(source.run(server.push))
        child = Child(f"127.0.0.1:{port}", pki, args.gc, f"xdp:{ns_b}")
        written = 0
        try:
            await child.ask("start")
            flows_map = dp.map("flows")
            print(f"# XDP map ends (generic XDP on veth, map capacity "
                  f"{flows_map.max_entries:,}); '{args.sink}'-sink figures above")  # fmt: skip

            # throughput: args.xdp_flows written at once (as its program would: raw map
            # entries made before the clock), until installed in the standby's map
            n = args.xdp_flows
            ids = dp.record_backend_ids()
            step = 4096 * records.RECORD_SIZE
            entries = [
                flowrecords.records_to_map(chunk, ids)
                for recs in [records.from_flows(flow(i) for i in range(n))]
                for chunk in (recs[j : j + step] for j in range(0, len(recs), step))
            ]
            t0 = time.monotonic()
            for keys, values in entries:
                await asyncio.to_thread(flowrecords.update, flows_map, keys, values)
            t_written = time.monotonic()
            t_scanned = await xdp_written(server, source, n)
            t_done = time.monotonic()
            rate = n / (t_done - t0)
            written = n
            ref = max(fake["throughput"][args.batch_sizes[-1]])
            st = source.stats()
            print(f"xdp throughput map -> map, {n:,} flows written by user space (scan path: "
                  f"no events): {rate:,.0f} entries/s (target "
                  f"200,000: {'met' if rate >= 200_000 else 'NOT met'}; {rate / ref:.2f}x the "
                  f"'{args.sink}'-sink run at batch {args.batch_sizes[-1]}, "
                  f"{rate / fake['baseline']['pipeline_per_s']:.2f}x baseline); written in "
                  f"{(t_written - t0) * 1e3:.0f} ms, all scanned {(t_scanned - t0) * 1e3:.0f} "
                  f"ms, all installed {(t_done - t0) * 1e3:.0f} ms; last scan of "
                  f"{st.entries:,} entries {st.last_scan_seconds * 1e3:.1f} ms")  # fmt: skip
            out["throughput"] = rate

            # throughput again, flows made by the program (event path): packets sent as
            # fast as this loop can, yielding every 1024 so the consumer keeps up (the
            # ring holds ~75k records)
            n_ev = args.xdp_flows // 2
            packets = ProgramPackets(dp, written, n_ev)
            st0 = source.stats()
            t0 = time.monotonic()
            for j in range(written, written + n_ev):
                packets.send(j)
                if j % 1024 == 0:
                    await asyncio.sleep(0)
            t_sent = time.monotonic()
            written += n_ev
            await xdp_written(server, source, written)
            rate = n_ev / (time.monotonic() - t0)
            st = source.stats()
            print(f"xdp throughput map -> map, {n_ev:,} flows made by the program (event "
                  f"path): {rate:,.0f} entries/s (target 200,000: "
                  f"{'met' if rate >= 200_000 else 'NOT met'}; {rate / ref:.2f}x the "
                  f"'{args.sink}'-sink run); sent in {(t_sent - t0) * 1e3:.0f} ms; "
                  f"{st.events - st0.events:,} from events, {st.event_lost} lost, "
                  f"{st.scans - st0.scans} scans")  # fmt: skip
            out["throughput_events"] = rate

            # lag: args.xdp_rate new flows/s made by the program (one packet each), for
            # lag_seconds, while the map holds the throughput run's flows too
            per_tick, tick = max(1, round(args.xdp_rate * 0.001)), 0.001
            packets = ProgramPackets(dp, written, int(args.xdp_rate * args.lag_seconds * 1.2)
                                     + 10 * per_tick)  # fmt: skip
            st0 = source.stats()
            await child.ask("record on")
            wrote: dict[int, float] = {}
            t_start = next_tick = time.monotonic()
            i = written
            while time.monotonic() - t_start < args.lag_seconds:
                for j in range(i, i + per_tick):
                    packets.send(j)
                now = time.monotonic()
                wrote.update((j, now) for j in range(i, i + per_tick))
                i += per_tick
                next_tick += tick
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            written = i
            await xdp_written(server, source, written)
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                await child.ask(f"dump {tmp.name}")
                got = {int(k): v for k, v in json.loads(Path(tmp.name).read_text()).items()}
            await child.ask("record off")
            lags = [(got[k] - t) * 1000 for k, t in wrote.items() if k in got]
            achieved = len(wrote) / args.lag_seconds
            st = source.stats()
            fl = fake["lag"]
            p99 = pct(lags, 99)
            print(f"xdp lag at {achieved:,.0f} new flows/s (made by the program), map growing "
                  f"to {st.entries:,}: p50 {pct(lags, 50):.1f} ms, p99 {p99:.1f} ms, max "
                  f"{max(lags):.1f} ms (target p99 <= 20 ms: "
                  f"{'met' if p99 <= 20 else 'NOT met'}; '{args.sink}'-sink push: p50 "
                  f"{fl['p50_ms']:.2f}, p99 {fl['p99_ms']:.2f} ms); "
                  f"{st.events - st0.events:,} from events, "
                  f"{st.upserts - st0.upserts - (st.events - st0.events):,} from scans, "
                  f"{st.scans - st0.scans} scans (interval now {st.interval * 1e3:.0f} ms, "
                  f"last {st.last_scan_seconds * 1e3:.1f} ms), {st.event_lost} events lost; "
                  f"{len(wrote) - len(lags)} unmatched")  # fmt: skip
            out["lag"] = {"rate": achieved, "p50_ms": pct(lags, 50), "p99_ms": p99,
                          "max_ms": max(lags), "entries": st.entries,
                          "events": st.events - st0.events}  # fmt: skip

            # resync: a fresh standby (fresh map) subscribes to the active's map
            r = await child.ask("resync")
            per_s = r["flows"] / r["seconds"]
            fr = fake["resync"]
            fake_per_s = fr["flows"] / fr["seconds"]
            print(f"xdp resync {r['flows']:,} flows: {r['seconds']:.2f} s = {per_s:,.0f} "
                  f"entries/s, 1M extrapolated {1e6 / per_s:.1f} s ({per_s / fake_per_s:.2f}x "
                  f"the '{args.sink}'-sink resync)")  # fmt: skip
            out["resync"] = {"flows": r["flows"], "seconds": r["seconds"]}
        finally:
            child.close()
            scans.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scans
            await server.stop(0)
            source.close()
            dp.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flows", type=int, default=200_000, help="flows per throughput run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192]
    )
    p.add_argument("--snapshot-batch-size", type=int, default=4096)
    p.add_argument("--rate", type=int, default=20_000, help="new flows/s in the lag run")
    p.add_argument("--lag-seconds", type=float, default=5.0)
    p.add_argument("--resync-flows", type=int, default=1_000_000)
    p.add_argument(
        "--gc",
        choices=["default", "tuned", "off"],
        default="tuned",
        help="CPython GC thresholds in both processes: 'default' (700, 10, 10) lets full\n"
        "collections walk every flow object (pauses of 50-150 ms with large tables);\n"
        "'tuned' = gc.freeze() after setup and thresholds (50000, 50, 1000);\n"
        "'off' = gc.disable() (the bench makes no reference cycles worth collecting)",
    )
    p.add_argument(
        "--sink",
        default="null",
        help="standby dataplane: 'null' (takes records, stores nothing: the stream alone)\n"
        "or 'fake' (FakeDataplane through the Flow-object fallback, as nft/IPVS);\n"
        "the XDP runs give their child 'xdp:NAMESPACE'",
    )
    p.add_argument("--xdp", action="store_true", help="also run with XDP maps at both ends")
    p.add_argument("--xdp-flows", type=int, default=100_000, help="flows per XDP throughput run")
    p.add_argument("--xdp-rate", type=int, default=10_000, help="new flows/s in the XDP lag run")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--standby", help=argparse.SUPPRESS)
    p.add_argument("--pki", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sink not in ("fake", "null") and not args.sink.startswith("xdp:"):
        p.error(f"--sink {args.sink!r}: fake or null")
    if args.gc == "tuned":
        gc.freeze()
        gc.set_threshold(50_000, 50, 1000)
    elif args.gc == "off":
        gc.disable()
    if args.standby:
        asyncio.run(standby(args.standby, args.pki, args.sink))
    else:
        asyncio.run(active(args))


if __name__ == "__main__":
    main()
