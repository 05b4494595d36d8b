"""From the config to checkers: one :class:`CheckTarget` per configured backend.

The only place that knows which checker class serves which ``health_check.type``.
Sorry backends are not checked (see :mod:`halb.checks.view`).
"""

from __future__ import annotations

from dataclasses import dataclass

from halb.checks.base import Checker
from halb.checks.exec import ExecChecker
from halb.checks.http import HttpChecker
from halb.checks.state import DEFAULT_THRESHOLDS, Thresholds
from halb.checks.tcp import TcpChecker
from halb.checks.udp import DEFAULT_PAYLOAD, UdpChecker
from halb.checks.view import backend_key
from halb.config import ClusterConfig, HealthCheckConfig, group_services
from halb.model import Backend

__all__ = ["CheckTarget", "make_checker", "targets_from_config"]


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """What the scheduler runs for one backend. ``checker`` None = not checked (type
    ``none``): the backend stays up."""

    key: str
    checker: Checker | None
    interval: float = 1.0
    timeout: float = 0.5
    thresholds: Thresholds = DEFAULT_THRESHOLDS


def make_checker(hc: HealthCheckConfig, backend: Backend) -> Checker | None:
    port = hc.port or backend.port
    address = str(backend.address)
    match hc.type:
        case "none":
            return None
        case "tcp":
            return TcpChecker(address, port)
        case "http" | "https":
            return HttpChecker(
                address,
                port,
                path=hc.path,
                expect_status=hc.expect_status,
                expect_body=hc.expect_body,
                tls=hc.type == "https",
                verify_tls=hc.verify_tls,
            )
        case "udp":
            return UdpChecker(
                address,
                port,
                payload=hc.payload.encode() if hc.payload is not None else DEFAULT_PAYLOAD,
                expect=hc.expect_body.encode() if hc.expect_body is not None else None,
            )
        case "exec":
            if not hc.command:
                raise ValueError("an exec check needs a command")
            return ExecChecker(hc.command, address, port)
    raise ValueError(f"unknown health check type {hc.type!r}")


def targets_from_config(cfg: ClusterConfig) -> list[CheckTarget]:
    """Every backend of every service, in config order."""
    out: list[CheckTarget] = []
    for group in cfg.vip_groups:
        service_configs = [s for vip in group.vips for s in vip.services]
        for svc, sc in zip(group_services(group), service_configs, strict=True):
            hc = sc.health_check
            for b in svc.backends:
                out.append(
                    CheckTarget(
                        key=backend_key(svc.key, b),
                        checker=make_checker(hc, b),
                        interval=hc.interval,
                        timeout=hc.timeout,
                        thresholds=Thresholds(rise=hc.rise, fall=hc.fall),
                    )
                )
    return out
