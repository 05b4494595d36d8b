"""The deployed cluster: site.yml applied to nspawn machines over ssh, then drilled.

The tests run in file order on one session's site: idempotence first, then the
drills, the systemd behaviours, the rolling upgrade last."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from halbd_machines import CGROUP_TREES
from halbd_site import ANSIBLE_DIR, ANSIBLE_VENV, VIP, Site

# CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_PERFMON (38), CAP_BPF (39): the unit's set.
AGENT_CAPS = (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39)


def _agent_pid(name: str) -> int:
    """The agent's pid as the host sees it (its unit's cgroup inside the machine)."""
    tree = Path("/sys/fs/cgroup") / CGROUP_TREES[1] / f"halbd-{name}"
    procs = tree / "payload/system.slice/halb-agent.service/cgroup.procs"
    pids = procs.read_text().split()
    assert pids, f"{name}: no halb-agent process"
    return int(pids[0])


def _unit(site: Site, name: str, *props: str) -> dict[str, str]:
    _, out = site.fabric.ssh(name, "systemctl show halb-agent -p " + ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _journal_time(site: Site, name: str, pattern: str, since: float) -> float:
    """Epoch of the first agent journal line after since matching pattern."""
    _, out = site.fabric.ssh(
        name, f"journalctl -u halb-agent -o short-unix --no-pager --since @{since:.3f}"
    )
    for line in out.splitlines():
        if re.search(pattern, line):
            return float(line.split()[0])
    raise AssertionError(f"{name}: no journal line matching {pattern!r} since {since}")


def _no_loss(doc: dict[str, object], what: str) -> dict[str, object]:
    drill = doc["drills"][0]  # type: ignore[index]
    summary = {
        k: drill[k]
        for k in ("new_owner", "leader_change_s", "first_garp_s", "survived", "lost", "gap_s")
    }
    summary["new_failed"] = drill["new_connections"]["failed"]
    summary["two_owners"] = drill["two_owners"]
    print(f"\n{what}: {json.dumps(summary)}")
    assert drill["connections"] > 0
    assert drill["lost"] == 0, f"{what}: connections lost: {json.dumps(drill)[:3000]}"
    assert drill["two_owners"] == [], f"{what}: two ARP owners: {drill['two_owners']}"
    return summary


def test_site_is_up_under_systemd(site: Site) -> None:
    print(f"\ntimings: {site.timings}")  # type: ignore[attr-defined]
    st = site.wait_settled("lb1")
    assert st["groups"][0]["vips"] == [VIP]
    for lb in ("lb1", "lb2"):
        u = _unit(site, lb, "Type", "ActiveState", "StatusText", "WatchdogUSec", "NRestarts")
        assert u["Type"] == "notify" and u["ActiveState"] == "active", u
        assert u["StatusText"] == "joined every VIP group", u  # READY=1 from the agent
        assert u["WatchdogUSec"] == "3s", u
        caps = Path(f"/proc/{_agent_pid(lb)}/status").read_text()
        eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", caps).group(1), 16)  # type: ignore[union-attr]
        assert eff == AGENT_CAPS, f"{lb}: CapEff {eff:#x}"
        # Logs are in the journal.
        _, log = site.fabric.ssh(lb, "journalctl -u halb-agent --no-pager -n 200")
        assert "agent " + lb + " starting" in log
    # The VIP answers from a backend, through XDP on the active balancer.
    _, out = site.fabric.ssh("client", f'python3 -c "{_WHOAMI}"')
    assert out.strip() in {"be1", "be2", "be3"}


_WHOAMI = (
    "import socket; s=socket.create_connection(('" + VIP + "', 9000), timeout=3); "
    "s.sendall(b'WHOAMI\\\\n'); print(s.recv(64).decode())"
)


def test_second_run_changes_nothing(site: Site) -> None:
    again = site.playbook(ANSIBLE_DIR / "site.yml", log="site-2")
    assert again.rc == 0, again.output[-4000:]
    print(f"\nsecond run: changed per host {again.changed}")
    assert again.changed and again.total_changed == 0, again.output[-6000:]


def test_kill_drill_loses_nothing(site: Site) -> None:
    site.wait_settled("lb1")
    active = site.active()
    assert active == "lb1"
    pid = _agent_pid(active)
    doc = site.drill("--fault", "kill", "--fault-cmd", f"kill -KILL {pid}", "--duration", "6")
    _no_loss(doc, "kill drill")


def test_planned_drill_loses_nothing(site: Site) -> None:
    site.wait_settled("lb1")
    doc = site.drill("--fault", "planned", "--duration", "4")
    _no_loss(doc, "planned drill")


def test_systemctl_stop_hands_over_in_tens_of_ms(site: Site) -> None:
    site.wait_settled("lb1")
    since = time.time()
    site.fabric.ssh("lb1", "systemctl stop halb-agent")
    try:
        stop = _journal_time(site, "lb1", r"stopping: handing over", since)
        took = _journal_time(site, "lb2", re.escape(f"holds {VIP}"), since)
        print(f"\nsystemctl stop on lb1: lb2 holds the VIP {1000 * (took - stop):.1f} ms later")
        assert 0 < took - stop < 0.1
    finally:
        site.fabric.ssh("lb1", "systemctl start halb-agent")
    site.wait_settled("lb1")


def test_frozen_agent_is_restarted_by_the_watchdog_without_a_second_owner(site: Site) -> None:
    site.wait_settled("lb1")
    before = int(_unit(site, "lb1", "NRestarts")["NRestarts"])
    pid = _agent_pid("lb1")
    # Frozen for longer than WatchdogSec=3s: systemd kills and restarts it; meanwhile
    # the VIP lifetime and the dead-man switch keep lb1 from owning the VIP with lb2.
    doc = site.drill("--fault", "stop", "--fault-cmd", f"kill -STOP {pid}", "--duration", "8")
    _no_loss(doc, "SIGSTOP drill")
    u = _unit(site, "lb1", "NRestarts", "MainPID", "ActiveState")
    print(f"\nafter SIGSTOP: {u}")
    assert int(u["NRestarts"]) == before + 1, u
    assert int(u["MainPID"]) not in (0, pid) and u["ActiveState"] == "active", u
    _, log = site.fabric.ssh("lb1", "journalctl -u halb-agent --no-pager -n 400")
    assert "Watchdog timeout" in log or "watchdog" in log.lower(), log[-3000:]
    site.wait_settled("lb1")


def test_rolling_upgrade_under_traffic_loses_nothing(site: Site) -> None:
    site.wait_settled("lb1")
    rc_file = site.workdir / "upgrade.rc"
    rc_file.unlink(missing_ok=True)
    play = " ".join(
        [
            str(ANSIBLE_VENV / "bin/ansible-playbook"),
            "-i",
            str(site.inventory_dir / "hosts.yml"),
            str(ANSIBLE_DIR / "upgrade.yml"),
            "-e",
            f"halb_balancer_wheelhouse_src={site.wheelhouse}/",
            "-e",
            "halb_balancer_force_reinstall=true",
        ]
    )
    cmd = (
        f"ANSIBLE_CONFIG={ANSIBLE_DIR / 'ansible.cfg'} {play} > {site.workdir}/upgrade.log 2>&1;"
        f" echo $? > {rc_file}"
    )
    t0, start = time.monotonic(), time.time()
    doc = site.drill(
        "--fault",
        "kill",
        "--fault-cmd",
        cmd,
        "--duration",
        "200",
        "--new-interval",
        "0.05",
        timeout=420,
    )
    # The traffic must have covered the whole upgrade.
    covered = rc_file.exists()
    while not rc_file.exists() and time.monotonic() - t0 < 400:
        time.sleep(1)
    log = (site.workdir / "upgrade.log").read_text()
    assert rc_file.exists() and rc_file.read_text().strip() == "0", log[-4000:]
    print(f"\nupgrade.yml took {rc_file.stat().st_mtime - start:.0f} s")
    assert covered, "the upgrade outlasted the drill's traffic"
    summary = _no_loss(doc, "rolling upgrade")
    assert summary["new_failed"] == 0
    assert log.count("Drain this node") == 2, log[-4000:]
