"""Conntrack flows of the nft dataplane against the real kernel: dump, install into a
second balancer and fail over a live TCP connection, events, refusals, reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest
import yaml

from halb.dataplane.nft.adapter import NftDataplane
from halb.dataplane.nft.conntrack import Conntrack
from halb.dataplane.nft.events import FlowDelta, FlowEvents, Resync
from halb.dataplane.nft.flows import FlowEntry
from halb.flows import records
from halb.model import (
    Backend,
    Flow,
    Forwarding,
    IPAddress,
    Protocol,
    Scheduler,
    Service,
    ServiceKey,
)
from halb.testing.nft_topo import BACKENDS, SNAT, VIP, Topology

pytestmark = pytest.mark.kernel

FULLNAT_VIP = IPv4Address("10.98.0.101")
CLIENT = IPv4Address("10.98.0.2")
TCP = tuple(Backend(a, 9000) for a in BACKENDS.values())


def services() -> list[Service]:
    return [
        Service(ServiceKey(VIP, 9000, Protocol.TCP), Scheduler.MAGLEV, Forwarding.NAT, TCP, 251),
        Service(ServiceKey(FULLNAT_VIP, 9000, Protocol.TCP), Scheduler.RR, Forwarding.FULLNAT, TCP),
    ]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology.build(f"halbt-nft-{uuid.uuid4().hex[:6]}")
    try:
        yield t
    finally:
        t.destroy()


@pytest.fixture
def pair(topo: Topology) -> Iterator[tuple[NftDataplane, NftDataplane]]:
    topo.use_balancer("lba")
    topo.ip("client", "route", "replace", f"{FULLNAT_VIP}/32", "via", "10.98.0.11")
    snat: dict[IPAddress, IPAddress] = {VIP: SNAT, FULLNAT_VIP: SNAT}
    a = NftDataplane(snat, netns=topo.ns("lba"))
    b = NftDataplane(snat, netns=topo.ns("lbb"))
    try:
        for lb in ("lba", "lbb"):
            topo.exec(lb, "conntrack", "-F", check=False)
        a.apply(services())
        b.apply(services())
        yield a, b
    finally:
        a.close()
        b.close()


def connect(topo: Topology, vip: IPv4Address) -> socket.socket:
    s = topo.client_socket(socket.SOCK_STREAM)
    try:
        s.connect((str(vip), 9000))
    except BaseException:
        s.close()
        raise
    return s


def whoami(s: socket.socket) -> str:
    s.sendall(b"WHOAMI\n")
    return s.recv(100).decode().strip()


def fail_over(topo: Topology, vip: IPv4Address) -> None:
    topo.use_balancer("lbb")
    if vip == FULLNAT_VIP:
        topo.ip("client", "route", "replace", f"{FULLNAT_VIP}/32", "via", "10.98.0.12")


def test_dump_shows_the_flow(topo: Topology, pair: tuple[NftDataplane, NftDataplane]) -> None:
    a, _ = pair
    with connect(topo, VIP) as s:
        name = whoami(s)
        sport = s.getsockname()[1]
        flows = a.dump_flows()
    want = Flow(Protocol.TCP, CLIENT, sport, VIP, 9000, BACKENDS[name], 9000)
    assert want in flows


@pytest.mark.parametrize("vip", [VIP, FULLNAT_VIP], ids=["nat", "fullnat"])
def test_failover_keeps_live_connection_on_its_backend(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane], vip: IPv4Address
) -> None:
    a, b = pair
    with connect(topo, vip) as s:
        name = whoami(s)
        entries = [fe for fe in a.dump_entries() if fe.flow.vip == vip]
        assert len(entries) == 1
        if vip == FULLNAT_VIP:
            assert entries[0].snat == SNAT and entries[0].snat_port is not None
        assert b.install_flows(entries) == 1
        assert b.last_install.refused == {}
        assert [fe.flow for fe in b.dump_entries()] == [entries[0].flow]
        fail_over(topo, vip)
        for _ in range(3):
            assert whoami(s) == name  # same backend, no reset, through balancer B
    assert b.counters().per_service[ServiceKey(vip, 9000, Protocol.TCP)].packets >= 3


def test_without_sync_the_mid_flow_packet_waits_until_installed(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    a, b = pair
    with connect(topo, VIP) as s:
        name = whoami(s)
        flows = a.dump_flows()
        fail_over(topo, VIP)
        dropped = b.invalid_dropped().packets
        before = b.table_stats()
        s.sendall(b"WHOAMI\n")
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.recv(100)  # dropped as ct state invalid: no answer, no reset
        assert b.invalid_dropped().packets > dropped
        assert b.dump_flows() == []
        assert b.table_stats().invalid > before.invalid  # conntrack counted it too
        # State arrives late: TCP's retransmission now finds it.
        assert b.install_flows(flows) == 1
        after = b.table_stats()
        assert after.count >= before.count + 1 and after.max >= after.count > 0
        assert after.doc()["fill"] == round(after.count / after.max, 4)
        # What the agent's metrics read: the same table figures, no XDP-style events.
        ks = b.kernel_stats()
        assert ks.events == {} and ks.conntrack is not None
        assert ks.conntrack["max"] == after.max and ks.conntrack["count"] >= before.count + 1
        s.settimeout(10.0)
        assert s.recv(100).decode().strip() == name


def test_install_is_idempotent_and_replaces_a_wrong_backend(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    _, b = pair
    f1 = Flow(Protocol.TCP, CLIENT, 41000, VIP, 9000, BACKENDS["be1"], 9000)
    assert b.install_flows([f1]) == 1
    assert b.install_flows([f1]) == 0 and b.last_install.present == 1
    f2 = Flow(Protocol.TCP, CLIENT, 41000, VIP, 9000, BACKENDS["be2"], 9000)
    assert b.install_flows([f2]) == 1 and b.last_install.replaced == 1
    assert b.dump_flows() == [f2]
    assert b.delete_flows([f2]) == 1
    assert b.delete_flows([f2]) == 0
    assert b.dump_flows() == []


def test_refused_flows_are_counted_with_a_reason(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    _, b = pair
    good = Flow(Protocol.TCP, CLIENT, 42000, VIP, 9000, BACKENDS["be1"], 9000)
    unknown_service = Flow(Protocol.TCP, CLIENT, 42001, VIP, 9999, BACKENDS["be1"], 9000)
    unknown_backend = Flow(Protocol.TCP, CLIENT, 42002, VIP, 9000, ip_address("10.98.1.99"), 9000)
    malformed = Flow(Protocol.TCP, ip_address("fd00::1"), 42003, VIP, 9000, BACKENDS["be1"], 9000)
    bad_port = Flow(Protocol.TCP, CLIENT, 70000, VIP, 9000, BACKENDS["be1"], 9000)
    # Two fullnat flows bound to the same SNAT port toward the same backend: distinct
    # original tuples whose reply tuples clash. The kernel refuses the second.
    clash_a = FlowEntry(
        Flow(Protocol.TCP, CLIENT, 42004, FULLNAT_VIP, 9000, BACKENDS["be1"], 9000), SNAT, 42004
    )
    clash_b = FlowEntry(
        Flow(Protocol.TCP, CLIENT, 42005, FULLNAT_VIP, 9000, BACKENDS["be1"], 9000), SNAT, 42004
    )
    written = b.install_flows(
        [good, unknown_service, unknown_backend, malformed, bad_port, clash_a]
    )
    assert written == 2
    r = b.last_install
    assert r.refused == {"unknown_service": 1, "unknown_backend": 1, "malformed": 2}
    assert b.install_flows([clash_b]) == 0
    assert list(b.last_install.refused) == ["kernel_EEXIST"]
    assert sorted(b.dump_flows()) == sorted([good, clash_a.flow])


def test_reconcile_deletes_stale_and_installs_missing(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    _, b = pair
    keep = Flow(Protocol.TCP, CLIENT, 43000, VIP, 9000, BACKENDS["be1"], 9000)
    stale = Flow(Protocol.TCP, CLIENT, 43001, VIP, 9000, BACKENDS["be2"], 9000)
    moved = Flow(Protocol.TCP, CLIENT, 43002, VIP, 9000, BACKENDS["be1"], 9000)
    missing = Flow(Protocol.TCP, CLIENT, 43003, VIP, 9000, BACKENDS["be2"], 9000)
    b.install_flows([keep, stale, moved])
    moved_now = Flow(Protocol.TCP, CLIENT, 43002, VIP, 9000, BACKENDS["be2"], 9000)
    report = b.reconcile_flows([keep, moved_now, missing])
    assert report.deleted == 2  # stale, and moved's old backend
    assert report.installed.written == 2
    assert sorted(b.dump_flows()) == sorted([keep, moved_now, missing])
    # Entries that are not halb's (another port) are left alone.
    topo.exec("lbb", "conntrack", "-I", "-p", "tcp", "-s", "10.98.0.2", "-d", "10.98.0.12",
              "--sport", "5000", "--dport", "22", "--state", "ESTABLISHED", "-t", "100",
              "-u", "ASSURED")  # fmt: skip
    b.reconcile_flows([])
    assert b.dump_flows() == []
    assert "dport=22" in topo.exec("lbb", "conntrack", "-L")


async def _collect(
    events: FlowEvents, until: int, timeout: float = 5.0
) -> list[FlowDelta | Resync]:
    out: list[FlowDelta | Resync] = []
    try:
        async with asyncio.timeout(timeout):
            async for item in events:
                out.append(item)
                if len(out) >= until:
                    break
    except TimeoutError:
        pass
    return out


def test_events_new_and_destroy_for_a_real_connection(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    a, _ = pair

    async def run() -> tuple[list[FlowDelta | Resync], str, int]:
        async with a.flow_events() as events:
            s = await asyncio.to_thread(connect, topo, VIP)
            with s:
                name = await asyncio.to_thread(whoami, s)
                sport = s.getsockname()[1]
            got = await _collect(events, 1)
            # Closing the connection ends the flow (TIME_WAIT -> delete); then remove the
            # entry altogether (DESTROY) as expiry would.
            await asyncio.to_thread(topo.exec, "lba", "conntrack", "-F")
            got += await _collect(events, 1)
            return got, name, sport

    got, name, sport = asyncio.run(run())
    flow = Flow(Protocol.TCP, CLIENT, sport, VIP, 9000, BACKENDS[name], 9000)
    assert got[0] == FlowDelta("upsert", FlowEntry(flow))
    assert isinstance(got[1], FlowDelta) and got[1].op == "delete" and got[1].flow == flow


def test_events_skip_our_own_injections(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    _, b = pair
    ours = Flow(Protocol.TCP, CLIENT, 44000, VIP, 9000, BACKENDS["be1"], 9000)
    theirs = Flow(Protocol.TCP, CLIENT, 44001, VIP, 9000, BACKENDS["be2"], 9000)

    async def run() -> tuple[list[FlowDelta | Resync], FlowEvents]:
        events = b.flow_events()
        with events:
            b.install_flows([ours])
            b.delete_flows([ours])
            # The same kind of write from another socket (another process) is seen.
            other = Conntrack(topo.ns("lbb"))
            try:
                other.install([theirs], b.flowmap)
            finally:
                other.close()
            return await _collect(events, 2, timeout=2.0), events

    got, events = asyncio.run(run())
    assert got == [FlowDelta("upsert", FlowEntry(theirs))]
    assert events.ignored_own >= 2  # our NEW and DESTROY


def test_event_overflow_asks_for_resync(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    _, b = pair
    flows = [
        Flow(Protocol.TCP, IPv4Address(f"10.98.50.{i % 250 + 1}"), 20000 + i, VIP, 9000,
             BACKENDS["be1"], 9000)
        for i in range(3000)
    ]  # fmt: skip

    async def run() -> list[FlowDelta | Resync]:
        events = FlowEvents(topo.ns("lbb"), lambda: b.flowmap, rcvbuf=4096)
        with events:
            other = Conntrack(topo.ns("lbb"))
            try:
                other.install(flows, b.flowmap)  # far more events than 4 KiB can queue
            finally:
                other.close()
            out: list[FlowDelta | Resync] = []
            t0 = time.monotonic()
            async for item in events:
                out.append(item)
                if isinstance(item, Resync) or time.monotonic() - t0 > 5:
                    break
            return out

    got = asyncio.run(run())
    assert isinstance(got[-1], Resync)


def test_fullnat_source_ports_travel_so_standby_entries_are_identical(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    """Many connections from one client address through fullnat, each from a port
    another client already holds toward both backends, so nf_nat on the active picks
    a fresh source port for every one. The records carry those ports: the standby's
    entries are the active's, and every connection survives the failover. Without the
    ports the standby would bind the client's port, which the other clients' (synced)
    entries hold: the kernel refuses those flows."""
    a, b = pair
    ports = range(44000, 44030)
    others = [
        FlowEntry(Flow(Protocol.TCP, ip_address(o), p, FULLNAT_VIP, 9000, be, 9000), SNAT, p)
        for o, be in (("10.98.0.77", BACKENDS["be1"]), ("10.98.0.78", BACKENDS["be2"]))
        for p in ports
    ]
    assert a.install_flows(others) == len(others)
    socks: list[socket.socket] = []
    try:
        names = {}
        for p in ports:
            s = topo.client_socket(socket.SOCK_STREAM)
            socks.append(s)
            s.bind((str(CLIENT), p))
            s.connect((str(FULLNAT_VIP), 9000))
            names[p] = whoami(s)
        mine = {fe.flow.sport: fe for fe in a.dump_entries() if fe.flow.src == CLIENT}
        assert sorted(mine) == list(ports)
        assert all(fe.snat == SNAT and fe.snat_port not in (None, p) for p, fe in mine.items())

        recs = a.snapshot_records()  # decoded in bulk: the same as entry by entry
        pairs = zip(records.to_flows(recs), records.nat_ports(recs), strict=True)
        assert sorted(pairs) == sorted((fe.flow, fe.snat_port) for fe in a.dump_entries())
        assert b.install_records(recs) == len(others) + len(ports)
        assert b.last_install.refused == {}
        assert sorted(b.dump_entries()) == sorted(a.dump_entries())

        # The same flows without their ports: the client's port is taken.
        topo.exec("lbb", "conntrack", "-F")
        flows = [fe.flow for fe in a.dump_entries()]
        b.install_records(records.from_flows(flows))
        assert b.last_install.refused.get("kernel_EEXIST", 0) == len(ports)

        topo.exec("lbb", "conntrack", "-F")
        assert b.install_records(recs) == len(others) + len(ports)
        fail_over(topo, FULLNAT_VIP)
        for p, s in zip(ports, socks, strict=True):
            assert whoami(s) == names[p]  # same backend, through balancer B
    finally:
        for s in socks:
            s.close()


def _cli_config(tmp: Path) -> Path:
    node = {"interface": "eth0", "backend_interface": "eth1", "sync_address": "127.0.0.1:1"}
    backends = [{"address": str(a)} for a in BACKENDS.values()]
    doc = {
        "cluster": "halbt-nftcli",
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "dataplane": {"kind": "nft"},
        "nodes": [
            {"name": "lba", "address": "10.98.0.11/24", "priority": 200, **node},
            {"name": "lbb", "address": "10.98.0.12/24", "priority": 100, **node},
        ],
        "vip_groups": [
            {
                "name": "g",
                "nat": {"gateway": "10.98.1.1/24", "snat": f"{SNAT}/24"},
                "vips": [
                    {"address": str(VIP), "services": [
                        {"port": 9000, "forwarding": "nat", "ring_size": 251,
                         "backends": backends}]},
                    {"address": str(FULLNAT_VIP), "services": [
                        {"port": 9000, "forwarding": "fullnat", "scheduler": "rr",
                         "backends": backends}]},
                ],
            }
        ],
        "sync": {"insecure": True},
        "admin": {"insecure": True},
    }  # fmt: skip
    path = tmp / "halb.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_lists_conntrack_flows_and_table_stats(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane], tmp_path: Path
) -> None:
    """`halb flows` and `halb dataplane show` on nft read the node's conntrack table:
    the same columns and JSON as on XDP, plus the fullnat source binding."""
    from click.testing import CliRunner

    from halb.cli.dataplane import show
    from halb.cli.flows import flows_cmd

    _, b = pair
    nat = Flow(Protocol.TCP, CLIENT, 45000, VIP, 9000, BACKENDS["be1"], 9000)
    full = FlowEntry(
        Flow(Protocol.TCP, CLIENT, 45001, FULLNAT_VIP, 9000, BACKENDS["be2"], 9000), SNAT, 61001
    )
    assert b.install_flows([nat, full]) == 2
    cfg = str(_cli_config(tmp_path))
    args = ["--config", cfg, "--node", "lbb", "--netns", topo.ns("lbb"), "-o", "json"]
    result = CliRunner().invoke(flows_cmd, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["dataplane"] == "nft"
    assert doc["nodes"]["lbb"]["count"] == 2
    assert doc["nodes"]["lbb"]["flows"] == [
        {"protocol": "tcp", "client": f"{CLIENT}:45000", "service": f"{VIP}:9000",
         "backend": f"{BACKENDS['be1']}:9000"},
        {"protocol": "tcp", "client": f"{CLIENT}:45001", "service": f"{FULLNAT_VIP}:9000",
         "backend": f"{BACKENDS['be2']}:9000", "snat": f"{SNAT}:61001"},
    ]  # fmt: skip
    only = CliRunner().invoke(flows_cmd, [*args[:-2], "--vip", str(FULLNAT_VIP)])
    assert only.exit_code == 0 and "lbb: 1 flows" in only.output, only.output
    assert f"(from {SNAT}:61001)" in only.output
    # Without a namespace or a lab, a node that is not named alone runs elsewhere.
    both = CliRunner().invoke(flows_cmd, ["--config", cfg, "-o", "json"])
    assert json.loads(both.output)["nodes"]["lba"]["available"] is False

    shown = CliRunner().invoke(show, ["--config", cfg, "--node", "lbb", "--netns",
                                      topo.ns("lbb"), "-o", "json"])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert report["conntrack"]["count"] >= 2 and report["conntrack"]["max"] > 0
    assert {"insert_failed", "drop", "early_drop"} <= set(report["conntrack"])
    assert report["flows"] == 2
    text = CliRunner().invoke(show, ["--config", cfg, "--node", "lbb", "--netns", topo.ns("lbb")])
    assert "conntrack" in text.output and "insert_failed=" in text.output, text.output


def test_flow_source_pushes_records_with_source_ports(
    topo: Topology, pair: tuple[NftDataplane, NftDataplane]
) -> None:
    """The active's flow source: its first reconcile pushes what the table holds (bulk
    records), then events push new flows (fullnat with the source port nf_nat chose)
    and deletes; a reconcile finds nothing more to correct."""
    a, _ = pair
    before = FlowEntry(Flow(Protocol.TCP, CLIENT, 46000, VIP, 9000, BACKENDS["be1"], 9000))
    later = FlowEntry(
        Flow(Protocol.TCP, CLIENT, 46001, FULLNAT_VIP, 9000, BACKENDS["be2"], 9000), SNAT, 62001
    )
    other = Conntrack(topo.ns("lba"))  # another socket: its writes are not "our own"
    pushed: list[tuple[bytes, bytes]] = []

    async def main() -> None:
        # Subscribed first: with nf_conntrack_events=2 an entry created while nobody
        # listens never reports its end (the reconcile catches those).
        source = a.flow_source()
        source.reconcile_interval = 0.3
        assert other.install([before], a.flowmap).created == 1
        task = asyncio.create_task(source.run(lambda u, d: pushed.append((u, d))))
        try:
            await asyncio.sleep(0.2)
            assert other.install([later], a.flowmap).created == 1
            await asyncio.sleep(0.2)
            assert other.delete([before.flow], a.flowmap) == 1
            await asyncio.sleep(0.5)  # past a reconcile
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stats = source.stats()
            source.close()
        assert stats["reconciles"] >= 2 and stats["corrected"] == 0, stats

    try:
        asyncio.run(main())
    finally:
        other.close()
    ups = [
        (f, p)
        for u, _ in pushed
        for f, p in zip(records.to_flows(u), records.nat_ports(u), strict=True)
    ]
    downs = [f for _, d in pushed for f in records.to_flows(d)]
    assert ups[0] == (before.flow, None)  # from the first reconcile's dump
    assert (later.flow, 62001) in ups
    assert downs == [before.flow]
