"""Generate the Python protobuf / gRPC modules for protos/halb/v1 into halb/_proto.

The generated tree is git-ignored. It is written at build time only (``python -m
halb.build``, which scripts/setup runs, or ``python -m halb.sync.protogen``), with type
stubs (``--pyi_out``) beside the modules; halb.sync.pb refuses a tree the stamp calls
missing or stale (check_fresh) instead of regenerating it at import time.

Layout and import paths: protoc runs with ``-I protos``, so the files are named
``halb/v1/sync.proto`` inside the descriptor pool (the name other languages see), and
the output lands in ``halb/_proto/halb/v1/sync_pb2.py``. protoc's gRPC plugin writes
``from halb.v1 import sync_pb2``, which would resolve against our own top-level
``halb`` package, so that one import line is rewritten to
``from halb._proto.halb.v1 import sync_pb2``. Empty ``__init__.py`` files make every
level a regular package. A stamp records the proto digests and the generator
versions; the output of one protoc version is byte-for-byte deterministic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from halb.protoc import replace_tree, run_protoc, tool_versions

__all__ = [
    "PROTO_FILES",
    "StaleProtoError",
    "check_fresh",
    "default_out_dir",
    "generate",
    "is_fresh",
    "proto_root",
    "stamp_for",
]

PROTO_FILES = ("halb/v1/sync.proto",)
_STAMP = "STAMP.json"
_PKG_PREFIX = "halb._proto"
# What protoc writes; in the stamp so a tree generated with fewer outputs is stale.
_OUTPUTS = ("python", "grpc_python", "pyi")


class StaleProtoError(RuntimeError):
    """The generated modules are missing or older than the protos / generator."""


def proto_root() -> Path:
    """protos/ of a source checkout (absent in an installed wheel)."""
    return Path(__file__).resolve().parents[2] / "protos"


def default_out_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "_proto"


def stamp_for(root: Path) -> dict[str, object]:
    """What the generated tree depends on: proto contents and generator versions."""
    digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in PROTO_FILES}
    return {"protos": digests, **tool_versions(), "outputs": list(_OUTPUTS)}


def is_fresh(out_dir: Path | None = None, root: Path | None = None) -> bool:
    out = out_dir or default_out_dir()
    src = root or proto_root()
    try:
        have = json.loads((out / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if not src.is_dir():
        # Installed package without protos/: the build generated the tree; trust it.
        return True
    return bool(have == stamp_for(src))


def check_fresh(out_dir: Path | None = None, root: Path | None = None) -> None:
    """Raise StaleProtoError, saying how to fix it, unless the generated tree is fresh."""
    out = out_dir or default_out_dir()
    if not is_fresh(out, root):
        state = "stale" if (out / _STAMP).exists() else "missing"
        raise StaleProtoError(
            f"the generated protobuf modules in {out} are {state} (not built from the current"
            " protos/, grpcio-tools, protobuf and outputs): run `python -m halb.build`"
            " (scripts/setup does)"
        )


def _fix_imports(out: Path) -> None:
    for name in PROTO_FILES:
        stem = name.removesuffix(".proto")
        grpc_file = out / f"{stem}_pb2_grpc.py"
        pkg, _, mod = stem.rpartition("/")
        old = f"from {pkg.replace('/', '.')} import {mod}_pb2 as"
        new = f"from {_PKG_PREFIX}.{pkg.replace('/', '.')} import {mod}_pb2 as"
        text = grpc_file.read_text()
        if old not in text:
            raise RuntimeError(f"unexpected import layout in generated {grpc_file.name}: {old!r}")
        grpc_file.write_text(text.replace(old, new))


def _add_inits(out: Path) -> None:
    (out / "__init__.py").write_text('"""Generated protobuf modules (git-ignored)."""\n')
    for name in PROTO_FILES:
        parts = Path(name).parent.parts
        for i in range(1, len(parts) + 1):
            init = out.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                init.write_text("")


def generate(out_dir: Path | str | None = None, root: Path | str | None = None) -> Path:
    """(Re)generate the modules into out_dir (default halb/_proto); returns out_dir.

    Writes into a temporary sibling directory and swaps it in under a file lock, so
    concurrent processes (parallel test runs, an agent starting) never import a
    half-written tree.
    """
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    src = Path(root) if root is not None else proto_root()

    def build(tmp: Path) -> None:
        run_protoc(src, tmp, PROTO_FILES, pyi=True, what=", ".join(PROTO_FILES))
        _fix_imports(tmp)
        _add_inits(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp_for(src), indent=2, sort_keys=True) + "\n")

    # Default tree: skip when another process generated it while we waited.
    fresh = (lambda: is_fresh(out, src)) if out_dir is None else None
    return replace_tree(out, "protogen", build, fresh)


if __name__ == "__main__":
    print(generate())
