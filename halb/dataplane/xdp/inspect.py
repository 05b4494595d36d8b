"""Read an XDP dataplane's state from its pinned maps (for `halb dataplane show`).

Only reads; works from any process that can open the pins (no adapter state needed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter as Tally
from pathlib import Path
from typing import Any

from halb.dataplane.xdp.layout import (
    BACKEND_F_VALID,
    STATS,
    SVC_F_TUNNEL,
    addr_from_words,
    mac_from_bytes,
)
from halb.dataplane.xdp.loader import BpfMap, open_pinned_maps

__all__ = ["read_pinned"]

_REQUIRED = ("services", "ring", "backends", "flows", "stats_service", "stats_backend", "config")


def _host16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


def _sum(m: BpfMap, index: int) -> tuple[int, int]:
    per_cpu = m.lookup(index) or []
    return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)


def _host(addr: Any) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


def _ring_digest(ring: array[int], names: dict[int, str]) -> str:
    h = hashlib.sha256()
    for bid in ring:
        h.update(names.get(bid, "-").encode() + b"\n")
    return h.hexdigest()[:16]


def read_pinned(pin_dir: Path) -> dict[str, Any]:
    """Services with ring shares per backend, counters, flow count, deadline."""
    maps = open_pinned_maps(pin_dir)
    try:
        missing = [n for n in _REQUIRED if n not in maps]
        if missing:
            raise FileNotFoundError(f"{pin_dir}: no pinned map(s) {', '.join(missing)}")
        stride = maps["ring"].max_entries // maps["stats_service"].max_entries
        services = []
        for key, info in sorted(maps["services"].items(), key=lambda kv: kv[1].index):
            vip = addr_from_words(key.addr, key.family)
            proto = {6: "tcp", 17: "udp"}.get(key.proto, str(key.proto))
            ring = array("I")
            ring.frombytes(maps["ring"].read_array(info.index * stride, info.ring_size))
            slots = Tally(ring)
            backends = []
            names: dict[int, str] = {}
            for bid, n in sorted(slots.items(), key=lambda kv: -kv[1]):
                row = maps["backends"].lookup(bid)
                entry: dict[str, Any] = {"backend": None, "id": None, "mac": None}
                packets = nbytes = 0
                if row is not None:  # NO_BACKEND (out of range) has no row
                    entry["id"] = bid
                    packets, nbytes = _sum(maps["stats_backend"], bid)
                    if row.flags & BACKEND_F_VALID:
                        addr = addr_from_words(row.addr, row.family)
                        entry["backend"] = f"{_host(addr)}:{row.port}"
                        names[bid] = entry["backend"]
                        entry["mac"] = mac_from_bytes(row.mac)
                entry.update(
                    slots=n,
                    share_pct=round(100.0 * n / info.ring_size, 3),
                    packets=packets,
                    bytes=nbytes,
                )
                backends.append(entry)
            packets, nbytes = _sum(maps["stats_service"], info.index)
            services.append(
                {
                    "service": f"{_host(vip)}:{_host16(key.port)}/{proto}",
                    "index": info.index,
                    "forwarding": "tunnel" if info.flags & SVC_F_TUNNEL else "dsr",
                    "ring_size": info.ring_size,
                    # Backend ids differ between nodes; the digest of the slot -> backend
                    # address sequence does not, so rings compare across nodes.
                    "ring_digest": _ring_digest(ring, names),
                    "packets": packets,
                    "bytes": nbytes,
                    "backends": backends,
                }
            )
        flows = sum(1 for _ in maps["flows"].items())
        cfg = maps["config"].lookup(0)
        out: dict[str, Any] = {
            "pin_dir": str(pin_dir),
            "services": services,
            "flows": flows,
            "flows_max": maps["flows"].max_entries,
            "deadline_ns": int(cfg.deadline_ns) if cfg else 0,
            "local_mac": mac_from_bytes(cfg.local_mac) if cfg else None,
            # Idle timeouts the program applies, seconds (0: never expire).
            "flow_timeouts": {
                "tcp_established": cfg.timeout_tcp * cfg.tick_ns / 1e9 if cfg else 0,
                "tcp_closing": cfg.timeout_closing * cfg.tick_ns / 1e9 if cfg else 0,
                "udp": cfg.timeout_udp * cfg.tick_ns / 1e9 if cfg else 0,
            },
        }
        if "vip_addrs" in maps:  # the addresses the dead-man switch fences ARP / ND for
            out["vip_addrs"] = sorted(
                str(addr_from_words(k.addr, k.family)) for k, _ in maps["vip_addrs"].items()
            )
        if "stats_global" in maps:
            out["stats"] = {name: _sum(maps["stats_global"], i)[0] for i, name in STATS.items()}
        return out
    finally:
        for m in maps.values():
            m.close()
