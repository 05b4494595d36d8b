"""The ctypes structures of halb.dataplane.xdp.layout match the object's BTF and maps."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest

from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.layout import MAP_TYPES, STRUCTS
from halb.dataplane.xdp.loader import BpfObject
from halb.testing.btf import btf_types, c_struct, map_sizes, py_struct

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def btf() -> dict[int, dict[str, Any]]:
    return btf_types(build_bpf())


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_matches_btf(btf: dict[int, dict[str, Any]], name: str) -> None:
    assert py_struct(STRUCTS[name]) == c_struct(btf, name)


def test_maps_have_the_python_key_and_value_sizes() -> None:
    obj = BpfObject(build_bpf())
    try:
        assert set(obj.maps) == set(MAP_TYPES)
        want = {n: (ctypes.sizeof(k), ctypes.sizeof(v)) for n, (k, v, _) in MAP_TYPES.items()}
        assert map_sizes(obj) == want
    finally:
        obj.close()


def test_build_without_clang_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from halb.dataplane.xdp.build import BuildError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BuildError, match="clang not found: run scripts/setup"):
        build_bpf(out_dir=tmp_path, force=True)


def test_build_is_skipped_when_the_object_is_fresh() -> None:
    obj = build_bpf()
    before = obj.stat().st_mtime_ns
    assert build_bpf() == obj
    assert obj.stat().st_mtime_ns == before
