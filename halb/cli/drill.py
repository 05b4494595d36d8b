"""`halb drill`: inject a fault on the active node under live traffic and measure."""

from __future__ import annotations

import json
from pathlib import Path

import click

from halb.cli.common import fail, output_option
from halb.drill.progress import Progress
from halb.drill.render import render_one, render_repeat
from halb.drill.report import repeat_summary
from halb.drill.run import FAULTS, DrillError, DrillOptions, resolve_target, run_drills
from halb.drill.target import OUTAGE_WITH
from halb.lab.netns import CommandError


@click.command("drill")
@click.option(
    "--fault",
    type=click.Choice(FAULTS),
    default="kill",
    show_default=True,
    help="What happens to the active node.",
)
@click.option("--node", default=None, help="Node to fault (default: the active node).")
@click.option(
    "--connections",
    default=20,
    show_default=True,
    help="Long-lived TCP echo connections (a line every 10 ms each).",
)
@click.option(
    "--duration", default=6.0, show_default=True, help="Seconds of traffic after the fault."
)
@click.option("--warmup", default=1.0, show_default=True, help="Seconds of traffic before it.")
@click.option(
    "--new-interval",
    default=0.005,
    show_default=True,
    help="Seconds between new connections (0: none).",
)
@click.option(
    "--new-kind",
    type=click.Choice(["http", "echo"]),
    default="http",
    show_default=True,
    help="New connections: HTTP GET or echo WHOAMI.",
)
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    help="Drills to run, healing and waiting for the original active in between.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a timeline PNG (needs matplotlib: pip install 'halb[drill]').",
)
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    default=None,
    help="Cluster config (default: the running lab's, HALB_LAB_INSTANCE).",
)
@click.option("--group", default=None, help="VIP group (default: the first).")
@click.option("--client-ns", default=None, help="Run the traffic in this network namespace.")
@click.option(
    "--client-cmd",
    default=None,
    help="Command prefix that runs commands on the client host, e.g. 'ssh client'.",
)
@click.option(
    "--echo-port",
    default=9000,
    show_default=True,
    help="TCP echo service (lines echoed, WHOAMI answered); lab: from its state.",
)
@click.option(
    "--http-port", default=80, show_default=True, help="HTTP service for new connections."
)
@click.option(
    "--arp-iface",
    default="eth0",
    show_default=True,
    help="Client interface for the ARP capture outside the lab.",
)
@click.option(
    "--fault-cmd", default=None, help="Shell command that injects the fault (outside the lab)."
)
@click.option("--heal-cmd", default=None, help="Shell command that undoes it between drills.")
@click.option(
    "--heal/--no-heal",
    default=True,
    show_default=True,
    help="Heal and wait for the original active node after the last drill.",
)
@click.option(
    "--arp-probe",
    default=0.2,
    show_default=True,
    help="Seconds between ARP probes for the VIP from the client (0: none); every node "
    "that still answers for the VIP shows in the capture.",
)
@click.option(
    "--outage-seconds",
    default=10.0,
    show_default=True,
    help="etcd-outage: seconds every etcd member is down.",
)
@click.option(
    "--outage-with",
    type=click.Choice(OUTAGE_WITH),
    default=None,
    help="etcd-outage: also SIGKILL the active (kill) or cut it from the other balancers "
    "(partition) during the outage, --outage-with-at seconds in.",
)
@click.option("--outage-with-at", default=2.0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
@output_option
def drill(
    fault: str,
    node: str | None,
    connections: int,
    duration: float,
    warmup: float,
    new_interval: float,
    new_kind: str,
    repeat: int,
    plot_path: str | None,
    config_path: str | None,
    group: str | None,
    client_ns: str | None,
    client_cmd: str | None,
    echo_port: int,
    http_port: int,
    arp_iface: str,
    fault_cmd: str | None,
    heal_cmd: str | None,
    heal: bool,
    arp_probe: float,
    outage_seconds: float,
    outage_with: str | None,
    outage_with_at: float,
    quiet: bool,
    output: str,
) -> None:
    """Fail over under live traffic and measure what clients saw.

    Keeps N long-lived connections to the VIP and a stream of new ones, injects FAULT on
    the active node, and reports each connection's longest gap, connections survived
    and lost, failed new connections, the time from the fault to the new owner's first
    gratuitous ARP, and every ARP claim by a second owner after it.

    \b
    Faults: kill, stop, term (the agent), link-down (front interface), etcd-cut,
    partition (balancers cut from each other, etcd reachable), planned (halb failover),
    etcd-outage (every etcd member down --outage-seconds, then back; --outage-with).
    Outside the lab: --config with --client-ns or --client-cmd, and --fault planned or
    --fault-cmd.
    """
    if repeat < 1 or connections < 1:
        fail("--repeat and --connections must be at least 1", 2)
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'halb[drill]'", 2)
    opts = DrillOptions(
        fault=fault,
        node=node,
        connections=connections,
        duration=duration,
        warmup=warmup,
        new_interval=new_interval,
        new_kind=new_kind,
        repeat=repeat,
        heal=heal,
        fault_cmd=fault_cmd,
        heal_cmd=heal_cmd,
        arp_probe=arp_probe,
        outage_seconds=outage_seconds,
        outage_with=outage_with,
        outage_with_at=outage_with_at,
    )
    progress = Progress(enabled=not quiet)
    try:
        target = resolve_target(
            config_path, client_ns, client_cmd, group, echo_port, http_port, arp_iface
        )
        results = run_drills(target, opts, progress)
    except (DrillError, CommandError) as exc:
        fail(str(exc))
        return
    summary = repeat_summary(results)
    if plot_path is not None:
        from halb.drill.plot import plot

        plot(results, Path(plot_path))
        progress.phase(f"plot written to {plot_path}")
    if output == "json":
        doc = {
            "target": {
                "vip": target.vip,
                "group": target.group,
                "lab": target.lab is not None,
                "dataplane": target.cfg.dataplane.kind.value,
            },
            "drills": [r.to_dict() for r in results],
            "summary": summary,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    for i, r in enumerate(results):
        if len(results) > 1:
            click.echo(f"--- drill {i + 1}")
        click.echo(render_one(r, per_connection=len(results) == 1))
        click.echo("")
    if len(results) > 1:
        click.echo(render_repeat(results, summary))
