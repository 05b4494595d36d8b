"""Driving the lab's agents from a test or a drill: cluster status, config applies,
restarting every agent with extra flags, waiting for a settled group.

``lab`` is the lab's state (what `halb lab status --output json` prints).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from halb.lab import faults, procs
from halb.lab.observe import cluster_status, wait_until
from halb.lab.procs import spawn

__all__ = [
    "active",
    "agent_log_lines",
    "agents_run",
    "apply_config",
    "cli_flows",
    "logs_on_failure",
    "node_status",
    "restart_agents",
    "start_agents",
    "status",
    "stop_agents",
    "wait_settled",
]

HALB = str(Path(sys.executable).with_name("halb"))


def status(lab: dict[str, Any]) -> dict[str, Any]:
    return cluster_status(lab["config"])


def active(lab: dict[str, Any]) -> str | None:
    groups = status(lab)["groups"]
    return groups[0]["active"] if groups else None


def node_status(lab: dict[str, Any], name: str) -> dict[str, Any]:
    nodes = status(lab)["nodes"]
    return next(n for n in nodes if n["name"] == name)


def apply_config(lab: dict[str, Any], doc: dict[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    try:
        subprocess.run(
            [HALB, "config", "apply", "--config", lab["config"], f.name, "--timeout", "30"],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        Path(f.name).unlink()


def start_agents(lab: dict[str, Any], extra: list[str]) -> None:
    for n in lab["nodes"]:
        argv = procs.agent_argv(n["name"], Path(lab["config"])) + extra
        log = Path(lab["lab_dir"]) / "logs" / f"agent-{n['name']}.log"
        spawn(argv, log, ns=n["namespace"], append=True)


def stop_agents(lab: dict[str, Any]) -> None:
    for n in lab["nodes"]:
        name = n["name"]
        if faults.agent_pid(name) is not None:
            faults.apply_fault(name, "term", lab)
            wait_until(f"agent on {name} to exit", lambda: faults.agent_pid(name) is None, 15)  # noqa: B023


def agents_run(lab: dict[str, Any], flag: str | None) -> bool:
    """Every agent is up and (flag None) runs without, or (flag) with, that flag."""
    for n in lab["nodes"]:
        pid = faults.agent_pid(n["name"])
        if pid is None:
            return False
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if (b"--no-sync" in argv) != (flag == "--no-sync"):
            return False
    return True


def restart_agents(lab: dict[str, Any], extra: list[str]) -> None:
    if agents_run(lab, extra[0] if extra else None):
        wait_settled(lab, sync=not extra)
        return
    stop_agents(lab)
    start_agents(lab, extra)
    wait_settled(lab, sync=not extra)


def wait_settled(lab: dict[str, Any], sync: bool) -> None:
    """lb1 active, every node alive; with sync, the standbys in sync with it."""
    first = lab["nodes"][0]["name"]

    def settled() -> bool:
        st = status(lab)
        if not st["groups"] or st["groups"][0]["active"] != first:
            return False
        nodes = st["nodes"]
        if not all(n["alive"] for n in nodes):
            return False
        if sync:
            return all(n["sync"].get("synced") for n in nodes if n["name"] != first)
        return True

    wait_until(f"{first} active with every agent up", settled, 60, every=0.2)


def cli_flows(lab: dict[str, Any]) -> dict[str, int]:
    """`halb flows --vip VIP --output json`: per node, the flows from this lab's client."""
    out = subprocess.run(
        [HALB, "flows", "--config", lab["config"], "--vip", lab["vip"], "--output", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    client = lab["client"]["address"] + ":"
    return {
        name: sum(f["client"].startswith(client) for f in doc.get("flows", []))
        for name, doc in json.loads(out)["nodes"].items()
    }


# What a failing lab test wants to see of the agents' logs: sync, state changes, trouble.
LOG_KEYS = ("halb.sync", "syncroles", " -> ", "floating", "ERROR", "WARNING")


def agent_log_lines(lab: dict[str, Any], keep: tuple[str, ...] = LOG_KEYS, last: int = 25) -> str:
    out = []
    for n in lab["nodes"]:
        path = Path(lab["lab_dir"]) / "logs" / f"agent-{n['name']}.log"
        lines = [ln for ln in path.read_text().splitlines() if any(k in ln for k in keep)]
        out.append(f"--- {path}\n" + "\n".join(lines[-last:]))
    return "\n".join(out)


@contextlib.contextmanager
def logs_on_failure(lab: dict[str, Any]) -> Iterator[None]:
    """Failures carry the agents' sync and state lines: the lab is gone afterwards."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent_log_lines(lab)}") from None
