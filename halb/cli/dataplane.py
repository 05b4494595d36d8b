"""`halb dataplane ...`: inspect the kernel dataplane of this node."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from halb.cli.common import config_option, echo_json, fail, load_or_exit, output_option
from halb.cli.nodens import locate
from halb.config import ClusterConfig

__all__ = ["dataplane_group"]


@click.group("dataplane")
def dataplane_group() -> None:
    """Inspect the kernel dataplane (XDP maps pinned by the agent; nft: conntrack and
    halb's nftables table)."""


@dataplane_group.command("show")
@click.option(
    "--pin-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of the pinned maps.",
)
@click.option("--node", default=None, help="Node name: use its default pin directory.")
@click.option("--netns", default=None, help="nft: read the node's tables in this namespace.")
@config_option
@output_option
def show(
    pin_dir: Path | None,
    node: str | None,
    netns: str | None,
    config_path: str | None,
    output: str,
) -> None:
    """xdp: VIPs and services, each backend's share of the Maglev ring, flows and
    counters, from the maps the agent pinned, in --pin-dir or in
    /run/halb/bpffs/CLUSTER/NODE for --node (checked against the config).

    nft (--node): the conntrack table's size, fill and refusals (insert failures,
    drops, early drops), halb's flows in it, and the packet counters of halb's table,
    read in the node's namespace (the lab's, --netns, or this host's).
    """
    from halb.dataplane.xdp.adapter import default_pin_dir
    from halb.dataplane.xdp.inspect import read_pinned

    if (pin_dir is None) == (node is None):
        raise click.UsageError("give exactly one of --pin-dir and --node")
    if node is not None:
        cfg = load_or_exit(config_path)
        try:
            cfg.node(node)
        except KeyError as exc:
            fail(str(exc.args[0]), 2)
        if cfg.dataplane.kind == "nft":
            _show_nft(cfg, node, netns, output)
            return
        if cfg.dataplane.kind != "xdp":
            fail(f"the cluster uses the {cfg.dataplane.kind} dataplane: no show for it", 2)
        pin_dir = default_pin_dir(cfg.cluster, node)
    assert pin_dir is not None
    try:
        report = read_pinned(pin_dir)
    except FileNotFoundError as exc:
        fail(f"{exc} (is the agent running with the xdp dataplane?)")
        return
    except PermissionError:
        fail(f"cannot open the maps in {pin_dir}: run as root")
        return
    if output == "json":
        echo_json(report)
    else:
        click.echo(render(report))


def _show_nft(cfg: ClusterConfig, node: str, netns: str | None, output: str) -> None:
    from halb.dataplane.nft import inspect

    where = locate(cfg, node, netns=netns, only=True)
    try:
        report = {"node": node, **inspect.read_node(cfg, where.netns)}
    except FileNotFoundError as exc:
        fail(f"{exc.filename or exc}: no such namespace")
        return
    except PermissionError:
        fail("cannot read conntrack or nftables: run as root")
        return
    if output == "json":
        echo_json(report)
    else:
        click.echo(f"node         {node}" + (f" (netns {where.netns})" if where.netns else ""))
        click.echo(inspect.render(report))


def _deadline(ns: int) -> str:
    if ns == 0:
        return "disarmed"
    left = (ns - time.monotonic_ns()) / 1e9
    return f"armed, {left:+.3f} s ({'expired: VIP traffic dropped' if left < 0 else 'forwarding'})"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"pinned maps  {report['pin_dir']}",
        f"flows        {report['flows']} / {report['flows_max']}",
        f"dead-man     {_deadline(report['deadline_ns'])}",
    ]
    if "flow_timeouts" in report:
        t = report["flow_timeouts"]
        lines.append(
            "idle timeout " + "  ".join(f"{k}={v:g}s" if v else f"{k}=never" for k, v in t.items())
        )
    if "stats" in report:
        lines.append("stats        " + "  ".join(f"{k}={v}" for k, v in report["stats"].items()))
    if not report["services"]:
        lines.append("no services")
    for s in report["services"]:
        lines.append("")
        lines.append(
            f"{s['service']}  {s['forwarding']}  ring {s['ring_size']}  "
            f"{s['packets']} pkts  {s['bytes']} bytes"
        )
        lines.append(f"  {'backend':<28} {'mac':<18} {'slots':>7} {'share':>8} {'packets':>10}")
        for b in s["backends"]:
            name = b["backend"] or "(none: drop)"
            lines.append(
                f"  {name:<28} {b['mac'] or '-':<18} {b['slots']:>7} "
                f"{b['share_pct']:>7.2f}% {b['packets']:>10}"
            )
    return "\n".join(lines)
