"""Reading a compiled BPF object's BTF (bpftool's raw JSON dump), for the tests that
check a Python layout against the C structs it mirrors (XDP, PROXY programs)."""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path
from typing import Any

from halb.dataplane.xdp import libbpf as lb
from halb.dataplane.xdp.loader import BpfObject

__all__ = ["btf_types", "c_struct", "map_sizes", "py_struct", "type_size"]

Types = dict[int, dict[str, Any]]


def btf_types(obj: Path) -> Types:
    """Type id -> the type's JSON, from ``bpftool btf dump file OBJ format raw -j``."""
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(obj), "format", "raw", "-j"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def type_size(types: Types, tid: int) -> int:
    """Bytes of type ``tid`` (through typedefs and qualifiers; arrays by element)."""
    t = types[tid]
    if t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
        return type_size(types, t["type_id"])
    if t["kind"] == "ARRAY":
        return int(t["nr_elems"]) * type_size(types, t["type_id"])
    return int(t["size"])


Member = tuple[str, int, int]  # name, byte offset, byte size


def c_struct(types: Types, name: str) -> tuple[int, list[Member]]:
    """The size and members of ``struct name`` in the object's BTF (exactly one)."""
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t["name"] == name]
    assert len(found) == 1, f"struct {name} not in the object's BTF"
    members = [
        (m["name"], m["bits_offset"] // 8, type_size(types, m["type_id"]))
        for m in found[0]["members"]
    ]
    return int(found[0]["size"]), members


def py_struct(py: type[ctypes.Structure]) -> tuple[int, list[Member]]:
    """The same for a ctypes structure: what c_struct must equal."""
    fields = [f[0] for f in py._fields_]
    return ctypes.sizeof(py), [(n, getattr(py, n).offset, getattr(py, n).size) for n in fields]


def map_sizes(obj: BpfObject) -> dict[str, tuple[int, int]]:
    """Key and value sizes of every map of a loaded object, as the kernel has them."""
    out = {}
    for name, m in obj.maps.items():
        info = lb.BpfMapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        lb.check(lb.lib.bpf_obj_get_info_by_fd(m.fd, ctypes.byref(info), ctypes.byref(size)), name)
        out[name] = (int(info.key_size), int(info.value_size))
    return out
