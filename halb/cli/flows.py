"""`halb flows`: list the flows a balancer node holds (its dataplane's flow table)."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Any

import click

from halb.cli.common import config_option, echo_json, fail, load_or_exit, output_option
from halb.config import ClusterConfig
from halb.model import Flow

__all__ = ["flows_cmd"]

BPFFS = Path("/run/halb/bpffs")


def pin_dir(cfg: ClusterConfig, node: str) -> Path:
    """Where the agent of ``node`` pins its XDP maps (as halb.agent.factory does)."""
    return BPFFS / cfg.cluster / node


def _host(addr: Any) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


def _doc(f: Flow) -> dict[str, Any]:
    return {
        "protocol": str(f.protocol),
        "client": f"{_host(f.src)}:{f.sport}",
        "service": f"{_host(f.vip)}:{f.vport}",
        "backend": f"{_host(f.backend)}:{f.bport}",
    }


def read_node_flows(cfg: ClusterConfig, node: str) -> list[Flow]:
    from halb.dataplane.xdp.flowsource import XdpFlowSource

    source = XdpFlowSource.from_pins(pin_dir(cfg, node))
    try:
        # By family first: IPv4 and IPv6 addresses do not compare.
        return sorted(source.snapshot(), key=lambda f: (f.src.version, f))
    finally:
        source.close()


@click.command("flows")
@click.option("--vip", default=None, help="Only flows to this VIP.")
@click.option("--node", "nodes", multiple=True, help="Only this node (repeatable).")
@click.option("--limit", type=int, default=None, help="Print at most this many per node.")
@config_option
@output_option
def flows_cmd(
    vip: str | None,
    nodes: tuple[str, ...],
    limit: int | None,
    config_path: str | None,
    output: str,
) -> None:
    """List the flows each balancer node holds: client, service, backend.

    Reads the flow map the node's agent pinned (XDP dataplane; run as root on the
    host). On a standby these are the flows synced from the active. Nodes whose agent
    is not running here are reported as unavailable.
    """
    cfg = load_or_exit(config_path)
    if cfg.dataplane.kind != "xdp":
        fail(f"halb flows reads XDP flow maps; this cluster uses {cfg.dataplane.kind}", 2)
    names = list(nodes) or [n.name for n in cfg.nodes]
    for name in names:
        try:
            cfg.node(name)
        except KeyError as exc:
            fail(str(exc.args[0]), 2)
    want = None
    if vip is not None:
        try:
            want = ip_address(vip)
        except ValueError:
            fail(f"--vip {vip!r} is not an IP address", 2)
    report: dict[str, Any] = {}
    for name in names:
        try:
            found = read_node_flows(cfg, name)
        except FileNotFoundError:
            report[name] = {"available": False, "error": f"no pinned maps in {pin_dir(cfg, name)}"}
            continue
        except PermissionError:
            fail(f"cannot open the maps in {pin_dir(cfg, name)}: run as root")
            return
        if want is not None:
            found = [f for f in found if f.vip == want]
        shown = found if limit is None else found[:limit]
        report[name] = {"available": True, "count": len(found), "flows": [_doc(f) for f in shown]}
    if output == "json":
        echo_json({"cluster": cfg.cluster, "nodes": report})
        return
    for name, r in report.items():
        if not r["available"]:
            click.echo(f"{name}: unavailable ({r['error']})")
            continue
        more = "" if r["count"] == len(r["flows"]) else f", {len(r['flows'])} shown"
        click.echo(f"{name}: {r['count']} flows{more}")
        if r["flows"]:
            click.echo(f"  {'PROTO':<6} {'CLIENT':<24} {'SERVICE':<24} BACKEND")
        for f in r["flows"]:
            click.echo(f"  {f['protocol']:<6} {f['client']:<24} {f['service']:<24} {f['backend']}")
