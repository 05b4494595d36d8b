"""Which lab nodes hold the VIP address, sampled through a fault (etcd-outage): the
"VIP on exactly one node throughout" check. ``spans`` is the pure summary."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["VipHolders", "spans"]


def spans(
    samples: Sequence[tuple[float, frozenset[str]]], start: float, end: float
) -> dict[str, Any]:
    """Seconds (between ``start`` and ``end``) the VIP was on no node, on one (and
    which), on several; each sample holds until the next."""
    none = several = 0.0
    one: dict[str, float] = {}
    inside = [(t, h) for t, h in samples if start <= t <= end]
    ends = [t for t, _ in inside[1:]] + [end] if inside else []
    for (t, holders), nxt_t in zip(inside, ends, strict=True):
        d = max(0.0, nxt_t - t)
        if not holders:
            none += d
        elif len(holders) > 1:
            several += d
        else:
            (n,) = holders
            one[n] = one.get(n, 0.0) + d
    return {
        "samples": len(inside),
        "none_s": round(none, 3),
        "several_s": round(several, 3),
        "one_s": {n: round(v, 3) for n, v in sorted(one.items())},
        "exactly_one_throughout": bool(inside) and none == 0 and several == 0 and len(one) == 1,
    }


class VipHolders:
    """Samples every ``every`` seconds, in a thread, which namespaces hold ``vip``."""

    def __init__(self, nodes: dict[str, str], vip: str, every: float = 0.1) -> None:
        self.nodes = nodes  # node name -> its namespace
        self.vip = vip
        self.every = every
        self.samples: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="vip-holders", daemon=True)

    @classmethod
    def for_lab(cls, lab: dict[str, Any], vip: str) -> VipHolders:
        return cls({n["name"]: n["namespace"] for n in lab["nodes"]}, vip)

    def _holds(self, ns: str) -> bool:
        r = subprocess.run(
            ["ip", "-n", ns, "-o", "addr", "show", "to", self.vip],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
        return bool(r.stdout.strip())

    def _main(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            held = frozenset(n for n, ns in self.nodes.items() if self._holds(ns))
            self.samples.append((t, held))
            self._stop.wait(self.every)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
