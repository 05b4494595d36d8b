"""The lab's etcd: one member or three on the management segment, plaintext or TLS with
client certificates, auth on and a role limited to the cluster's prefix.

Members run in the root namespace on addresses of the host's management link
(topology.ETCD_OCTETS). With TLS, the certificates are made by halb's own certificate
code (halb.sync.certs, what `halb certs` uses): one CA, a server certificate carrying
the lab's etcd server name and every member address, and a client certificate with
CN ``halb`` shared by the agents and the CLI. Auth is on and ``halb`` is a
certificate-named user (no password, no token: etcd takes the user from the CN) whose
role may read and write only ``/halb/<cluster>/`` (the etcdctl commands the README
documents). Tokens would be per member and lost when a member restarts, so moving to
a restarted member would cost a re-authentication (bcrypt on etcd's side) on the
agents' heartbeat path; password users are exercised by tests/kernel/test_etcd_client.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from halb.lab.errors import LabError
from halb.lab.procs import is_stopped, spawn, wait_for
from halb.lab.topology import ETCD_USER, LabPlan

__all__ = [
    "ETCD_FAULTS",
    "OUTAGE_FAULTS",
    "etcd_fault",
    "heal_members",
    "leader_member",
    "make_tls",
    "member_pids",
    "member_records",
    "start_members",
]

ETCD_FAULTS = ("etcd-member", "etcd-leader", "etcd-hang")
# A whole-coordinator outage: every member down, then every member back.
OUTAGE_FAULTS = ("etcd-stop-all", "etcd-start-all")


def _names(p: LabPlan) -> list[str]:
    return [f"m{i + 1}" for i in range(p.etcd_members)]


def make_tls(p: LabPlan) -> None:
    from halb.sync.certs import generate_ca, generate_node_cert

    d = p.etcd_tls_dir
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca = generate_ca(f"{p.site.cluster}-etcd")
    addrs = [ipaddress.ip_address(a) for a in p.etcd_addresses]
    server = generate_node_cert(ca, p.etcd_server_name, addrs)
    client = generate_node_cert(ca, ETCD_USER)  # CN = the etcd user
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server.cert_pem,
        "server-key.pem": server.key_pem,
        "client.pem": client.cert_pem,
        "client-key.pem": client.key_pem,
        "root-password": secrets.token_urlsafe(18).encode(),
    }
    for name, data in files.items():
        path = d / name
        path.write_bytes(data)
        os.chmod(path, 0o600)


def _argv(p: LabPlan, i: int) -> list[str]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise LabError("etcd not found: run scripts/setup (Debian package etcd-server)")
    names, ips = _names(p), p.etcd_addresses
    ip, name = ips[i], names[i]
    client = p.etcd_endpoints[i]
    cluster = ",".join(f"{n}=http://{a}:2380" for n, a in zip(names, ips, strict=True))
    argv = [
        etcd, "--name", name, "--data-dir", str(p.lab_dir / "etcd" / name),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", f"http://{ip}:2380",
        "--initial-advertise-peer-urls", f"http://{ip}:2380",
        "--initial-cluster", cluster,
        "--listen-metrics-urls", f"http://{ip}:2381",
        "--heartbeat-interval", "50", "--election-timeout", "500",
        # The agents' fast-takeover heartbeats write 20 revisions a second per group.
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m",
        "--logger", "zap", "--log-level", "warn",
    ]  # fmt: skip
    if p.etcd_tls:
        d = p.etcd_tls_dir
        argv += [
            "--cert-file", str(d / "server.pem"), "--key-file", str(d / "server-key.pem"),
            "--trusted-ca-file", str(d / "ca.pem"), "--client-cert-auth",
        ]  # fmt: skip
    return argv


def _healthy(metrics: str) -> bool:
    try:
        with urllib.request.urlopen(f"{metrics}/health", timeout=0.5) as r:
            return bool(json.load(r).get("health") == "true")
    except (OSError, ValueError):
        return False


def _probe(metrics: str) -> Callable[[], bool]:
    return lambda: _healthy(metrics)


def member_records(p: LabPlan) -> list[dict[str, Any]]:
    """What the lab's state file says about each member (faults restart from it)."""
    return [
        {
            "name": name,
            "address": ip,
            "endpoint": p.etcd_endpoints[i],
            "metrics": f"http://{ip}:2381",
            "argv": _argv(p, i),
            "log": str(p.lab_dir / "logs" / f"etcd-{name}.log"),
        }
        for i, (name, ip) in enumerate(zip(_names(p), p.etcd_addresses, strict=True))
    ]


