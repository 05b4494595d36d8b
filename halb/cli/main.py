"""The `halb` command line."""

from __future__ import annotations

import click

from halb import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="halb")
def cli() -> None:
    """halb: high-availability Layer-4 load-balancer pairs with live-flow takeover.

    Run `halb agent` on every balancer node; use the other commands to inspect the
    cluster, run planned failovers and drills, and build a network-namespace lab.
    """


# Command registration: one import and one add_command line per module.
from halb.cli.agent import agent  # noqa: E402
from halb.cli.backends import backend_group, backends_cmd  # noqa: E402
from halb.cli.certs import certs_group  # noqa: E402
from halb.cli.cluster import drain, failover, status, undrain  # noqa: E402
from halb.cli.config_cmd import config_group  # noqa: E402
from halb.cli.dataplane import dataplane_group  # noqa: E402
from halb.cli.drill import drill  # noqa: E402
from halb.cli.flows import flows_cmd  # noqa: E402
from halb.cli.lab import lab_group  # noqa: E402

cli.add_command(backend_group)
cli.add_command(backends_cmd)
cli.add_command(agent)
cli.add_command(certs_group)
cli.add_command(config_group)
cli.add_command(dataplane_group)
cli.add_command(drill)
cli.add_command(flows_cmd)
cli.add_command(lab_group)
for _cmd in (status, failover, drain, undrain):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="halb")
