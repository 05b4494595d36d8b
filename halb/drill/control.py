"""Driving a drilled cluster: inject the fault, heal, wait until it has settled.
``Controller`` bundles them for one target (the peer benchmark subclasses it)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from typing import Any

from halb.agent import etcdio
from halb.drill import partition
from halb.drill.progress import Progress
from halb.drill.target import ETCD_FAULTS, OUTAGE, DrillError, DrillOptions, Target
from halb.drill.vipwatch import VipHolders, spans
from halb.drill.watch import LeaderWatch, read_leader
from halb.etcd import EtcdError
from halb.ha.admin import request_handover
from halb.keys import GroupKeys
from halb.lab import faults

__all__ = [
    "Controller",
    "heal",
    "inject",
    "settle",
]


def _other_node(target: Target, node: str, statuses: dict[str, Any]) -> str:
    gcfg = next(g for g in target.cfg.vip_groups if g.name == target.group)
    members = sorted(target.cfg.group_nodes(gcfg), key=lambda n: -n.priority)
    live = [n.name for n in members if n.name != node and n.name in statuses]
    if not live:
        raise DrillError(f"no other live node to take group {target.group} from {node}")
    return live[0]


def _request_handover(target: Target, to: str) -> float:
    """Ask for a planned failover through etcd, in-process (the CLI's start-up would
    count as failover time); returns the instant the request was written."""

    async def main() -> float:
        client = etcdio.connect(target.cfg)
        try:
            await client.check()
            t = time.time()
            keys = GroupKeys(target.cfg.etcd.prefix, target.cfg.cluster, target.group)
            await request_handover(client, keys, to)
            return t
        finally:
            await client.close()

    return asyncio.run(main())


def inject(
    target: Target, opts: DrillOptions, node: str, statuses: dict[str, Any]
) -> tuple[float, str]:
    """Inject the fault; returns its instant (wall clock) and what was done."""
    t = time.time()
    if opts.fault_cmd:
        subprocess.Popen(["sh", "-c", opts.fault_cmd], stdout=subprocess.DEVNULL)
        return t, f"ran {opts.fault_cmd!r}"
    if opts.fault == "planned":
        to = _other_node(target, node, statuses)
        return _request_handover(target, to), f"planned failover to {to} requested"
    if target.lab is None:
        raise DrillError(f"--fault {opts.fault} needs the lab; elsewhere use --fault-cmd")
    if opts.fault == "partition":
        return t, partition.cut(target.lab, node)
    if opts.fault in ETCD_FAULTS:
        st = statuses.get(node)
        member = st.etcd.get("member") if st is not None else None
        return t, faults.apply_fault(node, opts.fault, target.lab, etcd_member=member)
    return t, faults.apply_fault(node, opts.fault, target.lab)


def etcd_notes(before: dict[str, Any], after: dict[str, Any], fault_at: float) -> list[str]:
    """What an etcd fault did to each node's etcd client and term: how long its
    coordinator's calls failed before they worked on another member, and whether its
    term (lease) of any group changed."""
    moves, terms = [], []
    for name in sorted(after):
        st = after[name]
        e = st.etcd or {}
        since = [s for end, s in e.get("recent_outages", []) if end >= fault_at]
        if since:
            moves.append(f"{name} {max(since):.3f}s (now on {e.get('member')})")
        else:
            moves.append(f"{name} none (on {e.get('member')})")
        old = before.get(name)
        for group, gs in st.groups.items():
            was = old.groups.get(group) if old is not None else None
            if was is not None and was.term != gs.term:
                terms.append(f"{name}/{group} term {was.term} -> {gs.term}")
    notes = ["etcd client outage per node: " + ", ".join(moves)]
    notes.append("terms: " + ("; ".join(terms) if terms else "none lost or changed"))
    return notes


def heal(target: Target, opts: DrillOptions) -> list[str]:
    done: list[str] = []
    if opts.heal_cmd:
        subprocess.run(["sh", "-c", opts.heal_cmd], check=False, timeout=60)
        done.append(f"ran {opts.heal_cmd!r}")
    if target.lab is not None:
        if partition.heal(target.lab):
            done.append("partition removed")
        done.extend(faults.heal(target.lab))
    return done


def settle(target: Target, want: str, timeout: float, progress: Progress) -> None:
    """Wait until ``want`` leads, every node publishes its status, and every standby's
    flow sync says it is synced (when it reports that); ask for a failover back to
    ``want`` once if it does not take the group by itself (no preemption)."""
    deadline = time.monotonic() + timeout
    asked = False
    while True:
        try:
            leader, statuses = read_leader(target.cfg, target.group)
        except EtcdError:  # etcd electing, a member restarting: not settled yet
            leader, statuses = None, {}
        nodes = {n.name for n in target.cfg.nodes}
        synced = all(s.sync.get("synced", True) for n, s in statuses.items() if n != leader)
        if leader == want and set(statuses) >= nodes and synced:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DrillError(
                f"cluster did not settle in {timeout:g}s: leader {leader}, nodes with "
                f"status {sorted(statuses)}, standbys synced: {synced}"
            )
        if not asked and leader not in (None, want) and want in statuses and left < timeout - 8:
            progress.phase(f"{want} did not take the group back by itself: failover --to {want}")
            _request_handover(target, want)
            asked = True
        time.sleep(0.2)


class Controller:
    """How a drill drives and observes a cluster: halb's, through etcd and the lab's
    faults. The peer benchmark subclasses it for keepalived."""

    def __init__(self, target: Target) -> None:
        self.target = target
        # etcd-outage: the thread that ends it, and what it did (wall clock, line).
        self._outage: threading.Thread | None = None
        self.outage_log: list[tuple[float, str]] = []
        self._holders: VipHolders | None = None
        self._fault_at = 0.0

    def leader(self) -> str | None:
        return read_leader(self.target.cfg, self.target.group)[0]

    def statuses(self) -> dict[str, Any]:
        return read_leader(self.target.cfg, self.target.group)[1]

    def preferred_leader(self) -> str | None:
        """Who will lead once a pending preemption has happened: the highest-priority
        member that is up, when the group preempts (None: whoever leads stays)."""
        gcfg = next(g for g in self.target.cfg.vip_groups if g.name == self.target.group)
        if not gcfg.preempt:
            return None
        up = self.statuses()
        members = sorted(self.target.cfg.group_nodes(gcfg), key=lambda n: -n.priority)
        return next((n.name for n in members if n.name in up), None)

    def stable_leader(self, timeout: float) -> str | None:
        """The leader once no preemption is pending (a drill that starts just before
        one would fault the wrong node), or whoever leads after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None and self.preferred_leader() in (None, leader):
                return leader
            if time.monotonic() > deadline:
                return leader
            time.sleep(0.2)

    def settle(self, want: str, opts: DrillOptions, progress: Progress) -> None:
        settle(self.target, want, opts.settle_timeout, progress)

    def watch(self) -> LeaderWatch:
        return LeaderWatch(self.target.cfg, self.target.group)

    def inject(self, opts: DrillOptions, node: str, statuses: dict[str, Any]) -> tuple[float, str]:
        lab = self.target.lab
        # Which nodes hold the VIP address: the etcd-outage verdict, and with a virtual
        # MAC the only way to tell owners apart (their ARP claims share one MAC).
        if lab is not None and (opts.fault == OUTAGE or self.target.virtual_mac is not None):
            self._holders = VipHolders.for_lab(lab, self.target.vip)
            self._holders.start()
        if opts.fault != OUTAGE:
            t, what = inject(self.target, opts, node, statuses)
            self._fault_at = t
            return t, what
        if lab is None:
            raise DrillError(f"--fault {OUTAGE} needs the lab")
        t = self._fault_at = time.time()
        what = faults.apply_fault(node, "etcd-stop-all", lab)
        self.outage_log = [(t, what)]
        self._outage = threading.Thread(
            target=self._end_outage, args=(opts, node, t), name="etcd-outage", daemon=True
        )
        self._outage.start()
        return t, f"{what}; back in {opts.outage_seconds:g}s"

    def _end_outage(self, opts: DrillOptions, node: str, began: float) -> None:
        lab = self.target.lab
        assert lab is not None
        try:
            if opts.outage_with is not None:
                time.sleep(max(0.0, began + opts.outage_with_at - time.time()))
                t = time.time()
                if opts.outage_with == "partition":
                    line = partition.cut(lab, node)
                else:
                    line = faults.apply_fault(node, opts.outage_with, lab)
                self.outage_log.append((t, f"during the outage: {line}"))
            time.sleep(max(0.0, began + opts.outage_seconds - time.time()))
            t = time.time()
            line = faults.apply_fault(node, "etcd-start-all", lab)
            self.outage_log.append((t, f"{line} (healthy after {time.time() - t:.2f}s)"))
        except Exception as exc:  # reported in the drill's notes, never a hung drill
            self.outage_log.append((time.time(), f"outage thread failed: {exc}"))

    def after_fault(self) -> list[tuple[float, str]]:
        """Once the drill's traffic is over: what the fault did after its injection."""
        if self._outage is not None:
            self._outage.join(60)
            self._outage = None
        return list(self.outage_log)

    def vip_holders(self) -> dict[str, Any] | None:
        """Which nodes held the VIP from the fault to now (then stops); None when not
        sampled (see ``inject``)."""
        h, self._holders = self._holders, None
        if h is None:
            return None
        h.stop()
        return spans(h.samples, self._fault_at, time.time())

    def heal(self, opts: DrillOptions) -> list[str]:
        return heal(self.target, opts)
