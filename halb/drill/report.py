"""Pure analysis of a drill: per-connection gaps, survival, ARP ownership, statistics.

Inputs are what the traffic generator printed (halb.drill.traffic), the ARP frames seen
on the segment, and the fault's time; nothing here does I/O.

Definitions (the numbers `halb drill` prints):

- *gap* of a connection: an interval in the measurement window with no echo, i.e.
  between two consecutive echoes, from the window's start to the first echo, or from
  the last echo to the window's end (or to the error that ended the connection). Its
  *max gap* is the longest of these.
- *lost*: the connection ended with an error (reset, closed, echo mismatch), answered
  from another backend at the end, or received no echo during the last ``stall``
  seconds of the window. Everything else *survived*.
- *claim*: an ARP frame whose sender address is the VIP (a gratuitous request or a
  reply), from the MAC that sent it.
- *new owner*: the first MAC other than the old owner's to claim the VIP after the
  fault; *time to first GARP* is from the fault to that claim.
- *two owners*: after the new owner's first claim (and before the next change of
  leader seen in etcd, when there is one), every claim from a MAC other than the new
  owner's, typically the old owner answering ARP with an address it has not withdrawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Claim",
    "ConnResult",
    "DrillResult",
    "Ownership",
    "Stats",
    "build_result",
    "claims_of",
    "conn_result",
    "gaps_of",
    "ownership",
    "repeat_summary",
    "stats",
]

# One run of echoes: [first time, last time, count, longest interval inside the run].
Run = Sequence[float]


@dataclass(frozen=True, slots=True)
class Stats:
    n: int
    min: float
    median: float
    p95: float
    max: float


def _nearest_rank(sorted_vals: Sequence[float], q: float) -> float:
    # Nearest-rank percentile: always one of the measured values.
    k = max(1, math.ceil(q * len(sorted_vals)))
    return sorted_vals[k - 1]


def stats(values: Iterable[float]) -> Stats | None:
    vals = sorted(values)
    if not vals:
        return None
    mid = len(vals) // 2
    median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return Stats(len(vals), vals[0], median, _nearest_rank(vals, 0.95), vals[-1])


def gaps_of(runs: Sequence[Run], start: float, end: float) -> list[tuple[float, float]]:
    """Every interval without an echo between ``start`` and ``end`` that is longer than
    the echoes inside a run: between runs, before the first and after the last.
    Intervals inside a run are shorter than the generator's split and not listed."""
    out: list[tuple[float, float]] = []
    prev = start
    for r in runs:
        if r[0] > prev:
            out.append((prev, r[0]))
        prev = max(prev, r[1])
    if end > prev:
        out.append((prev, end))
    return out


@dataclass(frozen=True, slots=True)
class ConnResult:
    id: int
    backend: str | None
    backend_end: str | None
    echoed: int
    max_gap: float
    gaps: tuple[tuple[float, float], ...]  # absolute times, longer than ``threshold``
    lost: bool
    reason: str  # why lost ("" when it survived)
    error_t: float | None = None


def conn_result(
    doc: Mapping[str, Any], start: float, end: float, stall: float = 1.0, threshold: float = 0.05
) -> ConnResult:
    """One ``conn`` event of the generator, judged over the window [start, end]."""
    runs: list[Run] = doc.get("runs") or []
    error = doc.get("error")
    error_t = doc.get("error_t")
    stop = min(end, float(error_t)) if error and error_t else end
    all_gaps = gaps_of(runs, start, stop)
    inner = max((float(r[3]) for r in runs), default=0.0)
    max_gap = max([inner, *(b - a for a, b in all_gaps)])
    if error:
        # A dead connection's silence runs to the end of the window.
        last = max((float(r[1]) for r in runs), default=start)
        max_gap = max(max_gap, end - last)
    stalled = not runs or end - float(runs[-1][1]) > stall
    reason = ""
    if error and not (stalled and error_t and float(error_t) >= end):
        reason = str(error)
    elif doc.get("backend_end") and doc.get("backend_end") != doc.get("backend"):
        reason = f"moved from {doc.get('backend')} to {doc.get('backend_end')}"
    elif stalled:
        # An error after the window (the final WHOAMI) only confirms the stall.
        reason = f"no echo in the last {stall:g}s" + (f" ({error})" if error else "")
    return ConnResult(
        id=int(doc["id"]),
        backend=doc.get("backend"),
        backend_end=doc.get("backend_end"),
        echoed=int(doc.get("echoed", 0)),
        max_gap=max_gap,
        gaps=tuple((a, b) for a, b in all_gaps if b - a >= threshold),
        lost=bool(reason),
        reason=reason,
        error_t=float(error_t) if error_t else None,
    )


