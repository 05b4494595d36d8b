"""The ctypes structures of halb.dataplane.proxyproto.layout match the object's BTF and
its maps; the build is content-stamped like the XDP object's."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from halb.dataplane.proxyproto.build import build_proxy_bpf
from halb.dataplane.proxyproto.layout import MAP_TYPES, STATS, STRUCTS
from halb.dataplane.xdp import libbpf as lb
from halb.dataplane.xdp.loader import BpfObject
from halb.testing.btf import btf_types, type_size

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def btf() -> dict[int, dict[str, Any]]:
    return btf_types(build_proxy_bpf())


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_matches_btf(btf: dict[int, dict[str, Any]], name: str) -> None:
    found = [t for t in btf.values() if t["kind"] == "STRUCT" and t["name"] == name]
    assert len(found) == 1, f"struct {name} not in the object's BTF"
    py = STRUCTS[name]
    assert found[0]["size"] == ctypes.sizeof(py)
    c_members = [
        (m["name"], m["bits_offset"] // 8, type_size(btf, m["type_id"]))
        for m in found[0]["members"]
    ]
    py_members = [(f[0], getattr(py, f[0]).offset, getattr(py, f[0]).size) for f in py._fields_]
    assert py_members == c_members


def test_maps_have_the_python_key_and_value_sizes() -> None:
    obj = BpfObject(build_proxy_bpf(), MAP_TYPES)
    try:
        assert set(obj.maps) == set(MAP_TYPES)
        for name, m in obj.maps.items():
            info = lb.BpfMapInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            lb.check(
                lb.lib.bpf_obj_get_info_by_fd(m.fd, ctypes.byref(info), ctypes.byref(size)), name
            )
            key_t, val_t, _ = MAP_TYPES[name]
            assert (info.key_size, info.value_size) == (
                ctypes.sizeof(key_t),
                ctypes.sizeof(val_t),
            ), name
        # one counter per name (enum pp_stat ends in PP_STAT_MAX)
        assert obj.maps["pp_stats"].max_entries == len(STATS)
    finally:
        obj.close()


def test_build_is_skipped_when_the_object_is_fresh() -> None:
    obj = build_proxy_bpf()
    before = obj.stat().st_mtime_ns
    assert build_proxy_bpf() == obj
    assert obj.stat().st_mtime_ns == before
