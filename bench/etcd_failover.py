"""etcd member failover benchmark: how long halb's etcd client takes to move off a
killed (SIGKILL) or hung (SIGSTOP) member, follower or leader, under a keepalive +
txn + watch workload, printed beside the lease TTL it must stay well under.

Each run starts a fresh 3-member cluster on loopback (TLS + auth with --secure), puts
the member to fault first in the client's endpoint order (so the client uses it),
faults it mid-run, and reports (halb.testing.etcd_workload):

  move       fault -> first transaction sent after it that succeeded
  ka max     the longest one keepalive call kept its caller waiting
  ka gap     the longest time between two successful keepalives (vs the TTL)
  lost       a lease lost, or acknowledged writes missing / repeated on the watch

    .venv/bin/python bench/etcd_failover.py [--repeat 3] [--secure]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics

from halb.etcd import ClientSettings, EtcdClient, TlsFiles
from halb.testing.etcd import USER_PASSWORD, EtcdCluster
from halb.testing.etcd_workload import FaultReport, order_for, run_fault

CASES = [("kill", "follower"), ("stop", "follower"), ("kill", "leader"), ("stop", "leader")]


async def one(cluster: EtcdCluster, fault: str, role: str) -> FaultReport:
    member, endpoints = order_for(cluster, role)  # type: ignore[arg-type]
    t = cluster.tls
    tls = TlsFiles(t.ca, t.client_cert, t.client_key, t.server_name) if t else None
    user = "halb" if cluster.auth else None
    st = ClientSettings(tuple(endpoints), tls, user, USER_PASSWORD if user else None)
    async with EtcdClient(st) as client:
        await client.check()
        return await run_fault(cluster, client, fault, member, role)  # type: ignore[arg-type]


async def _all(repeat: int, secure: bool) -> None:
    for fault, role in CASES:
        reports = []
        for _ in range(repeat):
            with EtcdCluster(3, tls=secure, auth=secure) as cluster:
                reports.append(await one(cluster, fault, role))
        moves = [r.move_s for r in reports if r.move_s is not None]
        lost = sum(r.lease_lost or bool(r.missing) or bool(r.duplicates) for r in reports)
        move = f"{min(moves):.3f}/{statistics.median(moves):.3f}/{max(moves):.3f}" if moves else "-"
        print(
            f"{fault + ' ' + role:<16} {move:<24} "
            f"{max(r.keepalive_max_s for r in reports):<9.3f} "
            f"{max(r.keepalive_gap_s for r in reports):<9.3f} "
            f"{reports[0].lease_ttl}s {lost}/{len(reports)}",
            flush=True,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--secure", action="store_true", help="TLS + auth members")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{'fault':<16} {'move s (min/med/max)':<24} {'ka max s':<9} {'ka gap s':<9} ttl lost")
    # One event loop for every run: grpc.aio does not like a loop per client.
    asyncio.run(_all(args.repeat, args.secure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
