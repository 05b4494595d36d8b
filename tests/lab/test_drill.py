"""`halb drill` against the lab: a real kill under traffic, measured end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from halb.lab import faults
from halb.lab.observe import leader, wait_until

HALB = str(Path(sys.executable).with_name("halb"))


def test_kill_drill_loses_no_connection_and_plots(lab: dict[str, Any], tmp_path: Path) -> None:
    faults.heal(lab)
    wait_until("lb1 to lead", lambda: leader(lab["config"]) == "lb1", 30)
    png = tmp_path / "drill.png"
    r = subprocess.run(
        [HALB, "drill", "--fault", "kill", "--connections", "10", "--duration", "4",
         "--output", "json", "--plot", str(png), "--quiet"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    d = doc["drills"][0]
    assert d["old_owner"] == "lb1" and d["new_owner"] == "lb2"
    assert d["connections"] == 10
    assert d["lost"] == 0, [c for c in d["per_connection"] if c["lost"]]
    # The lease TTL is 1 s: the new owner announces after it, well within 5 s.
    assert d["first_garp_from"] == "lb2"
    assert 0.2 < d["first_garp_s"] < 5.0
    assert d["two_owners"] == []
    # Without a virtual MAC the client's ARP entry moves to the new owner's MAC
    # (test_vmac_lab.py: with one, it never changes).
    macs = {n["name"]: n["mac"] for n in lab["nodes"]}
    assert d["client_arp"] == {"before": macs["lb1"], "after": macs["lb2"]}
    assert d["gap_s"]["max"] < 5.0
    assert doc["summary"]["lost_total"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    # The drill heals: the killed agent runs again and lb1 leads.
    assert faults.agent_pid("lb1") is not None
    assert leader(lab["config"]) == "lb1"


def test_drill_outside_the_lab_needs_a_client(lab: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "halb.yaml"
    other.write_text(Path(lab["config"]).read_text())
    r = subprocess.run([HALB, "drill", "--config", str(other), "--fault", "planned", "-q"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 1
    assert "--client-ns or --client-cmd" in r.stderr
