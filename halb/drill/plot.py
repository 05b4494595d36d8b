"""The drill timeline as a PNG (matplotlib, optional: pip install 'halb[drill]').

One row per long-lived connection with its gaps in red, a row of ARP claims coloured by
node, a row of failed new connections, and vertical lines for the fault, the leader
change seen in etcd and the new owner's first gratuitous ARP. With several drills, a
second panel shows each drill's figures; the timeline is the drill with the worst gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from halb.drill.report import DrillResult

__all__ = ["plot"]

NODE_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def _worst(results: Sequence[DrillResult]) -> int:
    def key(i: int) -> tuple[int, float]:
        r = results[i]
        return (r.lost, r.gap_stats.max if r.gap_stats else 0.0)

    return max(range(len(results)), key=key)


def _timeline(ax: Axes, r: DrillResult) -> None:
    t0 = r.fault_at
    start, end = r.window[0] - t0, r.window[1] - t0
    n = len(r.conns)
    arp_row, new_row = n + 1.2, n + 2.4
    for c in r.conns:
        y = c.id
        stop = (c.error_t - t0) if c.error_t else end
        ax.hlines(y, start, stop, color="lightgrey", linewidth=3, zorder=1)
        bars = [(a - t0, b - a) for a, b in c.gaps]
        ax.broken_barh(bars, (y - 0.35, 0.7), facecolors="tab:red", zorder=2)
        if c.lost:
            ax.plot([stop], [y], marker="x", color="black", markersize=7, zorder=3)
    # ARP claims, coloured by sender.
    macs = sorted({c.mac for c in r.claims})
    colour = {m: NODE_COLOURS[i % len(NODE_COLOURS)] for i, m in enumerate(macs)}
    for cl in r.claims:
        ax.plot(
            [cl.time - t0], [arp_row], marker="|", markersize=14, color=colour[cl.mac], zorder=5
        )
    for cl in r.own.conflicts:
        ax.plot([cl.time - t0], [arp_row], marker="v", markersize=9, color="tab:red", zorder=4)
    fails = [t - t0 for t in r.new_err_times]
    ax.plot(
        fails, [new_row] * len(fails), linestyle="none", marker="x", color="tab:red", markersize=5
    )
    ax.axvline(0, color="black", linewidth=1.5)
    ax.text(0, -0.75, f" {r.fault} {r.node}", fontsize=9, va="bottom")
    if r.leader_s is not None:
        ax.axvline(r.leader_s, color="tab:blue", linestyle="--", linewidth=1.2)
    if r.garp_s is not None:
        ax.axvline(r.garp_s, color="tab:green", linewidth=1.2)
    ax.set_yticks([*range(n), arp_row, new_row])
    ax.set_yticklabels(
        [f"conn {c.id} {c.backend or ''}" for c in r.conns] + ["ARP claims", "new conn fail"],
        fontsize=7,
    )
    ax.set_ylim(-1, new_row + 1.8)
    ax.invert_yaxis()
    ax.set_xlim(start, end)
    ax.set_xlabel("seconds after the fault")
    ax.grid(axis="x", linestyle=":", linewidth=0.6)
    handles: list[Line2D | Patch] = [
        Patch(color="tab:red", label="gap (no echo ≥ 50 ms)"),
        Line2D([], [], color="black", linewidth=1.5, label="fault"),
        Line2D([], [], color="tab:blue", linestyle="--", label="leader change (etcd)"),
        Line2D([], [], color="tab:green", label="new owner's first GARP"),
        Line2D([], [], color="tab:red", marker="v", linestyle="none", label="two owners"),
        *(
            Line2D(
                [],
                [],
                color=colour[m],
                marker="|",
                linestyle="none",
                markersize=10,
                label=f"ARP from {r.name(m)}",
            )
            for m in macs
        ),
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    gs = r.gap_stats
    ax.set_title(
        f"{r.fault} on {r.node} → {r.new_owner or 'no new owner'}:  "
        f"{r.survived}/{len(r.conns)} connections survived,  worst gap "
        f"{gs.max if gs else 0:.3f} s,  first GARP "
        + (f"{r.garp_s:.3f} s" if r.garp_s is not None else "none")
        + f",  {r.new_err} new connections failed",
        fontsize=10,
    )


def _per_run(ax: Axes, results: Sequence[DrillResult]) -> None:
    xs = list(range(1, len(results) + 1))
    worst = [r.gap_stats.max if r.gap_stats else float("nan") for r in results]
    garp = [r.garp_s if r.garp_s is not None else float("nan") for r in results]
    leader = [r.leader_s if r.leader_s is not None else float("nan") for r in results]
    ax.plot(xs, worst, "o-", color="tab:red", label="worst gap")
    ax.plot(xs, garp, "s-", color="tab:green", label="fault → first GARP")
    ax.plot(xs, leader, "^--", color="tab:blue", label="leader change (etcd)")
    for x, r in zip(xs, results, strict=True):
        if r.lost:
            ax.annotate(
                f"{r.lost} lost",
                (x, worst[x - 1]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
                color="tab:red",
            )
    ax.set_xlabel("drill")
    ax.set_ylabel("seconds")
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.grid(linestyle=":", linewidth=0.6)
    ax.legend(fontsize=8, loc="upper right")
    lost = sum(r.lost for r in results)
    total = sum(len(r.conns) for r in results)
    ax.set_title(f"{len(results)} drills: {lost} of {total} connections lost", fontsize=10)


def plot(results: Sequence[DrillResult], path: Path) -> None:
    if not results:
        raise ValueError("nothing to plot")
    n = len(results[0].conns)
    timeline_h = 2.2 + 0.16 * (n + 3)
    many = len(results) > 1
    fig = plt.figure(figsize=(11, timeline_h + (3.2 if many else 0)), layout="constrained")
    if many:
        top, bottom = fig.subplots(2, 1, height_ratios=[timeline_h, 3.2])
        w = _worst(results)
        _timeline(top, results[w])
        top.set_title(f"drill {w + 1} (worst): " + top.get_title(), fontsize=10)
        _per_run(bottom, results)
    else:
        _timeline(fig.subplots(), results[0])
    fig.savefig(path, dpi=110)
    plt.close(fig)
