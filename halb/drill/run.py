"""Running drills: start traffic and an ARP capture, inject the fault, watch etcd,
collect, heal, repeat. The analysis is in halb.drill.report; this module does the I/O.

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

import asyncio
import contextlib
import json
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halb.agent import etcdio
from halb.config import ClusterConfig, load_config
from halb.drill import partition
from halb.drill.progress import Progress
from halb.drill.report import DrillResult, build_result
from halb.ha.coord import GroupKeys, request_handover
from halb.lab import builder, faults
from halb.lab.observe import ArpCapture, parse_arp_line

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

FAULTS = ("kill", "stop", "term", "link-down", "etcd-cut", "partition", "planned")
LAB_ONLY = {"kill", "stop", "term", "link-down", "etcd-cut", "partition"}
HALB = str(Path(sys.executable).with_name("halb"))
TRAFFIC_SOURCE = Path(__file__).with_name("traffic.py")
WATCH_SLACK = 0.25


class DrillError(RuntimeError):
    """A drill cannot run; worded for the operator."""


@dataclass
class DrillOptions:
    fault: str = "kill"
    node: str | None = None  # default: the active node
    connections: int = 20
    duration: float = 6.0  # seconds of traffic after the fault
    warmup: float = 1.0  # seconds of traffic before it
    interval: float = 0.01
    new_interval: float = 0.005
    new_kind: str = "http"
    repeat: int = 1
    settle_timeout: float = 30.0
    stall: float = 1.0
    heal: bool = True
    fault_cmd: str | None = None
    heal_cmd: str | None = None
    arp_probe: float = 0.2  # seconds between ARP probes for the VIP (0: none)


@dataclass
class Target:
    config_path: Path
    cfg: ClusterConfig
    group: str
    vip: str
    echo_port: int
    http_port: int
    client_prefix: list[str]
    client_python: str
    lab: dict[str, Any] | None = None
    macs: dict[str, str] = field(default_factory=dict)  # node -> front MAC
    arp_iface: str = "eth0"

    @property
    def names(self) -> dict[str, str]:
        return {m.lower(): n for n, m in self.macs.items()}


def resolve_target(
    config: str | None,
    client_ns: str | None,
    client_cmd: str | None,
    group: str | None,
    echo_port: int,
    http_port: int,
    arp_iface: str,
) -> Target:
    state = builder.load_state()
    lab = None
    if config is None:
        if state is None:
            raise DrillError(
                "no lab is up (HALB_LAB_INSTANCE): run `halb lab up`, or pass --config with "
                "--client-ns or --client-cmd"
            )
        lab, config = state, state["config"]
    elif state is not None and Path(config).resolve() == Path(state["config"]).resolve():
        lab = state
    assert config is not None
    cfg = load_config(config)
    names = [g.name for g in cfg.vip_groups]
    gname = group or names[0]
    if gname not in names:
        raise DrillError(f"no group {gname!r} in {config} (groups: {', '.join(names)})")
    gcfg = next(g for g in cfg.vip_groups if g.name == gname)
    vip = str(gcfg.vips[0].address)
    if client_cmd:
        prefix, python = shlex.split(client_cmd), "python3"
    elif client_ns:
        prefix, python = ["ip", "netns", "exec", client_ns], sys.executable
    elif lab is not None:
        prefix, python = ["ip", "netns", "exec", lab["client"]["namespace"]], sys.executable
    else:
        raise DrillError("outside the lab, say where the client runs: --client-ns or --client-cmd")
    macs = {n["name"]: n["mac"] for n in lab["nodes"]} if lab else {}
    if lab is not None:
        echo_port, http_port = int(lab["echo_port"]), int(lab["http_port"])
    return Target(
        Path(config), cfg, gname, vip, echo_port, http_port, prefix, python, lab, macs, arp_iface
    )


# -- observing etcd ----------------------------------------------------------------------


class LeaderWatch:
    """Polls the group's leader in etcd from a thread; records every change with its
    wall-clock time."""

    def __init__(self, cfg: ClusterConfig, group: str, every: float = 0.05) -> None:
        self.cfg, self.group, self.every = cfg, group, every
        self.changes: list[tuple[float, str | None]] = []
        self.statuses: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="leader-watch", daemon=True)
        self._first = threading.Event()

    def __enter__(self) -> LeaderWatch:
        self._thread.start()
        self._first.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def current(self) -> str | None:
        return self.changes[-1][1] if self.changes else None

    def _main(self) -> None:
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        client = etcdio.connect(self.cfg)
        try:
            while not self._stop.is_set():
                try:
                    snap = await asyncio.wait_for(etcdio.read_cluster(client, self.cfg), 2.0)
                except Exception:  # etcd hiccups must not end the drill; try again
                    await asyncio.sleep(self.every)
                    continue
                li = snap.leaders.get(self.group)
                holder = li.node if li else None
                if not self.changes or self.changes[-1][1] != holder:
                    self.changes.append((time.time(), holder))
                self.statuses = {n: s for n, s in snap.statuses.items()}
                self._first.set()
                await asyncio.sleep(self.every)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


class PollWatch(LeaderWatch):
    """A LeaderWatch over any blocking probe (e.g. which node holds the VIP address),
    for clusters that keep no leader in etcd."""

    def __init__(self, probe: Callable[[], str | None], every: float = 0.05) -> None:
        self.probe = probe
        self.every = every
        self.changes = []
        self.statuses = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="leader-watch", daemon=True)
        self._first = threading.Event()

    def _main(self) -> None:
        while not self._stop.is_set():
            holder = self.probe()
            if not self.changes or self.changes[-1][1] != holder:
                self.changes.append((time.time(), holder))
            self._first.set()
            self._stop.wait(self.every)


def read_leader(cfg: ClusterConfig, group: str) -> tuple[str | None, dict[str, Any]]:
    async def main() -> tuple[str | None, dict[str, Any]]:
        client = etcdio.connect(cfg)
        try:
            snap = await etcdio.read_cluster(client, cfg)
        finally:
            await client.close()
        li = snap.leaders.get(group)
        return (li.node if li else None), dict(snap.statuses)

    return asyncio.run(main())


# -- traffic -------------------------------------------------------------------------------


class Traffic:
    """The generator running on the client; its events are collected by a thread."""

    def __init__(
        self, target: Target, opts: DrillOptions, on_tick: Callable[[dict[str, Any]], None]
    ) -> None:
        args = [
            "--vip",
            target.vip,
            "--echo-port",
            str(target.echo_port),
            "--http-port",
            str(target.http_port),
            "--connections",
            str(opts.connections),
            "--interval",
            str(opts.interval),
            "--duration",
            str(opts.warmup + opts.duration),
            "--new-interval",
            str(opts.new_interval),
            "--new-kind",
            opts.new_kind,
            "--arp-probe",
            str(opts.arp_probe),
            "--arp-iface",
            target.arp_iface,
        ]
        self.argv = [*target.client_prefix, target.client_python, "-", *args]
        self.events: list[dict[str, Any]] = []
        self.ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self.on_tick = on_tick
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(TRAFFIC_SOURCE.read_text())
        self.proc.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("ev") == "tick":
                self.on_tick(ev)
                continue
            self.events.append(ev)
            if ev.get("ev") == "ready":
                self.ready.put(ev)
        self.ready.put({})

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        try:
            ev = self.ready.get(timeout=timeout)
        except queue.Empty:
            ev = {}
        if not ev:
            self.stop()
            raise DrillError(f"the traffic generator did not start: {self.stderr()}")
        return ev

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        self._reader.join(5)
        if self.proc.returncode not in (0, None) and not any(
            e.get("ev") == "summary" for e in self.events
        ):
            raise DrillError(f"the traffic generator failed: {self.stderr()}")
        return self.events

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().strip()[-2000:] or f"exit code {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- ARP -----------------------------------------------------------------------------------


class ClientArpCapture:
    """tcpdump on the client's interface (outside the lab)."""

    def __init__(self, target: Target, out: Path) -> None:
        self.argv = [
            *target.client_prefix,
            "tcpdump",
            "-l",
            "-n",
            "-e",
            "-tt",
            "-i",
            target.arp_iface,
            "--immediate-mode",
            "arp",
        ]
        self.out = out
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ClientArpCapture:
        self._fh = self.out.open("wb")
        self._proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.PIPE)
        assert self._proc.stderr is not None
        self._proc.stderr.readline()  # "listening on ..."
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            time.sleep(0.1)
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._fh.close()

    def frames(self) -> list[Any]:
        lines = self.out.read_text(errors="replace").splitlines()
        return [f for f in map(parse_arp_line, lines) if f is not None]


