"""The `halb` command line."""

from __future__ import annotations

import importlib

import click

from halb import __version__

# Command name -> "module:attribute". Loaded on use, so `halb failover` does not pay for
# importing the agent, the lab and the drill (grpc, pyroute2, numpy) first.
COMMANDS: dict[str, str] = {
    "agent": "halb.cli.agent:agent",
    "backend": "halb.cli.backends:backend_group",
    "backends": "halb.cli.backends:backends_cmd",
    "certs": "halb.cli.certs:certs_group",
    "config": "halb.cli.config_cmd:config_group",
    "dataplane": "halb.cli.dataplane:dataplane_group",
    "drain": "halb.cli.cluster:drain",
    "drill": "halb.cli.drill:drill",
    "failover": "halb.cli.cluster:failover",
    "flows": "halb.cli.flows:flows_cmd",
    "lab": "halb.cli.lab:lab_group",
    "status": "halb.cli.cluster:status",
    "undrain": "halb.cli.cluster:undrain",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported when first used (click's documented
    lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{target} is not a click command")
        if cmd.name != cmd_name:
            raise TypeError(f"{target} is named {cmd.name!r}, registered as {cmd_name!r}")
        return cmd


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="halb")
def cli() -> None:
    """halb: high-availability Layer-4 load-balancer pairs with live-flow takeover.

    Run `halb agent` on every balancer node; use the other commands to inspect the
    cluster, run planned failovers and drills, and build a network-namespace lab.
    """


def main() -> None:
    cli(prog_name="halb")
