"""`halb config ...`: validate (and, with the HA core, apply) cluster configs."""

from __future__ import annotations

import click

from halb.cli.common import EXIT_BAD_INPUT
from halb.config import ConfigError, load_config


@click.group("config")
def config_group() -> None:
    """Validate and manage the cluster configuration."""


@config_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Check cluster config FILES: schema and semantic rules.

    Prints OK, or every problem with its field path, for example

      vip_groups[0].vips[1].services[0].backends[2].address: '10.0.0.300' is not an IP address

    and exits 2 if any file is invalid. With several files each line is prefixed with the
    file name.
    """
    bad = False
    many = len(files) > 1
    for f in files:
        prefix = f"{f}: " if many else ""
        try:
            load_config(f)
        except ConfigError as exc:
            bad = True
            for issue in exc.issues:
                click.echo(f"{prefix}{issue}")
        else:
            click.echo(f"{prefix}OK")
    if bad:
        raise SystemExit(EXIT_BAD_INPUT)


def _register_apply() -> None:
    # cluster.py talks to etcd; imported here so `config validate` stays light.
    from halb.cli.cluster import apply

    config_group.add_command(apply)


_register_apply()