def _neigh_mac(target: Target) -> str | None:
    out = subprocess.run(
        [*target.client_prefix, "ip", "neigh", "show", target.vip],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout
    m = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return m.group(1) if m else None


# -- faults and healing ------------------------------------------------------------------


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
            await client.connect()
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
    return t, faults.apply_fault(node, opts.fault, target.lab)


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
        leader, statuses = read_leader(target.cfg, target.group)
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

    def leader(self) -> str | None:
        return read_leader(self.target.cfg, self.target.group)[0]

    def statuses(self) -> dict[str, Any]:
        return read_leader(self.target.cfg, self.target.group)[1]

    def settle(self, want: str, opts: DrillOptions, progress: Progress) -> None:
        settle(self.target, want, opts.settle_timeout, progress)

    def watch(self) -> LeaderWatch:
        return LeaderWatch(self.target.cfg, self.target.group)

    def inject(self, opts: DrillOptions, node: str, statuses: dict[str, Any]) -> tuple[float, str]:
        return inject(self.target, opts, node, statuses)

    def heal(self, opts: DrillOptions) -> list[str]:
        return heal(self.target, opts)


# -- one drill -----------------------------------------------------------------------------


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
    old_mac = target.macs.get(original) if target.lab is not None else _neigh_mac(target)
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
                fault_at, what = ctl.inject(opts, node, statuses)
                progress.fault_at = fault_at
                progress.phase(f"fault: {what}")
                events = traffic.wait(opts.duration + 30)
            finally:
                traffic.stop()
            changes = list(watch.changes)
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
        stall=opts.stall,
    )
    if new_owner is None:
        result.notes.append(f"no other node took group {target.group} (leader stayed {original})")
    if later:
        result.notes.append(
            f"leader changed again at {later[0][0] - fault_at:+.2f}s to {later[0][1] or '(none)'}"
            " (e.g. preemption): claims after it are not counted as two owners"
        )
    if target.lab is None:
        result.notes.append("ARP seen from the client only: replies to other hosts are not")
    return result


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
    if opts.fault in LAB_ONLY and target.lab is None and not opts.fault_cmd:
        raise DrillError(f"--fault {opts.fault} needs the lab; elsewhere use --fault-cmd")
    ctl.heal(opts)
    # A just-healed cluster may still be electing.
    deadline = time.monotonic() + opts.settle_timeout
    original = ctl.leader()
    while original is None and time.monotonic() < deadline:
        time.sleep(0.2)
        original = ctl.leader()
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
