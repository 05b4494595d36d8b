"""What a drill runs against and with which options: the lab (from its state file,
HALB_LAB_INSTANCE) or any cluster (``--config`` with ``--client-ns`` or ``--client-cmd``)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halb.config import ClusterConfig, load_config
from halb.lab import builder

__all__ = [
    "ETCD_FAULTS",
    "FAULTS",
    "LAB_ONLY",
    "OUTAGE",
    "OUTAGE_WITH",
    "DrillError",
    "DrillOptions",
    "Target",
    "resolve_target",
]

# etcd-member: SIGKILL the etcd member the active node's client uses; etcd-leader: the
# raft leader; etcd-hang: SIGSTOP the member in use (3-member lab etcd).
ETCD_FAULTS = ("etcd-member", "etcd-leader", "etcd-hang")
# Every etcd member down for --outage-seconds, then back (issue 15).
OUTAGE = "etcd-outage"
# What may happen to the active during that outage (--outage-with).
OUTAGE_WITH = ("kill", "partition")
FAULTS = (
    "kill", "stop", "term", "link-down", "etcd-cut", "partition", "planned", *ETCD_FAULTS, OUTAGE,
)  # fmt: skip
LAB_ONLY = {"kill", "stop", "term", "link-down", "etcd-cut", "partition", *ETCD_FAULTS, OUTAGE}


class DrillError(RuntimeError):
    """A drill cannot run; worded for the operator."""


@dataclass
class DrillOptions:
    fault: str = "kill"
    node: str | None = None  # default: the active node
    connections: int = 20
    duration: float = 6.0  # seconds of traffic after the fault
    warmup: float = 1.0  # seconds of traffic before it
    interval: float = 0.01
    new_interval: float = 0.005
    new_kind: str = "http"
    repeat: int = 1
    settle_timeout: float = 30.0
    stall: float = 1.0
    heal: bool = True
    fault_cmd: str | None = None
    heal_cmd: str | None = None
    arp_probe: float = 0.2  # seconds between ARP probes for the VIP (0: none)
    outage_seconds: float = 10.0  # etcd-outage: how long every member is down
    outage_with: str | None = None  # etcd-outage: kill or partition the active during it
    outage_with_at: float = 2.0  # ... this many seconds into the outage


@dataclass
class Target:
    config_path: Path
    cfg: ClusterConfig
    group: str
    vip: str
    echo_port: int
    http_port: int
    client_prefix: list[str]
    client_python: str
    lab: dict[str, Any] | None = None
    macs: dict[str, str] = field(default_factory=dict)  # node -> front MAC
    arp_iface: str = "eth0"

    @property
    def virtual_mac(self) -> str | None:
        """The group's virtual MAC: every owner answers from it (halb.net.vmac)."""
        g = next(g for g in self.cfg.vip_groups if g.name == self.group)
        return g.virtual_mac.mac if g.virtual_mac is not None else None

    @property
    def names(self) -> dict[str, str]:
        names = {m.lower(): n for n, m in self.macs.items()}
        if self.virtual_mac is not None:
            names[self.virtual_mac] = "virtual-mac"
        return names


def resolve_target(
    config: str | None,
    client_ns: str | None,
    client_cmd: str | None,
    group: str | None,
    echo_port: int,
    http_port: int,
    arp_iface: str,
) -> Target:
    state = builder.load_state()
    lab = None
    if config is None:
        if state is None:
            raise DrillError(
                "no lab is up (HALB_LAB_INSTANCE): run `halb lab up`, or pass --config with "
                "--client-ns or --client-cmd"
            )
        lab, config = state, state["config"]
    elif state is not None and Path(config).resolve() == Path(state["config"]).resolve():
        lab = state
    assert config is not None
    cfg = load_config(config)
    names = [g.name for g in cfg.vip_groups]
    gname = group or names[0]
    if gname not in names:
        raise DrillError(f"no group {gname!r} in {config} (groups: {', '.join(names)})")
    gcfg = next(g for g in cfg.vip_groups if g.name == gname)
    vip = str(gcfg.vips[0].address)
    if client_cmd:
        prefix, python = shlex.split(client_cmd), "python3"
    elif client_ns:
        prefix, python = ["ip", "netns", "exec", client_ns], sys.executable
    elif lab is not None:
        prefix, python = ["ip", "netns", "exec", lab["client"]["namespace"]], sys.executable
    else:
        raise DrillError("outside the lab, say where the client runs: --client-ns or --client-cmd")
    macs = {n["name"]: n["mac"] for n in lab["nodes"]} if lab else {}
    if lab is not None:
        echo_port, http_port = int(lab["echo_port"]), int(lab["http_port"])
    return Target(
        Path(config), cfg, gname, vip, echo_port, http_port, prefix, python, lab, macs, arp_iface
    )
