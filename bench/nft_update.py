"""A backend change on real-size Maglev rings: in-place nft update beside a full reload.

One namespace holds halb's table with three services of 65537-slot rings (10 backends
each). In one run:

1. full: what every change cost before in-place updates (read the counters with `nft
   list counters`, render the whole table, load it with `nft -f`), and what a layout
   change costs now (NftDataplane.apply adding / removing a service: the counters
   are read with a netlink dump instead);
2. in place: NftDataplane.apply of a backend change on one service (a backend down,
   the same backend back, an 11th backend added, removed again), which rewrites only
   the changed slots, chains, counters and elements in one libnftables transaction.
   A backend going down or its weight changing moves only ring slots; an added or
   removed backend also creates or deletes its counter and its counter-map and
   backend-set elements. Either goes to the kernel as one raw nf_tables batch.
   Each change is timed the first time (the Maglev table is built) and repeated (a
   flapping backend's tables are cached), beside the Maglev build alone.

Prints each in-place time beside the full reload, and their ratio.
Target: a backend change at or under 50 ms. Root only; the namespace (halbn-bench-*)
is removed at the end.

    .venv/bin/python bench/nft_update.py [--ring 65537] [--backends 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid
from ipaddress import IPv4Address

from halb.dataplane.nft import nftcmd, ruleset
from halb.dataplane.nft.adapter import NftDataplane
from halb.model import Backend, Forwarding, Protocol, Scheduler, Service, ServiceKey


def services(ring: int, n: int, change: int = 0) -> list[Service]:
    """Three Maglev services; ``change`` alters the first one's backends: 1 = the
    first backend down, 2 = an extra backend, 0 = as built."""
    out = []
    for k in range(3):
        key = ServiceKey(IPv4Address(f"10.97.0.{100 + k}"), 80, Protocol.TCP)
        bs = [Backend(IPv4Address(f"10.97.{1 + k}.{10 + i}"), 8080) for i in range(n)]
        if k == 0 and change == 1:
            bs[0] = Backend(bs[0].address, bs[0].port, weight=0)
        if k == 0 and change == 2:
            bs.append(Backend(IPv4Address(f"10.97.1.{10 + n}"), 8080))
        out.append(Service(key, Scheduler.MAGLEV, Forwarding.NAT, tuple(bs), ring))
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ring", type=int, default=65537, help="Maglev ring size (a prime)")
    p.add_argument("--backends", type=int, default=10, help="backends per service")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four changes")
    a = p.parse_args()
    ns = f"halbn-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    dp = NftDataplane(netns=ns)
    try:
        base = services(a.ring, a.backends)
        dp.apply(base)
        full: list[float] = []
        for _ in range(a.rounds):
            t0 = time.monotonic()
            carry = nftcmd.list_counters(ns)
            script = ruleset.render(base, None, carry).script
            nftcmd.load(ns, script)
            full.append(time.monotonic() - t0)
        # A layout change still loads the table whole (a service added or removed).
        extra = Service(
            ServiceKey(IPv4Address("10.97.0.99"), 53, Protocol.UDP),
            Scheduler.RR,
            Forwarding.NAT,
            (Backend(IPv4Address("10.97.9.1"), 53),),
        )
        layout: list[float] = []
        for svcs in ([*base, extra], base) * a.rounds:
            t0 = time.monotonic()
            dp.apply(svcs)
            layout.append(time.monotonic() - t0)
        # The adapter still holds its own view of the (identical) table.
        steps = (1, 0, 2, 0)  # down, back, added, removed
        timed: dict[tuple[int, bool], list[float]] = {}
        build: list[float] = []
        for rnd in range(a.rounds):
            for change in steps:
                svcs = services(a.ring, a.backends, change)
                first = rnd == 0
                if first:
                    # A table never seen: build it (kept for the following rounds, as a
                    # flapping backend's tables are).
                    ruleset._maglev.cache_clear()
                    t0 = time.monotonic()
                    ruleset.service_parts(svcs[0])
                    build.append(time.monotonic() - t0)
                    ruleset._maglev.cache_clear()
                t0 = time.monotonic()
                r = dp.apply(svcs)
                timed.setdefault((change, first), []).append(time.monotonic() - t0)
                assert r.writes == 1 and len(r.updated) == 1, r
        med_full = statistics.median(full)
        print(f"ring {a.ring} slots x 3 services, {a.backends} backends each")
        print(f"full reload as before (nft list counters, render, nft -f): median {ms(med_full)}")
        print(f"full reload now, a layout change (counter dump, render, nft -f): median "
              f"{ms(statistics.median(layout))}")  # fmt: skip
        print(f"Maglev table build alone (first time): median {ms(statistics.median(build))}")
        names = {1: "backend down (ring only)", 0: "backend back / removed", 2: "backend added"}
        for change in (1, 0, 2):
            fresh = timed[(change, True)]
            again = timed.get((change, False), [])
            line = f"{names[change]:28s} first {ms(statistics.median(fresh))}"
            if again:
                line += f", repeated (cached table) median {ms(statistics.median(again))}"
                line += f" worst {ms(max(again))}"
            print(line)
        for label, times in (
            ("first (table built)", timed[(1, True)]),
            ("repeated (table cached)", timed.get((1, False), [])),
        ):
            if not times:
                continue
            med = statistics.median(times)
            verdict = "met" if med <= 0.050 else "NOT met"
            print(
                f"backend down, {label}: ratio to the full reload {med / med_full:.4f} "
                f"({med_full / med:.0f}x faster); target <= 50 ms {verdict}"
            )
    finally:
        dp.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
