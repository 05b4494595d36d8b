"""XDP balancer cost per packet, and Maglev ring build time, each beside a baseline.

Per packet (BPF_PROG_TEST_RUN, same run, same machine):
  minimal   a program that only returns XDP_TX (the floor of the test-run loop)
  floor     minimal + one lookup in the flows map (bench/bpf/floor.bpf.c): the floor
            of any program that must look its flow up
  flow hit  balancer, the 5-tuple is in the flow table (the steady state)
  flow miss balancer, a new 5-tuple each packet: ring lookup + flow insert
  non-VIP   balancer, a packet for another address (passed to the stack)
  baseline  the balancer built from another revision's sources (--baseline, default
            main), the same hit
Target (issue 19): flow hit <= 1.2x floor.

Flow-creation events (flow_events ring buffer, armed by lb_config.flags on the active):
the miss path with and without the event. Loop figures from a throw-away build whose
every packet takes the miss path (-DHALB_BENCH_ALWAYS_MISS: ring slot + flow re-recorded
+ event), with the ring drained before each round, and once more with the ring full
(the output fails and counts event_lost: what an active whose consumer fell behind
pays); single runs of real new flows with the event off and on.

Breakdown of the flow hit: bench/bpf/variants.bpf.c, the production entry composed again
from the same steps (halb/dataplane/xdp/bpf/balancer.h) with -D switches (listed there)
that stop after stage n, leave a part out or do it otherwise; built without any switch
it must behave exactly as the production program, checked on every run. Expiry
bookkeeping on the hit (the expiry test + the last-seen stamp, written once per tick)
is measured against builds without it, without the stamp, and with the stamp written
on every packet; the clock (jiffies) against bpf_ktime_get_ns and bpf_ktime_get_coarse_ns.

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
import subprocess
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
    FlowKey,
    FlowValue,
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
from halb.testing.packets import (
    ETH_P_IP,
    TCP_ACK,
    XDP_PASS,
    XDP_TX,
    eth,
    icmp_too_big,
    ipv4,
    tcp,
)

VIP = "10.0.0.100"
CLIENT = "192.0.2.7"
RING = 65537
BENCH_BPF = Path(__file__).resolve().parent / "bpf"
REPO = Path(__file__).resolve().parents[1]
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


# name -> (-D switches of bench/bpf/variants.bpf.c, what it shows); the stages nest.
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "stage1": (("HALB_BENCH_STOP=1",), "parse Ethernet/IP/ports + VIP filter (array)"),
    "stage2": (
        ("HALB_BENCH_STOP=2",),
        "+ config, clock, flows LRU lookup, expiry test, backend entry",
    ),
    "stage3": (("HALB_BENCH_STOP=3",), "+ dead-man check (armed) + last-seen stamp"),
    "stage4": (("HALB_BENCH_STOP=4",), "+ service and backend per-CPU counters"),
    "full": ((), "+ MAC rewrite, XDP_TX (the overlay, no switch)"),
    "no_deadline": (("HALB_BENCH_NO_DEADLINE=1",), "full without the dead-man check"),
    "no_counters": (("HALB_BENCH_NO_COUNTERS=1",), "full without the two counters"),
    "backend_counter": (
        ("HALB_BENCH_BACKEND_COUNTER_ONLY=1",),
        "full with the backend counter only",
    ),
    "no_expiry": (("HALB_BENCH_NO_EXPIRY=1",), "full without expiry test and stamp"),
    "no_touch": (("HALB_BENCH_NO_TOUCH=1",), "full with the expiry test, no stamp"),
    "always_touch": (("HALB_BENCH_ALWAYS_TOUCH=1",), "full, stamp written every packet"),
    "svc_lookup": (("HALB_BENCH_SERVICE_LOOKUP=1",), "full + services lookup per packet"),
    "fine_clock": (("HALB_BENCH_FINE_CLOCK=1",), "full with bpf_ktime_get_ns"),
    "coarse_clock": (("HALB_BENCH_COARSE_CLOCK=1",), "full with bpf_ktime_get_coarse_ns"),
    "previous": (
        ("HALB_BENCH_SERVICE_LOOKUP=1", "HALB_BENCH_FINE_CLOCK=1"),
        "both: the lookups and clock of an older program",
    ),
    "v4key_stage2": (
        ("HALB_BENCH_V4_KEY=1", "HALB_BENCH_STOP=2"),
        "stage2 with a 16-byte IPv4 flow key",
    ),
    "v4key": (("HALB_BENCH_V4_KEY=1",), "full with a 16-byte IPv4 flow key"),
    "no_common_lru": (("HALB_BENCH_NO_COMMON_LRU=1",), "full, flows with BPF_F_NO_COMMON_LRU"),
}


def build_variant(out: Path, defines: tuple[str, ...]) -> Path:
    return build_bpf(out, source=BENCH_BPF / "variants.bpf.c", defines=defines, force=True)


def build_baseline(rev: str, out: Path) -> Path | None:
    """The production program of another revision (its own sources and headers), or
    None when the revision is unknown here."""
    tree = out / f"baseline-{rev.replace('/', '_')}"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "halb/dataplane/xdp/bpf"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        print(f"baseline {rev}: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    src = tree / "halb/dataplane/xdp/bpf/balancer.bpf.c"
    # Quoted includes are found beside the source first: the revision's own headers.
    return build_bpf(out, source=src, force=True)


def same_behaviour(a: BpfObject, b: BpfObject, frames: list[bytes]) -> None:
    """The overlay built without switches must do what the production program does."""
    for f in frames:
        ra, rb = a.test_run("halb_balancer", f), b.test_run("halb_balancer", f)
        if (ra.retval, ra.data) != (rb.retval, rb.data):
            raise SystemExit(
                "bench/bpf/variants.bpf.c no longer matches the production program "
                f"(verdict {rb.retval} vs {ra.retval}): update it from balancer.bpf.c"
            )


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
        "--miss-repeat", type=int, default=50_000, help="miss variants' loop repeats (<= 65k)"
    )
    ap.add_argument(
        "--baseline", default="main", help="git revision whose program runs beside ('': none)"
    )
    args = ap.parse_args()

    balancer = BpfObject(build_bpf())
    minimal = BpfObject(build_bpf(source="minimal.bpf.c"))
    evented = BpfObject(build_bpf())  # the real program, flow events armed
    variants: dict[str, BpfObject] = {}
    miss_objs: dict[str, BpfObject] = {}
    extra: dict[str, BpfObject] = {}  # floor, baseline
    rings: list[RingBuffer] = []
    hit, other = frame(40000), frame(40000, dst="10.0.0.99")
    other_end = frame(40000, dst="10.0.1.100")  # same last byte as the VIP
    loops, singles = Rounds(), Rounds()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            for name, (defines, _) in VARIANTS.items():
                obj = BpfObject(build_variant(out, defines))
                variants[name] = obj
                setup(obj)
                obj.test_run("halb_balancer", hit)  # record the flow
            # The miss path in a loop: off, on (ring drained first), on with a full ring.
            for name in ("miss_off", "miss_event", "miss_full", "miss_nc"):
                defines: tuple[str, ...] = ("HALB_BENCH_ALWAYS_MISS=1",)
                if name == "miss_nc":
                    defines += ("HALB_BENCH_NO_COMMON_LRU=1",)
                obj = BpfObject(build_variant(out, defines))
                miss_objs[name] = obj
                setup(obj, events=name in ("miss_event", "miss_full"))
            floor = BpfObject(build_bpf(out, source=BENCH_BPF / "floor.bpf.c", force=True))
            extra["floor"] = floor
            # The hit's own flow key, as the balancer records it (its program fills it).
            floor_key = FlowKey(
                src=(int.from_bytes(hit[26:30], "little"), 0, 0, 0),
                dst=(int.from_bytes(hit[30:34], "little"), 0, 0, 0),
                sport=int.from_bytes(hit[34:36], "little"),
                dport=int.from_bytes(hit[36:38], "little"),
                proto=6,
                family=FAMILY_V4,
            )
            floor.maps["flows"].update(floor_key, FlowValue(1))
            if args.baseline:
                path = build_baseline(args.baseline, out)
                if path is not None:
                    extra["baseline"] = BpfObject(path)
                    setup(extra["baseline"])
                    extra["baseline"].test_run("halb_balancer", hit)
        setup(balancer)
        setup(evented, events=True)
        balancer.test_run("halb_balancer", hit)
        recorded = [bytes(k) for k, _ in balancer.maps["flows"].items()]
        assert recorded == [bytes(floor_key)], "the floor looks up another key than the hit"
        probe = [
            frame(40001),
            frame(40001),
            frame(40002, dst="10.0.0.99"),
            frame(40003, dst="10.0.1.100"),
            eth(
                "02:00:00:00:00:01",
                "02:00:00:00:00:02",
                ETH_P_IP,
                icmp_too_big(
                    "198.51.100.1",
                    VIP,
                    ipv4(VIP, CLIENT, 6, tcp(VIP, CLIENT, 80, 40001, flags=TCP_ACK)),
                ),
            ),
        ]
        same_behaviour(variants["full"], balancer, probe)
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
        loops.add("floor", lambda: per_packet_loop(floor, "halb_floor", hit, rep, XDP_TX))
        loops.add("hit", lambda: per_packet_loop(balancer, "halb_balancer", hit, rep, XDP_TX))
        if "baseline" in extra:
            base_obj = extra["baseline"]
            loops.add(
                "baseline", lambda: per_packet_loop(base_obj, "halb_balancer", hit, rep, XDP_TX)
            )
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
        for obj in (*variants.values(), *miss_objs.values(), *extra.values()):
            obj.close()

    floor_ns = loops.min("minimal")
    lookup_floor = loops.min("floor")

    def line(label: str, name: str, base: float | None = None) -> str:
        lo, md = loops.min(name), loops.med(name)
        extra = f"  +{lo - base:5.1f} ns" if base is not None else ""
        return (
            f"  {label:<58} {lo:5.1f} / {md:5.1f} ns {lo / floor_ns:5.2f}x minimal "
            f"{lo / lookup_floor:5.2f}x floor{extra}"
        )

    print(
        f"per packet, BPF_PROG_TEST_RUN loop (repeat={args.repeat}, min / median of {args.rounds}):"
    )
    print(line("minimal XDP_TX", "minimal"))
    print(line("floor: minimal + one flows lookup", "floor"))
    print(line("flow hit", "hit"))
    if "baseline" in extra:
        print(line(f"flow hit, the program of {args.baseline}", "baseline"))
    print(line("non-VIP packet (passed by the VIP filter)", "non_vip"))
    print(line("non-VIP, last byte as a VIP's (flows + services miss)", "non_vip_end"))
    ratio = loops.min("hit") / lookup_floor
    verdict = "met" if ratio <= 1.2 else "not met"
    print(f"  hit-path ratio to its floor: {ratio:.2f} (target <= 1.2: {verdict})", end="")
    if "baseline" in extra:
        print(f"; {args.baseline}: {loops.min('baseline') / lookup_floor:.2f}")
    else:
        print()
    print("flow hit, where the time goes (cumulative stages, min of rounds; +: over previous):")
    prev = floor_ns
    for name in ("stage1", "stage2", "stage3", "stage4", "full"):
        print(line(VARIANTS[name][1], name, prev))
        prev = loops.min(name)
    full_ns = loops.min("full")
    print("flow hit, parts left out or done otherwise (+: over the overlay's full build; the")
    print("stages above overlap in the CPU, so leaving one out saves less than its stage adds):")
    for name in (
        "no_deadline",
        "no_counters",
        "backend_counter",
        "no_expiry",
        "no_touch",
        "always_touch",
        "svc_lookup",
        "fine_clock",
        "coarse_clock",
        "previous",
        "v4key",
        "no_common_lru",
    ):
        print(line(VARIANTS[name][1], name, full_ns))
    print(line(VARIANTS["v4key_stage2"][1], "v4key_stage2", loops.min("stage2")))
    print(
        f"  expiry bookkeeping on the hit (full - no_expiry): "
        f"{full_ns - loops.min('no_expiry'):+.1f} ns; the stamp alone (full - no_touch): "
        f"{full_ns - loops.min('no_touch'):+.1f} ns; a stamp every packet instead of per "
        f"tick: {loops.min('always_touch') - full_ns:+.1f} ns"
    )
    off = loops.min("miss_off")
    print(f"miss path with and without the flow event (every packet a miss, repeat="
          f"{args.miss_repeat}; +: over events off):")  # fmt: skip
    print(line("miss, events off (a standby)", "miss_off"))
    print(line("miss, event written (ring drained before each round)", "miss_event", off))
    print(line("miss, ring full (output fails, event_lost counted)", "miss_full", off))
    print(line("miss, events off, flows with BPF_F_NO_COMMON_LRU", "miss_nc", off))
    med = singles.med
    print(f"per packet, single runs (kernel-timed, {n * 5} each, median of 5 means):")
    print(f"  minimal XDP_TX   {med('minimal'):7.1f} ns")
    print(f"  flow hit         {med('hit'):7.1f} ns   {med('hit') / med('minimal'):.2f}x minimal")
    print(f"  flow miss        {med('miss'):7.1f} ns   {med('miss') / med('minimal'):.2f}x minimal")
    print(f"  flow miss+event  {med('miss_event'):7.1f} ns   +{med('miss_event') - med('miss'):.1f}"
          f" ns over the miss without (new flows, events armed)")  # fmt: skip

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
