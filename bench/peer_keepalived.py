"""Failover drills side by side: halb against keepalived (VRRP) + conntrackd (FTFW) +
nftables NAT, the stack operators run today where IPVS is not available (there is no
IPVS on this kernel; see PLATFORM.md).

Both run on the same namespace lab (halb.lab.builder, HALB_LAB_INSTANCE, default 5),
with the same traffic generator and ARP capture (halb.drill):

1. halb: `halb lab up --dataplane nft` with agents; if the nft dataplane does not carry
   traffic through the VIP, halb's XDP lab instead (said so in the output).
2. keepalived: the nft lab without agents; on each balancer keepalived 2.2 (VRRPv3,
   advert_int 0.3 s, so a master is declared dead after about 1 s like halb's 1 s
   lease), one VRRP sync group with the VIP on eth0 and the NAT gateway on eth1,
   conntrackd 1.4 FTFW over UDP on the management segment with the stock
   primary-backup notify script (commit, flush, resync, bulk on MASTER), and an nft
   DNAT that spreads connections over the backends with numgen (round robin).

Drills: `kill` (SIGKILL halb's agent / every keepalived process on the active node),
repeated, and `partition` (the balancer-to-balancer path cut on every segment, etcd
reachable): VRRP elects a second master, halb must not. An ARP probe from the client
every 0.2 s shows every node that still answers for the VIP.

keepalived and conntrackd are installed with apt-get when missing (Debian packages).

    .venv/bin/python bench/peer_keepalived.py [--repeat 5] [--connections 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not os.environ.get("HALB_LAB_INSTANCE"):
    os.environ["HALB_LAB_INSTANCE"] = "5"

from halb.drill import partition
from halb.drill.progress import Progress
from halb.drill.report import DrillResult
from halb.drill.run import (
    Controller,
    DrillOptions,
    PollWatch,
    resolve_target,
    run_drills,
)
from halb.lab import builder, netns
from halb.lab.netns import run
from halb.lab.observe import http_get, leader, wait_until
from halb.lab.procs import spawn

PACKAGES = {"keepalived": "keepalived", "conntrackd": "conntrackd", "tcpdump": "tcpdump"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def ensure_packages() -> None:
    missing = [pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None]
    if not missing:
        return
    log(f"installing {', '.join(missing)} with apt-get (Debian packages)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


# -- the keepalived + conntrackd + nft stack ---------------------------------------------


def _v4(node: dict[str, Any], ifname: str) -> str:
    itf = next(i for i in node["interfaces"] if i["name"] == ifname)
    return str(itf["addresses"][0].split("/")[0])


def nft_rules(state: dict[str, Any]) -> str:
    backs = [_v4(b, "eth1") for b in state["backends"]]
    vip = state["vip"]

    def dnat(port: int) -> str:
        m = ", ".join(f"{i} : {a}" for i, a in enumerate(backs))
        return f"ip daddr {vip} tcp dport {port} dnat to numgen inc mod {len(backs)} map {{ {m} }}"

    return f"""table ip peer_lb {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    {dnat(state["echo_port"])}
    {dnat(state["http_port"])}
  }}
}}
"""


def conntrackd_conf(d: Path, me: dict[str, Any], peer: dict[str, Any]) -> str:
    return f"""Sync {{
  Mode FTFW {{
  }}
  UDP {{
    IPv4_address {_v4(me, "eth2")}
    IPv4_Destination_Address {_v4(peer, "eth2")}
    Port 3780
    Interface eth2
    SndSocketBuffer 1249280
    RcvSocketBuffer 1249280
    Checksum on
  }}
}}
General {{
  HashSize 32768
  HashLimit 131072
  LogFile {d}/conntrackd.log
  Syslog off
  LockFile {d}/conntrackd.lock
  UNIX {{
    Path {d}/conntrackd.ctl
  }}
  NetlinkBufferSize 2097152
  NetlinkBufferSizeMaxGrowth 8388608
  Filter From Userspace {{
    Protocol Accept {{
      TCP
    }}
    Address Ignore {{
      IPv4_address 127.0.0.1
      IPv4_address {_v4(me, "eth2")}
      IPv4_address {_v4(peer, "eth2")}
    }}
  }}
}}
"""


def notify_script(d: Path) -> str:
    # The stock primary-backup.sh of conntrack-tools, with this node's config.
    c = f"conntrackd -C {d}/conntrackd.conf"
    return f"""#!/bin/sh
echo "$(date +%H:%M:%S.%N) $1" >> {d}/notify.log
case "$1" in
  primary) {c} -c; {c} -f; {c} -R; {c} -B ;;
  backup) {c} -t; {c} -n ;;
  fault) {c} -t ;;
