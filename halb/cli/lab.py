"""`halb lab ...`: the network-namespace lab used by tests, drills and demos."""

from __future__ import annotations

import os
from typing import Any

import click

from halb.cli.common import echo_json, fail, output_option
from halb.lab import builder, faults
from halb.lab.netns import CommandError
from halb.lab.topology import NS_PREFIX, site_from_env


@click.group("lab")
def lab_group() -> None:
    """Build, inspect and remove the network-namespace lab.

    The lab is a client, balancer nodes and backends in namespaces named halb-*, on one
    L2 segment (plus a backend segment for the NAT modes and a management segment), with
    a real etcd. See docs/lab-layout.md.
    """


def _progress(msg: str) -> None:
    click.echo(f"lab: {msg}", err=True)


@lab_group.command("up")
@click.option("--nodes", default=2, show_default=True, help="Balancer nodes (1-9).")
@click.option("--backends", default=3, show_default=True, help="Backends (1-50).")
@click.option(
    "--dataplane",
    type=click.Choice(["xdp", "nft"]),
    default="xdp",
    show_default=True,
    help="Dataplane written into the lab's cluster config.",
)
@click.option(
    "--agents/--no-agents",
    default=True,
    show_default=True,
    help="Start `halb agent` on every balancer (logs in /run/halb-lab/logs).",
)
@click.option(
    "--etcd-members",
    type=click.Choice(["1", "3"]),
    default="1",
    show_default=True,
    help="etcd members on the management segment.",
)
@click.option(
    "--etcd-tls/--no-etcd-tls",
    default=False,
    show_default=True,
    help="etcd with TLS (client certificates), auth on and a role limited to the cluster's prefix.",
)
@click.option(
    "--virtual-mac/--no-virtual-mac",
    default=False,
    show_default=True,
    help="The group answers from the virtual MAC 00:00:5e:00:01:01 on a macvlan that "
    "moves with the VIP (keepalived's use_vmac).",
)
def up(
    nodes: int,
    backends: int,
    dataplane: str,
    agents: bool,
    etcd_members: str,
    etcd_tls: bool,
    virtual_mac: bool,
) -> None:
    """Build the lab: namespaces, bridges, etcd, backend servers, its config, and an
    agent on every balancer node."""
    _require_root()
    try:
        state = builder.up(
            nodes,
            backends,
            dataplane,
            progress=_progress,
            agents=agents,
            etcd_members_n=int(etcd_members),
            etcd_tls=etcd_tls,
            virtual_mac=virtual_mac,
        )
    except (builder.LabError, CommandError, ValueError) as exc:
        fail(str(exc))
        return
    etcd = ", ".join(state["etcd_endpoints"])
    click.echo(f"lab is up: VIP {state['vip']}, config {state['config']}, etcd {etcd}")
    client = state["client"]["namespace"]
    click.echo(f"try: halb lab status; halb lab exec {client} -- curl -s http://{state['vip']}/")


@lab_group.command("down")
def down() -> None:
    """Remove every namespace, process, interface and file the lab made (idempotent;
    also cleans up after a crashed run)."""
    _require_root()
    removed = builder.down(progress=_progress)
    click.echo("lab is down" + ("" if removed else " (nothing to remove)"))


@lab_group.command("status")
@output_option
def status(output: str) -> None:
    """Show every lab namespace with its addresses and MACs, the VIP, the backends, the
    etcd endpoint and the config path."""
    state = builder.load_state()
    if state is None:
        fail("the lab is not up (run `halb lab up`)")
        return
    if output == "json":
        echo_json(state)
        return
    click.echo(f"VIP        {state['vip']} / {state['vip6']}")
    click.echo(
        f"ports      echo {state['echo_port']}/tcp, http {state['http_port']}/tcp, "
        f"udp echo {state['udp_port']}/udp"
    )
    click.echo(f"etcd       {state['etcd']}")
    click.echo(f"config     {state['config']}  (dataplane {state['dataplane']})")
    click.echo("")
    click.echo(f"{'NAME':<8} {'NAMESPACE':<13} {'IF':<5} {'MAC':<18} ADDRESSES")
    hosts: list[dict[str, Any]] = [state["client"], *state["nodes"], *state["backends"]]
    for h in hosts:
        for i, itf in enumerate(h["interfaces"]):
            name, ns = (h["name"], h["namespace"]) if i == 0 else ("", "")
            click.echo(
                f"{name:<8} {ns:<13} {itf['name']:<5} {itf['mac']:<18} "
                + ", ".join(itf["addresses"])
            )
        if h["loopback"]:
            click.echo(f"{'':<8} {'':<13} {'lo':<5} {'':<18} " + ", ".join(h["loopback"]))


@lab_group.command(
    "exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in lab namespace NAME (e.g. halb-client or just client).

    Example: halb lab exec halb-client -- curl -s http://10.99.0.21/
    """
    _require_root()
    ns = site_from_env().ns(name)
    from halb.lab.netns import list_namespaces

    if ns not in list_namespaces(NS_PREFIX):
        fail(f"no lab namespace {ns!r} (is the lab up? see `halb lab status`)", code=2)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        fail("no command given (halb lab exec NAME -- CMD...)", code=2)
    argv = ["ip", "netns", "exec", ns, *command]
    os.execvp(argv[0], argv)


def _require_root() -> None:
    if os.geteuid() != 0:
        fail("the lab needs root (network namespaces)", code=2)


@lab_group.command("fault")
@click.argument("node")
@click.argument("fault", type=click.Choice(faults.FAULTS))
def fault(node: str, fault: str) -> None:
    """Inject FAULT on balancer NODE (lb1, lb2, ...) or backend NODE (be1, ...).

    \b
    kill, stop, cont, term     SIGKILL / SIGSTOP / SIGCONT / SIGTERM the agent
    start                      start the agent again (after kill or term)
    link-down, link-up         the node's front interface (eth0)
    etcd-cut, etcd-heal        drop / restore the node's traffic to etcd only
    server-stop, server-start  a backend's TCP/HTTP/UDP server (health checks fail)
    """
    _require_root()
    state = builder.load_state()
    if state is None:
        fail("the lab is not up (run `halb lab up`)")
        return
    try:
        click.echo(faults.apply_fault(node, fault, state))
    except (faults.FaultError, CommandError) as exc:
        fail(str(exc))
