"""`halb agent`: run the balancer agent on this node."""

from __future__ import annotations

import asyncio
import logging
import sys
from functools import partial
from pathlib import Path

import click

from halb.agent.main import Agent, AgentError
from halb.agent.syncroles import SyncSetupError, make_sync_roles
from halb.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, resolve_config_path
from halb.config import ConfigError


@click.command("agent")
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    default=None,
    help="Cluster config (default: $HALB_CONFIG, /etc/halb/halb.yaml, the lab's).",
)
@click.option("--node", required=True, help="This node's name in the config's nodes.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--allow-insecure-sync",
    is_flag=True,
    help="Accept sync.insecure: true (plaintext flow sync, no peer check). Lab only.",
)
@click.option(
    "--no-sync",
    is_flag=True,
    help="Run without flow sync (a takeover keeps only the flows Maglev maps alike).",
)
def agent(
    config_path: str | None, node: str, log_level: str, allow_insecure_sync: bool, no_sync: bool
) -> None:
    """Run the agent for NODE: program the dataplane, campaign for every VIP group the
    node belongs to, own the VIPs while holding the term, sync flows, publish status.

    SIGTERM hands over (VIPs removed, lease revoked) and exits; SIGHUP re-reads the
    config file and stores it in etcd so every agent applies the same revision.
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    path = resolve_config_path(config_path)
    try:
        factory = None if no_sync else partial(make_sync_roles, allow_insecure=allow_insecure_sync)
        asyncio.run(Agent(Path(path), node, sync_factory=factory).run())
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(f"{path}: {issue}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except (AgentError, SyncSetupError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except Exception:
        logging.getLogger("halb.agent").exception("agent %s failed", node)
        raise SystemExit(EXIT_FAILED) from None
