"""`halb flows`: list the flows a balancer node holds (its dataplane's flow table):
the XDP flow map the agent pinned, the node's conntrack table (nft: halb's services'
NATed entries) or its IPVS connection table, with the same columns and JSON."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Any

import click

from halb.cli.common import config_option, echo_json, fail, load_or_exit, output_option
from halb.cli.nodens import locate
from halb.config import ClusterConfig
from halb.model import Flow

# (flow, fullnat source binding "address:port" or None)
Row = tuple[Flow, str | None]

__all__ = ["flows_cmd"]

BPFFS = Path("/run/halb/bpffs")


def pin_dir(cfg: ClusterConfig, node: str) -> Path:
    """Where the agent of ``node`` pins its XDP maps (as halb.agent.factory does)."""
    return BPFFS / cfg.cluster / node


def _host(addr: Any) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


def _doc(row: Row) -> dict[str, Any]:
    f, snat = row
    doc = {
        "protocol": str(f.protocol),
        "client": f"{_host(f.src)}:{f.sport}",
        "service": f"{_host(f.vip)}:{f.vport}",
        "backend": f"{_host(f.backend)}:{f.bport}",
    }
    if snat is not None:
        doc["snat"] = snat  # fullnat: the source the backend sees
    return doc


def _sorted(rows: list[Row]) -> list[Row]:
    # By family first: IPv4 and IPv6 addresses do not compare.
    return sorted(rows, key=lambda r: (r[0].src.version, r[0]))


def read_node_flows(cfg: ClusterConfig, node: str) -> list[Flow]:
    from halb.dataplane.xdp.flowsource import XdpFlowSource

    source = XdpFlowSource.from_pins(pin_dir(cfg, node))
    try:
        return [f for f, _ in _sorted([(f, None) for f in source.snapshot()])]
    finally:
        source.close()


def read_conntrack_flows(cfg: ClusterConfig, netns: str | None) -> list[Row]:
    """halb's NATed flows in the conntrack table of ``netns``."""
    from halb.dataplane.nft.adapter import snat_addresses
    from halb.dataplane.nft.conntrack import Conntrack
    from halb.dataplane.nft.flows import FlowMap

    ct = Conntrack(netns)
    try:
        entries = ct.dump(FlowMap(cfg.services(), snat_addresses(cfg)))
    finally:
        ct.close()
    rows = [
        (fe.flow, None if fe.snat is None else f"{_host(fe.snat)}:{fe.snat_port}") for fe in entries
    ]
    return _sorted(rows)


def read_ipvs_flows(cfg: ClusterConfig, netns: str | None) -> list[Row]:
    """Live connections (not CLOSE / TIME_WAIT) of the config's services in the IPVS
    connection table of ``netns``."""
    from halb.dataplane.ipvs.conntab import ENDED_STATES, parse_conns
    from halb.net.netns import in_netns

    def read() -> str:
        with open("/proc/thread-self/net/ip_vs_conn") as f:
            return f.read()

    services = {s.key for s in cfg.services()}
    flows = {
        e.flow
        for e in parse_conns(in_netns(netns, read))
        if e.state not in ENDED_STATES and e.flow.service in services
    }
    return _sorted([(f, None) for f in flows])


def _read(cfg: ClusterConfig, name: str, netns: str | None) -> list[Row]:
    kind = cfg.dataplane.kind
    if kind == "xdp":
        return [(f, None) for f in read_node_flows(cfg, name)]
    if kind == "nft":
        return read_conntrack_flows(cfg, netns)
    return read_ipvs_flows(cfg, netns)


@click.command("flows")
@click.option("--vip", default=None, help="Only flows to this VIP.")
@click.option("--node", "nodes", multiple=True, help="Only this node (repeatable).")
@click.option("--limit", type=int, default=None, help="Print at most this many per node.")
@click.option("--netns", default=None, help="nft/ipvs: read this network namespace (one --node).")
@config_option
@output_option
def flows_cmd(
    vip: str | None,
    nodes: tuple[str, ...],
    limit: int | None,
    netns: str | None,
    config_path: str | None,
    output: str,
) -> None:
    """List the flows each balancer node holds: client, service, backend (and, for
    fullnat, the source address and port the backend sees).

    xdp: the flow map the node's agent pinned. nft: the node's conntrack table. ipvs:
    its IPVS connection table. Run as root on the host: in the lab every node is read
    from its namespace; on a balancer, the node given with --node (or HALB_NODE) is
    read from this host's tables and others are reported as unavailable. On a
    standby these are the flows synced from the active.
    """
    cfg = load_or_exit(config_path)
    names = list(nodes) or [n.name for n in cfg.nodes]
    for name in names:
        try:
            cfg.node(name)
        except KeyError as exc:
            fail(str(exc.args[0]), 2)
    if netns is not None and (len(names) != 1 or cfg.dataplane.kind == "xdp"):
        fail("--netns reads one node's nft or ipvs tables: give one --node", 2)
    want = None
    if vip is not None:
        try:
            want = ip_address(vip)
        except ValueError:
            fail(f"--vip {vip!r} is not an IP address", 2)
    report: dict[str, Any] = {}
    for name in names:
        where = locate(cfg, name, netns=netns, only=len(nodes) == 1)
        if cfg.dataplane.kind != "xdp" and not where.available:
            report[name] = {"available": False, "error": where.why}
            continue
        try:
            found = _read(cfg, name, where.netns)
        except FileNotFoundError as exc:
            error = (
                f"no pinned maps in {pin_dir(cfg, name)}"
                if cfg.dataplane.kind == "xdp"
                else f"{exc.filename or exc}: no such table or namespace"
            )
            report[name] = {"available": False, "error": error}
            continue
        except PermissionError:
            fail(f"cannot read node {name}'s {cfg.dataplane.kind} tables: run as root")
            return
        if want is not None:
            found = [r for r in found if r[0].vip == want]
        shown = found if limit is None else found[:limit]
        report[name] = {"available": True, "count": len(found), "flows": [_doc(r) for r in shown]}
    if output == "json":
        echo_json({"cluster": cfg.cluster, "dataplane": cfg.dataplane.kind, "nodes": report})
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
            via = f"  (from {f['snat']})" if "snat" in f else ""
            click.echo(
                f"  {f['protocol']:<6} {f['client']:<24} {f['service']:<24} {f['backend']}{via}"
            )