esac
exit 0
"""


def keepalived_conf(d: Path, state: dict[str, Any], me: dict[str, Any], prio: int) -> str:
    gw = f"{_v4(state['backends'][0], 'eth1').rsplit('.', 1)[0]}.1"
    return f"""global_defs {{
  router_id {me["name"]}
  vrrp_version 3
  script_user root
  enable_script_security
}}
vrrp_sync_group LB {{
  group {{
    FRONT
    BACK
  }}
  notify_master "{d}/notify.sh primary"
  notify_backup "{d}/notify.sh backup"
  notify_fault "{d}/notify.sh fault"
}}
vrrp_instance FRONT {{
  state BACKUP
  interface eth0
  virtual_router_id 51
  priority {prio}
  advert_int 0.3
  virtual_ipaddress {{
    {state["vip"]}/32 dev eth0
  }}
}}
vrrp_instance BACK {{
  state BACKUP
  interface eth1
  virtual_router_id 52
  priority {prio}
  advert_int 0.3
  virtual_ipaddress {{
    {gw}/24 dev eth1
  }}
}}
"""


def _pids(ns: str, name: str) -> list[int]:
    out = []
    for pid in netns.netns_pids(ns):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == name:
            out.append(pid)
    return out


class Peer:
    """keepalived + conntrackd + nft on every balancer of a lab built without agents."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.root = Path(state["lab_dir"]) / "peer"

    def dir(self, node: dict[str, Any]) -> Path:
        return self.root / str(node["name"])

    def setup(self) -> None:
        nodes = self.state["nodes"]
        for i, me in enumerate(nodes):
            peer = nodes[1 - i]
            d = self.dir(me)
            d.mkdir(parents=True, exist_ok=True)
            (d / "conntrackd.conf").write_text(conntrackd_conf(d, me, peer))
            (d / "keepalived.conf").write_text(keepalived_conf(d, self.state, me, 200 - 10 * i))
            script = d / "notify.sh"
            script.write_text(notify_script(d))
            script.chmod(0o755)
            run(
                ["ip", "netns", "exec", me["namespace"], "nft", "-f", "-"],
                input_text=nft_rules(self.state),
            )
            self.start_conntrackd(me)
        time.sleep(0.5)
        for me in nodes:
            self.start_keepalived(me)

    def start_conntrackd(self, me: dict[str, Any]) -> None:
        d = self.dir(me)
        (d / "conntrackd.lock").unlink(missing_ok=True)
        spawn(
            ["conntrackd", "-C", str(d / "conntrackd.conf")],
            d / "conntrackd.out",
            ns=me["namespace"],
            append=True,
        )

    def start_keepalived(self, me: dict[str, Any]) -> None:
        d = self.dir(me)
        argv = [
            "keepalived",
            "-n",
            "-l",
            "-P",
            "-D",
            "-f",
            str(d / "keepalived.conf"),
            "-p",
            str(d / "keepalived.pid"),
            "-r",
            str(d / "vrrp.pid"),
            "-c",
            str(d / "checkers.pid"),
        ]
        spawn(argv, d / "keepalived.log", ns=me["namespace"], append=True)

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.state["nodes"] if n["name"] == name)

    def holders(self) -> list[str]:
        vip = f"{self.state['vip']}/32"
        return [
            n["name"]
            for n in self.state["nodes"]
            if vip in run(["ip", "-n", n["namespace"], "-br", "addr", "show", "eth0"], check=False)
        ]


class PeerController(Controller):
    """Drives the keepalived stack: the 'leader' is whoever holds the VIP address
    (``lb1,lb2`` when both do)."""

    def __init__(self, target: Any, peer: Peer) -> None:
        super().__init__(target)
        self.peer = peer

    def leader(self) -> str | None:
        return ",".join(self.peer.holders()) or None

    def statuses(self) -> dict[str, Any]:
        return {}

    def watch(self) -> PollWatch:
        return PollWatch(self.leader, every=0.05)

    def settle(self, want: str, opts: DrillOptions, progress: Progress) -> None:
        wait_until(f"{want} alone to hold the VIP", lambda: self.leader() == want, 30)
        vip = self.target.vip
        wait_until(
            "the service through the VIP", lambda: http_get(f"http://{vip}/", timeout=0.5), 30
        )
        time.sleep(1.0)  # let conntrackd's resync requests settle

    def inject(self, opts: DrillOptions, node: str, statuses: dict[str, Any]) -> tuple[float, str]:
        t = time.time()
        if opts.fault == "partition":
            return t, partition.cut(self.peer.state, node)
        ns = self.peer.node(node)["namespace"]
        pids = _pids(ns, "keepalived")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return t, f"SIGKILL keepalived pids {pids} on {node}"

    def heal(self, opts: DrillOptions) -> list[str]:
        done = []
        if partition.heal(self.peer.state):
            done.append("partition removed")
        for n in self.peer.state["nodes"]:
            if not _pids(n["namespace"], "keepalived"):
                self.peer.start_keepalived(n)
                done.append(f"{n['name']}: keepalived started")
            if not _pids(n["namespace"], "conntrackd"):
                self.peer.start_conntrackd(n)
                done.append(f"{n['name']}: conntrackd started")
        return done


# -- running both --------------------------------------------------------------------------


