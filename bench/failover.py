"""Failover time in the lab: from a fault on the active node to the first request
answered through the new active, for kill, stop, link-down and planned faults.

Run as root (builds its own lab instance; HALB_LAB_INSTANCE, default 3):

    .venv/bin/python bench/failover.py [--runs 10] [--faults kill,stop,link-down,planned]
        [--dataplane xdp|nft]

"Answered through the new active" means: a TCP connect + HTTP GET to the VIP succeeded
while the client's neighbour entry for the VIP held the new active's MAC (a killed
agent leaves its XDP program and, for up to the address lifetime, its VIP in place, so
a success through the old node does not count). The planned fault starts when the
hand-over request is written to etcd, as `halb failover` writes it. Each fault's median
is printed beside the lease TTL and beside the planned hand-over measured in the same
run (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HALB_LAB_INSTANCE", "3")

from halb.agent.etcdio import connect
from halb.config import load_config
from halb.ha.admin import request_handover
from halb.keys import GroupKeys
from halb.lab import builder, faults
from halb.lab.observe import leader, wait_until
from halb.lab.topology import site_from_env

SITE = site_from_env()

# Runs in the client namespace: every 5 ms, GET / from the VIP (150 ms timeout) and
# report the outcome with the MAC the client's neighbour table holds for the VIP.
PROBER = r"""
import json, socket, sys, time
vip, port = sys.argv[1], int(sys.argv[2])
def mac():
    for line in open("/proc/net/arp").read().splitlines()[1:]:
        f = line.split()
        if f[0] == vip:
            return f[3]
    return None
while True:
    t = time.time()
    ok = False
    try:
        s = socket.create_connection((vip, port), timeout=0.15)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        ok = b"200" in s.recv(256)
        s.close()
    except OSError:
        pass
    print(json.dumps({"t": t, "ok": ok, "mac": mac()}), flush=True)
    time.sleep(0.005)
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def mac_of(state: dict[str, Any], node: str) -> str:
    return str(next(n["mac"] for n in state["nodes"] if n["name"] == node))


def one_run(state: dict[str, Any], fault: str, timeout: float = 15.0) -> float:
    cfg = state["config"]
    faults.heal(state)
    wait_until("lb1 to lead", lambda: leader(cfg) == "lb1", 30)
    time.sleep(0.5)  # lb1's announcements done, standby synced
    new_mac = mac_of(state, "lb2")
    probe = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            SITE.ns("client"),
            sys.executable,
            "-c",
            PROBER,
            state["vip"],
            str(state["http_port"]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdout is not None
    try:
        probe.stdout.readline()  # running
        if fault == "planned":
            # The fault is the request written to etcd (what `halb failover --to lb2`
            # does once its Python start-up, ~0.5 s, is over): timed from the write.
            t0 = asyncio.run(request_planned(cfg, "lb2"))
        else:
            t0 = time.time()
            faults.apply_fault("lb1", fault, state)
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = probe.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            if ev["t"] >= t0 and ev["ok"] and ev["mac"] == new_mac:
                return float(ev["t"] - t0)
        raise TimeoutError(f"{fault}: no answer through lb2 within {timeout:g}s")
    finally:
        probe.terminate()
        probe.wait()
        probe.stdout.close()
        if fault == "planned":
            # Hand it back so the next run starts from lb1 again.
            subprocess.run(
                [str(Path(sys.executable).with_name("halb")), "failover", "--to", "lb1"],
                capture_output=True,
                check=False,
            )


async def request_planned(config_path: str, target: str) -> float:
    cfg = load_config(Path(config_path))
    client = connect(cfg)
    try:
        await client.get(b"/")  # connected before the clock starts
        t0 = time.time()
        await request_handover(
            client, GroupKeys(cfg.etcd.prefix, cfg.cluster, cfg.vip_groups[0].name), target
        )
        return t0
    finally:
        await client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--faults", default="planned,kill,stop,link-down")
    ap.add_argument("--keep-lab", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--dataplane", choices=("xdp", "nft"), default="xdp")
    args = ap.parse_args()
    builder.down(SITE)
    state = builder.up(2, 3, dataplane=args.dataplane, site=SITE)
    ttl = 1.0
    fo = load_config(Path(state["config"])).failover
    results: dict[str, list[float]] = {}
    try:
        for fault in args.faults.split(","):
            results[fault] = []
            for i in range(args.runs):
                took = one_run(state, fault)
                results[fault].append(took)
                print(
                    f"{fault:<10} run {i + 1:>2}/{args.runs}: {took * 1000:7.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not args.keep_lab:
            builder.down(SITE)
    base = statistics.median(results["planned"]) if results.get("planned") else None
    print(
        f"\n{args.dataplane}: failover to the first answer through the new active "
        f"(lease TTL {ttl:g} s, "
        f"halb heartbeat {fo.heartbeat_interval or 0:g} s / timeout {fo.heartbeat_timeout:g} s, "
        f"etcd heartbeat 50 ms / election 500 ms, {args.runs} runs each)"
    )
    print(
        f"{'fault':<10} {'median':>9} {'p95':>9} {'min':>9} {'max':>9} {'x TTL':>7} "
        f"{'x planned':>10}"
    )
    for fault, xs in results.items():
        med = statistics.median(xs)
        vs_planned = f"{med / base:10.1f}" if base else f"{'-':>10}"
        print(
            f"{fault:<10} {med * 1000:7.0f}ms {pct(xs, 95) * 1000:7.0f}ms "
            f"{min(xs) * 1000:7.0f}ms {max(xs) * 1000:7.0f}ms {med / ttl:7.2f} {vs_planned}"
        )
    print(
        "targets: unplanned median <= 1200 ms, planned median <= 50 ms; keepalived's "
        "default VRRP (advert 1 s) sends its first gratuitous ARP 3.1 s after the master dies"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
