"""Backend health in the lab: checks, one view for the cluster, drains, sorry backend."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from halb.lab import faults
from halb.lab.observe import cluster_status, leader, wait_until
from halb.lab.topology import site_from_env
from halb.lb.maglev import build_table, changed_slots

HALB = str(Path(sys.executable).with_name("halb"))
SITE = site_from_env()
VIP = f"{SITE.net(0)}.100"
ECHO = 9000
# Lab checks: interval 1 s, fall 3, rise 2 (the config defaults).
DOWN_WITHIN = 1.0 * 3 + 3.0
UP_WITHIN = 1.0 * 2 + 3.0

# A client that holds one connection open: prints the backend's name, then on each
# stdin line sends a payload and WHOAMI again and prints "echo-ok NAME" or "error ...".
HOLDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
def who():
    s.sendall(b"WHOAMI\n")
    return s.recv(64).decode().strip()
print(who(), flush=True)
for line in sys.stdin:
    try:
        s.sendall(b"ping\n")
        ok = s.recv(64) == b"ping\n"
        print(("echo-ok " if ok else "echo-bad ") + who(), flush=True)
    except OSError as exc:
        print(f"error {exc}", flush=True)
s.close()
"""

# Opens N fresh connections and prints the backend of each.
SPREAD = r"""
import socket, sys
for _ in range(int(sys.argv[3])):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"WHOAMI\n")
    print(s.recv(64).decode().strip())
    s.close()
"""


def halb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HALB, *args], capture_output=True, text=True, timeout=60, check=False)