def drills(
    ctl_factory: Any, fault: str, args: argparse.Namespace, repeat: int
) -> list[DrillResult]:
    target = resolve_target(None, None, None, None, 9000, 80, "eth0")
    opts = DrillOptions(
        fault=fault, connections=args.connections, duration=args.duration, repeat=repeat, heal=True
    )
    progress = Progress()
    return run_drills(target, opts, progress, ctl=ctl_factory(target))


def halb_side(args: argparse.Namespace) -> tuple[str, dict[str, list[DrillResult]]]:
    builder.down()
    label = "halb (nft dataplane)"
    state = builder.up(2, 3, "nft", progress=log)
    try:
        wait_until("a leader", lambda: leader(state["config"]), 30)
        wait_until(
            "the service through the VIP",
            lambda: http_get(f"http://{state['vip']}/", timeout=0.5),
            15,
        )
    except TimeoutError as exc:
        log(f"halb's nft lab does not carry traffic through the VIP ({exc}); using XDP")
        builder.down()
        label = "halb (XDP DSR; its nft lab did not carry traffic)"
        state = builder.up(2, 3, "xdp", progress=log)
        wait_until("a leader", lambda: leader(state["config"]), 30)
    try:
        return label, {
            "kill": drills(Controller, "kill", args, args.repeat),
            "partition": drills(Controller, "partition", args, 1),
        }
    finally:
        builder.down()


def peer_side(args: argparse.Namespace) -> dict[str, list[DrillResult]]:
    builder.down()
    state = builder.up(2, 3, "nft", progress=log, agents=False)
    try:
        peer = Peer(state)
        log("starting conntrackd and keepalived on the balancers")
        peer.setup()

        def make(target: Any) -> PeerController:
            return PeerController(target, peer)

        return {
            "kill": drills(make, "kill", args, args.repeat),
            "partition": drills(make, "partition", args, 1),
        }
    finally:
        builder.down()


# -- the table -----------------------------------------------------------------------------


def _med(vals: list[float]) -> str:
    return f"{statistics.median(vals):.3f}" if vals else "-"


def _range(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"


def figures(res: dict[str, list[DrillResult]]) -> dict[str, str]:
    k, p = res["kill"], res["partition"][0]
    conns = sum(len(r.conns) for r in k)
    both_kill = sum("," in (r.new_owner or "") for r in k)
    claimers = sorted(
        {r_name for c in p.claims if c.time >= p.fault_at for r_name in [p.name(c.mac) or c.mac]}
    )
    return {
        "kill: connections survived": f"{sum(r.survived for r in k)}/{conns}",
        "kill: worst gap per drill, s": _range([r.gap_stats.max for r in k if r.gap_stats]),
        "kill: median gap, s": _med([r.gap_stats.median for r in k if r.gap_stats]),
        "kill: fault -> first GARP, s": _range([r.garp_s for r in k if r.garp_s is not None]),
        "kill: new connections failed": str(sum(r.new_err for r in k)),
        "kill: drills with 2 ARP owners": f"{sum(bool(r.own.conflicts) for r in k)}/{len(k)}",
        "kill: VIP address on 2 nodes": f"{both_kill}/{len(k)} drills",
        "partition: who holds the VIP": p.new_owner or f"{p.old_owner} only",
        "partition: ARP answers from": ", ".join(claimers) or "-",
        "partition: two-owner claims": str(len(p.own.conflicts)),
        "partition: connections survived": f"{p.survived}/{len(p.conns)}",
        "partition: new connections failed": str(p.new_err),
    }


def table(halb_label: str, h: dict[str, str], k: dict[str, str]) -> str:
    peer_label = "keepalived+conntrackd+nft"
    w = max(len(x) for x in h) + 2
    c = max(len(halb_label), *(len(v) for v in h.values())) + 2
    lines = [f"{'':<{w}}{halb_label:<{c}}{peer_label}"]
    for key in h:
        lines.append(f"{key:<{w}}{h[key]:<{c}}{k[key]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="kill drills per side")
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--json", type=Path, default=None, help="also write every drill here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/peer_keepalived.py needs root (network namespaces)")
    ensure_packages()
    before = builder.load_state() if builder.is_up() else None
    try:
        halb_label, halb_res = halb_side(args)
        peer_res = peer_side(args)
    finally:
        builder.down()
        if before is not None:
            log("restoring the lab that was up before")
            builder.up(len(before["nodes"]), len(before["backends"]), before["dataplane"])
    print(
        f"lab instance {os.environ['HALB_LAB_INSTANCE']}: {args.repeat} kill drills per side, "
        f"{args.connections} long-lived connections, new HTTP connections every 5 ms"
    )
    if "XDP" in halb_label:
        print("NOTE: halb runs its XDP DSR dataplane here; the peer runs nftables NAT.")
    print(table(halb_label, figures(halb_res), figures(peer_res)))
    if args.json:
        doc = {
            side: {f: [r.to_dict() for r in rs] for f, rs in res.items()}
            for side, res in (("halb", halb_res), ("keepalived", peer_res))
        }
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
