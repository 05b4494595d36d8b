"""The XDP flow map <-> packed flow records, against real BPF maps: one adapter's map
copied into another's through records (backend ids differ between the two), raw keys
and values surviving both conversions, and the raw batch update / delete."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, ip_address

import pytest

from halb.dataplane.xdp import flowrecords
from halb.dataplane.xdp.adapter import XdpDataplane
from halb.flows import records
from halb.model import Backend, Flow, Forwarding, Protocol, Scheduler, Service, ServiceKey
from halb.testing.sync_cluster import veth_dataplanes

pytestmark = pytest.mark.kernel

VIP, VIP6 = ip_address("10.79.0.100"), ip_address("fd79::100")
BACKENDS = tuple(
    Backend(ip_address(f"10.79.0.{10 + i}"), 8080, mac=f"02:79:00:00:00:{10 + i:02x}")
    for i in range(4)
)
B6 = Backend(ip_address("fd79::10"), 80, mac="02:79:00:00:00:20")
WEB, WEB6 = ServiceKey(VIP, 80, Protocol.TCP), ServiceKey(VIP6, 443, Protocol.TCP)


def services(backends: tuple[Backend, ...] = BACKENDS) -> list[Service]:
    return [
        Service(WEB, Scheduler.MAGLEV, Forwarding.DSR, backends, ring_size=1009),
        # 4in6 and 6in6 tunnels: an IPv6 VIP with an IPv4 and an IPv6 backend
        Service(WEB6, Scheduler.MAGLEV, Forwarding.TUNNEL, (BACKENDS[0], B6), ring_size=1009),
    ]


def flows(n: int, base: int = 0x0A4F0900) -> list[Flow]:
    return [
        Flow(Protocol.TCP, IPv4Address(base + i // 50000), 1024 + i % 50000, VIP, 80,
             BACKENDS[i % 4].address, 8080)
        for i in range(n)
    ]  # fmt: skip


V6 = [
    Flow(Protocol.TCP, ip_address("fd79::9:1"), 40000, VIP6, 443, B6.address, 80),
    Flow(Protocol.TCP, ip_address("fd79::9:2"), 40001, VIP6, 443, BACKENDS[0].address, 8080),
]


@pytest.fixture
def make_dp() -> Iterator[Callable[[list[Service]], XdpDataplane]]:
    with veth_dataplanes("halbt-frec") as make:
        yield lambda services: make(services, "10.79.0.1")


def test_one_map_copied_into_another_through_records(
    make_dp: Callable[[list[Service]], XdpDataplane],
) -> None:
    a = make_dp(services())
    # The same backends in another order: b gives them other ids, so the copy must go
    # by address, not by id.
    b = make_dp(services(BACKENDS[::-1]))
    assert a.record_backend_ids() != b.record_backend_ids()
    held = flows(20_000) + V6  # more than one batch syscall (16384 entries)
    assert a.install_flows(held) == len(held)

    recs = a.dump_records()
    assert records.count(recs) == len(held)
    assert b.install_records(recs) == len(held)
    assert b.dump_flows() == a.dump_flows() == sorted(held, key=lambda f: (f.src.version, f))

    # Deletes need only the connection: another backend in the record still matches.
    moved = records.from_flows(
        [Flow(f.protocol, f.src, f.sport, f.vip, f.vport, BACKENDS[3].address, 8080)
         for f in held[:100]]
    )  # fmt: skip
    assert b.delete_records(moved) == 100
    assert b.delete_records(moved) == 0
    assert len(b.dump_flows()) == len(held) - 100


def test_raw_entries_survive_both_conversions(
    make_dp: Callable[[list[Service]], XdpDataplane],
) -> None:
    a = make_dp(services())
    a.install_flows(flows(500) + V6)
    keys, values = flowrecords.read_all(a.map("flows"))
    table = flowrecords.BackendTable.build(
        {bid: (b.address, b.port) for bid, (_, b) in a._backend_of.items()}
    )
    recs, left_out = flowrecords.map_to_records(keys, values, table)
    assert left_out == 0
    assert flowrecords.records_to_map(recs, a.record_backend_ids()) == (keys, values)
    assert flowrecords.records_to_keys(recs) == keys


def test_entries_of_unknown_backends_are_left_out_both_ways(
    make_dp: Callable[[list[Service]], XdpDataplane],
) -> None:
    a = make_dp(services())
    a.install_flows(flows(40))  # 10 on each backend
    keys, values = flowrecords.read_all(a.map("flows"))
    known = {bid: (b.address, b.port) for bid, (_, b) in a._backend_of.items()
             if b != BACKENDS[2]}  # fmt: skip
    recs, left_out = flowrecords.map_to_records(keys, values, flowrecords.BackendTable.build(known))
    assert left_out == 10 and records.count(recs) == 30
    assert BACKENDS[2].address not in {f.backend for f in records.to_flows(recs)}

    # A node without that backend skips its records on install.
    b = make_dp(services(BACKENDS[:2]))
    assert b.install_records(a.dump_records()) == 20
    assert {f.backend for f in b.dump_flows()} == {BACKENDS[0].address, BACKENDS[1].address}


def test_batch_delete_goes_past_missing_keys(
    make_dp: Callable[[list[Service]], XdpDataplane],
) -> None:
    a = make_dp(services())
    held = flows(3000)
    a.install_flows(held[::2])  # every other one is missing from the map
    keys = flowrecords.records_to_keys(records.from_flows(held))
    # The kernel stops a batch at the first missing key; every present one still goes.
    assert flowrecords.delete(a.map("flows"), keys) == 1500
    assert a.dump_flows() == []


def test_raw_update_refuses_mismatched_buffers(
    make_dp: Callable[[list[Service]], XdpDataplane],
) -> None:
    a = make_dp(services())
    with pytest.raises(ValueError, match="key bytes"):
        flowrecords.update(a.map("flows"), b"\0" * 40, b"\0" * 4)
    with pytest.raises(ValueError, match="key bytes"):
        flowrecords.delete(a.map("flows"), b"\0" * 41)
    assert flowrecords.update(a.map("flows"), b"", b"") == 0