def start_members(p: LabPlan, pids: dict[str, int]) -> list[dict[str, Any]]:
    """Start every member, wait until all are healthy, turn auth on (TLS labs);
    returns the members' records for the lab's state file."""
    members = member_records(p)
    for m in members:
        pids[f"etcd-{m['name']}"] = spawn(m["argv"], Path(m["log"]))
    for m in members:
        wait_for(f"etcd member {m['name']} to become healthy", _probe(m["metrics"]), 20)
    if p.etcd_tls:
        _enable_auth(p)
    return members


def _etcdctl(p: LabPlan, *args: str, root: bool = False) -> None:
    _run_etcdctl(p.etcd_endpoints, p.etcd_tls_dir if p.etcd_tls else None, args, root=root)


def _run_etcdctl(
    endpoints: list[str], tls_dir: Path | None, args: tuple[str, ...], *, root: bool
) -> str:
    argv = [shutil.which("etcdctl") or "etcdctl", f"--endpoints={','.join(endpoints)}"]
    if tls_dir is not None:
        d = tls_dir
        argv += [f"--cacert={d / 'ca.pem'}", f"--cert={d / 'client.pem'}"]
        argv.append(f"--key={d / 'client-key.pem'}")
        if root:
            argv.append(f"--user=root:{(d / 'root-password').read_text()}")
    done = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"etcdctl {' '.join(args[:2])}: {done.stderr.strip()}")
    return done.stdout


def _enable_auth(p: LabPlan) -> None:
    d = p.etcd_tls_dir
    _etcdctl(p, "user", "add", f"root:{(d / 'root-password').read_text()}")
    _etcdctl(p, "user", "grant-role", "root", "root")
    _etcdctl(p, "role", "add", ETCD_USER)
    _etcdctl(
        p, "role", "grant-permission", ETCD_USER, "--prefix=true", "readwrite", p.etcd_role_prefix
    )
    _etcdctl(p, "user", "add", ETCD_USER, "--no-password")
    _etcdctl(p, "user", "grant-role", ETCD_USER, ETCD_USER)
    _etcdctl(p, "auth", "enable")


# --- faults ----------------------------------------------------------------------------


def member_pids(data_dir: Path, *, exact: bool = False) -> list[int]:
    """Processes running etcd on ``data_dir`` (or, unless ``exact``, under it), found by
    their command line: restarted members too, and after a crash lost the state file."""
    found = []
    marker = b"--data-dir\0" + str(data_dir).encode() + (b"\0" if exact else b"")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def _pid(state: dict[str, Any], name: str) -> int | None:
    pids = member_pids(Path(state["lab_dir"]) / "etcd" / name, exact=True)
    return pids[0] if pids else None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def leader_member(state: dict[str, Any]) -> dict[str, Any]:
    """The member that is the raft leader (asked over each member's metrics port)."""
    for m in state.get("etcd_members", []):
        try:
            with urllib.request.urlopen(f"{m['metrics']}/metrics", timeout=0.5) as r:
                if "\netcd_server_is_leader 1" in r.read().decode():
                    return dict(m)
        except OSError:
            continue
    raise LabError("no etcd member of the lab reports being the leader")


def _member_at(state: dict[str, Any], address: str) -> dict[str, Any] | None:
    host = address.rsplit(":", 1)[0].strip("[]")
    return next((dict(m) for m in state.get("etcd_members", []) if m["address"] == host), None)


