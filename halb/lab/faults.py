"""Fault injection and agent control in the lab (`halb lab fault`, drills, tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from halb.lab import netns, procs
from halb.lab.errors import FaultError, LabError
from halb.lab.etcd_members import (
    ETCD_FAULTS,
    OUTAGE_FAULTS,
    etcd_fault,
    heal_members,
    start_all_members,
    stop_all_members,
)
from halb.lab.netns import run
from halb.lab.procs import agent_pid, is_stopped, short_name, start_agent
from halb.lab.topology import NS_PREFIX

__all__ = ["FAULTS", "FaultError", "agent_pid", "apply_fault", "start_agent", "stop_agent"]

FAULTS = (
    "kill",
    "stop",
    "cont",
    "term",
    "start",
    "link-down",
    "link-up",
    "etcd-cut",
    "etcd-heal",
    *ETCD_FAULTS,
    *OUTAGE_FAULTS,
)

# A table of our own in the node's namespace: cutting etcd never touches the dataplane's.
_FAULT_TABLE = "halb_lab_fault"


def stop_agent(node: str) -> None:
    pid = agent_pid(node)
    if pid is not None:
        netns.kill_pids([pid])


def _signal(node: str, sig: signal.Signals) -> int:
    pid = agent_pid(node)
    if pid is None:
        raise FaultError(f"no agent runs on {short_name(node)}")
    os.kill(pid, sig)
    return pid


def _etcd_cut(ns: str, member_ips: list[str]) -> None:
    ips = "{ " + ", ".join(member_ips) + " }"
    rules = f"""
table inet {_FAULT_TABLE} {{
  chain out {{ type filter hook output priority -10; ip daddr {ips} tcp dport 2379 drop; }}
  chain in {{ type filter hook input priority -10; ip saddr {ips} tcp sport 2379 drop; }}
}}
"""
    run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=rules)


def _etcd_heal(ns: str) -> None:
    run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", _FAULT_TABLE], check=False)


def apply_fault(
    node: str, fault: str, state: dict[str, Any], *, etcd_member: str | None = None
) -> str:
    """Inject ``fault`` on lab node ``node``; returns a line saying what was done. The
    etcd faults hit a member of the lab's etcd: ``etcd_member`` (``host:port``, the one
    the node's client uses) or the first; etcd-leader the raft leader."""
    if fault in ETCD_FAULTS or fault in OUTAGE_FAULTS:
        try:
            if fault == "etcd-stop-all":
                return stop_all_members(state)
            if fault == "etcd-start-all":
                return start_all_members(state)
            return etcd_fault(fault, state, etcd_member)
        except LabError as exc:
            raise FaultError(str(exc)) from None
    if fault == "server-stop":
        return stop_backend(node, state)
    if fault == "server-start":
        return start_backend(node, state)
    entry = next((n for n in state["nodes"] if node in (n["name"], n["namespace"])), None)
    if entry is None:
        raise FaultError(f"{node} is not a balancer node of the lab")
    ns = entry["namespace"]
    node = ns
    if ns not in netns.list_namespaces(NS_PREFIX):
        raise FaultError(f"no lab namespace {ns!r} (is the lab up?)")
    etcd_ips = [m["address"] for m in state.get("etcd_members", [])] or [
        state["etcd"].split("//", 1)[1].rsplit(":", 1)[0]
    ]
    if fault == "kill":
        return f"SIGKILL agent pid {_signal(node, signal.SIGKILL)}"
    if fault == "stop":
        return f"SIGSTOP agent pid {_signal(node, signal.SIGSTOP)}"
    if fault == "cont":
        return f"SIGCONT agent pid {_signal(node, signal.SIGCONT)}"
    if fault == "term":
        return f"SIGTERM agent pid {_signal(node, signal.SIGTERM)}"
    if fault == "start":
        return f"started agent pid {start_agent(node, Path(state['config']))}"
    if fault in ("link-down", "link-up"):
        up = fault == "link-up"
        run(["ip", "-n", ns, "link", "set", "eth0", "up" if up else "down"])
        return f"{ns} eth0 {'up' if up else 'down'}"
    if fault == "etcd-cut":
        _etcd_cut(ns, etcd_ips)
        return f"{ns}: traffic to and from etcd {', '.join(etcd_ips)} (:2379) dropped"
    if fault == "etcd-heal":
        _etcd_heal(ns)
        return f"{ns}: etcd traffic restored"
    raise FaultError(f"unknown fault {fault!r} (one of {', '.join(FAULTS)})")


def heal(state: dict[str, Any]) -> list[str]:
    """Undo every fault: continue stopped agents, links up, etcd restored, agents started.
    Returns what was done (empty when nothing needed healing)."""
    done = []
    config = Path(state["config"])
    for n in state["nodes"]:
        ns = n["namespace"]
        pid = agent_pid(ns)
        if pid is not None and is_stopped(pid):
            os.kill(pid, signal.SIGCONT)
            done.append(f"{n['name']}: SIGCONT")
        if "state DOWN" in run(["ip", "-n", ns, "link", "show", "eth0"]):
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            done.append(f"{n['name']}: eth0 up")
        if (
            run(["ip", "netns", "exec", ns, "nft", "list", "tables"], check=False).find(
                _FAULT_TABLE
            )
            >= 0
        ):
            _etcd_heal(ns)
            done.append(f"{n['name']}: etcd restored")
        if pid is None:
            start_agent(ns, config)
            done.append(f"{n['name']}: agent started")
    return heal_members(state) + done


def _backend(name: str, state: dict[str, Any]) -> dict[str, Any]:
    backends: list[dict[str, Any]] = state["backends"]
    entry = next((b for b in backends if name in (b["name"], b["namespace"])), None)
    if entry is None:
        raise FaultError(f"{name} is not a backend of the lab")
    return entry


def server_pid(name: str, state: dict[str, Any]) -> int | None:
    """The pid of the backend server running in backend ``name``'s namespace."""
    ns = _backend(name, state)["namespace"]
    for pid in netns.netns_pids(ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"halb.lab.backend_server" in argv and netns.pid_alive(pid):
            return pid
    return None


def stop_backend(name: str, state: dict[str, Any]) -> str:
    """Stop a backend's server (its health checks start failing)."""
    pid = server_pid(name, state)
    if pid is None:
        raise FaultError(f"no server runs on {name}")
    netns.kill_pids([pid])
    return f"stopped the server on {name} (pid {pid})"


def start_backend(name: str, state: dict[str, Any]) -> str:
    entry = _backend(name, state)
    if (pid := server_pid(name, state)) is not None:
        raise FaultError(f"a server already runs on {name} (pid {pid})")
    pid = procs.start_backend(entry["name"], entry["namespace"], Path(state["lab_dir"]))
    return f"started the server on {name} (pid {pid})"
