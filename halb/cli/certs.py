"""`halb certs ...`: the cluster CA and per-node certificates for sync/admin mTLS."""

from __future__ import annotations

import click
import yaml

from halb.cli.common import config_option, fail, load_or_exit


@click.group("certs")
def certs_group() -> None:
    """Create the TLS material the nodes use to authenticate each other."""


@certs_group.command("generate")
@config_option
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for ca.pem, ca-key.pem, NODE.pem and NODE-key.pem.",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="NAME",
    help="Only these nodes (repeatable; default: every node of the config).",
)
@click.option("--force", is_flag=True, help="Replace an existing CA and every node certificate.")
def generate(config_path: str | None, out_dir: str, nodes: tuple[str, ...], force: bool) -> None:
    """Generate a cluster CA (reused if OUT already has one) and node certificates.

    Each node certificate names the node (CN and DNS SAN) and its addresses (IP SANs),
    and serves for both server and client authentication. Prints the `tls:` block to
    put under `sync:` (and `admin:`) in the config. Copy ca-key.pem somewhere safe and
    off the nodes: whoever has it can mint a node identity.
    """
    cfg = load_or_exit(config_path)
    known = {n.name for n in cfg.nodes}
    unknown = sorted(set(nodes) - known)
    if unknown:
        fail(
            f"not a node of the config: {', '.join(unknown)} (nodes: {', '.join(sorted(known))})", 2
        )
    from halb.sync.certs import write_cluster_certs  # cryptography only when needed

    files = write_cluster_certs(cfg, out_dir, nodes=list(nodes) or None, force=force)
    done = list(nodes) or sorted(known)
    click.echo(f"wrote certificates for {', '.join(done)} into {out_dir}", err=True)
    click.echo(yaml.safe_dump({"tls": files.model_dump()}, sort_keys=False), nl=False)