def in_client(code: str, *args: str) -> list[str]:
    r = subprocess.run(
        ["ip", "netns", "exec", SITE.ns("client"), sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def spread(n: int = 40) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in in_client(SPREAD, VIP, str(ECHO), str(n)):
        out[name] = out.get(name, 0) + 1
    return out


class Holder:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                SITE.ns("client"),
                sys.executable,
                "-c",
                HOLDER,
                VIP,
                str(ECHO),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.backend = self.proc.stdout.readline().strip()

    def check(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def holder_on(backends: set[str], tries: int = 60) -> Holder:
    for _ in range(tries):
        h = Holder()
        if h.backend in backends:
            return h
        h.close()
    raise AssertionError(f"no connection landed on {backends}")


def rings(lab: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per node: service -> (digest, {backend: slots})."""
    out = {}
    for n in lab["nodes"]:
        r = halb("dataplane", "show", "--node", n["name"], "--output", "json")
        assert r.returncode == 0, r.stderr
        out[n["name"]] = {
            s["service"]: (s["ring_digest"], {b["backend"]: b["slots"] for b in s["backends"]})
            for s in json.loads(r.stdout)["services"]
        }
    return out


def echo_ring(lab: dict[str, Any], node: str = "lb1") -> dict[str, int]:
    return dict(rings(lab)[node][f"{VIP}:{ECHO}/tcp"][1])


def same_rings(lab: dict[str, Any]) -> bool:
    r = rings(lab)
    return all(r[n["name"]] == r["lb1"] for n in lab["nodes"])


def backend_addr(name: str, lab: dict[str, Any]) -> str:
    return next(b["address"] for b in lab["backends"] if b["name"] == name)


@pytest.fixture
def hl(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    original = Path(lab["config"]).read_text()
    faults.heal(lab)
    wait_until("lb1 to lead", lambda: leader(lab["config"]) == "lb1", 20)
    all_up(lab)
    yield lab
    for b in lab["backends"]:
        if faults.server_pid(b["name"], lab) is None:
            faults.start_backend(b["name"], lab)
        halb("backend", "undrain", f"{VIP}:{ECHO}", f"{b['address']}:{ECHO}")
    Path(lab["config"]).write_text(original)
    assert halb("config", "apply", lab["config"]).returncode == 0
    all_up(lab)


def not_up(lab: dict[str, Any]) -> list[str]:
    """The backends of the published view that are not up (or drained), with why."""
    r = halb("backends", "--output", "json")
    if r.returncode != 0:
        return [f"halb backends failed: {r.stderr.strip()}"]
    rows = json.loads(r.stdout)["backends"]
    bad = [
        f"{row['key']}: {row['state']} ({row['reason']}) drain={row.get('drain')}"
        for row in rows
        if row["state"] != "up" or row.get("drain")
    ]
    return bad if rows else ["no backends in the view"]


def all_up(lab: dict[str, Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while bad := not_up(lab):
        if time.monotonic() > deadline:
            raise AssertionError(f"backends not up after {timeout:g}s: {bad}")
        time.sleep(0.2)


def test_a_failed_backend_leaves_every_ring_and_comes_back(hl: dict[str, Any]) -> None:
    be2 = f"{backend_addr('be2', hl)}:{ECHO}"
    assert be2 in echo_ring(hl)
    keep = holder_on({"be1", "be3"})
    try:
        t0 = time.monotonic()
        faults.stop_backend("be2", hl)
        wait_until("be2 to leave the ring", lambda: be2 not in echo_ring(hl), DOWN_WITHIN)
        took = time.monotonic() - t0
        print(f"be2 left the ring {took:.1f}s after its server stopped (interval 1s x fall 3)")
        wait_until("identical rings on both nodes", lambda: same_rings(hl), 5)
        # Connections to the other backends are unaffected.
        assert keep.check() == f"echo-ok {keep.backend}"
        assert set(spread(30)) <= {"be1", "be3"}
        faults.start_backend("be2", hl)
        wait_until("be2 back in the ring", lambda: be2 in echo_ring(hl), UP_WITHIN)
        wait_until("identical rings on both nodes", lambda: same_rings(hl), 5)
        assert keep.check() == f"echo-ok {keep.backend}"
    finally:
        keep.close()


def test_drain_keeps_existing_connections_and_avoids_new_ones(hl: dict[str, Any]) -> None:
    be1 = f"{backend_addr('be1', hl)}:{ECHO}"
    held = holder_on({"be1"})
    try:
        r = halb("backend", "drain", f"{VIP}:{ECHO}", be1)
        assert r.returncode == 0, r.stderr
        wait_until("be1 to hold no ring slots", lambda: be1 not in echo_ring(hl), 10)
        assert held.check() == "echo-ok be1", "a drained backend lost its connection"
        assert "be1" not in spread(30)
        wait_until("identical rings on both nodes", lambda: same_rings(hl), 5)
        r = halb("backend", "undrain", f"{VIP}:{ECHO}", be1)
        assert r.returncode == 0, r.stderr
        wait_until("be1 back in the ring", lambda: be1 in echo_ring(hl), 10)
    finally:
        held.close()


def test_sorry_backend_takes_new_flows_when_all_are_down(hl: dict[str, Any]) -> None:
    doc = yaml.safe_load(Path(hl["config"]).read_text())
    echo = next(s for s in doc["vip_groups"][0]["vips"][0]["services"] if s["port"] == ECHO)
    sorry = echo["backends"].pop()  # be3 becomes the sorry backend
    echo["sorry_backend"] = sorry
    new = Path(hl["lab_dir"]) / "sorry.yaml"
    new.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert halb("config", "apply", str(new)).returncode == 0
    assert set(spread(20)) <= {"be1", "be2"}
    faults.stop_backend("be1", hl)
    faults.stop_backend("be2", hl)
    wait_until(
        "the sorry backend to take the ring",
        lambda: set(echo_ring(hl)) == {f"{sorry['address']}:{ECHO}"},
        DOWN_WITHIN + 3,
    )
    assert set(spread(20)) == {"be3"}


def test_a_weight_change_moves_only_the_slots_maglev_moves(hl: dict[str, Any]) -> None:
    before = rings(hl)["lb1"]
    doc = yaml.safe_load(Path(hl["config"]).read_text())
    echo = next(s for s in doc["vip_groups"][0]["vips"][0]["services"] if s["port"] == ECHO)
    echo["backends"][0]["weight"] = 3
    new = Path(hl["lab_dir"]) / "weight.yaml"
    new.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = halb("config", "apply", str(new))
    assert r.returncode == 0, r.stderr
    rev = int(re.search(r"config revision (\d+)", r.stdout).group(1))  # type: ignore[union-attr]
    wait_until("identical rings on both nodes", lambda: same_rings(hl), 10)
    after = rings(hl)["lb1"]
    key = f"{VIP}:{ECHO}/tcp"
    # Only the echo service's ring changed, and it is Maglev's table for the new weights.
    assert {s for s in after if after[s] != before[s]} == {key}
    names = [f"{b['address']}:{ECHO}" for b in echo["backends"]]
    old_t = build_table(dict.fromkeys(names, 1), 65537)
    new_t = build_table({n: (3 if i == 0 else 1) for i, n in enumerate(names)}, 65537)
    want = {n: 0 for n in names}
    for n in new_t.mapped(lambda x: x):
        assert n is not None
        want[n] += 1
    assert after[key][1] == want
    moved = len(changed_slots(old_t.mapped(lambda x: x), new_t.mapped(lambda x: x)))
    # The agent wrote exactly the moved slots (plus no service or backend rows).
    log = (Path(hl["lab_dir"]) / "logs" / "agent-lb1.log").read_text()
    m = re.search(rf"config revision {rev} applied: .*?(\d+) dataplane writes", log)
    assert m, log[-2000:]
    print(f"weight 1 -> 3: Maglev moves {moved} slots of 65537; the agent wrote {m.group(1)}")
    assert int(m.group(1)) == moved
    assert cluster_status(hl["config"])["groups"][0]["active"] == "lb1"
