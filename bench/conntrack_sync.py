"""Conntrack sync throughput and lag for the nft dataplane, beside the kernel's ceiling.

Two balancer namespaces (active A, standby B) hold the same nft rules. In one run:

1. ceiling: raw ctnetlink creates on one node — pre-encoded NATed create messages sent
   in batches into A (no Python work per entry beyond the socket loop);
2. install: A's dump (flows of halb's services) installed into B through
   NftDataplane.install_flows (validation + encoding + batched creates), and as
   packed records through install_records (what FlowSync's client calls: the create
   messages of a whole buffer built at once, halb.dataplane.nft.ctbulk);
3. sync snapshot: the same dump streamed through halb.sync (FlowSyncServer on A's
   adapter, FlowSyncClient into B's adapter, gRPC over loopback, plaintext) until the
   client reports synced;
4. sync deltas: new connections appear on A at a steady rate (created by another
   netlink socket, so A's event stream reports them), flow from A's conntrack events
   through the server and client into B; lag = installed in B - created in A.

Prints each rate and its ratio to the ceiling. Root only; namespaces named
halbt-nft-bench-* are removed at the end.

    .venv/bin/python bench/conntrack_sync.py [--flows 20000] [--rate 5000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any

from halb.config import ClusterConfig, parse_config
from halb.dataplane.base import Counters, KernelStats
from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.adapter import NftDataplane
from halb.dataplane.nft.conntrack import Conntrack
from halb.dataplane.nft.events import FlowDelta
from halb.dataplane.nft.flows import FlowEntry, FlowMap
from halb.flows import records
from halb.model import Flow, Protocol, Term

VIP = "10.98.0.100"
BACKENDS = ["10.98.1.21", "10.98.1.22"]
TERM = Term(lease_id=1, revision=1)


def config() -> ClusterConfig:
    return parse_config(
        {
            "cluster": "bench",
            "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
            "dataplane": {"kind": "nft"},
            "nodes": [
                {
                    "name": name,
                    "address": f"10.98.2.{11 + i}/24",
                    "interface": "eth0",
                    "backend_interface": "eth1",
                    "priority": 100 - i,
                    "sync_address": "127.0.0.1:1",
                }
                for i, name in enumerate(("lba", "lbb"))
            ],
            "vip_groups": [
                {
                    "name": "g",
                    "nat": {"gateway": "10.98.1.1/24"},
                    "vips": [
                        {
                            "address": VIP,
                            "services": [
                                {
                                    "port": 9000,
                                    "forwarding": "nat",
                                    "ring_size": 251,
                                    "backends": [{"address": b} for b in BACKENDS],
                                }
                            ],
                        }
                    ],
                }
            ],
            "sync": {"insecure": True},
            "admin": {"insecure": True},
        }
    )


def synthetic_flows(n: int, offset: int = 0) -> list[Flow]:
    """n distinct client flows (client address varies, then port)."""
    out = []
    for i in range(offset, offset + n):
        client = IPv4Address(int(IPv4Address("10.200.0.0")) + (i % 60000) + 1)
        out.append(
            Flow(
                Protocol.TCP,
                client,
                10000 + i // 60000,
                IPv4Address(VIP),
                9000,
                IPv4Address(BACKENDS[i % 2]),
                9000,
            )
        )
    return out


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class TimedDataplane:
    """B's adapter, recording when each flow's install returned (for lag)."""

    name = "nft-timed"

    def __init__(self, inner: NftDataplane) -> None:
        self.inner = inner
        self.installed_at: dict[Flow | bytes, float] = {}  # Flow or record conn key
        self.lock = threading.Lock()

    def apply(self, services: Any) -> Any:
        return self.inner.apply(services)

    def dump_flows(self) -> list[Flow]:
        return self.inner.dump_flows()

    def install_flows(self, flows: Iterable[Flow]) -> int:
        batch = list(flows)
        n = self.inner.install_flows(batch)
        now = time.monotonic()
        with self.lock:
            for f in batch:
                self.installed_at.setdefault(f, now)
        return n

    def delete_flows(self, flows: Iterable[Flow]) -> int:
        return self.inner.delete_flows(flows)

    # FlowSync's client installs packed records (with fullnat source ports).
    def install_records(self, recs: bytes) -> int:
        n = self.inner.install_records(recs)
        now = time.monotonic()
        with self.lock:
            # Keyed by the record's connection bytes: no object per flow in the timing.
            for k in records.conn_keys(recs):
                self.installed_at.setdefault(k, now)
        return n

    def delete_records(self, recs: bytes) -> int:
        return self.inner.delete_records(recs)

    def dump_records(self) -> bytes:
        return self.inner.dump_records()

    def counters(self) -> Counters:
        return self.inner.counters()

    def kernel_stats(self) -> KernelStats:
        return self.inner.kernel_stats()

    def set_deadline(self, monotonic_ns: int | None) -> None:
        self.inner.set_deadline(monotonic_ns)

    def close(self) -> None:
        self.inner.close()


def ceiling(ns: str, flows: list[Flow], fmap: FlowMap) -> float:
    """Raw creates/s: messages encoded before the clock starts."""
    ct = Conntrack(ns)
    try:
        msgs = []
        for f in flows:
            seq = ct.sock.next_seq()
            dnat, _ = fmap.nat_for(FlowEntry(f))
            msgs.append(
                (
                    seq,
                    ctmsg.encode_create(seq, fmap.orig_tuple(f), timeout=3600, nat_dst=dnat),
                )
            )
        t0 = time.perf_counter()
        results = ct.sock.batch(msgs)
        dt = time.perf_counter() - t0
        failed = sum(1 for code, _ in results.values() if code)
        if failed:
            print(f"  warning: {failed} raw creates failed", file=sys.stderr)
        return len(flows) / dt
    finally:
        ct.close()


async def sync_phase(
    cfg: ClusterConfig,
    a: NftDataplane,
    b: TimedDataplane,
    n_snapshot: int,
    rate: int,
    seconds: float,
    ns_a: str,
) -> dict[str, float]:
    from halb.sync.client import ClientOptions, FlowSyncClient
    from halb.sync.server import FlowSyncServer, ServerOptions
    from halb.sync.tls import SyncSecurity

    peers = frozenset({"lba", "lbb"})
    server = FlowSyncServer(
        a,  # NftDataplane.snapshot_records() is the FlowSnapshot
        term=TERM,
        security=SyncSecurity("lba", peers, None, None),
        address="127.0.0.1:0",
        options=ServerOptions(flush_interval=0.002),
    )
    out: dict[str, float] = {}
    events = a.flow_events()  # subscribe before the snapshot is taken
    async with server:
        port = server.port
        client = FlowSyncClient(
            config=cfg,
            node="lbb",
            peer="lba",
            dataplane=b,
            security=SyncSecurity("lbb", peers, None, None),
            known_term=TERM,
            target=f"127.0.0.1:{port}",
            options=ClientOptions(),
        )

        async def pump() -> None:
            async for item in events:
                if isinstance(item, FlowDelta):
                    if item.op == "upsert":
                        server.push(upserts=[item.flow])
                    else:
                        server.push(deletes=[item.flow])

        pump_task = asyncio.create_task(pump())
        t0 = time.perf_counter()
        client.start()
        ok = await client.wait_synced(timeout=120)
        dt = time.perf_counter() - t0
        if not ok:
            raise RuntimeError("sync client never reported synced")
        out["snapshot_rate"] = n_snapshot / dt
        out["snapshot_seconds"] = dt

        # Deltas: batches of new flows on A every 10 ms from another socket.
        injector = Conntrack(ns_a)
        created_at: dict[bytes, float] = {}
        per_tick = max(1, rate // 100)
        ticks = int(seconds * 100)
        offset = 1_000_000
        try:
            start = time.monotonic()
            for t in range(ticks):
                batch = records.from_flows(synthetic_flows(per_tick, offset + t * per_tick))
                await asyncio.to_thread(injector.install_records, batch, a.flowmap)
                now = time.monotonic()
                for k in records.conn_keys(batch):
                    created_at[k] = now
                delay = start + (t + 1) * 0.01 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent_seconds = time.monotonic() - start
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with b.lock:
                    done = sum(1 for f in created_at if f in b.installed_at)
                if done == len(created_at):
                    break
                await asyncio.sleep(0.01)
        finally:
            injector.close()
        lags = []
        with b.lock:
            for f, t_c in created_at.items():
                t_i = b.installed_at.get(f)
                if t_i is not None:
                    lags.append(t_i - t_c)
        out["delta_offered_rate"] = len(created_at) / sent_seconds
        out["delta_delivered"] = len(lags) / max(1, len(created_at))
        if lags:
            lags.sort()
            out["lag_p50_ms"] = 1000 * statistics.median(lags)
            out["lag_p99_ms"] = 1000 * lags[min(len(lags) - 1, int(0.99 * len(lags)))]
            out["lag_max_ms"] = 1000 * lags[-1]
        await client.stop()
        pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump_task
    events.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", type=int, default=20000, help="flows in the source dump")
    p.add_argument("--rate", type=int, default=5000, help="new flows/s in the delta phase")
    p.add_argument("--seconds", type=float, default=3.0, help="length of the delta phase")
    p.add_argument("--no-grpc", action="store_true", help="skip the halb.sync phases")
    args = p.parse_args()

    prefix = f"halbt-nft-bench-{uuid.uuid4().hex[:6]}"
    ns_a, ns_b = f"{prefix}-lba", f"{prefix}-lbb"
    cfg = config()
    a = b = None
    try:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
        a = NftDataplane.from_config(cfg, netns=ns_a)
        b = NftDataplane.from_config(cfg, netns=ns_b)
        a.apply(cfg.services())
        b.apply(cfg.services())
        flows = synthetic_flows(args.flows)

        raw = ceiling(ns_a, flows, a.flowmap)

        t0 = time.perf_counter()
        entries = a.dump_entries()
        dump_rate = len(entries) / (time.perf_counter() - t0)
        assert len(entries) == args.flows, (len(entries), args.flows)

        t0 = time.perf_counter()
        written = b.install_flows(entries)
        install_rate = written / (time.perf_counter() - t0)
        assert written == args.flows, (written, b.last_install)

        # What a standby does with a snapshot: packed records, create messages in bulk.
        t0 = time.perf_counter()
        recs = a.snapshot_records()
        dump_records_rate = (len(recs) // records.RECORD_SIZE) / (time.perf_counter() - t0)
        b.reconcile_flows([])
        t0 = time.perf_counter()
        written = b.install_records(recs)
        records_rate = written / (time.perf_counter() - t0)
        assert written == args.flows, (written, b.last_install)

        print(f"conntrack sync bench: {args.flows} NATed TCP flows, kernel {os.uname().release}")
        print(f"  ceiling  raw ctnetlink create (one node)   {raw:10.0f} entries/s")
        print(f"  dump     source flows (FlowEntry objects)  {dump_rate:10.0f} entries/s")
        print(f"  dump     source snapshot_records (bulk)    {dump_records_rate:10.0f} entries/s")
        print(
            f"  install  dump -> standby install_flows     {install_rate:10.0f} entries/s"
            f"   ratio {install_rate / raw:.2f} of ceiling"
        )
        print(
            f"  records  snapshot records -> install_records {records_rate:8.0f} entries/s"
            f"   ratio {records_rate / raw:.2f} of ceiling"
        )
        if not args.no_grpc:
            b.reconcile_flows([])  # empty the standby again
            timed = TimedDataplane(b)
            res = asyncio.run(
                sync_phase(cfg, a, timed, len(entries), args.rate, args.seconds, ns_a)
            )
            print(
                f"  sync     snapshot via halb.sync (gRPC)     {res['snapshot_rate']:10.0f}"
                f" entries/s   ratio {res['snapshot_rate'] / raw:.2f} of ceiling"
            )
            print(
                f"  deltas   {res['delta_offered_rate']:.0f} new flows/s offered, "
                f"{100 * res['delta_delivered']:.1f}% delivered; lag p50 "
                f"{res.get('lag_p50_ms', float('nan')):.1f} ms, p99 "
                f"{res.get('lag_p99_ms', float('nan')):.1f} ms, max "
                f"{res.get('lag_max_ms', float('nan')):.1f} ms"
            )
    finally:
        for dp in (a, b):
            if dp is not None:
                with contextlib.suppress(Exception):
                    dp.close()
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


if __name__ == "__main__":
    main()
