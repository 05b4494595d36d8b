"""Two VIP groups whose actives are on different nodes (issue 13): lb1 is active for
``lab``, lb2 for ``lab2``, each node serves its own group's flows and follows the
other's over its one FlowSync server. Killing each active in turn under traffic keeps
every connection of both groups on its backend.

1. both groups' echo services have every backend but the last; the agents restart
   with the two-group config, then ``lab2`` is handed to lb2 (``halb failover``; it
   does not preempt, so it stays there);
2. connections to both VIPs; the last backend is added: Maglev now maps about 1/N of
   the existing connections elsewhere, so only flow sync keeps those on their backend;
3. SIGKILL lb1 (active for ``lab``): lb2 takes ``lab`` over; lb1 is restarted, resyncs
   both groups from lb2 and takes ``lab`` back (it has the higher priority);
4. SIGKILL lb2 (active for ``lab2``): lb1 takes ``lab2`` over;
5. WHOAMI after each step, and the connections report.

Before each kill the standby's sync state shows both groups: the one it follows (a
client holding that group's flows) and the one it serves.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from halb.lab import faults, topology
from halb.lab.agents import (
    apply_config,
    cli_flows,
    logs_on_failure,
    node_status,
    restart_agents,
    start_agents,
    status,
    stop_agents,
)
from halb.lab.observe import wait_until
from halb.testing.holders import Client

pytestmark = pytest.mark.lab

HALB = str(Path(sys.executable).with_name("halb"))
CONNECTIONS = 30  # per group
GROUPS = ("lab", "lab2")


def _active(lab: dict[str, Any], group: str) -> str | None:
    return next((g["active"] for g in status(lab)["groups"] if g["name"] == group), None)


def _group_sync(lab: dict[str, Any], node: str, group: str) -> dict[str, Any]:
    doc: dict[str, Any] = node_status(lab, node)["sync"].get("groups", {}).get(group, {})
    return doc


def _follows(lab: dict[str, Any], node: str, group: str) -> bool:
    doc = _group_sync(lab, node, group)
    return doc.get("role") == "client" and doc.get("synced") is True


def _without_last_echo_backend(doc: dict[str, Any], echo_port: int) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for g in out["vip_groups"]:
        for svc in g["vips"][0]["services"]:
            if svc["port"] == echo_port and svc["protocol"] == "tcp":
                svc["backends"].pop()
                assert svc["backends"], "the lab needs at least two backends"
    return out


@pytest.fixture
def two_groups(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The lab's agents running a second group (lab2) with the last echo backend
    missing in both; restores the one-group lab afterwards."""
    site = topology.site_from_env()
    vip2 = topology.plan(len(lab["nodes"]), len(lab["backends"]), site).vip2
    if not all(f"{vip2}/32" in b["loopback"] for b in lab["backends"]):
        pytest.fail(f"the lab's backends do not hold {vip2}: rebuild it (halb lab down/up)")
    cfg_path = Path(lab["config"])
    original_text = cfg_path.read_text()
    original = yaml.safe_load(original_text)
    full = topology.second_group(original, vip2)
    fewer = _without_last_echo_backend(full, lab["echo_port"])
    try:
        restart_agents(lab, [])
        apply_config(lab, fewer)
        # The CLI (status, failover) reads the groups from the lab's config file; the
        # agents pick new groups up at start, from the stored config.
        cfg_path.write_text(yaml.safe_dump(fewer, sort_keys=False))
        stop_agents(lab)
        start_agents(lab, [])
        wait_until(
            "both groups active, each followed by the other node",
            lambda: all(_settled(lab, g) for g in GROUPS),
            60,
            every=0.2,
        )
        yield {"vip2": vip2, "full": full}
    finally:
        cfg_path.write_text(original_text)
        for n in lab["nodes"]:
            if faults.agent_pid(n["name"]) is None:
                faults.apply_fault(n["name"], "start", lab)
        apply_config(lab, original)
        stop_agents(lab)
        start_agents(lab, [])
        restart_agents(lab, [])


def _settled(lab: dict[str, Any], group: str) -> bool:
    """The group has an active node and every other node follows it, in sync."""
    active = _active(lab, group)
    others = [n["name"] for n in lab["nodes"] if n["name"] != active]
    return active is not None and all(_follows(lab, n, group) for n in others)


def _whoami(clients: dict[str, Client], tag: str) -> None:
    for c in clients.values():
        c.send(f"whoami {tag}")
    for c in clients.values():
        assert c.read(90) == {"whoami": tag}


