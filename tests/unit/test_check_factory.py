from __future__ import annotations

from pathlib import Path

import pytest

from halb.checks.exec import ExecChecker
from halb.checks.factory import targets_from_config
from halb.checks.http import HttpChecker
from halb.checks.tcp import TcpChecker
from halb.checks.udp import UdpChecker
from halb.cli.backends import resolve_backend
from halb.config import load_config, parse_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_targets_follow_the_config() -> None:
    cfg = load_config(ROOT / "examples" / "xdp.yaml")
    targets = {t.key: t for t in targets_from_config(cfg)}
    assert len(targets) == sum(len(s.backends) for s in cfg.services())

    http = targets["10.0.0.100:80/tcp/10.0.0.23:80"]
    assert isinstance(http.checker, HttpChecker)
    assert http.checker.path == "/healthz" and not http.checker.tls
    assert http.checker.target == "http://10.0.0.23:80/healthz"
    assert (http.interval, http.timeout) == (1.0, 0.5)
    assert (http.thresholds.rise, http.thresholds.fall) == (2, 3)

    udp = targets["10.0.0.100:53/udp/10.0.0.21:53"]
    assert isinstance(udp.checker, UdpChecker) and udp.checker.payload == b"ping"

    tcp6 = targets["[2001:db8::100]:443/tcp/[2001:db8:1::22]:443"]
    assert isinstance(tcp6.checker, TcpChecker)
    assert tcp6.checker.target == "tcp [2001:db8:1::22]:443"


def _cfg(health_check: dict[str, object]) -> dict[str, object]:
    return {
        "cluster": "c",
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "dataplane": {"kind": "xdp"},
        "nodes": [
            {"name": "lb1", "address": "10.0.0.11/24", "interface": "eth0", "priority": 1,
             "sync_address": "10.0.2.11:7700"},
        ],
        "vip_groups": [
            {"name": "g", "vips": [{"address": "10.0.0.100", "services": [
                {"port": 443, "forwarding": "dsr", "health_check": health_check,
                 "backends": [{"address": "10.0.0.21"}, {"address": "10.0.0.22", "port": 8443}]},
            ]}]},
        ],
        "sync": {"insecure": True},
        "admin": {"insecure": True},
    }  # fmt: skip


def test_https_exec_none_and_port_override() -> None:
    t = targets_from_config(
        parse_config(_cfg({"type": "https", "verify_tls": False, "port": 9443}))
    )
    assert isinstance(t[0].checker, HttpChecker) and t[0].checker.tls
    assert not t[0].checker.verify_tls and t[0].checker.port == 9443
    assert t[0].checker._host_header() == "10.0.0.21:9443"

    t = targets_from_config(
        parse_config(_cfg({"type": "exec", "command": ["/bin/check", "{address}:{port}"]}))
    )
    assert isinstance(t[1].checker, ExecChecker)
    assert t[1].checker.argv == ["/bin/check", "10.0.0.22:8443"]

    t = targets_from_config(parse_config(_cfg({"type": "none"})))
    assert [x.checker for x in t] == [None, None]


def test_resolve_backend_arguments() -> None:
    services = parse_config(_cfg({"type": "tcp"})).services()
    key = "10.0.0.100:443/tcp/10.0.0.22:8443"
    assert resolve_backend(services, "10.0.0.100:443", "10.0.0.22") == key
    assert resolve_backend(services, "10.0.0.100:443/tcp", "10.0.0.22:8443") == key
    for svc, backend, message in [
        ("10.0.0.100", "10.0.0.22", "needs a port"),
        ("10.0.0.100:443/udp", "10.0.0.22", "no service"),
        ("10.0.0.100:80", "10.0.0.22", "no service"),
        ("10.0.0.100:443", "10.0.0.22:443", "no backend"),
        ("10.0.0.100:443", "backend-a", "is not ADDRESS"),
        ("vip:443", "10.0.0.22", "is not VIP:PORT"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_backend(services, svc, backend)
