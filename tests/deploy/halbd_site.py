"""The deployed site of the deploy tier: which machines, their addresses, the inventory
that site.yml is applied with, and running ansible and halb against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from halbd_machines import FRONT, MGMT, Fabric, Link, Machine

TOP = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = TOP / "deploy/ansible"
ANSIBLE_VENV = TOP / ".venv-deploy"
HALB = Path(sys.executable).with_name("halb")
# Lab instance 7 owns 10.92.x.x (10.(99-N)): the front segment 10.92.0.0/24 (client,
# balancers, backends, VIP), the management segment 10.92.2.0/24 (host .1, etcd, ssh,
# flow sync).
SUBNET = os.environ.get("HALB_DEPLOY_SUBNET", "10.92")
VIP = f"{SUBNET}.0.100"

# name -> (host number, on the front segment too)
HOSTS = {
    "lb1": (11, True),
    "lb2": (12, True),
    "be1": (21, True),
    "be2": (22, True),
    "be3": (23, True),
    "client": (50, True),
    "etcd1": (31, False),
    "etcd2": (32, False),
    "etcd3": (33, False),
}


def machines() -> list[Machine]:
    out = []
    for name, (n, front) in HOSTS.items():
        links = [Link(MGMT, "eth1", f"{SUBNET}.2.{n}/24", f"02:4a:02:00:00:{n:02x}")]
        if front:
            links.insert(0, Link(FRONT, "eth0", f"{SUBNET}.0.{n}/24", f"02:4a:00:00:00:{n:02x}"))
        out.append(Machine(name, links))
    return out


def inventory(fabric: Fabric, key: Path) -> dict[str, Any]:
    m = fabric.machines

    def host(name: str, **extra: Any) -> dict[str, Any]:
        h: dict[str, Any] = {"ansible_host": m[name].ip(MGMT), "halb_mgmt_ip": m[name].ip(MGMT)}
        if any(ln.segment == FRONT for ln in m[name].links):
            h["halb_front_ip"] = m[name].ip(FRONT)
            h["halb_front_mac"] = m[name].mac(FRONT)
        return {**h, **extra}

    return {
        "all": {
            "children": {
                "balancers": {
                    "hosts": {
                        "lb1": host("lb1", halb_priority=200),
                        "lb2": host("lb2", halb_priority=100),
                    }
                },
                "backends": {"hosts": {b: host(b) for b in ("be1", "be2", "be3")}},
                "etcd": {"hosts": {e: host(e) for e in ("etcd1", "etcd2", "etcd3")}},
                "clients": {"hosts": {"client": host("client")}},
            },
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(key),
                "ansible_ssh_common_args": (
                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
                ),
                "halb_balancer_cluster": "deploy",
                "halb_balancer_vip_groups": [
                    {
                        "name": "web",
                        "preempt": True,
                        "preempt_delay": 2.0,
                        "announce": {"count": 3, "interval": 0.1},
                        "vips": [
                            {
                                "address": VIP,
                                "services": [
                                    {
                                        "port": 9000,
                                        "protocol": "tcp",
                                        "forwarding": "dsr",
                                        "health_check": {"type": "tcp"},
                                    },
                                    {
                                        "port": 80,
                                        "protocol": "tcp",
                                        "forwarding": "dsr",
                                        "health_check": {"type": "http"},
                                    },
                                ],
                            }
                        ],
                    }
                ],
                "halb_backend_mode": "dsr",
                "halb_backend_vips": [VIP],
            },
        }
    }


@dataclass
class PlayResult:
    rc: int
    output: str
    changed: dict[str, int]
    failed: dict[str, int]

    @property
    def total_changed(self) -> int:
        return sum(self.changed.values())


RECAP = re.compile(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


@dataclass
class Site:
    fabric: Fabric
    workdir: Path
    wheelhouse: Path

    @property
    def inventory_dir(self) -> Path:
        return self.workdir / "inventory"

    @property
    def config(self) -> Path:
        """The cluster config as rendered for the site (the controller's copy)."""
        return self.inventory_dir / "pki/halb.yaml"

    def write_inventory(self, key: Path) -> None:
        (self.inventory_dir / "pki").mkdir(parents=True, exist_ok=True)
        (self.inventory_dir / "hosts.yml").write_text(
            yaml.safe_dump(inventory(self.fabric, key), sort_keys=False)
        )

    def playbook(
        self, playbook: Path, *extra: str, timeout: float = 900, log: str | None = None
    ) -> PlayResult:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{ANSIBLE_VENV / 'bin'}:{os.environ.get('PATH', '')}",
        }
        argv = [
            str(ANSIBLE_VENV / "bin/ansible-playbook"),
            "-i",
            str(self.inventory_dir / "hosts.yml"),
            str(playbook),
            "-e",
            f"halb_balancer_wheelhouse_src={self.wheelhouse}/",
            "-e",
            f"halb_balancer_controller_halb={HALB}",
            "-e",
            f"halb_src={TOP}",
            *extra,
        ]
        p = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        out = p.stdout + p.stderr
        if log:
            (self.workdir / f"{log}.log").write_text(out)
        changed, failed = {}, {}
        for line in out.splitlines():
            mt = RECAP.match(line)
            if mt:
                changed[mt.group(1)] = int(mt.group(2))
                failed[mt.group(1)] = int(mt.group(3)) + int(mt.group(4))
        return PlayResult(p.returncode, out, changed, failed)

    def halb(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HALB), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "HALB_CONFIG": str(self.config)},
        )

    def status(self) -> dict[str, Any]:
        r = self.halb("status", "--config", str(self.config), "-o", "json", timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"halb status failed: {r.stderr}")
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def active(self) -> str | None:
        active = self.status()["groups"][0]["active"]
        return str(active) if active else None

    def wait_settled(self, want: str = "lb1", timeout: float = 60) -> dict[str, Any]:
        """Until ``want`` is active and every other live balancer follows it, synced."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
            except (RuntimeError, subprocess.TimeoutExpired, ValueError):
                time.sleep(0.5)
                continue
            if last["groups"][0]["active"] == want and all(
                n["name"] == want or (n["role"] == "standby" and n["sync"].get("synced") is True)
                for n in last["nodes"]
            ):
                return last
            time.sleep(0.3)
        raise AssertionError(f"not settled on {want} in {timeout} s: {json.dumps(last)[:2000]}")

    def drill(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        r = self.halb(
            "drill",
            "--config",
            str(self.config),
            "--client-ns",
            self.fabric.machines["client"].netns,
            "-q",
            "-o",
            "json",
            *args,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise AssertionError(f"halb drill {' '.join(args)} failed: {r.stdout}{r.stderr}")
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def ssh_cmd(self, name: str, cmd: str) -> str:
        """A shell command line that runs cmd on machine name (for --fault-cmd)."""
        import shlex

        return " ".join(shlex.quote(a) for a in [*self.fabric.ssh_argv(name), cmd])
