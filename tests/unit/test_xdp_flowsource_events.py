"""The flow source's bookkeeping between events and scans, without a kernel: the state a
scan compares with (the previous scan plus the events pushed since) and the filters that
keep a scan from resending what an event pushed while it ran."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

import numpy as np

from halb.dataplane.xdp import flowrecords
from halb.dataplane.xdp.mapdiff import MapState, without, without_keys
from halb.flows import records
from halb.model import Flow, Protocol

VIP = ip_address("10.0.0.100")


def key(i: int) -> bytes:
    return i.to_bytes(4, "little") + bytes(36)


def value(backend: int) -> bytes:
    return backend.to_bytes(4, "little") + bytes(flowrecords.VALUE_SIZE - 4)


def as_dict(state: MapState) -> dict[bytes, bytes]:
    return {k.tobytes(): v.tobytes() for k, v in zip(state.keys, state.values, strict=True)}


def test_with_entries_adds_new_keys_and_the_latest_value_wins() -> None:
    prev = MapState.of(key(1) + key(2) + key(3), value(10) + value(20) + value(30))
    # Key 2 re-created on another backend twice (the later event wins), key 4 new.
    told = prev.with_entries(key(2) + key(4) + key(2), value(21) + value(40) + value(22))
    assert as_dict(told) == {
        key(1): value(10),
        key(2): value(22),
        key(3): value(30),
        key(4): value(40),
    }
    assert np.all(told.hashes[:-1] <= told.hashes[1:])  # still searchable
    assert prev.with_entries(b"", b"") is prev
    assert len(prev) == 3  # not modified in place


def flow(i: int, backend: str = "10.0.0.21") -> Flow:
    return Flow(
        Protocol.TCP, IPv4Address(0x64400000 + i), 1024 + i, VIP, 80, ip_address(backend), 8080
    )


def test_without_drops_only_identical_records() -> None:
    recs = records.from_flows([flow(0), flow(1), flow(2)])
    pushed = records.from_flows([flow(1), flow(2, backend="10.0.0.22")])
    # flow 1 was pushed as it is; flow 2 went out with another backend: still sent.
    assert records.to_flows(without(recs, pushed)) == [flow(0), flow(2)]
    assert without(recs, b"") is recs


def test_without_keys_drops_records_of_the_same_connection_whatever_the_backend() -> None:
    deletes = records.from_flows([flow(0), flow(1), flow(2)])
    recreated = flowrecords.records_to_keys(records.from_flows([flow(1, backend="10.0.0.23")]))
    assert records.to_flows(without_keys(deletes, recreated)) == [flow(0), flow(2)]
    assert without_keys(deletes, b"") is deletes
