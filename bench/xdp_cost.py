"""XDP balancer cost per packet, and Maglev ring build time, each beside a baseline.

Per packet (BPF_PROG_TEST_RUN, same run, same machine):
  minimal   a program that only returns XDP_TX (the floor of the test-run loop)
  flow hit  balancer, the 5-tuple is in the flow table (the steady state)
  flow miss balancer, a new 5-tuple each packet: ring lookup + flow insert
  non-VIP   balancer, a packet for another address (passed to the stack)
Target: flow hit <= 2x minimal.

Flow-creation events (flow_events ring buffer, armed by lb_config.flags on the active):
the miss path with and without the event. Loop figures from a throw-away build whose
every packet takes the miss path (-DHALB_BENCH_ALWAYS_MISS: ring slot + flow re-recorded
+ event), with the ring drained before each round, and once more with the ring full
(the output fails and counts event_lost: what an active whose consumer fell behind
pays); single runs of real new flows with the event off and on.

Breakdown of the flow hit: throw-away builds of the same program (-DHALB_BENCH_STOP=n)
that return XDP_TX after stage n, and comparison builds: the previous order (services
lookup on every packet), bpf_ktime_get_ns instead of the coarse clock, and a 16-byte
IPv4-only flow key (not the layout: measured only).

Loop figures are min / median over interleaved rounds: the machine is shared, and
interference only ever adds time, so the min is the program's cost and the median what
a busy machine sees.

Maglev (best of several): 10 backends (baseline) vs 1000, numpy and plain loop.
Target < 50 ms.

Run as root: .venv/bin/python bench/xdp_cost.py [--repeat N] [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address, ip_address
from pathlib import Path

from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.layout import (
    BACKEND_F_VALID,
    CFG_F_FLOW_EVENTS,
    FAMILY_V4,
    BackendInfo,
    FlowEvent,
    LbConfig,
    ServiceInfo,
    VipAddr,
    VipKey,
    addr_to_words,
    mac_to_bytes,
)
from halb.dataplane.xdp.loader import BpfObject
from halb.dataplane.xdp.ringbuf import RingBuffer
from halb.lb import maglev
from halb.lb.maglev import build_table
from halb.testing.packets import ETH_P_IP, XDP_PASS, XDP_TX, eth, ipv4, tcp

VIP = "10.0.0.100"
CLIENT = "192.0.2.7"
RING = 65537
EVENT_SIZE = ctypes.sizeof(FlowEvent)


def net16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def frame(sport: int, dst: str = VIP) -> bytes:
    return eth(
        "02:00:00:00:00:01",
        "02:00:00:00:00:02",
        ETH_P_IP,
        ipv4(CLIENT, dst, 6, tcp(CLIENT, dst, sport, 80, payload=b"x" * 18)),
    )


def setup(obj: BpfObject, backends: int = 10, events: bool = False) -> None:
    maps = obj.maps
    # Armed, as on an active node (disarmed, the program skips the clock read).
    armed = time.monotonic_ns() + 3600 * 10**9
    cfg = LbConfig(deadline_ns=armed, local_mac=tuple(mac_to_bytes("02:00:00:00:00:01")))
    cfg.flags = CFG_F_FLOW_EVENTS if events else 0
    maps["config"].update(0, cfg)
    for i in range(backends):
        info = BackendInfo(
            addr=addr_to_words(IPv4Address(f"10.0.1.{i + 1}")),
            mac=tuple(mac_to_bytes(f"02:00:00:00:01:{i:02x}")),
            port=80,
            family=FAMILY_V4,
            flags=BACKEND_F_VALID,
            service=0,
        )
        maps["backends"].update(i, info)
    table = build_table({f"10.0.1.{i + 1}:80": 1 for i in range(backends)}, RING)
    maps["ring"].update_batch(list(range(RING)), list(table.slots))
    vip = ip_address(VIP)
    maps["vip_addrs"].update(VipAddr(addr_to_words(vip), FAMILY_V4), 1)
    maps["vip_filter"].update(vip.packed[-1], 1)
    key = VipKey(addr_to_words(vip), net16(80), 6, FAMILY_V4)
    maps["services"].update(key, ServiceInfo(0, RING, 0))


def per_packet_single(obj: BpfObject, prog: str, frames: list[bytes], verdict: int) -> float:
    """Mean kernel-timed ns of single runs (repeat=1), one frame each."""
    total = 0
    for f in frames:
        res = obj.test_run(prog, f, 1)
        assert res.retval == verdict, res.retval
        total += res.duration_ns
    return total / len(frames)


def per_packet_loop(obj: BpfObject, prog: str, f: bytes, repeat: int, verdict: int) -> float:
    res = obj.test_run(prog, f, repeat)
    assert res.retval == verdict, res.retval
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


# name -> (-D defines, what it shows); the stages nest, each adds to the one before.
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "stage1": (("HALB_BENCH_STOP=1",), "parse Ethernet/IP/ports + VIP filter (array)"),
    "stage2": (("HALB_BENCH_STOP=2",), "+ flows LRU lookup (40-byte key) + backend entry"),
    "stage3": (("HALB_BENCH_STOP=3",), "+ config entry + dead-man clock (coarse, armed)"),
    "stage4": (("HALB_BENCH_STOP=4",), "+ service and backend per-CPU counters"),
    "full": ((), "+ MAC rewrite, XDP_TX (the real program)"),
    "no_deadline": (("HALB_BENCH_NO_DEADLINE=1",), "full without the dead-man check"),
    "no_counters": (("HALB_BENCH_NO_COUNTERS=1",), "full without the two counters"),
    "svc_lookup": (("HALB_BENCH_SERVICE_LOOKUP=1",), "full + services lookup per packet"),
    "fine_clock": (("HALB_BENCH_FINE_CLOCK=1",), "full with bpf_ktime_get_ns"),
    "previous": (
        ("HALB_BENCH_SERVICE_LOOKUP=1", "HALB_BENCH_FINE_CLOCK=1"),
        "both: the lookups and clock of the previous program",
    ),
    "v4key_stage2": (
        ("HALB_BENCH_V4_KEY=1", "HALB_BENCH_STOP=2"),
        "stage2 with a 16-byte IPv4 flow key",
    ),
    "v4key": (("HALB_BENCH_V4_KEY=1",), "full with a 16-byte IPv4 flow key"),
}


class Rounds:
    """Interleaved measurements: each round runs every case once."""

    def __init__(self) -> None:
        self.cases: dict[str, Callable[[], float]] = {}
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, fn: Callable[[], float]) -> None:
        self.cases[name] = fn
        self.values[name] = []

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for name, fn in self.cases.items():
                self.values[name].append(fn())

    def min(self, name: str) -> float:
        return min(self.values[name])

    def med(self, name: str) -> float:
        return statistics.median(self.values[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200_000, help="test-run loop repeats")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--singles", type=int, default=20_000, help="single runs per path")
    ap.add_argument(
        "--miss-repeat", type=int, default=50_000, help="miss variants' loop repeats (<= 75k)"
    )
    args = ap.parse_args()

    balancer = BpfObject(build_bpf())
    minimal = BpfObject(build_bpf(source="minimal.bpf.c"))
    evented = BpfObject(build_bpf())  # the real program, flow events armed
    variants: dict[str, BpfObject] = {}
    miss_objs: dict[str, BpfObject] = {}
    rings: list[RingBuffer] = []
    hit, other = frame(40000), frame(40000, dst="10.0.0.99")
    other_end = frame(40000, dst="10.0.1.100")  # same last byte as the VIP
    loops, singles = Rounds(), Rounds()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (defines, _) in VARIANTS.items():
                obj = BpfObject(build_bpf(Path(tmp), defines=defines, force=True))
                variants[name] = obj
                setup(obj)
                obj.test_run("halb_balancer", hit)  # record the flow
            # The miss path in a loop: off, on (ring drained first), on with a full ring.
            for name in ("miss_off", "miss_event", "miss_full"):
                obj = BpfObject(
                    build_bpf(Path(tmp), defines=("HALB_BENCH_ALWAYS_MISS=1",), force=True)
                )
                miss_objs[name] = obj
                setup(obj, events=name != "miss_off")
        setup(balancer)
        setup(evented, events=True)
        balancer.test_run("halb_balancer", hit)
        rep = args.repeat
        ring = RingBuffer(miss_objs["miss_event"].ring_fds["flow_events"], EVENT_SIZE)
        rings.append(ring)
        full = miss_objs["miss_full"]
        full.test_run("halb_balancer", hit, 200_000)  # more records than the ring holds
        for name, obj in miss_objs.items():

            def miss(obj: BpfObject = obj, name: str = name) -> float:
                if name == "miss_event":
                    ring.consume()  # off the clock: the consumer keeps up
                return per_packet_loop(obj, "halb_balancer", hit, args.miss_repeat, XDP_TX)

            loops.add(name, miss)
        loops.add("minimal", lambda: per_packet_loop(minimal, "halb_minimal", hit, rep, XDP_TX))
        loops.add("hit", lambda: per_packet_loop(balancer, "halb_balancer", hit, rep, XDP_TX))
        loops.add(
            "non_vip", lambda: per_packet_loop(balancer, "halb_balancer", other, rep, XDP_PASS)
        )
        loops.add(
            "non_vip_end",
            lambda: per_packet_loop(balancer, "halb_balancer", other_end, rep, XDP_PASS),
        )
        for name, obj in variants.items():
            loops.add(
                name,
                lambda obj=obj: per_packet_loop(obj, "halb_balancer", hit, rep, XDP_TX),  # type: ignore[misc]
            )
        loops.run(args.rounds)

        n = max(1, args.singles // 5)
        sport = iter(range(1, 1 << 16))
        singles.add(
            "minimal", lambda: per_packet_single(minimal, "halb_minimal", [hit] * n, XDP_TX)
        )
        singles.add("hit", lambda: per_packet_single(balancer, "halb_balancer", [hit] * n, XDP_TX))
        singles.add(
            "miss",
            lambda: per_packet_single(
                balancer, "halb_balancer", [frame(next(sport)) for _ in range(n)], XDP_TX
            ),
        )
        ev_ring = RingBuffer(evented.ring_fds["flow_events"], EVENT_SIZE)
        rings.append(ev_ring)

        def miss_event() -> float:
            ev_ring.consume()
            return per_packet_single(
                evented, "halb_balancer", [frame(next(sport)) for _ in range(n)], XDP_TX
            )

        singles.add("miss_event", miss_event)
        singles.run(5)
        lost = sum(c.packets for c in full.maps["stats_global"].lookup(5) or [])
        assert lost > 0, "the full-ring variant never failed an output"
    finally:
        for r in rings:
            r.close()
        balancer.close()
        minimal.close()
        evented.close()
        for obj in (*variants.values(), *miss_objs.values()):
            obj.close()

    floor = loops.min("minimal")

    def line(label: str, name: str, base: float | None = None) -> str:
        lo, md = loops.min(name), loops.med(name)
        extra = f"  +{lo - base:5.1f} ns" if base is not None else ""
        return f"  {label:<56} {lo:5.1f} / {md:5.1f} ns {lo / floor:5.2f}x minimal{extra}"

    print(
        f"per packet, BPF_PROG_TEST_RUN loop (repeat={args.repeat}, min / median of {args.rounds}):"
    )
    print(line("minimal XDP_TX", "minimal"))
    print(line("flow hit", "hit"))
    print(line("non-VIP packet (passed by the VIP filter)", "non_vip"))
    print(line("non-VIP, last byte as a VIP's (flows + services miss)", "non_vip_end"))
    print("flow hit, where the time goes (cumulative stages, min of rounds; +: over previous):")
    prev = floor
    for name in ("stage1", "stage2", "stage3", "stage4", "full"):
        print(line(VARIANTS[name][1], name, prev))
        prev = loops.min(name)
    full = loops.min("full")
    print("flow hit, parts left out or done otherwise (+: over the real program; the stages")
    print("above overlap in the CPU, so leaving one out saves less than its stage adds):")
    for name in ("no_deadline", "no_counters", "svc_lookup", "fine_clock", "previous", "v4key"):
        print(line(VARIANTS[name][1], name, full))
    print(line(VARIANTS["v4key_stage2"][1], "v4key_stage2", loops.min("stage2")))
    print(
        f"  floor: minimal {floor:.1f} ns + one hash-map lookup "
        f"{loops.min('stage2') - loops.min('stage1'):.1f} ns already exceed 2x minimal "
        f"({2 * floor:.1f} ns)"
    )
    off = loops.min("miss_off")
    print(f"miss path with and without the flow event (every packet a miss, repeat="
          f"{args.miss_repeat}; +: over events off):")  # fmt: skip
    print(line("miss, events off (a standby; the previous program)", "miss_off"))
    print(line("miss, event written (ring drained before each round)", "miss_event", off))
    print(line("miss, ring full (output fails, event_lost counted)", "miss_full", off))
    med = singles.med
    print(f"per packet, single runs (kernel-timed, {n * 5} each, median of 5 means):")
    print(f"  minimal XDP_TX   {med('minimal'):7.1f} ns")
    print(f"  flow hit         {med('hit'):7.1f} ns   {med('hit') / med('minimal'):.2f}x minimal")
    print(f"  flow miss        {med('miss'):7.1f} ns   {med('miss') / med('minimal'):.2f}x minimal")
    print(f"  flow miss+event  {med('miss_event'):7.1f} ns   +{med('miss_event') - med('miss'):.1f}"
          f" ns over the miss without (new flows, events armed)")  # fmt: skip
    print("  target: flow hit <= 2x minimal")

    base = maglev_ms(10, RING)
    big = maglev_ms(1000, RING)
    big_m = maglev_ms(1000, 100003)
    saved = maglev.VECTOR_MIN
    maglev.VECTOR_MIN = 1 << 30  # the plain loop, for comparison
    try:
        plain = maglev_ms(1000, RING, rounds=3)
    finally:
        maglev.VECTOR_MIN = saved
    print(f"maglev ring build (best of 5; numpy from {maglev.VECTOR_MIN} backends):")
    print(f"  10 backends,   M=65537   {base:7.1f} ms (baseline, plain loop)")
    print(f"  1000 backends, M=65537   {big:7.1f} ms  {big / base:.2f}x baseline")
    print(f"  1000 backends, M=100003  {big_m:7.1f} ms  {big_m / base:.2f}x baseline (M > 100 N)")
    print(f"  1000 backends, M=65537   {plain:7.1f} ms  plain loop, for comparison")
    print(f"  python loop iteration    {python_loop_ns():7.1f} ns (machine speed reference)")
    print("  target: < 50 ms for 1000 backends")


if __name__ == "__main__":
    main()
