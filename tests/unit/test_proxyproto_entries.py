"""The PROXY programs' entries built and read back in Python (no kernel): a ProxyFlow
survives the trip through the map's byte layout, and bad headers are refused."""

from __future__ import annotations

import ctypes
from ipaddress import ip_address

import pytest

from halb.dataplane.proxyproto.layout import (
    MAX_HDR,
    PP_F_ISN,
    PpFlow,
    PpKey,
    PpState,
    make_flow,
    make_key,
)
from halb.dataplane.proxyproto.program import ProxyFlow
from halb.proxy.codec import ProxyHeader, build_v1, build_v2


def flow(local: str, backend: str, header: bytes, isn: int | None) -> ProxyFlow:
    return ProxyFlow(
        local=ip_address(local),
        lport=40001,
        backend=ip_address(backend),
        bport=8080,
        header=header,
        isn_next=isn,
        state=PpState.SENT,
    )


@pytest.mark.parametrize(
    ("local", "backend"), [("10.1.0.1", "10.2.0.21"), ("fd01::1", "fd02::21")], ids=["v4", "v6"]
)
@pytest.mark.parametrize("isn", [None, 0, 0xFFFFFFFF])
def test_flow_round_trips_through_the_entry_bytes(
    local: str, backend: str, isn: int | None
) -> None:
    h = ProxyHeader(2, source=(ip_address(local), 5), destination=(ip_address(backend), 6))
    f = flow(local, backend, build_v2(h), isn)
    key = PpKey.from_buffer_copy(bytes(f.key()))
    value = PpFlow.from_buffer_copy(bytes(make_flow(f.header, f.isn_next, f.state)))
    assert ProxyFlow.from_entry(key, value) == f
    assert f.offset == len(f.header)
    assert bool(value.flags & PP_F_ISN) == (isn is not None)


def test_ports_are_in_network_order_and_the_header_zero_padded() -> None:
    key = make_key(ip_address("10.1.0.1"), 0x1234, ip_address("10.2.0.21"), 80)
    raw = bytes(key)
    assert raw[32:36] == b"\x12\x34\x00\x50" and raw[36] == 4
    hdr = build_v1(
        ProxyHeader(1, source=(ip_address("192.0.2.7"), 1), destination=(ip_address("10.0.0.1"), 2))
    )
    value = make_flow(hdr, 7)
    assert bytes(value.hdr) == hdr + bytes(MAX_HDR - len(hdr))
    assert (value.hdr_len, value.isn_next, value.state) == (len(hdr), 7, PpState.PENDING)
    assert ctypes.sizeof(PpFlow) == 8 + MAX_HDR


@pytest.mark.parametrize("size", [0, MAX_HDR + 1])
def test_headers_that_do_not_fit_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="PROXY header"):
        make_flow(b"x" * size)


def test_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in family"):
        make_key(ip_address("10.1.0.1"), 1, ip_address("fd02::21"), 2)


def test_new_flow_carries_the_original_connection_keyed_by_the_nat_one() -> None:
    from halb.proxy.codec import Parsed, parse

    client, vip = (ip_address("2001:db8::7"), 51000), (ip_address("fd00::100"), 443)
    local, backend = (ip_address("fd01::1"), 40001), (ip_address("fd02::21"), 8443)
    for version in (1, 2):
        f = ProxyFlow.new(version, client, vip, local, backend)
        got = parse(f.header)
        assert isinstance(got, Parsed) and got.length == f.offset
        assert (got.header.source, got.header.destination) == (client, vip)
        assert (f.local, f.lport, f.backend, f.bport) == (*local, *backend)
        assert (f.isn_next, f.state) == (None, PpState.PENDING)
    with pytest.raises(ValueError, match="version 3"):
        ProxyFlow.new(3, client, vip, local, backend)
