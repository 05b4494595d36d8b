"""HA core in the lab: real agents, real etcd, real VIPs and ARP."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from halb.lab import builder, faults
from halb.lab.observe import ArpCapture, cluster_status, http_get, leader, wait_until
from halb.lab.topology import site_from_env

HALB = str(Path(sys.executable).with_name("halb"))
SITE = site_from_env()
VIP = f"{SITE.net(0)}.100"


def halb(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HALB, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def has_vip(node: str, vip: str = VIP) -> bool:
    out = subprocess.run(
        ["ip", "-n", SITE.ns(node), "-br", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return f"{vip}/32" in out


def reaches_service() -> str | None:
    return http_get(f"http://{VIP}/", timeout=0.5)


def settle(state: dict[str, Any], want: str = "lb1", timeout: float = 20) -> None:
    faults.heal(state)
    config = state["config"]
    wait_until(f"{want} to lead", lambda: leader(config) == want, timeout)
    wait_until(
        "every node to publish its status",
        lambda: all(n["alive"] for n in cluster_status(config)["nodes"]),
        timeout,
    )


@pytest.fixture
def ha(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A lab with every agent healthy and lb1 (the highest priority) active."""
    original = Path(lab["config"]).read_text()
    settle(lab)
    yield lab
    # Leave the lab as we found it: original config, no faults, lb1 active.
    if Path(lab["config"]).read_text() != original:
        Path(lab["config"]).write_text(original)
    r = halb("config", "apply", lab["config"], "--no-wait")
    assert r.returncode == 0, r.stderr
    for n in ("lb1", "lb2"):
        halb("undrain", n, "--config", lab["config"])
    settle(lab)


def agent_log(lab: dict[str, Any], node: str) -> str:
    return (Path(lab["lab_dir"]) / "logs" / f"agent-{node}.log").read_text()


