"""A keepalive + txn + watch workload against an EtcdCluster, with one member fault in
the middle: what the kernel tests assert on and what bench/etcd_failover.py prints.

    report = await run_fault(cluster, client, "kill", "follower")
    report.lease_lost, report.missing, report.duplicates, report.move_s
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from halb.etcd import Compare, EtcdClient, EtcdError, Put, WatchEvent, read_then_watch
from halb.etcd.watch import Snapshot
from halb.testing.etcd import EtcdCluster

__all__ = ["FaultReport", "order_for", "run_fault"]

Fault = Literal["kill", "stop"]
Role = Literal["follower", "leader"]


@dataclass
class FaultReport:
    fault: str
    role: str
    member: int
    lease_ttl: int
    move_s: float | None = None  # fault -> first txn sent after it that succeeded
    keepalive_max_s: float = 0.0  # longest a keepalive call kept its caller waiting
    keepalive_gap_s: float = 0.0  # longest time between two successful keepalives
    watch_lag_max_s: float = 0.0  # longest write-ack -> watch-event delay
    lease_lost: bool = False
    written: int = 0
    missing: list[bytes] = field(default_factory=list)
    duplicates: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def order_for(cluster: EtcdCluster, role: Role) -> tuple[int, list[str]]:
    """(member index, endpoints with that member first): the client then uses it."""
    leader = cluster.leader_index()
    if role == "leader":
        index = leader
    else:
        index = next(i for i in range(len(cluster.members)) if i != leader)
    eps = cluster.endpoints
    return index, [eps[index]] + [e for i, e in enumerate(eps) if i != index]


async def run_fault(
    cluster: EtcdCluster,
    client: EtcdClient,
    fault: Fault,
    member: int,
    role: Role,
    *,
    prefix: bytes = b"/halb/t/",
    ttl: int = 2,
    before: float = 0.5,
    after: float = 2.0,
) -> FaultReport:
    lease = await client.grant(ttl)
    report = FaultReport(fault, role, member, ttl)
    acked: dict[bytes, float] = {}
    seen: dict[bytes, int] = {}
    lag: list[float] = []
    fault_at: float | None = None
    stop = asyncio.Event()
    first_event = asyncio.Event()

    async def keepalive() -> None:
        last_ok = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                left = await client.keepalive(lease.id, timeout=ttl * 0.9)
            except EtcdError as exc:
                report.errors.append(f"keepalive: {exc}")
                left = -1
            t1 = time.monotonic()
            report.keepalive_max_s = max(report.keepalive_max_s, t1 - t0)
            if left <= 0 and left != -1:
                report.lease_lost = True
            if left > 0:
                report.keepalive_gap_s = max(report.keepalive_gap_s, t1 - last_ok)
                last_ok = t1
            await asyncio.sleep(max(0.0, ttl / 3 - (t1 - t0)))

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key = prefix + f"{n:06d}".encode()
            sent = time.monotonic()
            try:
                # Create-if-absent: a retried attempt whose reply was lost cannot
                # write the key twice.
                await client.txn([Compare.create(key, "==", 0)], [Put(key, b"v", lease.id)])
            except EtcdError as exc:
                report.errors.append(f"txn {key!r}: {exc}")
                continue
            acked[key] = time.monotonic()
            if fault_at is not None and sent > fault_at and report.move_s is None:
                report.move_s = acked[key] - fault_at
            await asyncio.sleep(0.02)

    async def watcher() -> None:
        async for item in read_then_watch(client, prefix, prefix=True):
            if isinstance(item, Snapshot):
                for kv in item.kvs:
                    seen[kv.key] = seen.get(kv.key, 0) + 1
                first_event.set()
                continue
            assert isinstance(item, WatchEvent)
            seen[item.kv.key] = seen.get(item.kv.key, 0) + 1
            if item.kv.key in acked:
                lag.append(time.monotonic() - acked[item.kv.key])

    tasks = [asyncio.create_task(f()) for f in (keepalive, writer)]
    watch_task = asyncio.create_task(watcher())
    try:
        await asyncio.wait_for(first_event.wait(), 5)
        await asyncio.sleep(before)
        fault_at = time.monotonic()
        m = cluster.members[member]
        if fault == "kill":
            m.stop(kill=True)
        else:
            m.freeze()
        await asyncio.sleep(after)
        stop.set()
        await asyncio.gather(*tasks)
        # Let the watch catch up with the last acknowledged write.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not set(acked) <= set(seen):
            await asyncio.sleep(0.05)
        info = await client.time_to_live(lease.id)
        if info.ttl <= 0:
            report.lease_lost = True
    finally:
        stop.set()
        for t in [*tasks, watch_task]:
            t.cancel()
        await asyncio.gather(*tasks, watch_task, return_exceptions=True)
        cluster.members[member].thaw()
    report.written = len(acked)
    report.missing = sorted(set(acked) - set(seen))
    report.duplicates = sorted(k for k, c in seen.items() if c > 1)
    report.watch_lag_max_s = max(lag, default=0.0)
    return report
