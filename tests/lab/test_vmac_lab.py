"""The virtual MAC in the lab (issue 15): the group answers from 00:00:5e:00:01:01 on a
macvlan that moves with the term. A planned failover and a SIGKILL of the active under
traffic lose nothing, and the client's ARP entry for the VIP never changes (beside it,
test_drill.py shows the default mode's entry moving to the new owner's MAC)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from halb.lab import faults
from halb.lab.agents import apply_config, start_agents, stop_agents, wait_settled
from halb.lab.netns import run
from halb.lab.observe import cluster_status

pytestmark = pytest.mark.lab

HALB = str(Path(sys.executable).with_name("halb"))
VMAC = "00:00:5e:00:01:01"


def restart_agents(lab: dict[str, Any]) -> None:
    # The virtual MAC is taken at agent start.
    stop_agents(lab)
    start_agents(lab, [])
    wait_settled(lab, sync=True)


@pytest.fixture
def vmac_lab(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    faults.heal(lab)
    path = Path(lab["config"])
    original = path.read_text()
    doc = yaml.safe_load(original)
    doc["vip_groups"][0]["virtual_mac"] = {"id": 1}
    # The drill reads the file; the agents prefer the config stored in etcd.
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    apply_config(lab, doc)
    try:
        restart_agents(lab)
        yield lab
    finally:
        path.write_text(original)
        faults.heal(lab)
        apply_config(lab, yaml.safe_load(original))
        restart_agents(lab)


def drill(fault: str) -> dict[str, Any]:
    r = subprocess.run(
        [HALB, "drill", "--fault", fault, "--connections", "10", "--duration", "4",
         "--output", "json", "--quiet"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    d: dict[str, Any] = json.loads(r.stdout)["drills"][0]
    return d


def links(ns: str) -> str:
    return run(["ip", "-n", ns, "-o", "link", "show"])


def test_failovers_keep_the_clients_arp_entry(vmac_lab: dict[str, Any]) -> None:
    lb1, lb2 = (n["namespace"] for n in vmac_lab["nodes"][:2])
    assert cluster_status(vmac_lab["config"])["groups"][0]["virtual_mac"] == VMAC
    for fault in ("planned", "kill"):
        # Only the active has the macvlan, with the group's MAC; the standby sends
        # nothing from it.
        assert VMAC in links(lb1) and "halb-vmac1" in links(lb1)
        assert "halb-vmac1" not in links(lb2)
        d = drill(fault)
        assert d["old_owner"] == "lb1" and d["new_owner"] == "lb2", fault
        assert d["lost"] == 0, [c for c in d["per_connection"] if c["lost"]]
        assert d["client_arp"] == {"before": VMAC, "after": VMAC}, fault
        # The new owner announced from the virtual MAC, and no node ever claimed the
        # VIP from its own MAC.
        assert d["first_garp_from"] == "virtual-mac", fault
        assert d["two_owners"] == []
        assert all(c["mac"] == VMAC for c in d["claims"]), d["claims"]
        v = d["vip_holders"]
        assert v is not None and v["one_s"].get("lb2", 0.0) > 1.0, v
        if fault == "planned":
            # A hand-over: the old owner removed the address (and its macvlan) first.
            assert v["several_s"] == 0, v
        # The drill healed and lb1 leads again; its standby in sync before the next.
        wait_settled(vmac_lab, sync=True)