def log_times(text: str, pattern: str) -> list[float]:
    """Wall-clock times (today) of the log lines matching ``pattern``."""
    out = []
    today = dt.date.today()
    for line in text.splitlines():
        m = re.match(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ", line)
        if m and re.search(pattern, line):
            h, mi, s, ms = map(int, m.groups())
            stamp = dt.datetime(today.year, today.month, today.day, h, mi, s, ms * 1000)
            out.append(stamp.timestamp())
    return out


def test_election_converges_on_the_highest_priority(ha: dict[str, Any]) -> None:
    doc = json.loads(halb("status", "--output", "json").stdout)
    roles = {n["name"]: n["role"] for n in doc["nodes"]}
    assert roles == {"lb1": "active", "lb2": "standby"}
    assert doc["groups"][0]["active"] == "lb1"
    assert has_vip("lb1") and not has_vip("lb2")
    assert reaches_service() in {"be1\n", "be2\n", "be3\n"}


def test_sigkill_of_the_active_moves_the_vip_and_lb1_preempts_back(ha: dict[str, Any]) -> None:
    t0 = time.monotonic()
    faults.apply_fault("lb1", "kill", ha)
    wait_until("lb2 to own the VIP", lambda: has_vip("lb2"), 10)
    wait_until("the service through the VIP", reaches_service, 10)
    took = time.monotonic() - t0
    print(f"kill -> service answered through lb2 in {took:.2f}s (lease TTL 1s)")
    assert leader(ha["config"]) == "lb2"
    # The killed node's VIP is withdrawn by the kernel (address lifetime).
    wait_until("lb1's VIP to expire", lambda: not has_vip("lb1"), 5)
    # Preemption: lb1 comes back and takes the group after its hold-down.
    faults.apply_fault("lb1", "start", ha)
    t1 = time.monotonic()
    wait_until("lb1 to preempt", lambda: leader(ha["config"]) == "lb1", 20)
    held = time.monotonic() - t1
    assert held >= 2.0 - 0.2, f"preempted after {held:.2f}s, before the 2s hold-down"
    wait_until("the service through lb1", lambda: has_vip("lb1") and reaches_service(), 10)
    assert not has_vip("lb2")


def no_preempt(lab: dict[str, Any]) -> None:
    """Store the lab config with preempt: false (the ha fixture restores it)."""
    doc = yaml.safe_load(Path(lab["config"]).read_text())
    doc["vip_groups"][0]["preempt"] = False
    new = Path(lab["lab_dir"]) / "no-preempt.yaml"
    new.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = halb("config", "apply", str(new))
    assert r.returncode == 0, r.stderr + r.stdout


def test_preempt_false_keeps_the_lower_priority_leader(ha: dict[str, Any]) -> None:
    no_preempt(ha)
    faults.apply_fault("lb1", "kill", ha)
    wait_until("lb2 to lead", lambda: leader(ha["config"]) == "lb2", 10)
    faults.apply_fault("lb1", "start", ha)
    wait_until(
        "lb1 to publish status",
        lambda: next(n for n in cluster_status(ha["config"])["nodes"] if n["name"] == "lb1")[
            "alive"
        ],
        10,
    )
    time.sleep(3.0)  # well past the 2s hold-down
    assert leader(ha["config"]) == "lb2"
    assert has_vip("lb2") and not has_vip("lb1")


def test_frozen_leader_is_replaced_and_sends_no_arp_after_it_resumes(
    ha: dict[str, Any],
) -> None:
    lb1_mac = next(n["mac"] for n in ha["nodes"] if n["name"] == "lb1")
    lb2_mac = next(n["mac"] for n in ha["nodes"] if n["name"] == "lb2")
    # Freeze lb1 in the middle of its announcements (3 every 0.1 s after it wins):
    # resumed, it must not finish them on the strength of a term it no longer holds.
    no_preempt(ha)
    assert halb("failover", "--to", "lb2").returncode == 0
    with ArpCapture() as cap:
        assert halb("failover", "--to", "lb1").returncode == 0
        faults.apply_fault("lb1", "stop", ha)
        wait_until("lb2 to lead", lambda: leader(ha["config"]) == "lb2", 10)
        wait_until("the service through lb2", reaches_service, 10)
        time.sleep(0.5)
        resumed = time.time()
        faults.apply_fault("lb1", "cont", ha)
        # Watch the segment while lb1 is a standby again (before its 2s preemption).
        time.sleep(1.5)
        assert leader(ha["config"]) == "lb2"
    claims = cap.announcements(VIP)
    assert any(f.src_mac == lb2_mac for f in claims), "lb2 never announced the VIP"
    assert any(f.src_mac == lb1_mac for f in claims), "lb1 never announced the VIP"
    late = [f for f in claims if f.src_mac == lb1_mac and f.time > resumed]
    assert late == [], f"resumed lb1 claimed the VIP: {late}"


def test_the_active_refreshes_its_gratuitous_arp_and_the_standby_never_does(
    ha: dict[str, Any],
) -> None:
    lb1_mac = next(n["mac"] for n in ha["nodes"] if n["name"] == "lb1")
    doc = yaml.safe_load(Path(ha["config"]).read_text())
    doc["vip_groups"][0]["announce"]["refresh"] = 0.5
    fast = Path(ha["lab_dir"]) / "garp-refresh.yaml"
    fast.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = halb("config", "apply", str(fast))
    assert r.returncode == 0, r.stderr
    # The running term takes the new cadence after its current (default 5 s) refresh.
    time.sleep(5.6)
    with ArpCapture() as cap:
        time.sleep(2.3)
    claims = cap.announcements(VIP)
    frames = sorted(f.time for f in claims if f.src_mac == lb1_mac)
    # One round is a gratuitous request and reply, a few microseconds apart.
    mine = [t for i, t in enumerate(frames) if i == 0 or t - frames[i - 1] > 0.05]
    assert len(mine) >= 4, f"lb1 refreshed {len(mine)} times in 2.3 s"
    assert all(0.3 < b - a < 0.9 for a, b in itertools.pairwise(mine)), mine
    assert all(f.src_mac == lb1_mac for f in claims), "the standby announced the VIP"


def arp_fence_drops(node: str) -> int:
    r = halb("dataplane", "show", "--node", node, "--output", "json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["stats"]["arp_fence_drop"])


def test_frozen_leader_is_fenced_and_replaced_by_a_revoke_of_its_lease(
    ha: dict[str, Any],
) -> None:
    """Fast takeover: lb1 frozen (SIGSTOP) stops heartbeating; lb2 revokes its lease
    and takes over after the fence wait. Meanwhile lb1's XDP program, with nobody to
    re-arm its deadline, drops the ARP requests for the VIP that lb1's kernel would
    still answer: the client hears only lb2."""
    lb2_mac = next(n["mac"] for n in ha["nodes"] if n["name"] == "lb2")
    no_preempt(ha)
    before = arp_fence_drops("lb1")
    faults.apply_fault("lb1", "stop", ha)
    try:
        wait_until("lb2 to lead", lambda: leader(ha["config"]) == "lb2", 10)
        with ArpCapture() as cap:
            asked = time.time()
            subprocess.run(
                ["ip", "netns", "exec", SITE.ns("client"), "arping", "-c", "3", "-i", "0.05",
                 "-w", "2", "-I", "eth0", VIP],
                capture_output=True, check=False, timeout=10,
            )  # fmt: skip
        replies = [
            f for f in cap.frames() if f.kind == "reply" and f.sender_ip == VIP and f.time >= asked
        ]
        assert replies, "nobody answered ARP for the VIP"
        assert {f.src_mac for f in replies} == {lb2_mac}, replies
        assert arp_fence_drops("lb1") >= before + 3
    finally:
        faults.apply_fault("lb1", "cont", ha)
    assert re.search(r"no heartbeat from the leader .* for", agent_log(ha, "lb2"))
    assert "revoking its lease" in agent_log(ha, "lb2")
    wait_until("the service through lb2", reaches_service, 10)
    # `halb status` names the cause the operator needs: a silent leader, revoked.
    wait_until(
        "lb2's status to name the takeover",
        lambda: (
            (cluster_status(ha["config"]).get("last_failover") or {})
            .get("cause", "")
            .startswith("took over from a silent leader")
        ),
        10,
    )


def test_etcd_cut_active_drops_the_vip_before_the_standby_adds_it(ha: dict[str, Any]) -> None:
    t_cut = time.time()
    faults.apply_fault("lb1", "etcd-cut", ha)
    wait_until("lb2 to own the VIP", lambda: has_vip("lb2"), 10)
    time.sleep(0.3)  # let both agents write their lines
    removed = [t for t in log_times(agent_log(ha, "lb1"), r"VIPs removed") if t >= t_cut - 1]
    added = [t for t in log_times(agent_log(ha, "lb2"), rf"holds .*{VIP}") if t >= t_cut - 1]
    assert removed, "lb1 never removed its VIP"
    assert added, "lb2 never added the VIP"
    gap = added[0] - removed[0]
    print(f"lb1 removed the VIP {gap * 1000:.0f} ms before lb2 added it")
    assert gap > 0, "two owners: lb2 added the VIP before lb1 removed it"
    assert not has_vip("lb1")


def test_planned_failover_via_cli(ha: dict[str, Any]) -> None:
    # With preemption on, lb1 would take the group back after its hold-down.
    no_preempt(ha)
    r = halb("failover", "--to", "lb2")
    assert r.returncode == 0, r.stderr
    m = re.search(r"lab: lb1 -> lb2 in (\d+) ms", r.stdout)
    assert m, r.stdout
    print(f"planned failover: {m.group(1)} ms")
    assert int(m.group(1)) < 1000
    assert leader(ha["config"]) == "lb2"
    wait_until("lb2 to own the VIP", lambda: has_vip("lb2"), 5)
    assert not has_vip("lb1")
    doc = json.loads(halb("status", "--output", "json").stdout)
    assert doc["last_failover"]["to"] == "lb2"
    bad = halb("failover", "--to", "nosuch")
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def vip_holders(vip: str) -> set[str]:
    return {node for node in ("lb1", "lb2") if has_vip(node, vip)}


def test_a_vip_added_by_config_apply_moves_with_a_planned_failover_and_never_doubles(
    ha: dict[str, Any],
) -> None:
    """Regression (issue 13): a VIP added by `halb config apply` was added by the agent's
    reload path outside the term, so a planned failover left it on the old node for its
    kernel lifetime, both nodes answering ARP for it."""
    no_preempt(ha)
    extra = f"{SITE.net(0)}.101"
    doc = yaml.safe_load((Path(ha["lab_dir"]) / "no-preempt.yaml").read_text())
    added = json.loads(json.dumps(doc["vip_groups"][0]["vips"][0]))
    added["address"] = extra
    doc["vip_groups"][0]["vips"].append(added)
    two = Path(ha["lab_dir"]) / "two-vips.yaml"
    two.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = halb("config", "apply", str(two))
    assert r.returncode == 0, r.stderr
    wait_until("lb1 to hold the added VIP", lambda: vip_holders(extra) == {"lb1"}, 10)

    samples: list[set[str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(vip_holders(extra))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time.sleep(0.3)
        r = halb("failover", "--to", "lb2")
        assert r.returncode == 0, r.stderr
        wait_until("lb2 to hold the added VIP", lambda: "lb2" in vip_holders(extra), 5)
        time.sleep(2.5)  # past the VIP's kernel lifetime and the kernel's sweep
    finally:
        stop.set()
        sampler.join(5)
    doubled = [i for i, s in enumerate(samples) if len(s) > 1]
    assert not doubled, f"{len(doubled)} of {len(samples)} samples show {extra} on both nodes"
    assert samples[-1] == {"lb2"}, samples[-5:]
    assert leader(ha["config"]) == "lb2"


def test_drain_hands_over_and_undrain_takes_it_back(ha: dict[str, Any]) -> None:
    r = halb("drain", "lb1")
    assert r.returncode == 0, r.stderr
    assert leader(ha["config"]) == "lb2"
    roles = {n["name"]: n["role"] for n in cluster_status(ha["config"])["nodes"]}
    assert roles == {"lb1": "drained", "lb2": "active"}
    time.sleep(2.5)  # a drained node never campaigns, even with the higher priority
    assert leader(ha["config"]) == "lb2"
    r = halb("undrain", "lb1")
    assert r.returncode == 0, r.stderr
    wait_until("lb1 to preempt after undrain", lambda: leader(ha["config"]) == "lb1", 15)


def test_sigterm_on_the_active_hands_over_fast(ha: dict[str, Any]) -> None:
    t0 = time.monotonic()
    faults.apply_fault("lb1", "term", ha)
    wait_until("lb2 to own the VIP", lambda: has_vip("lb2"), 5, every=0.005)
    took = time.monotonic() - t0
    print(f"SIGTERM hand-over: VIP on lb2 after {took * 1000:.0f} ms")
    # Far below the 1 s lease TTL: the lease was revoked, not left to expire.
    assert took < 0.9
    wait_until("lb1's agent to exit", lambda: faults.agent_pid("lb1") is None, 10)
    assert not has_vip("lb1")


def test_config_apply_rejects_an_invalid_config_and_keeps_the_running_one(
    ha: dict[str, Any], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load(Path(ha["config"]).read_text())
    doc["vip_groups"][0]["vips"][0]["address"] = "10.99.0.300"  # invalid in every instance
    bad.write_text(yaml.safe_dump(doc))
    before = {n["name"]: n["config_revision"] for n in cluster_status(ha["config"])["nodes"]}
    r = halb("config", "apply", str(bad))
    assert r.returncode == 2
    assert "vip_groups[0].vips[0].address: '10.99.0.300' is not an IP address" in r.stderr
    assert "running config is unchanged" in r.stderr
    after = {n["name"]: n["config_revision"] for n in cluster_status(ha["config"])["nodes"]}
    assert after == before
    assert reaches_service()


def test_status_table_names_roles_term_and_last_failover(ha: dict[str, Any]) -> None:
    r = halb("status")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^lab\s+lb1\s+[0-9a-f]+@\d+", r.stdout, re.M), r.stdout
    assert re.search(r"^lb1\s+active\s+200", r.stdout, re.M)
    assert re.search(r"^lb2\s+standby\s+190", r.stdout, re.M)
    assert "last failover:" in r.stdout


@pytest.fixture
def lab3(lab_session: None) -> Iterator[dict[str, Any]]:
    builder.down()
    state = builder.up(3, 3, site=SITE)
    yield state
    builder.down()  # the `lab` fixture rebuilds the usual two-node lab when needed


def test_three_agents_elect_by_priority_and_survive_two_kills(lab3: dict[str, Any]) -> None:
    cfg = lab3["config"]
    wait_until("lb1 to lead", lambda: leader(cfg) == "lb1", 20)
    faults.apply_fault("lb1", "kill", lab3)
    wait_until("lb2 (next priority) to lead", lambda: leader(cfg) == "lb2", 10)
    faults.apply_fault("lb2", "kill", lab3)
    wait_until("lb3 to lead", lambda: leader(cfg) == "lb3", 10)
    wait_until("the service through lb3", lambda: has_vip("lb3") and reaches_service(), 10)


def test_link_down_on_the_active_hands_over_and_link_up_takes_it_back(
    ha: dict[str, Any],
) -> None:
    t0 = time.monotonic()
    faults.apply_fault("lb1", "link-down", ha)
    wait_until("lb2 to own the VIP", lambda: has_vip("lb2"), 5)
    wait_until("the service through lb2", reaches_service, 5)
    print(f"link-down: service through lb2 after {time.monotonic() - t0:.2f}s")
    assert leader(ha["config"]) == "lb2"
    node = next(n for n in cluster_status(ha["config"])["nodes"] if n["name"] == "lb1")
    assert node["groups"]["lab"]["cause"] == "interface eth0 down"
    time.sleep(2.5)  # past the hold-down: a node with its link down never campaigns
    assert leader(ha["config"]) == "lb2"
    faults.apply_fault("lb1", "link-up", ha)
    wait_until("lb1 to take the group back", lambda: leader(ha["config"]) == "lb1", 15)
