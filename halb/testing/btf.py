"""Reading a compiled BPF object's BTF (bpftool's raw JSON dump), for the tests that
check a Python layout against the C structs it mirrors (XDP, PROXY programs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["btf_types", "type_size"]

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
