"""Build and tear down the network-namespace lab (I/O side of halb.lab.topology)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from halb.config import parse_config
from halb.lab import etcd_members, netns
from halb.lab.errors import LabError
from halb.lab.netns import run
from halb.lab.procs import start_agent, start_backend
from halb.lab.topology import (
    BACK,
    BRIDGES,
    ECHO_PORT,
    FRONT,
    HTTP_PORT,
    NS_PREFIX,
    UDP_PORT,
    Host,
    LabPlan,
    LabSite,
    lab_config,
    plan,
    site_from_env,
)

log = logging.getLogger(__name__)

BPFFS = Path("/run/halb/bpffs")

__all__ = ["LabError", "down", "load_state", "up"]

Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    pass


def _ns_cmd(ns: str, *args: str) -> None:
    run(["ip", "-n", ns, *args])


def _sysctl(ns: str, key: str, value: str) -> None:
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])


def _build_switch(sw: str) -> None:
    run(["ip", "netns", "add", sw])
    _ns_cmd(sw, "link", "set", "lo", "up")
    for br in BRIDGES.values():
        _ns_cmd(sw, "link", "add", br, "type", "bridge", "stp_state", "0")
        _ns_cmd(sw, "link", "set", br, "up")


def _build_host(h: Host, site: LabSite) -> None:
    ns = h.namespace
    sw = site.switch_ns
    run(["ip", "netns", "add", ns])
    _ns_cmd(ns, "link", "set", "lo", "up")
    # Answer only for our own addresses: DSR backends hold the VIP on lo.
    _sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
    _sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
    if h.role == "lb":
        _sysctl(ns, "net.ipv4.ip_forward", "1")
        _sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
    if h.role == "be":
        for scope in ("all", "default"):
            _sysctl(ns, f"net.ipv4.conf.{scope}.arp_ignore", "1")
            _sysctl(ns, f"net.ipv4.conf.{scope}.arp_announce", "2")
            _sysctl(ns, f"net.ipv4.conf.{scope}.rp_filter", "0")
    for lk in h.links:
        run(
            [
                "ip", "link", "add", "name", lk.ifname, "netns", ns, "address", lk.mac,
                "type", "veth", "peer", "name", lk.peer, "netns", sw,
            ]
        )  # fmt: skip
        _ns_cmd(sw, "link", "set", lk.peer, "master", lk.bridge, "up")
        for addr in lk.addresses:
            extra = ["nodad"] if ":" in addr else []
            _ns_cmd(ns, "addr", "add", addr, "dev", lk.ifname, *extra)
        _ns_cmd(ns, "link", "set", lk.ifname, "up")
    for addr in h.loopback:
        _ns_cmd(ns, "addr", "add", addr, "dev", "lo")
    if h.role == "be" and len(h.links) > 1:
        # NAT modes: replies from the back address go through the floating gateway.
        back = h.links[1]
        src = back.addresses[0].split("/")[0]
        back_net = f"{site.net(BACK)}.0/24"
        _ns_cmd(ns, "rule", "add", "to", back_net, "lookup", "main", "priority", "50")
        _ns_cmd(ns, "rule", "add", "from", src, "lookup", "100", "priority", "100")
        _ns_cmd(ns, "route", "add", "default", "via", f"{site.net(BACK)}.1", "dev", back.ifname,
                "table", "100", "onlink")  # fmt: skip
    if h.role == "client":
        # Native XDP_TX on veth drops the sender's partial checksum (PLATFORM.md).
        run(["ip", "netns", "exec", ns, "ethtool", "-K", h.link(FRONT).ifname, "tx", "off"])


def _build_host_link(p: LabPlan) -> None:
    link, sw = p.site.host_link, p.site.switch_ns
    run(
        [
            "ip", "link", "add", "name", link, "type", "veth",
            "peer", "name", "host-m", "netns", sw,
        ]
    )  # fmt: skip
    _ns_cmd(sw, "link", "set", "host-m", "master", BRIDGES[2], "up")
    run(["ip", "addr", "add", p.host_address, "dev", link])
    for extra in p.etcd_addresses[1:]:  # more etcd members on the management segment
        run(["ip", "addr", "add", f"{extra}/24", "dev", link])
    run(["ip", "link", "set", link, "up"])


def _start_backends(p: LabPlan, pids: dict[str, int]) -> None:
    for b in p.backends:
        pids[b.name] = start_backend(b.name, b.namespace, p.lab_dir)


def status_doc(p: LabPlan, dataplane: str, pids: dict[str, int]) -> dict[str, Any]:
    def host(h: Host) -> dict[str, Any]:
        return {
            "name": h.name,
            "namespace": h.namespace,
            "address": h.address,
            "mac": h.mac,
            "interfaces": [
                {
                    "name": lk.ifname,
                    "mac": lk.mac,
                    "addresses": list(lk.addresses),
                    "bridge": lk.bridge,
                }
                for lk in h.links
            ],
            "loopback": list(h.loopback),
        }

    return {
        "vip": p.vip,
        "vip6": p.vip6,
        "echo_port": ECHO_PORT,
        "http_port": HTTP_PORT,
        "udp_port": UDP_PORT,
        "config": str(p.config_path),
        "etcd": p.etcd_endpoint,
        "etcd_endpoints": p.etcd_endpoints,
        "etcd_members": etcd_members.member_records(p),
        "etcd_tls": p.etcd_tls,
        "dataplane": dataplane,
        "lab_dir": str(p.lab_dir),
        "switch": p.site.switch_ns,
        "instance": p.site.instance,
        "client": host(p.client),
        "nodes": [host(n) for n in p.nodes],
        "backends": [host(b) for b in p.backends],
        "pids": pids,
    }


def _write_state(p: LabPlan, doc: dict[str, Any]) -> None:
    (p.lab_dir / "state.json").write_text(json.dumps(doc, indent=2) + "\n")


def load_state(site: LabSite | None = None) -> dict[str, Any] | None:
    path = (site or site_from_env()).lab_dir / "state.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def is_up(site: LabSite | None = None) -> bool:
    site = site or site_from_env()
    return load_state(site) is not None and site.switch_ns in netns.list_namespaces(NS_PREFIX)


def lab_namespaces(site: LabSite) -> list[str]:
    return [ns for ns in netns.list_namespaces(NS_PREFIX) if site.owns(ns)]


def up(
    n_nodes: int = 2,
    n_backends: int = 3,
    dataplane: str = "xdp",
    site: LabSite | None = None,
    progress: Progress = _noop,
    agents: bool = True,
    etcd_members_n: int = 1,
    etcd_tls: bool = False,
    virtual_mac: bool = False,
) -> dict[str, Any]:
    """Build the lab; on any failure remove whatever was built and re-raise."""
    site = site or site_from_env()
    p = plan(n_nodes, n_backends, site, etcd_members=etcd_members_n, etcd_tls=etcd_tls)
    lab_dir = site.lab_dir
    if lab_namespaces(site) or load_state(site) is not None:
        raise LabError("a lab is already up (or left over): run `halb lab down` first")
    # Validate the lab's own config before building anything.
    doc = lab_config(p, dataplane, virtual_mac)
    parse_config(doc, "lab config")
    pids: dict[str, int] = {}
    try:
        for sub in ("logs", "run", "state"):
            (lab_dir / sub).mkdir(parents=True, exist_ok=True)
        progress(f"switch namespace {site.switch_ns} with {', '.join(BRIDGES.values())}")
        _build_switch(site.switch_ns)
        for h in p.hosts:
            progress(f"namespace {h.namespace} ({', '.join(lk.ifname for lk in h.links)})")
            _build_host(h, site)
        progress(f"host link {site.host_link} {p.host_address}")
        _build_host_link(p)
        p.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        if p.etcd_tls:
            progress(f"etcd certificates in {p.etcd_tls_dir}")
            etcd_members.make_tls(p)
        what = "TLS, auth, role on " + p.etcd_role_prefix if p.etcd_tls else "plaintext"
        progress(f"etcd on {', '.join(p.etcd_endpoints)} ({what})")
        etcd_members.start_members(p, pids)
        progress(f"backend servers on {', '.join(b.name for b in p.backends)}")
        _start_backends(p, pids)
        state = status_doc(p, dataplane, pids)
        _write_state(p, state)
        if agents:
            progress(f"agents on {', '.join(n.name for n in p.nodes)}")
            for n in p.nodes:
                start_agent(n.namespace, p.config_path, lab_dir)
    except BaseException:
        progress("failed: removing what was built")
        down(site, progress=_noop, extra_pids=list(pids.values()))
        raise
    return state


def down(
    site: LabSite | None = None, progress: Progress = _noop, extra_pids: Sequence[int] = ()
) -> list[str]:
    """Remove every namespace, process, link and file of the lab. Idempotent; works from
    the state file when there is one and by name prefix when a crash left none."""
    site = site or site_from_env()
    lab_dir = site.lab_dir
    removed: list[str] = []
    state = load_state(site)
    pids: list[int] = list(extra_pids)
    if state is not None:
        pids.extend(int(v) for v in state.get("pids", {}).values())
    namespaces = lab_namespaces(site)
    for ns in namespaces:
        pids.extend(netns.netns_pids(ns))
    pids.extend(_lab_processes(lab_dir))
    if pids:
        progress(f"stopping {len(set(pids))} processes")
        netns.kill_pids(sorted(set(pids)))
    for ns in namespaces:
        progress(f"deleting namespace {ns}")
        run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    if run(["ip", "link", "show", site.host_link], check=False):
        progress(f"deleting link {site.host_link}")
        run(["ip", "link", "del", site.host_link], check=False)
        removed.append(site.host_link)
    # Maps a killed agent left pinned (they outlive it on purpose) go with the lab.
    pins = BPFFS / site.cluster
    if pins.exists():
        progress(f"removing pinned maps {pins}")
        shutil.rmtree(pins, ignore_errors=True)
        removed.append(str(pins))
    if lab_dir.exists():
        progress(f"removing {lab_dir}")
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(str(lab_dir))
    return removed


def _lab_processes(lab_dir: Path) -> list[int]:
    """The lab's etcd members (the lab processes outside the namespaces), found by their
    data directories even when the state file is gone."""
    return etcd_members.member_pids(lab_dir / "etcd")