def _flows_of_both(lab: dict[str, Any], vip2: str) -> dict[str, dict[str, int]]:
    """Per group VIP: per node, the flows of the lab's client (`halb flows`)."""
    return {"lab": cli_flows(lab), "lab2": cli_flows({**lab, "vip": vip2})}


def _run(lab: dict[str, Any], tg: dict[str, Any]) -> dict[str, Any]:
    first, second = lab["nodes"][0]["name"], lab["nodes"][1]["name"]
    for group, node in (("lab", first), ("lab2", second)):
        if _active(lab, group) != node:
            subprocess.run(
                [HALB, "failover", "--config", lab["config"], "--group", group, "--to", node,
                 "--timeout", "30"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
    wait_until(
        f"{first} active for lab, {second} for lab2, each following the other's group",
        lambda: (
            _active(lab, "lab") == first
            and _active(lab, "lab2") == second
            and _follows(lab, second, "lab")
            and _follows(lab, first, "lab2")
        ),
        60,
        every=0.2,
    )
    clients = {
        "lab": Client(lab, CONNECTIONS),
        "lab2": Client({**lab, "vip": tg["vip2"]}, CONNECTIONS),
    }
    seen: dict[str, Any] = {}
    try:
        for g, c in clients.items():
            start = c.read(60)["ready"]
            assert all(start.values()), f"{g}: connections without a backend: {start}"
        apply_config(lab, tg["full"])
        time.sleep(1.5)  # a few scans and batches: each standby holds every flow
        seen["before_kill_first"] = {
            "sync": node_status(lab, second)["sync"],
            "flows": _flows_of_both(lab, tg["vip2"]),
        }
        t0 = time.monotonic()
        faults.apply_fault(first, "kill", lab)
        wait_until(f"{second} to take lab over", lambda: _active(lab, "lab") == second, 30,
                   every=0.05)  # fmt: skip
        seen["takeover_first_s"] = time.monotonic() - t0
        _whoami(clients, "after_kill_first")
        faults.apply_fault(first, "start", lab)
        wait_until(f"{first} to take lab back", lambda: _active(lab, "lab") == first, 90,
                   every=0.2)  # fmt: skip
        wait_until(f"{first} following lab2 again", lambda: _follows(lab, first, "lab2"), 60,
                   every=0.2)  # fmt: skip
        _whoami(clients, "after_return")
        time.sleep(1.0)
        seen["before_kill_second"] = {
            "sync": node_status(lab, first)["sync"],
            "flows": _flows_of_both(lab, tg["vip2"]),
        }
        t0 = time.monotonic()
        faults.apply_fault(second, "kill", lab)
        wait_until(f"{first} to take lab2 over", lambda: _active(lab, "lab2") == first, 30,
                   every=0.05)  # fmt: skip
        seen["takeover_second_s"] = time.monotonic() - t0
        _whoami(clients, "after_kill_second")
        seen["reports"] = {g: c.report() for g, c in clients.items()}
        return seen
    finally:
        for c in clients.values():
            c.close()


def test_two_groups_on_different_nodes_keep_every_connection_through_both_kills(
    lab: dict[str, Any], two_groups: dict[str, Any]
) -> None:
    seen = _run(lab, two_groups)
    first, second = lab["nodes"][0]["name"], lab["nodes"][1]["name"]
    with logs_on_failure(lab):
        for key, node, follows, serves in (
            ("before_kill_first", second, "lab", "lab2"),
            ("before_kill_second", first, "lab2", "lab"),
        ):
            groups = seen[key]["sync"]["groups"]
            assert set(groups) == set(GROUPS), (key, seen[key]["sync"])
            assert groups[follows]["role"] == "client" and groups[follows]["synced"], groups
            assert groups[follows]["flows"] >= CONNECTIONS, (key, groups[follows])
            assert groups[serves]["role"] == "server", (key, groups[serves])
            assert groups[serves]["connected_peers"] == 1, (key, groups[serves])
            # The standby's dataplane holds both groups' connections: the followed
            # group's synced in, its own group's from its traffic.
            for g in GROUPS:
                assert seen[key]["flows"][g][node] >= CONNECTIONS, (key, g, seen[key]["flows"])
        for g, report in seen["reports"].items():
            assert len(report) == CONNECTIONS
            broken = [c for c in report if c["errors"]]
            assert not broken, f"{g}: {len(broken)} connections broke: {broken[:3]}"
            moved = [c for c in report if len(set(c["backends"].values())) != 1]
            assert not moved, f"{g}: connections changed backend: {moved[:3]}"
            assert all(c["echoes"] > 50 for c in report), g
        print(
            f"takeover after killing {first}: {seen['takeover_first_s']:.2f} s, "
            f"after killing {second}: {seen['takeover_second_s']:.2f} s"
        )
