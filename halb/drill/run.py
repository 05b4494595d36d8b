"""Running drills: start traffic and an ARP capture, inject the fault, watch etcd,
collect, heal, repeat. The analysis is in halb.drill.report; the parts are in target
(what and how), watch (the leader over time), client (traffic, ARP) and control (faults,
healing).

Targets:
- the lab (default): everything comes from the lab's state file (HALB_LAB_INSTANCE);
  every fault is available and the ARP capture sees the whole front segment.
- any cluster (``--config``): traffic runs through ``--client-ns NS`` (a namespace on
  this host) or ``--client-cmd 'ssh client'`` (a command prefix that runs
  ``python3 -`` and ``tcpdump`` on the client host; its clock must be in sync with this
  one). Faults are ``planned`` or ``--fault-cmd``; ARP is captured on the client's
  interface, which sees gratuitous ARP and replies to the client's own requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from halb.drill.client import ClientArpCapture, Traffic, neigh_mac
from halb.drill.control import Controller, etcd_notes
from halb.drill.progress import Progress
from halb.drill.report import DrillResult, build_result
from halb.drill.target import (
    ETCD_FAULTS,
    FAULTS,
    LAB_ONLY,
    OUTAGE,
    DrillError,
    DrillOptions,
    Target,
    resolve_target,
)
from halb.drill.watch import LeaderWatch, PollWatch
from halb.etcd import EtcdError
from halb.lab.observe import ArpCapture

# The watch polls: it sees a change up to a poll plus a read late.
WATCH_SLACK = 0.25

__all__ = [
    "FAULTS",
    "Controller",
    "DrillError",
    "DrillOptions",
    "PollWatch",
    "Target",
    "resolve_target",
    "run_drills",
    "run_one",
]


def run_one(
    target: Target,
    opts: DrillOptions,
    original: str,
    progress: Progress,
    workdir: Path,
    ctl: Controller | None = None,
) -> DrillResult:
    ctl = ctl or Controller(target)
    ctl.settle(original, opts, progress)
    statuses = ctl.statuses()
    node = opts.node or original
    progress.reset()
    progress.fault = f"{opts.fault} {node}"
    arp_file = workdir / f"drill-arp-{time.time_ns()}.txt"
    capture: ArpCapture | ClientArpCapture
    capture = (
        ArpCapture(out=arp_file) if target.lab is not None else ClientArpCapture(target, arp_file)
    )
    # The lab knows every node's MAC; with a virtual MAC every owner claims from it.
    old_mac = target.virtual_mac or target.macs.get(original)
    arp_before: str | None = None
    try:
        with capture, ctl.watch() as watch:
            progress.phase(f"{opts.connections} connections to {target.vip}:{target.echo_port}")
            traffic = Traffic(target, opts, _watching(progress, watch))
            try:
                ready = traffic.wait_ready(15)
                if ready.get("opened") != opts.connections:
                    raise DrillError(
                        f"only {ready.get('opened')} of {opts.connections} connections opened "
                        f"to {target.vip}:{target.echo_port}"
                    )
                time.sleep(opts.warmup)
                # The MAC the client resolves the VIP to (fresh: the traffic uses it).
                # Outside the lab it names the old owner.
                arp_before = neigh_mac(target)
                if target.lab is None and target.virtual_mac is None:
                    old_mac = arp_before
                fault_at, what = ctl.inject(opts, node, statuses)
                progress.fault_at = fault_at
                progress.phase(f"fault: {what}")
                events = traffic.wait(opts.duration + 30)
            finally:
                traffic.stop()
            changes = list(watch.changes)
            known_until = watch.last_read_at
        frames = capture.frames()
    finally:
        arp_file.unlink(missing_ok=True)
    after = [(t, who) for t, who in changes if t >= fault_at and who not in (None, original)]
    leader_at, new_owner = after[0] if after else (None, None)
    later = [
        (t, who)
        for t, who in changes
        if leader_at is not None and t > leader_at and who != new_owner
    ]
    result = build_result(
        fault=opts.fault if not opts.fault_cmd else "custom",
        node=node,
        old_owner=original,
        new_owner=new_owner,
        fault_at=fault_at,
        events=events,
        frames=frames,
        vip=target.vip,
        names=target.names,
        old_mac=old_mac,
        leader_changed_at=leader_at,
        # The watch polls: it sees a change up to a poll plus a read late, and the next
        # owner's first claims may come just before it.
        next_leader_change_at=later[0][0] - WATCH_SLACK if later else None,
        known_until=known_until,
        stall=opts.stall,
        shared_mac=target.virtual_mac,
    )
    result.client_arp = {"before": arp_before, "after": neigh_mac(target)}
    result.notes.append(_client_arp_note(result.client_arp))
    if new_owner is None:
        result.notes.append(f"no other node took group {target.group} (leader stayed {original})")
    if later:
        result.notes.append(
            f"leader changed again at {later[0][0] - fault_at:+.2f}s to {later[0][1] or '(none)'}"
            " (e.g. preemption): claims after it are not counted as two owners"
        )
    for t, line in ctl.after_fault():
        result.notes.append(f"{t - fault_at:+.2f}s {line}")
    result.vip_holders = ctl.vip_holders()
    if result.vip_holders is not None:
        v = result.vip_holders
        one = ", ".join(f"{n} {s:.2f}s" for n, s in v["one_s"].items()) or "none"
        result.notes.append(
            f"VIP address on exactly one node throughout: {v['exactly_one_throughout']} "
            f"(on one node: {one}; on none: {v['none_s']:.2f}s; on several: "
            f"{v['several_s']:.2f}s)"
        )
    if target.lab is None:
        result.notes.append("ARP seen from the client only: replies to other hosts are not")
    if opts.fault in ETCD_FAULTS:
        result.notes.extend(_etcd_fault_notes(ctl, statuses, fault_at))
    return result


def _client_arp_note(arp: dict[str, str | None]) -> str:
    before, after = arp["before"], arp["after"]
    verdict = "unchanged" if before == after else "changed"
    return (
        f"client's ARP entry for the VIP: {before or 'none'} before, "
        f"{after or 'none'} after ({verdict})"
    )


def _etcd_fault_notes(ctl: Controller, before: dict[str, Any], fault_at: float) -> list[str]:
    # The faulted member may still be hung and etcd electing: try for a while.
    deadline = time.monotonic() + 10
    while True:
        try:
            return etcd_notes(before, ctl.statuses(), fault_at)
        except EtcdError as exc:
            if time.monotonic() > deadline:
                return [f"node statuses unreadable after the fault: {exc}"]
            time.sleep(0.5)


def _watching(progress: Progress, watch: LeaderWatch) -> Callable[[dict[str, Any]], None]:
    def on_tick(ev: dict[str, Any]) -> None:
        progress.leader = watch.current
        progress.tick(ev)

    return on_tick


def run_drills(
    target: Target,
    opts: DrillOptions,
    progress: Progress,
    on_result: Callable[[DrillResult], None] | None = None,
    ctl: Controller | None = None,
) -> list[DrillResult]:
    ctl = ctl or Controller(target)
    if opts.fault == OUTAGE:
        # Traffic runs through the outage and a few seconds past its end.
        opts = replace(opts, duration=max(opts.duration, opts.outage_seconds + 4.0))
    if opts.fault in LAB_ONLY and target.lab is None and not opts.fault_cmd:
        raise DrillError(f"--fault {opts.fault} needs the lab; elsewhere use --fault-cmd")
    ctl.heal(opts)
    # A just-healed cluster may still be electing, or about to preempt.
    original = ctl.stable_leader(opts.settle_timeout)
    if original is None:
        raise DrillError(f"group {target.group} has no active node to drill")
    if opts.node is not None and opts.node != original and opts.fault != "partition":
        raise DrillError(f"--node {opts.node} is not the active node ({original})")
    workdir = Path(target.lab["lab_dir"]) if target.lab is not None else Path("/tmp")
    results: list[DrillResult] = []
    try:
        for i in range(opts.repeat):
            progress.prefix = f"[{i + 1}/{opts.repeat}] " if opts.repeat > 1 else ""
            res = run_one(target, opts, original, progress, workdir, ctl)
            results.append(res)
            if on_result is not None:
                on_result(res)
            progress.done()
            worst = res.gap_stats.max if res.gap_stats else float("nan")
            garp = f"{res.garp_s:.3f}s" if res.garp_s is not None else "none"
            progress.phase(
                f"lost {res.lost}/{len(res.conns)}, worst gap {worst:.3f}s, first GARP {garp}"
            )
            if i + 1 < opts.repeat:
                for line in ctl.heal(opts):
                    progress.phase(f"heal: {line}")
    finally:
        progress.done()
        # Leave the cluster as we found it, also when a drill failed half-way.
        if opts.heal:
            for line in ctl.heal(opts):
                progress.phase(f"heal: {line}")
    if opts.heal:
        ctl.settle(original, opts, progress)
    return results
