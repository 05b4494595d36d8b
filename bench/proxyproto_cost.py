"""PROXY protocol TC programs: cost per packet of the insertion and of the adjusted
paths, beside the same programs with the flow absent (what every packet of a service
without PROXY pays: parse + one hash-map miss), in one run.

Loop figures (BPF_PROG_TEST_RUN repeat loop on one skb, min / median ns over
interleaved rounds):
  floor          a TC program that only returns TC_ACT_OK
  egress absent  client -> backend segment, no entry
  egress shift   data segment of a flow past its header: seq += offset
  ingress absent backend -> client segment, no entry
  ingress ack    ack -= offset
  ingress sack   ack and 3 SACK blocks (6 edges), one checksum diff
The loop re-runs the program on the same skb, so the adjusted paths keep shifting
(every run is a real rewrite); an insertion cannot be looped (the skb would grow), so
insertions are single runs (repeat=1, kernel-timed, the run's own overhead included)
with the entry reset between runs, beside single runs of the absent and shift paths.

Run as root: .venv/bin/python bench/proxyproto_cost.py [--repeat N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path

from halb.dataplane.proxyproto.layout import PpState
from halb.dataplane.proxyproto.program import EGRESS, INGRESS, ProxyFlow, ProxyProgram
from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.loader import BpfObject
from halb.proxy.codec import ProxyHeader, build_v1, build_v2
from halb.testing.packets import TCP_ACK, TCP_PSH
from halb.testing.tcpframes import frame, sack_option

LOCAL, BACKEND, LPORT, BPORT = "10.1.0.1", "10.2.0.21", 40001, 8080
OTHER_PORT = 40002  # a flow with no entry
ISN_NEXT = 1_000_001
TS = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps, as Linux sends
FLOOR_C = '#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\nSEC("tc") int halb_floor(struct __sk_buff *skb) { return 0; }\nchar _license[] SEC("license") = "GPL";\n'  # noqa: E501


def header(version: int) -> bytes:
    h = ProxyHeader(
        version=version,
        source=(ip_address("192.0.2.7"), 51000),
        destination=(ip_address("10.0.0.100"), 80),
    )
    return build_v1(h) if version == 1 else build_v2(h)


def to_backend(seq: int, payload: bytes = b"", lport: int = LPORT) -> bytes:
    flags = TCP_ACK | (TCP_PSH if payload else 0)
    return frame(
        LOCAL, BACKEND, lport, BPORT, seq=seq, ack=5, flags=flags, payload=payload, options=TS
    )


def to_client(ack: int, options: bytes = TS, lport: int = LPORT) -> bytes:
    return frame(BACKEND, LOCAL, BPORT, lport, seq=5, ack=ack, flags=TCP_ACK, options=options)


class Rounds:
    """Interleaved rounds: each measurement once per round, min and median kept."""

    def __init__(self) -> None:
        self.fns: dict[str, Callable[[], float]] = {}
        self.samples: dict[str, list[float]] = {}

    def add(self, name: str, fn: Callable[[], float]) -> None:
        self.fns[name] = fn
        self.samples[name] = []

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for name, fn in self.fns.items():
                self.samples[name].append(fn())

    def line(self, name: str, base: str | None) -> str:
        s = self.samples[name]
        lo, med = min(s), statistics.median(s)
        extra = ""
        if base is not None:
            extra = f"   +{lo - min(self.samples[base]):.0f} ns over {base}"
        return f"  {name:<26} {lo:7.0f} / {med:7.0f} ns{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200_000, help="test-run loop repeats")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--singles", type=int, default=3000, help="single runs per path")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="halbp-bench-") as tmp:
        (Path(tmp) / "floor.bpf.c").write_text(FLOOR_C)
        floor = BpfObject(build_bpf(Path(tmp), source="floor.bpf.c", bpf_dir=Path(tmp)), {})
    prog = ProxyProgram()
    try:
        hdr = header(1)
        off = len(hdr)
        flow = ProxyFlow(
            ip_address(LOCAL), LPORT, ip_address(BACKEND), BPORT, hdr, ISN_NEXT, PpState.ACKED
        )
        prog.put_flow(flow)
        data = bytes(1000)
        n = args.repeat
        # adjusted paths keep adjusting for the whole loop: acks and edges start high
        high = ISN_NEXT + off * (n * args.rounds + 1000)
        sacks = sack_option(*[(high + 100 * i, high + 100 * i + 50) for i in range(3)])
        frames = {
            "floor": (floor, "halb_floor", to_backend(ISN_NEXT + 10, data)),
            "egress absent": (prog.obj, EGRESS, to_backend(ISN_NEXT + 10, data, OTHER_PORT)),
            "egress shift": (prog.obj, EGRESS, to_backend(ISN_NEXT + 10, data)),
            "ingress absent": (prog.obj, INGRESS, to_client(high, lport=OTHER_PORT)),
            "ingress ack": (prog.obj, INGRESS, to_client(high)),
            "ingress sack": (prog.obj, INGRESS, to_client(high, TS + sacks)),
        }
        loop = Rounds()
        for name, (obj, p, raw) in frames.items():

            def one(obj: BpfObject = obj, p: str = p, raw: bytes = raw) -> float:
                res = obj.test_run(p, raw, repeat=n)
                assert res.retval == 0
                return float(res.duration_ns)

            loop.add(name, one)
        loop.run(args.rounds)
        stats = prog.stats()
        assert stats["error"] == 0, stats
        assert stats["seq_adjusted"] >= n * args.rounds, stats
        assert stats["sack_adjusted"] >= 3 * n * args.rounds, stats

        # single runs: insertions (entry reset to PENDING before each) beside the others
        pending = {
            v: ProxyFlow(
                ip_address(LOCAL),
                LPORT,
                ip_address(BACKEND),
                BPORT,
                header(v),
                ISN_NEXT,
                PpState.PENDING,
            )
            for v in (1, 2)
        }
        singles = Rounds()
        first_data = bytes(500)

        def insert(version: int, payload: bytes) -> Callable[[], float]:
            raw = to_backend(ISN_NEXT, payload)

            def one() -> float:
                prog.put_flow(pending[version])
                res = prog.test_run(EGRESS, raw)
                assert res.retval == 0 and len(res.data) == len(raw) + len(header(version))
                return float(res.duration_ns)

            return one

        def plain(name: str, raw: bytes) -> Callable[[], float]:
            def one() -> float:
                prog.put_flow(flow)
                return float(prog.test_run(EGRESS, raw).duration_ns)

            return one

        singles.add("absent (pure ACK)", plain("absent", to_backend(ISN_NEXT, b"", OTHER_PORT)))
        singles.add("insert v1 on pure ACK", insert(1, b""))
        singles.add("insert v2 on pure ACK", insert(2, b""))
        singles.add("insert v1 before data", insert(1, first_data))
        singles.add("shift (data)", plain("shift", to_backend(ISN_NEXT + 10, data)))
        singles.run(args.singles)
    finally:
        prog.close()
        floor.close()

    print(f"PROXY protocol TC programs, loop of {n} repeats, {args.rounds} rounds (min / median):")
    print(loop.line("floor", None))
    for name, base in (
        ("egress absent", "floor"),
        ("egress shift", "egress absent"),
        ("ingress absent", "floor"),
        ("ingress ack", "ingress absent"),
        ("ingress sack", "ingress absent"),
    ):
        print(loop.line(name, base))
    print(f"single runs (repeat=1, kernel-timed incl. the run's overhead), {args.singles} each:")
    print(singles.line("absent (pure ACK)", None))
    for name in (
        "insert v1 on pure ACK",
        "insert v2 on pure ACK",
        "insert v1 before data",
        "shift (data)",
    ):
        print(singles.line(name, "absent (pure ACK)"))


if __name__ == "__main__":
    main()
