"""XDP balancer cost per packet, and Maglev ring build time, each beside a baseline.

Per packet (BPF_PROG_TEST_RUN, same run, same machine):
  minimal   a program that only returns XDP_TX (the floor of the test-run loop)
  flow hit  balancer, the 5-tuple is in the flow table (the steady state)
  flow miss balancer, a new 5-tuple each packet: ring lookup + flow insert
Target: flow hit <= 2x minimal.

Maglev (pure Python, best of several): 10 backends (baseline) vs 1000. Target < 50 ms.

Run as root: .venv/bin/python bench/xdp_cost.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from ipaddress import IPv4Address, ip_address

from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.layout import (
    BACKEND_F_VALID,
    FAMILY_V4,
    BackendInfo,
    LbConfig,
    ServiceInfo,
    VipKey,
    addr_to_words,
    mac_to_bytes,
)
from halb.dataplane.xdp.loader import BpfObject
from halb.dataplane.xdp.packets import ETH_P_IP, XDP_TX, eth, ipv4, tcp
from halb.lb.maglev import build_table

VIP = "10.0.0.100"
CLIENT = "192.0.2.7"
RING = 65537


def net16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def frame(sport: int) -> bytes:
    return eth(
        "02:00:00:00:00:01",
        "02:00:00:00:00:02",
        ETH_P_IP,
        ipv4(CLIENT, VIP, 6, tcp(CLIENT, VIP, sport, 80, payload=b"x" * 18)),
    )


def setup(obj: BpfObject, backends: int = 10) -> None:
    maps = obj.maps
    maps["config"].update(0, LbConfig(local_mac=tuple(mac_to_bytes("02:00:00:00:00:01"))))
    for i in range(backends):
        info = BackendInfo(
            addr=addr_to_words(IPv4Address(f"10.0.1.{i + 1}")),
            mac=tuple(mac_to_bytes(f"02:00:00:00:01:{i:02x}")),
            port=80,
            family=FAMILY_V4,
            flags=BACKEND_F_VALID,
        )
        maps["backends"].update(i, info)
    table = build_table({f"10.0.1.{i + 1}:80": 1 for i in range(backends)}, RING)
    maps["ring"].update_batch(list(range(RING)), list(table.slots))
    key = VipKey(addr_to_words(ip_address(VIP)), net16(80), 6, FAMILY_V4)
    maps["services"].update(key, ServiceInfo(0, RING, 0))


def per_packet_single(obj: BpfObject, prog: str, frames: list[bytes]) -> float:
    """Mean kernel-timed ns of single runs (repeat=1), one frame each."""
    total = 0
    for f in frames:
        res = obj.test_run(prog, f, 1)
        assert res.retval == XDP_TX, res.retval
        total += res.duration_ns
    return total / len(frames)


def per_packet_loop(obj: BpfObject, prog: str, f: bytes, repeat: int) -> float:
    res = obj.test_run(prog, f, repeat)
    assert res.retval == XDP_TX
    return float(res.duration_ns)


def maglev_ms(n: int, size: int, rounds: int = 5) -> float:
    weights = {f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:80": 1 for i in range(n)}
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        build_table(weights, size)
        best = min(best, time.perf_counter() - t)
    return best * 1000


def python_loop_ns(n: int = 1_000_000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        pass
    return (time.perf_counter() - t) / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="test-run loop repeats")
    ap.add_argument("--singles", type=int, default=20_000, help="single runs per path")
    args = ap.parse_args()

    balancer = BpfObject(build_bpf())
    minimal = BpfObject(build_bpf(source="minimal.bpf.c"))
    try:
        setup(balancer)
        hit = frame(40000)
        balancer.test_run("halb_balancer", hit)  # record the flow
        # Interleave the three paths over several rounds so machine noise hits all alike.
        loop_min, loop_hit, one_min, one_hit, one_miss = [], [], [], [], []
        sport = 1
        for _ in range(5):
            loop_min.append(per_packet_loop(minimal, "halb_minimal", hit, args.repeat))
            loop_hit.append(per_packet_loop(balancer, "halb_balancer", hit, args.repeat))
            n = args.singles // 5
            one_min.append(per_packet_single(minimal, "halb_minimal", [hit] * n))
            one_hit.append(per_packet_single(balancer, "halb_balancer", [hit] * n))
            misses = [frame(p) for p in range(sport, sport + n)]
            sport += n
            one_miss.append(per_packet_single(balancer, "halb_balancer", misses))
    finally:
        balancer.close()
        minimal.close()

    med = statistics.median
    print(f"per packet, BPF_PROG_TEST_RUN loop (repeat={args.repeat}, median of 5):")
    print(f"  minimal XDP_TX   {med(loop_min):7.1f} ns")
    print(
        f"  flow hit         {med(loop_hit):7.1f} ns   {med(loop_hit) / med(loop_min):.2f}x minimal"
    )
    print(f"per packet, single runs (kernel-timed, {args.singles} each; misses need new tuples):")
    print(f"  minimal XDP_TX   {med(one_min):7.1f} ns")
    print(f"  flow hit         {med(one_hit):7.1f} ns   {med(one_hit) / med(one_min):.2f}x minimal")
    print(
        f"  flow miss        {med(one_miss):7.1f} ns   {med(one_miss) / med(one_min):.2f}x minimal"
    )
    print("  target: flow hit <= 2x minimal")

    base = maglev_ms(10, RING)
    big = maglev_ms(1000, RING)
    big_m = maglev_ms(1000, 100003)
    print("maglev ring build (pure Python, best of 5):")
    print(f"  10 backends,   M=65537   {base:7.1f} ms (baseline)")
    print(f"  1000 backends, M=65537   {big:7.1f} ms  {big / base:.2f}x baseline")
    print(f"  1000 backends, M=100003  {big_m:7.1f} ms  {big_m / base:.2f}x baseline (M > 100 N)")
    print(f"  python loop iteration    {python_loop_ns():7.1f} ns (machine speed reference)")
    print("  target: < 50 ms for 1000 backends")


if __name__ == "__main__":
    main()
