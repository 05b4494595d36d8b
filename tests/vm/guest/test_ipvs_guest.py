"""IPVS for real (inside the test VM): modes, schedulers, weights, counters, minimal
re-apply, flow dump / install / delete, and a connection takeover between balancers."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from ipvs_env import (
    BACKENDS,
    CLIENT,
    LB1,
    LB2,
    NAT_VIP,
    VIP,
    Client,
    Topology,
    ask_once,
    sh,
    topology,
)

from halb.dataplane.base import Counters, FlowSource
from halb.dataplane.ipvs import IpvsDataplane
from halb.dataplane.ipvs.kernel import desired_state
from halb.dataplane.ipvs.netlink import IpvsNetlink
from halb.flows import records
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey

BE = {ns.removeprefix("halbt-"): ip_address(a) for ns, a in BACKENDS.items()}


def measure(name: str, **values: object) -> None:
    """Record a figure for the host side (printed with the vm tier's timings)."""
    path = os.environ.get("HALB_VM_RESULTS")
    if path:
        with open(os.path.join(os.path.dirname(path), "measurements.jsonl"), "a") as f:
            f.write(json.dumps({"name": name, **values}) + "\n")


def service(
    scheduler: Scheduler = Scheduler.RR,
    forwarding: Forwarding = Forwarding.DSR,
    weights: tuple[int, ...] = (1, 1, 1),
    port: int = 80,
    sorry: tuple[Backend, ...] = (),
) -> Service:
    vip = NAT_VIP if forwarding is Forwarding.NAT else VIP
    backends = tuple(Backend(addr, port, w) for addr, w in zip(BE.values(), weights, strict=True))
    return Service(
        ServiceKey(vip, port, Protocol.TCP), scheduler, forwarding, backends, sorry=sorry
    )


def wait_counters(dp: IpvsDataplane, key: ServiceKey, packets: int) -> Counters:
    """IPVS folds its per-CPU counters into what netlink reports every 2 s."""
    deadline = time.monotonic() + 5
    while True:
        counters = dp.counters()
        if counters.per_service[key].packets >= packets or time.monotonic() > deadline:
            return counters
        time.sleep(0.25)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology() as t:
        yield t


@pytest.fixture
def lb1(topo: Topology) -> Iterator[IpvsDataplane]:
    dp = IpvsDataplane(LB1)
    yield dp
    dp.close()
    nl = IpvsNetlink(LB1)
    try:
        assert nl.dump() == {}  # close() removed what the test applied
    finally:
        nl.close()


@pytest.fixture
def lb2(topo: Topology) -> Iterator[IpvsDataplane]:
    dp = IpvsDataplane(LB2)
    yield dp
    dp.close()


def test_kernel_has_ipvs_and_schedulers() -> None:
    assert os.path.exists("/proc/net/ip_vs")
    modules = Path("/proc/modules").read_text()
    for mod in ("ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_mh", "ipip"):
        assert mod + " " in modules


def test_sysctls_set_per_namespace(lb1: IpvsDataplane) -> None:
    out = subprocess.run(
        f"ip netns exec {LB1} sysctl -n net.ipv4.vs.sloppy_tcp net.ipv4.vs.sloppy_sctp "
        f"net.ipv4.vs.expire_nodest_conn",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["1", "1", "1"]


@pytest.mark.parametrize("forwarding", [Forwarding.NAT, Forwarding.DSR, Forwarding.TUNNEL])
def test_forwarding_modes_carry_traffic_and_count(
    lb1: IpvsDataplane, forwarding: Forwarding
) -> None:
    svc = service(Scheduler.RR, forwarding)
    lb1.apply([svc])
    answers = collections.Counter(ask_once(svc.key.vip, 80) for _ in range(6))
    assert answers == {"be1": 2, "be2": 2, "be3": 2}
    counters = wait_counters(lb1, svc.key, 6 * 4)
    assert counters.per_service[svc.key].packets >= 6 * 4  # SYN, data, ACKs, FIN per conn
    assert counters.per_service[svc.key].bytes > 0
    for b in svc.backends:
        assert counters.per_backend[(svc.key, b)].packets > 0


def test_wrr_follows_weights(lb1: IpvsDataplane) -> None:
    svc = service(Scheduler.WRR, weights=(1, 2, 3))
    lb1.apply([svc])
    answers = collections.Counter(ask_once(VIP, 80) for _ in range(12))
    assert answers == {"be1": 2, "be2": 4, "be3": 6}


def test_sh_keeps_one_client_on_one_backend(lb1: IpvsDataplane) -> None:
    lb1.apply([service(Scheduler.SH)])
    assert len({ask_once(VIP, 80) for _ in range(6)}) == 1


def test_mh_spreads_by_port_and_skips_weight_zero(lb1: IpvsDataplane) -> None:
    lb1.apply([service(Scheduler.MAGLEV, weights=(1, 0, 1))])
    answers = collections.Counter(ask_once(VIP, 80) for _ in range(12))
    assert set(answers) == {"be1", "be3"}  # be2 drains: weight 0 gets no Maglev slots


def test_mh_is_deterministic_per_5_tuple(lb1: IpvsDataplane) -> None:
    lb1.apply([service(Scheduler.MAGLEV)])
    first = {}
    for sport in range(40001, 40009):
        c = Client(VIP, 80, sport)
        first[sport] = c.ask()
        c.close()
    assert len(set(first.values())) > 1  # the source port is hashed too
    lb1.apply([])  # a fresh table from the same inputs maps every tuple alike
    lb1.apply([service(Scheduler.MAGLEV)])
    time.sleep(1)
    for sport, name in first.items():
        c = Client(VIP, 80, sport)
        assert c.ask() == name, sport
        c.close()


@pytest.mark.parametrize("scheduler", [Scheduler.LC, Scheduler.WLC])
def test_least_connection_schedulers(lb1: IpvsDataplane, scheduler: Scheduler) -> None:
    weights = (1, 1, 2) if scheduler is Scheduler.WLC else (1, 1, 1)
    lb1.apply([service(scheduler, weights=weights)])
    held = []
    try:
        for _ in range(4 if scheduler is Scheduler.WLC else 3):
            c = Client(VIP, 80)
            c.ask()
            held.append(c)
        names = collections.Counter(c.ask() for c in held)
    finally:
        for c in held:
            c.close()
    if scheduler is Scheduler.LC:
        assert names == {"be1": 1, "be2": 1, "be3": 1}
    else:
        assert names == {"be1": 1, "be2": 1, "be3": 2}


def test_apply_is_idempotent_and_minimal(lb1: IpvsDataplane) -> None:
    a = service(Scheduler.MAGLEV)
    b = service(Scheduler.RR, port=8080)
    first = lb1.apply([a, b])
    assert first.writes == 2 + 6 and set(first.added) == {a.key, b.key}
    assert lb1.kernel_state() == desired_state([a, b])
    assert lb1.apply([a, b]).writes == 0

    reweighted = service(Scheduler.MAGLEV, weights=(1, 5, 1))
    r = lb1.apply([reweighted, b])
    assert (r.writes, r.updated, r.added, r.removed) == (1, (a.key,), (), ())
    resched = service(Scheduler.WLC, weights=(1, 5, 1))
    assert lb1.apply([resched, b]).writes == 1
    fewer = service(Scheduler.WLC, weights=(1, 5, 1))
    fewer = Service(fewer.key, fewer.scheduler, fewer.forwarding, fewer.backends[:2])
    assert lb1.apply([fewer, b]).writes == 1
    tunnel = Service(fewer.key, fewer.scheduler, Forwarding.TUNNEL, fewer.backends)
    assert lb1.apply([tunnel, b]).writes == 2
    r = lb1.apply([tunnel])
    assert (r.writes, r.removed) == (1, (b.key,))
    assert lb1.kernel_state() == desired_state([tunnel])
    assert lb1.apply([tunnel]).writes == 0


def test_apply_removes_foreign_services_and_uses_sorry(lb1: IpvsDataplane) -> None:
    lb1.apply([service(port=8080)])
    other = IpvsDataplane(LB1)  # a previous agent's leftovers
    other.apply([service(port=8080), service(port=80)])
    other._services.clear()  # forget them without removing them
    other.close()
    regular = service(weights=(0, 0, 0))
    drained = Service(
        regular.key,
        regular.scheduler,
        regular.forwarding,
        regular.backends[:2],  # be1, be2 drained
        sorry=(Backend(BE["be3"], 80, 1),),
    )
    r = lb1.apply([drained])
    assert set(lb1.kernel_state()) == {drained.key}
    assert r.removed == (service(port=8080).key,)
    assert ask_once(VIP, 80) == "be3"  # only the sorry backend takes new connections


def test_flows_dump_install_delete(lb1: IpvsDataplane, lb2: IpvsDataplane) -> None:
    svc = service(Scheduler.RR)
    lb1.apply([svc])
    lb2.apply([svc])
    held = [Client(VIP, 80) for _ in range(3)]
    try:
        backends = {c.sport: c.ask() for c in held}
        flows = lb1.dump_flows()
        mine = [f for f in flows if f.src == ip_address("10.0.0.2") and f.sport in backends]
        assert len(mine) == 3
        for f in mine:
            assert f.vip == VIP and f.vport == 80 and f.protocol is Protocol.TCP
            assert f.backend == BE[backends[f.sport]]
        stranger = Flow(
            Protocol.TCP, ip_address("10.0.0.9"), 1, VIP, 80, ip_address("10.0.0.99"), 80
        )
        assert lb2.install_flows([*mine, stranger]) == 3  # unknown backend: skipped
        assert sorted(lb2.dump_flows()) == sorted(mine)
        assert lb2.delete_flows(mine) == 3
        deadline = time.monotonic() + 5
        while lb2.dump_flows() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lb2.dump_flows() == []
    finally:
        for c in held:
            c.close()


def test_flow_source_pushes_new_connections(lb1: IpvsDataplane) -> None:
    svc = service(Scheduler.RR)
    lb1.apply([svc])
    source = lb1.flow_source()
    assert isinstance(source, FlowSource)
    pushed: list[Flow] = []

    def push(upserts: object, deletes: object) -> None:
        assert isinstance(upserts, list)
        pushed.extend(upserts)

    async def run_until_seen(sport: int) -> None:
        task = asyncio.create_task(source.run(push))
        try:
            async with asyncio.timeout(30):
                while not any(f.sport == sport for f in pushed):
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    held = Client(VIP, 80)
    try:
        backend = held.ask()
        asyncio.run(run_until_seen(held.sport))
        mine = [f for f in pushed if f.sport == held.sport]
        assert mine[0].backend == BE[backend] and mine[0].vip == VIP
        assert records.count(source.snapshot_records()) >= 1
    finally:
        held.close()
        source.close()


def test_install_many_flows_measured(lb2: IpvsDataplane) -> None:
    svc = service(Scheduler.MAGLEV)
    lb2.apply([svc])
    n = 10_000
    flows = [
        Flow(
            Protocol.TCP,
            ip_address(0x0A140000 + i),
            1024 + i % 60000,
            VIP,
            80,
            svc.backends[i % 3].address,
            80,
        )
        for i in range(n)
    ]
    started = time.monotonic()
    assert lb2.install_flows(flows) == n
    installed = time.monotonic() - started
    assert len(lb2.dump_flows()) == n
    visible = time.monotonic() - started
    # What each rescan of the flow source (IpvsDataplane.flow_source) costs at this size.
    t0 = time.monotonic()
    lb2.dump_flows()
    rescan = time.monotonic() - t0
    measure(
        "ipvs_install_flows",
        flows=n,
        install_s=round(installed, 3),
        visible_after_dump_s=round(visible, 3),
        rescan_s=round(rescan, 3),
    )
    lb2.delete_flows(flows)


def test_takeover_keeps_live_connections(lb1: IpvsDataplane, lb2: IpvsDataplane) -> None:
    """rr on both: without the synced state the standby would schedule each mid-flow
    packet afresh (sloppy_tcp) and most connections would land on another backend."""
    svc = service(Scheduler.RR)
    lb1.apply([svc])
    lb2.apply([svc])
    held = [Client(VIP, 80) for _ in range(6)]
    try:
        before = [c.ask() for c in held]
        lb2.install_flows(lb1.dump_flows())
        started = time.monotonic()
        # Move the VIP: lb1 lets go, lb2 takes it; the client re-resolves it.
        sh(
            f"ip -n {LB1} addr del {VIP}/32 dev eth0",
            f"ip -n {LB2} addr add {VIP}/32 dev eth0",
            f"ip -n {CLIENT} neigh flush {VIP}",
        )
        after = [c.ask() for c in held]
        measure(
            "ipvs_takeover",
            connections=len(held),
            first_answers_s=round(time.monotonic() - started, 3),
        )
        assert after == before
        lb2_in = wait_counters(lb2, svc.key, len(held)).per_service[svc.key].packets
        assert lb2_in >= len(held)  # the answers really went through lb2
    finally:
        for c in held:
            c.close()
        sh(f"ip -n {LB2} addr del {VIP}/32 dev eth0", f"ip -n {LB1} addr add {VIP}/32 dev eth0")
