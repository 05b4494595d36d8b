"""`halb backends` (the published backend view) and `halb backend drain|undrain`."""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from halb.checks.publish import HealthKeys, clear_drain, read_drains, read_view, set_drain
from halb.checks.view import BackendView, Drain, HealthView, ViewError, backend_key
from halb.cli.common import (
    EXIT_BAD_INPUT,
    config_option,
    echo_json,
    fail,
    load_or_exit,
    output_option,
    run_etcd,
)
from halb.config import ClusterConfig
from halb.etcd import EtcdClient
from halb.model import Backend, Service

__all__ = ["backend_group", "backend_rows", "backends_cmd", "resolve_backend"]

T = TypeVar("T")


def _run(cfg: ClusterConfig, work: Callable[[EtcdClient, HealthKeys], Awaitable[T]]) -> T:
    """Run ``work`` against the cluster's etcd (every endpoint)."""
    try:
        return run_etcd(cfg, lambda client: work(client, HealthKeys.from_config(cfg)))
    except ViewError as exc:
        fail(f"the published health view is unreadable: {exc}")
    raise AssertionError("unreachable")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0.0, time.time() - ts)
    return f"{dt.datetime.fromtimestamp(ts).strftime('%H:%M:%S')} ({secs:.0f}s ago)"


def backend_rows(
    services: list[Service], view: HealthView | None, drains: dict[str, Drain]
) -> list[dict[str, Any]]:
    """One row per configured backend: the published state plus the drain keys (a
    drain shows at once, before the active node republishes)."""
    rows = []
    for svc in services:
        for b in svc.backends:
            key = backend_key(svc.key, b)
            e: BackendView | None = view.backends.get(key) if view is not None else None
            drain = drains.get(key)
            rows.append(
                {
                    "service": str(svc.key),
                    "backend": str(b),
                    "key": key,
                    "state": e.state.value if e is not None else "unknown",
                    # 0 = not known (no check result yet).
                    "since": e.since if e is not None and e.since else None,
                    "since_iso": _iso(e.since) if e is not None and e.since else None,
                    "reason": e.reason if e is not None else "not in the published view",
                    "weight": b.weight,
                    "drained": drain is not None,
                    "drain": None
                    if drain is None
                    else {"reason": drain.reason, "since": drain.since, "by": drain.by},
                    # The published view does not reflect the drain key yet (or still
                    # shows a drain that was lifted): the active node has not caught up.
                    "drain_pending": e is not None and e.drained != (drain is not None),
                    "last": None
                    if e is None or e.last_up is None
                    else {"up": e.last_up, "reason": e.last_reason},
                }
            )
    return rows


@click.command("backends")
@config_option
@output_option
def backends_cmd(config_path: str | None, output: str) -> None:
    """Show every backend's health: state (up, down, draining, damped), since when, the
    last check result and the reason, as published in etcd by the active node."""
    cfg = load_or_exit(config_path)

    async def work(client: EtcdClient, keys: HealthKeys) -> tuple[HealthView | None, Any]:
        return await read_view(client, keys), await read_drains(client, keys)

    view, drains = _run(cfg, work)
    rows = backend_rows(cfg.services(), view, drains)
    if output == "json":
        echo_json(
            {
                "view": None
                if view is None
                else {"revision": view.revision, "node": view.node, "term": view.term},
                "backends": rows,
            }
        )
        return
    if view is None:
        click.echo("no health view published yet (is an agent active?)")
    else:
        click.echo(f"health view r{view.revision} published by {view.node} (term {view.term})")
    click.echo(
        f"{'SERVICE':<22} {'BACKEND':<22} {'STATE':<10} {'SINCE':<22} {'LAST CHECK':<28} REASON"
    )
    for r in rows:
        state = r["state"] + ("*" if r["drain_pending"] else "")
        last = "-" if r["last"] is None else ("ok: " if r["last"]["up"] else "fail: ")
        if r["last"] is not None:
            last += r["last"]["reason"]
        click.echo(
            f"{r['service']:<22} {r['backend']:<22} {state:<10} {_ago(r['since']):<22} "
            f"{last[:28]:<28} {r['reason']}"
        )
    if any(r["drain_pending"] for r in rows):
        click.echo("* drain requested or lifted; not yet in the published view")


