"""Text tables for `halb drill` (pure formatting of report results)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from halb.drill.report import DrillResult, Stats

__all__ = ["render_one", "render_repeat"]


def _s(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else f"{v:.3f}{unit}"


def _stats(st: Stats | None) -> str:
    if st is None:
        return "-"
    return f"min {st.min:.3f}  median {st.median:.3f}  p95 {st.p95:.3f}  max {st.max:.3f} s"


def render_one(r: DrillResult, per_connection: bool = True) -> str:
    lines = [
        f"drill: {r.fault} on {r.node} (active {r.old_owner}) -> new owner "
        f"{r.new_owner or '(none)'}",
        f"  new owner seen (etcd or VIP) {_s(r.leader_s)} after the fault",
        f"  first gratuitous ARP         {_s(r.garp_s)}"
        + (f" from {r.name(r.own.new_mac)}" if r.own.new_mac else ""),
        f"  connections                  {r.survived} survived, {r.lost} lost of {len(r.conns)}",
        f"  max gap per connection       {_stats(r.gap_stats)}",
        f"  new connections              {r.new_ok} ok, {r.new_err} failed, "
        f"{r.new_slow} slower than 1s",
    ]
    if r.new_err_times:
        lines.append(
            f"  new-connection failures      from {r.new_err_times[0] - r.fault_at:+.3f}s "
            f"to {r.new_err_times[-1] - r.fault_at:+.3f}s"
        )
    if r.own.conflicts:
        first, last = r.own.conflicts[0], r.own.conflicts[-1]
        who = sorted({r.name(c.mac) or c.mac for c in r.own.conflicts})
        lines.append(
            f"  TWO OWNERS                   {len(r.own.conflicts)} claims by {', '.join(who)} "
            f"after {r.name(r.own.new_mac)} announced, {first.time - r.fault_at:+.3f}s .. "
            f"{last.time - r.fault_at:+.3f}s"
        )
    else:
        lines.append("  two owners                   none")
    lines.extend(f"  note: {n}" for n in r.notes)
    if per_connection:
        lines.append("")
        lines.append(f"  {'CONN':>4}  {'BACKEND':<8} {'ECHOES':>6} {'MAX GAP':>8}  STATUS")
        for c in r.conns:
            status = "lost: " + c.reason if c.lost else "survived"
            lines.append(
                f"  {c.id:>4}  {c.backend or '-':<8} {c.echoed:>6} {c.max_gap:>7.3f}s  {status}"
            )
    return "\n".join(lines)


def render_repeat(results: Sequence[DrillResult], summary: dict[str, Any]) -> str:
    lines = [
        f"{'RUN':>3}  {'NEW OWNER':<9} {'LEADER':>7} {'GARP':>7} {'MEDIAN GAP':>10} "
        f"{'WORST GAP':>9} {'LOST':>5} {'NEW FAIL':>8} {'2 OWNERS':>8}"
    ]
    for i, r in enumerate(results, 1):
        gs = r.gap_stats
        lines.append(
            f"{i:>3}  {r.new_owner or '-':<9} {_s(r.leader_s):>7} {_s(r.garp_s):>7} "
            f"{_s(gs.median if gs else None):>10} {_s(gs.max if gs else None):>9} "
            f"{r.lost:>2}/{len(r.conns):<2} {r.new_err:>8} {len(r.own.conflicts):>8}"
        )
    lines.append("")
    lines.append(
        f"{'over ' + str(len(results)) + ' drills':<28} {'MIN':>8} {'MEDIAN':>8} "
        f"{'P95':>8} {'MAX':>8}"
    )
    labels = {
        "leader_change_s": "new owner seen (s)",
        "first_garp_s": "fault -> first GARP (s)",
        "median_gap_s": "median gap per drill (s)",
        "worst_gap_s": "worst gap per drill (s)",
        "lost": "connections lost",
        "new_failed": "new connections failed",
        "two_owner_claims": "two-owner ARP claims",
    }
    for key, label in labels.items():
        st = summary.get(key)
        if st is None:
            lines.append(f"{label:<28} {'-':>8}")
            continue
        fmt = "{:>8.3f}" if key.endswith("_s") else "{:>8g}"
        lines.append(
            f"{label:<28} " + " ".join(fmt.format(st[k]) for k in ("min", "median", "p95", "max"))
        )
    lines.append("")
    lines.append(
        f"connections lost: {summary['lost_total']} of {summary['connections_total']}; "
        f"drills with two owners: {summary['drills_with_two_owners']}; "
        f"drills without a GARP from a new owner: {summary['drills_without_garp']}"
    )
    return "\n".join(lines)