def etcd_fault(fault: str, state: dict[str, Any], in_use: str | None = None) -> str:
    """``etcd-member``: SIGKILL the member ``in_use`` (``host:port``, what the active's
    client uses; default the first); ``etcd-leader``: SIGKILL the raft leader;
    ``etcd-hang``: SIGSTOP the member in use. Returns what was done."""
    members = state.get("etcd_members", [])
    if len(members) < 3:
        raise LabError(f"--fault {fault} needs a 3-member lab etcd (halb lab up --etcd-members 3)")
    if fault == "etcd-leader":
        m = leader_member(state)
    else:
        m = (_member_at(state, in_use) if in_use else None) or dict(members[0])
        # These two are about a follower: a killed or hung leader is etcd-leader's case.
        _make_follower(state, m)
    pid = _pid(state, m["name"])
    if not _alive(pid):
        raise LabError(f"etcd member {m['name']} is not running")
    assert pid is not None
    sig = signal.SIGSTOP if fault == "etcd-hang" else signal.SIGKILL
    os.kill(pid, sig)
    return f"{sig.name} etcd member {m['name']} ({m['endpoint']}, pid {pid})"


def _make_follower(state: dict[str, Any], member: dict[str, Any]) -> None:
    """Move raft leadership off ``member`` if it has it (etcdctl move-leader)."""
    leader = leader_member(state)
    if leader["name"] != member["name"]:
        return
    tls = Path(state["lab_dir"]) / "etcd-tls" if state.get("etcd_tls") else None
    listing = json.loads(
        _run_etcdctl([leader["endpoint"]], tls, ("member", "list", "-w", "json"), root=True)
    )
    other = next(m for m in listing["members"] if m["name"] != member["name"])
    _run_etcdctl([leader["endpoint"]], tls, ("move-leader", f"{other['ID']:x}"), root=True)

    def moved() -> bool:
        try:
            return bool(leader_member(state)["name"] != member["name"])
        except LabError:
            return False  # electing

    wait_for(f"etcd leadership to move off {member['name']}", moved, 10)


def stop_all_members(state: dict[str, Any]) -> str:
    """SIGKILL every member (a coordinator outage). Killed, not stopped: a restarted
    cluster elects a leader, which gives every lease a fresh TTL, as a real etcd outage
    ends; a SIGSTOPped leader resumes with its lease clock run on and revokes them."""
    members = state.get("etcd_members", [])
    if not members:
        raise LabError("etcd-stop-all needs the lab's etcd members (halb lab up)")
    done = []
    for m in members:
        pid = _pid(state, m["name"])
        if _alive(pid):
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            done.append(f"{m['name']} (pid {pid})")
    return "SIGKILL every etcd member: " + (", ".join(done) or "none was running")


def _revive(state: dict[str, Any], m: dict[str, Any]) -> str | None:
    """SIGCONT a stopped member or restart a killed one (same data, same flags); what
    was done, None when it was running."""
    pid = _pid(state, m["name"])
    if _alive(pid):
        assert pid is not None
        if is_stopped(pid):
            os.kill(pid, signal.SIGCONT)
            return "continued"
        return None
    return f"started (pid {spawn(m['argv'], Path(m['log']), append=True)})"


def start_all_members(state: dict[str, Any], timeout: float = 20.0) -> str:
    """Start every member that is down (all at once: one alone has no quorum and never
    turns healthy), continue stopped ones, and wait until all are healthy."""
    done = []
    for m in state.get("etcd_members", []):
        what = _revive(state, m)
        if what is not None:
            done.append(f"{m['name']} {what}")
    for m in state.get("etcd_members", []):
        wait_for(f"etcd member {m['name']} to become healthy", _probe(m["metrics"]), timeout)
    return "etcd members: " + (", ".join(done) or "all were running")


def heal_members(state: dict[str, Any]) -> list[str]:
    """Continue stopped members and restart killed ones, one at a time."""
    done = []
    for m in state.get("etcd_members", []):
        what = _revive(state, m)
        if what is None:
            continue
        done.append(f"etcd member {m['name']} {what}")
        if what != "continued":
            wait_for(f"etcd member {m['name']} to rejoin", _probe(m["metrics"]), 20)
    return done
