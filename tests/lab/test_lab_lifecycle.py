"""The lab as a user drives it: through the `halb` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from halb.lab import builder
from halb.lab.topology import site_from_env

SITE = site_from_env()

HALB = [str(Path(sys.executable).with_name("halb"))]


def halb(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HALB, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def in_client(code: str) -> str:
    r = halb("lab", "exec", SITE.ns("client"), "--", sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_json_is_a_stable_interface(lab: dict[str, Any]) -> None:
    r = halb("lab", "status", "--output", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("vip", "echo_port", "http_port", "udp_port", "config", "etcd", "client"):
        assert key in doc
    assert set(doc["client"]) >= {"namespace", "address"}
    for kind in ("nodes", "backends"):
        assert doc[kind], kind
        for h in doc[kind]:
            assert set(h) >= {"name", "namespace", "address", "mac"}
    assert Path(doc["config"]).exists()
    check = halb("config", "validate", doc["config"])
    assert (check.returncode, check.stdout) == (0, "OK\n")
    table = halb("lab", "status")
    for h in doc["backends"]:
        assert h["namespace"] in table.stdout and h["mac"] in table.stdout


def test_client_reaches_every_backend_by_http_tcp_and_udp(lab: dict[str, Any]) -> None:
    for b in lab["backends"]:
        r = halb("lab", "exec", SITE.ns("client"), "--", "curl", "-s", "-m", "5",
                 f"http://{b['address']}/")  # fmt: skip
        assert (r.returncode, r.stdout) == (0, f"{b['name']}\n"), r.stderr
    b = lab["backends"][-1]
    out = in_client(
        "import socket\n"
        f"s = socket.create_connection(({b['address']!r}, {lab['echo_port']}), timeout=5)\n"
        "s.sendall(b'ping-1\\n'); print(s.recv(64))\n"
        "s.sendall(b'WHOAMI\\n'); print(s.recv(64))\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)\n"
        f"u.sendto(b'dgram', ({b['address']!r}, {lab['udp_port']})); print(u.recv(64))\n"
        "u.close(); s.close()\n"
    )
    assert out.splitlines() == ["b'ping-1\\n'", f"b'{b['name']}\\n'", "b'dgram'"]


def test_etcd_is_reachable_from_host_and_balancers(lab: dict[str, Any]) -> None:
    r = subprocess.run(["curl", "-s", "-m", "5", f"{lab['etcd']}/health"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert '"health":"true"' in r.stdout
    for n in lab["nodes"]:
        r = halb("lab", "exec", n["namespace"], "--", "curl", "-s", "-m", "5",
                 f"{lab['etcd']}/health")  # fmt: skip
        assert '"health":"true"' in r.stdout, (n["name"], r.stderr)


def test_exec_in_an_unknown_namespace_fails_clearly(lab: dict[str, Any]) -> None:
    r = halb("lab", "exec", "nosuch", "--", "true")
    assert r.returncode == 2
    assert f"no lab namespace '{SITE.ns('nosuch')}'" in r.stderr


def test_up_twice_is_refused_and_keeps_the_running_lab(lab: dict[str, Any]) -> None:
    r = halb("lab", "up")
    assert r.returncode == 1 and "already up" in r.stderr
    assert builder.is_up()


def _leftovers() -> dict[str, Any]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    link = subprocess.run(["ip", "link", "show", SITE.host_link], capture_output=True).returncode
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            # Every lab process names the lab directory (etcd data, config, ready file).
            if f"{SITE.lab_dir}/".encode() in cmd:
                procs.append(cmd.replace(b"\0", b" ").decode())
    return {
        "namespaces": [x.split()[0] for x in ns.splitlines() if SITE.owns(x.split()[0])],
        "host_link": link == 0,
        "processes": procs,
        "lab_dir": SITE.lab_dir.exists(),
        "pinned_maps": (Path("/run/halb/bpffs") / SITE.cluster).exists(),
    }


NOTHING = {
    "namespaces": [],
    "host_link": False,
    "processes": [],
    "lab_dir": False,
    "pinned_maps": False,
}


def test_down_removes_everything_and_is_idempotent(lab: dict[str, Any]) -> None:
    assert _leftovers()["namespaces"]
    r = halb("lab", "down")
    assert r.returncode == 0, r.stderr
    assert _leftovers() == NOTHING
    r = halb("lab", "down")
    assert r.returncode == 0 and "nothing to remove" in r.stdout


def test_down_cleans_up_after_a_crashed_run(lab: dict[str, Any]) -> None:
    # A crash loses the state file (and with it the pid list).
    (Path(lab["lab_dir"]) / "state.json").unlink()
    assert not builder.is_up()
    r = halb("lab", "down")
    assert r.returncode == 0, r.stderr
    assert _leftovers() == NOTHING
