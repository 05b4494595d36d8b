"""Helpers shared by CLI commands: config discovery, output formats, error exits."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from halb.config import ClusterConfig, ConfigError, load_config
from halb.etcd import EtcdClient, EtcdError

__all__ = [
    "LAB_CONFIG",
    "config_option",
    "echo_json",
    "fail",
    "load_or_exit",
    "output_option",
    "resolve_config_path",
    "run_etcd",
]

T = TypeVar("T")

LAB_CONFIG = Path("/run/halb-lab/halb.yaml")  # instance 0; see lab_config_path()
SYSTEM_CONFIG = Path("/etc/halb/halb.yaml")

# Exit codes: 1 = operation failed, 2 = bad input (usage or config).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def resolve_config_path(given: str | None) -> Path:
    """--config, else $HALB_CONFIG, else /etc/halb/halb.yaml, else the running lab's."""
    if given:
        return Path(given)
    env = os.environ.get("HALB_CONFIG")
    if env:
        return Path(env)
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    from halb.lab.topology import site_from_env

    lab = site_from_env().lab_dir / "halb.yaml"
    if lab.exists():
        return lab
    raise click.UsageError(
        "no config: pass --config FILE, set HALB_CONFIG, create /etc/halb/halb.yaml, "
        "or start the lab with `halb lab up`"
    )


def load_or_exit(given: str | None) -> ClusterConfig:
    path = resolve_config_path(given)
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(f"{path}: {issue}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


def fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


config_option = click.option(
    "--config",
    "config_path",
    metavar="FILE",
    default=None,
    help="Cluster config (default: $HALB_CONFIG, /etc/halb/halb.yaml, then the lab's).",
)

output_option = click.option(
    "--output",
    "-o",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json is a stable interface for scripts.",
)


def run_etcd(cfg: ClusterConfig, work: Callable[[EtcdClient], Awaitable[T]]) -> T:
    """Run ``work`` with a client on every endpoint of ``cfg.etcd`` (TLS and auth from
    the config or HALB_ETCD_USER / HALB_ETCD_PASSWORD; ``{node}`` in TLS paths from
    HALB_NODE). TLS, auth and reachability problems are reported first, in plain words.
    """
    from halb.agent import etcdio  # the agent side owns how etcd is opened

    async def main() -> T:
        client = etcdio.connect(cfg, os.environ.get("HALB_NODE"))
        try:
            await client.check()
            return await work(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(f"error: {issue}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except (TimeoutError, EtcdError, OSError) as exc:
        fail(f"no etcd endpoint answered ({type(exc).__name__}: {exc})")
        raise AssertionError("unreachable") from None
