"""XdpFlowSource against a real XdpDataplane: scans of the pinned flow map become the
upserts and deletes (packed records) FlowSync pushes, and its snapshot is a dump."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import numpy as np
import pytest
import yaml

from halb.dataplane.base import FlowSource
from halb.dataplane.xdp import mapdiff
from halb.dataplane.xdp.adapter import XdpDataplane
from halb.dataplane.xdp.flowsource import XdpFlowSource
from halb.flows.records import to_flows
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey

pytestmark = pytest.mark.kernel

VIP = ip_address("10.78.0.100")
BACKENDS = tuple(
    Backend(ip_address(f"10.78.0.{10 + i}"), 80, mac=f"02:78:00:00:00:{10 + i:02x}")
    for i in range(4)
)
WEB = ServiceKey(VIP, 80, Protocol.TCP)
BPFFS_ROOT = Path("/run/halb/bpffs")


def flows(n: int, base: int = 0x0A4E0900, backend: int | None = None) -> list[Flow]:
    return [
        Flow(
            Protocol.TCP,
            IPv4Address(base + i // 50000),
            1024 + i % 50000,
            VIP,
            80,
            BACKENDS[i % 4 if backend is None else backend].address,
            80,
        )
        for i in range(n)
    ]


@pytest.fixture
def dp() -> Iterator[XdpDataplane]:
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ns = f"halbt-fsrc-{tag}"
    pin_dir = Path("/run/halb/bpffs") / f"halbt-fsrc-{tag}"
    d: XdpDataplane | None = None
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
            check=True,
        )
        subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "up"], check=True)
        d = XdpDataplane("veth0", ip_address("10.78.0.1"), "generic", pin_dir, ns)
        d.apply([Service(WEB, Scheduler.MAGLEV, Forwarding.DSR, BACKENDS, ring_size=1009)])
        yield d
    finally:
        if d is not None:
            d.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture
def src(dp: XdpDataplane) -> Iterator[XdpFlowSource]:
    s = XdpFlowSource.from_dataplane(dp)
    try:
        yield s
    finally:
        s.close()


def scan(src: XdpFlowSource) -> tuple[list[Flow], list[Flow]]:
    d = src.scan()
    src.accept(d)
    return sorted(to_flows(d.upserts)), sorted(to_flows(d.deletes))


def test_the_adapter_offers_its_event_and_scan_source(dp: XdpDataplane) -> None:
    source = dp.flow_source()
    try:
        assert isinstance(source, XdpFlowSource)
        assert isinstance(source, FlowSource)
    finally:
        source.close()


def test_scans_report_new_changed_and_gone_flows(dp: XdpDataplane, src: XdpFlowSource) -> None:
    assert scan(src) == ([], [])
    first = flows(1000)
    assert dp.install_flows(first) == 1000
    assert scan(src) == (sorted(first), [])
    assert scan(src) == ([], [])  # nothing changed: nothing pushed

    # A flow moved to another backend (the program re-routes a flow whose backend left)
    # is an upsert with the new backend.
    moved = [Flow(f.protocol, f.src, f.sport, f.vip, f.vport, BACKENDS[3].address, 80)
             for f in first[:10] if f.backend != BACKENDS[3].address]  # fmt: skip
    dp.install_flows(moved)
    more = flows(5, base=0x0A4E0A00)
    dp.install_flows(more)
    ended = first[500:520]
    dp.delete_flows(ended)
    ups, dels = scan(src)
    assert ups == sorted(moved + more)
    assert dels == sorted(ended)  # deletes carry the backend they had
    st = src.stats()
    assert st.entries == 1000 + 5 - 20
    assert st.upserts == 1000 + len(moved) + 5 and st.deletes == 20


def test_snapshot_is_a_dump(dp: XdpDataplane, src: XdpFlowSource) -> None:
    dp.install_flows(flows(3000))
    assert sorted(src.snapshot()) == dp.dump_flows()
    assert sorted(to_flows(src.snapshot_records())) == dp.dump_flows()
    # The same through the pins, as another process (the CLI) reads them.
    assert dp.pin_dir is not None
    pinned = XdpFlowSource.from_pins(dp.pin_dir)
    try:
        assert sorted(pinned.snapshot()) == dp.dump_flows()
    finally:
        pinned.close()


def test_deletes_of_a_freed_backend_keep_their_backend(
    dp: XdpDataplane, src: XdpFlowSource
) -> None:
    on_b0 = flows(8, backend=0)
    dp.install_flows(on_b0)
    scan(src)
    # Removing the backend frees its id and deletes its flows in the same apply.
    dp.apply([Service(WEB, Scheduler.MAGLEV, Forwarding.DSR, BACKENDS[1:], ring_size=1009)])
    ups, dels = scan(src)
    assert ups == [] and dels == sorted(on_b0)


def test_run_pushes_each_diff_once(dp: XdpDataplane, src: XdpFlowSource) -> None:
    pushed: list[tuple[bytes, bytes]] = []
    batch = flows(200)

    async def main() -> None:
        task = asyncio.create_task(src.run(lambda u, d: pushed.append((u, d))))
        try:
            await asyncio.to_thread(dp.install_flows, batch)
            async with asyncio.timeout(5):
                while sum(len(to_flows(u)) for u, _ in pushed) < 200:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # several more scans: nothing new to push
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert sorted(f for u, _ in pushed for f in to_flows(u)) == sorted(batch)
    assert all(not d for _, d in pushed)


def test_cli_lists_the_flows_of_a_node_from_its_pins(tmp_path: Path) -> None:
    """`halb flows` reads /run/halb/bpffs/CLUSTER/NODE, where the agent pins."""
    from click.testing import CliRunner

    from halb.cli.flows import flows_cmd, pin_dir

    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cluster, ns = f"halbt-fcli-{tag}", f"halbt-fcli-{tag}"
    cfg_file = tmp_path / "halb.yaml"
    node = {"interface": "veth0", "sync_address": "127.0.0.1:7700"}
    backend = {"address": "10.78.0.10", "mac": "02:78:00:00:00:0a"}
    doc = {
        "cluster": cluster,
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "dataplane": {"kind": "xdp"},
        "nodes": [
            {"name": "lb1", "address": "10.78.0.1/24", "priority": 200, **node},
            {"name": "lb2", "address": "10.78.0.2/24", "priority": 100, **node},
        ],
        "vip_groups": [
            {
                "name": "g",
                "vips": [
                    {
                        "address": "10.78.0.100",
                        "services": [{"port": 80, "forwarding": "dsr", "backends": [backend]}],
                    }
                ],
            }
        ],
        "sync": {"insecure": True},
        "admin": {"insecure": True},
    }
    cfg_file.write_text(yaml.safe_dump(doc))
    from halb.config import load_config

    cfg = load_config(cfg_file)
    d: XdpDataplane | None = None
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
            check=True,
        )
        subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "up"], check=True)
        d = XdpDataplane("veth0", ip_address("10.78.0.1"), "generic", pin_dir(cfg, "lb1"), ns)
        d.apply(cfg.services())
        held = flows(3, backend=0)
        assert d.install_flows(held) == 3

        result = CliRunner().invoke(
            flows_cmd, ["--config", str(cfg_file), "--vip", "10.78.0.100", "--output", "json"]
        )
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)["nodes"]
        assert doc["lb1"]["count"] == 3
        assert doc["lb1"]["flows"][0] == {
            "protocol": "tcp",
            "client": f"{held[0].src}:{held[0].sport}",
            "service": "10.78.0.100:80",
            "backend": "10.78.0.10:80",
        }
        assert doc["lb2"]["available"] is False  # no agent of lb2 here

        text = CliRunner().invoke(flows_cmd, ["--config", str(cfg_file), "--node", "lb1"])
        assert text.exit_code == 0 and "lb1: 3 flows" in text.output
    finally:
        if d is not None:
            d.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(BPFFS_ROOT / cluster, ignore_errors=True)


def test_ipv6_flows_are_translated(dp: XdpDataplane, src: XdpFlowSource) -> None:
    vip6 = ip_address("fd78::100")
    b6 = Backend(ip_address("fd78::10"), 80, mac="02:78:00:00:00:20")
    web6 = ServiceKey(vip6, 80, Protocol.TCP)
    dp.apply(
        [
            Service(WEB, Scheduler.MAGLEV, Forwarding.DSR, BACKENDS, ring_size=1009),
            Service(web6, Scheduler.MAGLEV, Forwarding.DSR, (b6,), ring_size=1009),
        ]
    )
    f6 = Flow(Protocol.TCP, ip_address("fd78::9:1"), 40000, vip6, 80, b6.address, 80)
    f4 = flows(1)[0]
    assert dp.install_flows([f6, f4]) == 2
    d = src.scan()
    src.accept(d)
    assert set(to_flows(d.upserts)) == {f4, f6} and d.deletes == b""  # (v4, v6 do not sort)
    dp.delete_flows([f6])
    assert scan(src) == ([], [f6])


def test_hash_collisions_never_lose_or_invent_a_change(
    dp: XdpDataplane, src: XdpFlowSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The diff finds keys by a 64-bit hash and then compares bytes. With a hash of two
    # values every key collides with half the others: changes must still all be seen,
    # and nothing live may be reported gone (extra upserts are allowed: idempotent).
    monkeypatch.setattr(mapdiff, "key_hash", lambda words: words[:, 0] & np.uint64(1))
    first = flows(600)
    dp.install_flows(first)
    ups, dels = scan(src)
    assert ups == sorted(first) and dels == []
    moved = [Flow(f.protocol, f.src, f.sport, f.vip, f.vport, BACKENDS[3].address, 80)
             for f in first[:40] if f.backend != BACKENDS[3].address]  # fmt: skip
    dp.install_flows(moved)
    ended = first[300:330]
    dp.delete_flows(ended)
    ups, dels = scan(src)
    live = set(dp.dump_flows())
    assert set(moved) <= set(ups) <= live
    assert dels == sorted(ended)
    assert scan(src)[1] == []  # and a scan without changes reports nothing gone


def test_scans_delete_idle_flows_and_report_them_gone(dp: XdpDataplane, src: XdpFlowSource) -> None:
    """The active's source deletes flows idle past their timeouts (read from the
    program's config entry) and pushes them as deletes; synced flows no packet has
    touched here (stamp 0) count as seen when the source started."""
    from halb.dataplane.xdp.clock import Clock
    from halb.model import FlowTimeouts

    dp.set_flow_timeouts(FlowTimeouts(tcp_established=60.0, tcp_closing=5.0, udp=30.0))
    live = flows(100)
    dp.install_flows(live)
    assert scan(src) == (sorted(live), [])
    m = dp.map("flows")
    entries = sorted(m.items(), key=lambda kv: bytes(kv[0]))
    clock = Clock.of(dp.map("config").lookup(0))
    now = clock.now()
    idle, fresh = entries[:30], entries[30:40]
    for key, value in idle:
        value.last_seen = now - clock.ticks(61)
        m.update(key, value)
    for key, value in fresh:
        value.last_seen = now - clock.ticks(59)
        m.update(key, value)
    ups, dels = scan(src)
    assert ups == []  # a new stamp is not a change to sync
    assert len(dels) == 30
    assert {bytes(k) for k, _ in m.items()} == {bytes(k) for k, _ in entries[30:]}
    assert dp.global_stats()["flow_swept"] == 30
    assert src.stats().swept == 30
    assert scan(src) == ([], [])
    # A source that started sweeping long ago: the unstamped synced flows go too.
    src._sweep_since = now - clock.ticks(3600)
    ups, dels = scan(src)
    assert (ups, len(dels)) == ([], 60)
    assert sorted(bytes(k) for k, _ in m.items()) == sorted(bytes(k) for k, _ in fresh)
    assert dp.global_stats()["flow_swept"] == 90


def test_a_source_without_expiry_deletes_nothing(dp: XdpDataplane) -> None:
    s = XdpFlowSource.from_dataplane(dp, expire=False)
    try:
        dp.install_flows(flows(10))
        m = dp.map("flows")
        for key, value in list(m.items()):
            value.last_seen = 1
            m.update(key, value)
        assert len(scan(s)[0]) == 10 and len(list(m.items())) == 10
    finally:
        s.close()


def test_the_sweep_rereads_what_it_deletes(dp: XdpDataplane) -> None:
    """Entries the scan read as expired but that a packet touched (or something
    deleted) since are neither deleted nor counted; the rest are."""
    from halb.dataplane.xdp import flowrecords
    from halb.dataplane.xdp.clock import Clock
    from halb.dataplane.xdp.flowsource import sweep
    from halb.dataplane.xdp.layout import FlowValue
    from halb.model import FlowTimeouts

    dp.set_flow_timeouts(FlowTimeouts(tcp_established=60.0, tcp_closing=5.0, udp=30.0))
    dp.install_flows(flows(6))
    m = dp.map("flows")
    clock = Clock.of(dp.map("config").lookup(0))
    now = clock.now()
    entries = sorted(m.items(), key=lambda kv: bytes(kv[0]))
    for key, value in entries:
        value.last_seen = now - clock.ticks(120)
        m.update(key, value)
    keys, values = flowrecords.read_all(m)  # the scan's (stale) read: all six expired
    touched, vanished = entries[0][0], entries[1][0]
    m.update(touched, FlowValue(entries[0][1].backend_id, 0, clock.now()))
    m.delete(vanished)
    left_keys, left_values, n = sweep({"flows": m, "config": dp.map("config")}, keys, values, 0)
    assert n == 4
    assert [bytes(k) for k, _ in m.items()] == [bytes(touched)]
    assert left_keys == bytes(touched)
    assert FlowValue.from_buffer_copy(left_values).last_seen > now - clock.ticks(120)