@dataclass(frozen=True, slots=True)
class Claim:
    time: float
    mac: str
    kind: str  # request (gratuitous) | reply


def claims_of(frames: Iterable[Any], vip: str) -> list[Claim]:
    """The frames that claim ``vip`` (ArpFrame-like: time, src_mac, kind, sender_ip)."""
    out = [
        Claim(float(f.time), str(f.src_mac).lower(), str(f.kind))
        for f in frames
        if f.sender_ip == vip
    ]
    return sorted(out, key=lambda c: c.time)


@dataclass(frozen=True, slots=True)
class Ownership:
    new_mac: str | None
    first_claim: float | None  # absolute time of the new owner's first claim
    conflicts: tuple[Claim, ...]  # claims by another MAC after that (two owners)


def ownership(
    claims: Sequence[Claim],
    t_fault: float,
    old_mac: str | None,
    until: float | None = None,
    shared_mac: str | None = None,
) -> Ownership:
    """Who took the VIP after the fault, and every claim that overlapped with it.

    ``shared_mac`` (a virtual MAC): every owner claims from it, so the new owner's
    first claim is the first gratuitous one (a request) from it after the fault (the old
    node's kernel may still answer probes until its fence), and a claim from any other
    MAC (a node's own, answering for the VIP) conflicts with it; which node holds the
    VIP comes from sampling the addresses instead (halb.drill.vipwatch)."""
    old = old_mac.lower() if old_mac else None
    if shared_mac is not None:
        shared = shared_mac.lower()
        first = next(
            (c for c in claims if c.time >= t_fault and c.mac == shared and c.kind == "request"),
            None,
        )
    else:
        first = next((c for c in claims if c.time >= t_fault and c.mac != old), None)
    if first is None:
        return Ownership(None, None, ())
    conflicts = tuple(
        c
        for c in claims
        if c.time >= first.time and c.mac != first.mac and (until is None or c.time < until)
    )
    return Ownership(first.mac, first.time, conflicts)


@dataclass(slots=True)
class DrillResult:
    """One drill. Times in ``*_at`` fields are absolute (wall clock); ``*_s`` fields are
    seconds after the fault."""

    fault: str
    node: str
    old_owner: str | None
    new_owner: str | None  # from etcd
    fault_at: float
    window: tuple[float, float]
    conns: list[ConnResult]
    new_ok: int
    new_err: int
    new_err_times: list[float]
    new_slow: int
    claims: list[Claim]
    names: dict[str, str]  # MAC -> node name, when known
    old_mac: str | None
    own: Ownership
    leader_changed_at: float | None  # first time etcd showed another leader
    notes: list[str] = field(default_factory=list)
    # etcd-outage and virtual-MAC drills: which nodes held the VIP address
    # (halb.drill.vipwatch.spans).
    vip_holders: dict[str, Any] | None = None
    # The client's neighbour entry for the VIP before the fault and after the traffic
    # (the MAC it resolves the VIP to), where the drill can read it.
    client_arp: dict[str, str | None] | None = None

    @property
    def survived(self) -> int:
        return sum(not c.lost for c in self.conns)

    @property
    def lost(self) -> int:
        return sum(c.lost for c in self.conns)

    @property
    def garp_s(self) -> float | None:
        return None if self.own.first_claim is None else self.own.first_claim - self.fault_at

    @property
    def leader_s(self) -> float | None:
        return None if self.leader_changed_at is None else self.leader_changed_at - self.fault_at

    @property
    def gap_stats(self) -> Stats | None:
        return stats(c.max_gap for c in self.conns)

    def name(self, mac: str | None) -> str | None:
        return None if mac is None else self.names.get(mac, mac)

    def to_dict(self) -> dict[str, Any]:
        t0 = self.fault_at

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 4)

        gs = self.gap_stats
        return {
            "fault": self.fault,
            "node": self.node,
            "old_owner": self.old_owner,
            "new_owner": self.new_owner,
            "fault_at": t0,
            "leader_change_s": rel(self.leader_changed_at),
            "first_garp_s": rel(self.own.first_claim),
            "first_garp_from": self.name(self.own.new_mac),
            "connections": len(self.conns),
            "survived": self.survived,
            "lost": self.lost,
            "gap_s": None if gs is None else {k: round(v, 4) for k, v in asdict(gs).items()},
            "new_connections": {
                "ok": self.new_ok,
                "failed": self.new_err,
                "slow": self.new_slow,
                "failed_at_s": [rel(t) for t in self.new_err_times],
            },
            "two_owners": [
                {"t_s": rel(c.time), "mac": c.mac, "node": self.name(c.mac), "kind": c.kind}
                for c in self.own.conflicts
            ],
            "claims": [
                {"t_s": rel(c.time), "mac": c.mac, "node": self.name(c.mac), "kind": c.kind}
                for c in self.claims
            ],
            "per_connection": [
                {
                    "id": c.id,
                    "backend": c.backend,
                    "backend_end": c.backend_end,
                    "echoes": c.echoed,
                    "max_gap_s": round(c.max_gap, 4),
                    "gaps_s": [[rel(a), rel(b)] for a, b in c.gaps],
                    "lost": c.lost,
                    "reason": c.reason,
                }
                for c in self.conns
            ],
            "window_s": [rel(self.window[0]), rel(self.window[1])],
            "vip_holders": self.vip_holders,
            "client_arp": self.client_arp,
            "notes": self.notes,
        }


