"""`halb dataplane show` for nft: the conntrack table's size and refusals, halb's flows
in it, and the packet counters of halb's table, read from a node's namespace."""

from __future__ import annotations

from typing import Any

from halb.config import ClusterConfig
from halb.dataplane.nft import ruleset
from halb.dataplane.nft.adapter import snat_addresses
from halb.dataplane.nft.conntrack import Conntrack
from halb.dataplane.nft.ctstats import read_table_stats
from halb.dataplane.nft.flows import FlowMap
from halb.dataplane.nft.nfnl import NfTables

__all__ = ["read_node", "render"]


def read_node(cfg: ClusterConfig, netns: str | None) -> dict[str, Any]:
    ct = Conntrack(netns)
    try:
        stats = read_table_stats(ct.sock, netns)
        flows = len(ct.dump(FlowMap(cfg.services(), snat_addresses(cfg))))
    finally:
        ct.close()
    nf = NfTables(netns)
    try:
        values = nf.counters(ruleset.TABLE)
    finally:
        nf.close()
    services = []
    for svc in sorted(cfg.services(), key=lambda s: str(s.key)):
        c = values.get(ruleset.service_counter(svc.key))
        backends = []
        for b in (*svc.backends, *svc.sorry):
            bc = values.get(ruleset.backend_counter(svc.key, b))
            backends.append(
                {"backend": str(b), "weight": b.weight, "packets": bc.packets if bc else None}
            )
        services.append(
            {
                "service": str(svc.key),
                "forwarding": svc.forwarding.value,
                "scheduler": svc.scheduler.value,
                "ring_size": svc.ring_size,
                "loaded": c is not None,  # in halb's table on this node
                "packets": c.packets if c else None,
                "bytes": c.bytes if c else None,
                "backends": backends,
            }
        )
    return {
        "netns": netns,
        "table": f"{ruleset.FAMILY} {ruleset.TABLE}",
        "loaded": bool(values),
        "conntrack": stats.doc(),
        "flows": flows,
        "invalid_dropped": values[ruleset.INVALID_COUNTER].packets
        if ruleset.INVALID_COUNTER in values
        else None,
        "services": services,
    }


def render(report: dict[str, Any]) -> str:
    ct = report["conntrack"]
    lines = [
        f"table        {report['table']}{'' if report['loaded'] else ' (not loaded)'}",
        f"conntrack    {ct['count']} / {ct['max']} entries ({100 * ct['fill']:.1f}% full), "
        f"{ct['buckets']} buckets",
        "             " + "  ".join(
            f"{k}={ct[k]}" for k in ("insert_failed", "drop", "early_drop", "invalid")
        ),
        f"flows        {report['flows']} (halb's services)",
        f"invalid      {report['invalid_dropped']} packets dropped (mid-flow, no state)",
    ]  # fmt: skip
    for s in report["services"]:
        lines.append("")
        ring = f"  ring {s['ring_size']}" if s["scheduler"] == "maglev" else ""
        lines.append(
            f"{s['service']}  {s['forwarding']}  {s['scheduler']}{ring}  "
            f"{s['packets']} pkts  {s['bytes']} bytes"
        )
        lines.append(f"  {'backend':<28} {'weight':>6} {'packets':>10}")
        for b in s["backends"]:
            lines.append(f"  {b['backend']:<28} {b['weight']:>6} {b['packets']!s:>10}")
    return "\n".join(lines)
