"""Commands that talk to a running cluster through etcd: status, failover, drain,
config apply."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from halb.agent import etcdio
from halb.agent.status import cluster_view
from halb.cli.common import (
    EXIT_BAD_INPUT,
    config_option,
    echo_json,
    fail,
    load_or_exit,
    output_option,
    run_etcd,
)
from halb.config import ClusterConfig, ConfigError, parse_config_text
from halb.etcd import EtcdClient
from halb.ha.admin import clear_drain, request_handover, set_drain
from halb.keys import GroupKeys

T = TypeVar("T")


def _run(cfg: ClusterConfig, work: Callable[[EtcdClient], Awaitable[T]]) -> T:
    return run_etcd(cfg, work)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0.0, time.time() - ts)
    when = dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")
    return f"{when} ({secs:.0f}s ago)"


@click.command("status")
@config_option
@output_option
def status(config_path: str | None, output: str) -> None:
    """Show the cluster: groups, each node's role, term, lease time left, VIPs,
    dataplane, sync state, and the last failover with its cause."""
    cfg = load_or_exit(config_path)
    snap = _run(cfg, lambda c: etcdio.read_cluster(c, cfg))
    view = cluster_view(cfg, snap.leaders, snap.statuses, snap.drained)
    if output == "json":
        echo_json(view)
        return
    click.echo(
        f"cluster {view['cluster']}  dataplane {view['dataplane']}  "
        f"lease TTL {view['lease_ttl']:g}s"
    )
    click.echo("")
    click.echo(f"{'GROUP':<12} {'ACTIVE':<10} {'TERM':<22} {'LEASE LEFT':<11} VIPS")
    for g in view["groups"]:
        left = f"{g['lease_ttl_left']:.0f}s" if g["lease_ttl_left"] is not None else "-"
        vmac = f"  (virtual MAC {g['virtual_mac']})" if g.get("virtual_mac") else ""
        click.echo(
            f"{g['name']:<12} {g['active'] or '(none)':<10} {g['term'] or '-':<22} "
            f"{left:<11} {', '.join(g['vips'])}{vmac}"
        )
    click.echo("")
    click.echo(f"{'NODE':<10} {'ROLE':<9} {'PRIO':<5} {'DATAPLANE':<10} {'CONFIG':<7} SYNC")
    for n in view["nodes"]:
        sync = n["sync"]
        sync_txt = (
            ", ".join(
                f"{k}={_ago(v) if k == 'last_resync' else v}"
                for k, v in sync.items()
                if not isinstance(v, dict | list)
            )
            if sync
            else "-"
        )
        click.echo(
            f"{n['name']:<10} {n['role']:<9} {n['priority']:<5} "
            f"{n['dataplane'] or '-':<10} {n['config_revision'] or '-'!s:<7} {sync_txt}"
        )
    holds = hold_lines(view["nodes"])
    if holds:
        click.echo("")
        click.echo("coordinator-outage hold (failover.coordinator_outage: hold):")
        for line in holds:
            click.echo(f"  {line}")
    last = view["last_failover"]
    click.echo("")
    if last:
        click.echo(
            f"last failover: {last.get('group')} {last.get('from') or '(none)'} -> "
            f"{last.get('to')} at {_ago(last.get('time'))}: {last.get('cause')}"
        )
    else:
        click.echo("last failover: none recorded")


def hold_lines(nodes: list[dict[str, Any]]) -> list[str]:
    """Per node and group: the hold it keeps (holding since, promises held and their
    expiry, refusals) and the promises it gave (bound for, granted, refused)."""
    out = []
    for n in nodes:
        for group, g in sorted(n.get("groups", {}).items()):
            h = g.get("hold") or {}
            if not h:
                continue
            parts = []
            if h.get("holding"):
                promises = ", ".join(f"{p} (+{s:.2f}s)" for p, s in h["promises"].items())
                since = _ago(h.get("holding_since"))
                left = h.get("hold_left")
                parts.append(
                    f"HOLDING since {since}, promises {promises or 'none'}, hold left {left}s"
                )
            if h.get("refusals"):
                parts.append("refusals " + ", ".join(f"{p}: {r}" for p, r in h["refusals"].items()))
            parts.append(f"holds {h.get('holds', 0)}")
            if h.get("last_end"):
                parts.append(f"last ended: {h['last_end']}")
            parts.append(
                f"promised: bound for {h.get('bound_for', 0)}s, granted {h.get('granted', 0)}, "
                f"refused {h.get('refused') or {}}"
            )
            out.append(f"{n['name']} {group}: " + "; ".join(parts))
    return out


def _group(cfg: ClusterConfig, name: str | None) -> str:
    names = [g.name for g in cfg.vip_groups]
    if name is None:
        if len(names) != 1:
            fail(f"--group is required: the cluster has groups {', '.join(names)}", 2)
        return names[0]
    if name not in names:
        fail(f"no group {name!r} in the config (groups: {', '.join(names)})", 2)
    return name


async def _wait_leader(
    client: EtcdClient,
    cfg: ClusterConfig,
    group: str,
    pred: Callable[[str | None], bool],
    timeout: float,
) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        snap = await etcdio.read_cluster(client, cfg)
        li = snap.leaders.get(group)
        holder = li.node if li else None
        if pred(holder) or time.monotonic() > deadline:
            return holder
        await asyncio.sleep(0.01)


@click.command("failover")
@config_option
@click.option("--group", "-g", default=None, help="VIP group (needed if there are several).")
@click.option(
    "--to",
    "target",
    default=None,
    metavar="NODE",
    help="Node to hand over to (default: the best other live node).",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait.")
def failover(
    config_path: str | None, group: str | None, target: str | None, timeout: float
) -> None:
    """Planned failover: the active node removes its VIPs and hands the group over.

    Waits until the new node holds the group and prints how long it took.
    """
    cfg = load_or_exit(config_path)
    gname = _group(cfg, group)
    if target is not None and target not in {n.name for n in cfg.nodes}:
        fail(f"--to: node {target!r} is not defined in the config", 2)

    async def work(client: EtcdClient) -> tuple[str | None, str | None, float]:
        snap = await etcdio.read_cluster(client, cfg)
        li = snap.leaders.get(gname)
        if li is None:
            fail(f"group {gname!r} has no active node to fail over from")
        assert li is not None
        to = target
        if to is None:
            members = [
                n
                for n in sorted(cfg.nodes, key=lambda n: -n.priority)
                if n.name != li.node and n.name in snap.statuses and n.name not in snap.drained
            ]
            if not members:
                fail(f"no other live, undrained node to take group {gname!r}")
            to = members[0].name
        if to == li.node:
            fail(f"{to} is already active for group {gname!r}", 2)
        if to not in snap.statuses:
            fail(f"{to} is not running (no status in etcd)")
        keys = GroupKeys(cfg.etcd.prefix, cfg.cluster, gname)
        t0 = time.monotonic()
        click.echo(f"asking {li.node} to hand group {gname} to {to} ...", err=True)
        await request_handover(client, keys, to)
        holder = await _wait_leader(client, cfg, gname, lambda h: h == to, timeout)
        return li.node, holder, time.monotonic() - t0

    old, new, took = _run(cfg, work)
    if new is None or new == old:
        fail(f"group {gname} still held by {new or 'nobody'} after {timeout:g}s")
    click.echo(f"group {gname}: {old} -> {new} in {took * 1000:.0f} ms")


def _drain_cmd(drain: bool) -> click.Command:
    verb = "drain" if drain else "undrain"

    @click.command(verb)
    @config_option
    @click.argument("node")
    @click.option(
        "--reason", default="operator", show_default=True, help="Recorded with the drain."
    )
    @click.option(
        "--timeout",
        default=10.0,
        show_default=True,
        help="Seconds to wait for the node to hand over its groups.",
    )
    def cmd(config_path: str | None, node: str, reason: str, timeout: float) -> None:
        cfg = load_or_exit(config_path)
        if node not in {n.name for n in cfg.nodes}:
            fail(f"node {node!r} is not defined in the config", 2)

        async def work(client: EtcdClient) -> list[str]:
            keys = GroupKeys(cfg.etcd.prefix, cfg.cluster, cfg.vip_groups[0].name)
            if not drain:
                await clear_drain(client, keys, node)
                return []
            await set_drain(client, keys, node, reason)
            stuck = []
            for g in cfg.vip_groups:
                holder = await _wait_leader(client, cfg, g.name, lambda h: h != node, timeout)
                if holder == node:
                    stuck.append(g.name)
            return stuck

        stuck = _run(cfg, work)
        if stuck:
            fail(f"{node} still active for {', '.join(stuck)} after {timeout:g}s")
        click.echo(f"{node} {'drained: it will not campaign' if drain else 'undrained'}")

    cmd.help = (
        "Drain NODE: it never campaigns, and hands over any group it holds."
        if drain
        else "Undrain NODE: it campaigns again (and may preempt by priority)."
    )
    return cmd


drain = _drain_cmd(True)
undrain = _drain_cmd(False)


@click.command("apply")
@config_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every live agent runs the new revision.",
)
@click.option("--timeout", default=15.0, show_default=True)
def apply(config_path: str | None, file: str, wait: bool, timeout: float) -> None:
    """Store FILE as the cluster config in etcd; every agent applies the same revision.

    An invalid FILE is rejected with its errors (exit 2) and nothing is stored: the
    running config stays. Only what changed is applied by the agents.
    """
    try:
        text = Path(file).read_text()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}", EXIT_BAD_INPUT)
        return
    try:
        new = parse_config_text(text, file)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(f"{file}: {issue}", err=True)
        fail("config rejected; the running config is unchanged", EXIT_BAD_INPUT)
        return
    current = load_or_exit(config_path) if config_path else new
    if current.cluster != new.cluster:
        fail(f"{file} is for cluster {new.cluster!r}, not {current.cluster!r}", EXIT_BAD_INPUT)

    async def work(client: EtcdClient) -> tuple[int, dict[str, Any]]:
        rev = await etcdio.publish_config(client, new, text)
        lagging: dict[str, Any] = {}
        if wait:
            deadline = time.monotonic() + timeout
            while True:
                snap = await etcdio.read_cluster(client, new)
                lagging = {
                    n: s.config_revision
                    for n, s in snap.statuses.items()
                    if s.config_revision < rev
                }
                if not lagging or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        return rev, lagging

    rev, lagging = _run(new, work)
    click.echo(f"config revision {rev} stored")
    if lagging:
        fail("not yet applied by: " + ", ".join(f"{n} (at {r})" for n, r in lagging.items()))
