"""The ctypes structures of halb.dataplane.proxyproto.layout match the object's BTF and
its maps; the build is content-stamped like the XDP object's."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from halb.dataplane.proxyproto.build import build_proxy_bpf
from halb.dataplane.proxyproto.layout import MAP_TYPES, STATS, STRUCTS
from halb.dataplane.xdp.loader import BpfObject
from halb.testing.btf import btf_types, c_struct, map_sizes, py_struct

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def btf() -> dict[int, dict[str, Any]]:
    return btf_types(build_proxy_bpf())


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_matches_btf(btf: dict[int, dict[str, Any]], name: str) -> None:
    assert py_struct(STRUCTS[name]) == c_struct(btf, name)


def test_maps_have_the_python_key_and_value_sizes() -> None:
    obj = BpfObject(build_proxy_bpf(), MAP_TYPES)
    try:
        assert set(obj.maps) == set(MAP_TYPES)
        want = {n: (ctypes.sizeof(k), ctypes.sizeof(v)) for n, (k, v, _) in MAP_TYPES.items()}
        assert map_sizes(obj) == want
        # one counter per name (enum pp_stat ends in PP_STAT_MAX)
        assert obj.maps["pp_stats"].max_entries == len(STATS)
    finally:
        obj.close()


def test_build_is_skipped_when_the_object_is_fresh() -> None:
    obj = build_proxy_bpf()
    before = obj.stat().st_mtime_ns
    assert build_proxy_bpf() == obj
    assert obj.stat().st_mtime_ns == before