def build_result(
    *,
    fault: str,
    node: str,
    old_owner: str | None,
    new_owner: str | None,
    fault_at: float,
    events: Sequence[Mapping[str, Any]],
    frames: Iterable[Any],
    vip: str,
    names: Mapping[str, str],
    old_mac: str | None,
    leader_changed_at: float | None,
    next_leader_change_at: float | None = None,
    known_until: float | None = None,
    stall: float = 1.0,
    threshold: float = 0.05,
    shared_mac: str | None = None,
) -> DrillResult:
    """Put one drill together from the generator's events and the ARP frames.

    Claims are judged only while the leader is known: before the next leader change
    (a preemption hands the VIP on legitimately) and before ``known_until``, the last
    leader read (a change after it is not seen). ``old_mac`` None: the last claimer
    before the fault is taken for the old owner."""
    summary = next((e for e in events if e.get("ev") == "summary"), None)
    if summary is None:
        raise ValueError("the traffic generator printed no summary (did it crash?)")
    start, end = float(summary["t_start"]), float(summary["t_end"])
    conns = [conn_result(e, start, end, stall, threshold) for e in events if e.get("ev") == "conn"]
    cl = claims_of(frames, vip)
    if old_mac is None:
        old_mac = next((c.mac for c in reversed(cl) if c.time < fault_at), None)
    bounds = [t for t in (next_leader_change_at, known_until) if t is not None]
    until = min(bounds) if bounds else None
    result = DrillResult(
        fault=fault,
        node=node,
        old_owner=old_owner,
        new_owner=new_owner,
        fault_at=fault_at,
        window=(start, end),
        conns=conns,
        new_ok=int(summary.get("new_ok", 0)),
        new_err=int(summary.get("new_err", 0)),
        new_err_times=sorted(float(e["t"]) for e in events if e.get("ev") == "newerr"),
        new_slow=int(summary.get("new_slow", 0)),
        claims=cl,
        names={k.lower(): v for k, v in names.items()},
        old_mac=old_mac.lower() if old_mac else None,
        own=ownership(cl, fault_at, old_mac, until, shared_mac),
        leader_changed_at=leader_changed_at,
    )
    unjudged = sum(1 for c in cl if known_until is not None and c.time >= known_until)
    if unjudged and known_until is not None and until == known_until:
        result.notes.append(
            f"{unjudged} ARP claims after the last leader read ({known_until - fault_at:+.2f}s) "
            "are not judged"
        )
    return result


def repeat_summary(results: Sequence[DrillResult]) -> dict[str, Any]:
    """min / median / p95 / max over drills of the figures that matter."""

    def s(vals: Iterable[float | None]) -> dict[str, float] | None:
        st = stats(v for v in vals if v is not None)
        return None if st is None else {k: round(float(v), 4) for k, v in asdict(st).items()}

    return {
        "drills": len(results),
        "first_garp_s": s(r.garp_s for r in results),
        "leader_change_s": s(r.leader_s for r in results),
        "worst_gap_s": s((r.gap_stats.max if r.gap_stats else None) for r in results),
        "median_gap_s": s((r.gap_stats.median if r.gap_stats else None) for r in results),
        "lost": s(r.lost for r in results),
        "new_failed": s(r.new_err for r in results),
        "two_owner_claims": s(len(r.own.conflicts) for r in results),
        "lost_total": sum(r.lost for r in results),
        "connections_total": sum(len(r.conns) for r in results),
        "drills_with_two_owners": sum(bool(r.own.conflicts) for r in results),
        "drills_without_garp": sum(r.garp_s is None for r in results),
    }