# --- drain / undrain ------------------------------------------------------------------


def _split_hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ValueError(f"{text!r}: bad port")
        return host, int(port)
    return text, None  # a bare IPv4 or IPv6 address


def resolve_backend(services: list[Service], service_arg: str, backend_arg: str) -> str:
    """The view key for ``VIP:PORT[/PROTO]`` and ``ADDRESS[:PORT]``; ValueError with a
    message for the operator when nothing or more than one thing matches."""
    svc_text, _, proto = service_arg.partition("/")
    try:
        vip_text, port = _split_hostport(svc_text)
        vip = ipaddress.ip_address(vip_text)
    except ValueError:
        raise ValueError(f"{service_arg!r} is not VIP:PORT or VIP:PORT/PROTO") from None
    if port is None:
        raise ValueError(f"{service_arg!r} needs a port (VIP:PORT)")
    matches = [
        s
        for s in services
        if s.key.vip == vip and s.key.port == port and (not proto or s.key.protocol == proto)
    ]
    if not matches:
        known = ", ".join(str(s.key) for s in services)
        raise ValueError(f"no service {service_arg} in the config (services: {known})")
    if len(matches) > 1:
        raise ValueError(f"{service_arg} is ambiguous ({', '.join(str(s.key) for s in matches)})")
    svc = matches[0]
    try:
        addr_text, bport = _split_hostport(backend_arg)
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        raise ValueError(f"{backend_arg!r} is not ADDRESS or ADDRESS:PORT") from None
    found: list[Backend] = [
        b for b in svc.backends if b.address == addr and (bport is None or b.port == bport)
    ]
    if len(found) != 1:
        known = ", ".join(str(b) for b in svc.backends)
        what = "no" if not found else "more than one"
        raise ValueError(f"{what} backend {backend_arg} in {svc.key} (backends: {known})")
    return backend_key(svc.key, found[0])


def _resolve_or_exit(cfg: ClusterConfig, service: str, backend: str) -> str:
    try:
        return resolve_backend(cfg.services(), service, backend)
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
        raise AssertionError("unreachable") from None


@click.group("backend")
def backend_group() -> None:
    """Drain or undrain one backend of a service (an operator action stored in etcd)."""


@backend_group.command("drain")
@config_option
@click.option("--reason", default="", help="Recorded with the drain and shown by `halb backends`.")
@click.argument("service", metavar="VIP:PORT[/PROTO]")
@click.argument("backend", metavar="BACKEND[:PORT]")
def drain_cmd(config_path: str | None, reason: str, service: str, backend: str) -> None:
    """Stop sending new flows to BACKEND of SERVICE; its existing flows keep going.

    The backend leaves the Maglev ring (weight 0) once the active node publishes the
    next view; flows already in the flow table stay on it until they end.
    """
    cfg = load_or_exit(config_path)
    key = _resolve_or_exit(cfg, service, backend)
    by = f"{getpass.getuser()}@{socket.gethostname()}"
    drain = Drain(reason=reason, since=time.time(), by=by)

    async def work(client: EtcdClient, keys: HealthKeys) -> None:
        await set_drain(client, keys, key, drain)

    _run(cfg, work)
    click.echo(f"drained {key}: no new flows once the active node publishes the view")


@backend_group.command("undrain")
@config_option
@click.argument("service", metavar="VIP:PORT[/PROTO]")
@click.argument("backend", metavar="BACKEND[:PORT]")
def undrain_cmd(config_path: str | None, service: str, backend: str) -> None:
    """Let BACKEND of SERVICE take new flows again (if its health checks pass)."""
    cfg = load_or_exit(config_path)
    key = _resolve_or_exit(cfg, service, backend)

    async def work(client: EtcdClient, keys: HealthKeys) -> bool:
        return await clear_drain(client, keys, key)

    existed = _run(cfg, work)
    click.echo(f"undrained {key}" if existed else f"{key} was not drained")
