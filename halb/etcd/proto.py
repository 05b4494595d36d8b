"""etcd's v3 protos -> Python stubs in a private descriptor pool (generated at build time).

Source: Debian's ``golang-etcd-server-dev`` (etcd 3.4), the same protos etcd is built
from. They import gogoproto and google.api annotations that only matter to Go and to
grpc-gateway; those imports and options are stripped, the packages (``etcdserverpb``,
``mvccpb``, ``authpb``) are kept, since they are part of the gRPC method paths.

Why a private pool (PLATFORM.md "etcd client"): every Python etcd client registers
these same files in protobuf's default pool, so two of them cannot live in one
process; registering ours in the default pool would clash with any of them. The
generated ``*_pb2.py`` are rewritten to add their files to :data:`POOL` instead.

Output: ``halb/_etcdproto`` (git-ignored), written by ``python -m halb.build`` and
nothing else: :func:`load` refuses a tree its stamp calls missing or stale (with the
command that fixes it) rather than regenerate it at import time. Load the modules with
:func:`load`, never by importing ``halb._etcdproto`` directly.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halb.protoc import replace_tree, run_protoc, tool_versions

__all__ = [
    "PROTO_SOURCES",
    "StaleStubsError",
    "Stubs",
    "default_out_dir",
    "generate",
    "is_fresh",
    "load",
    "source_root",
    "strip_annotations",
]

log = logging.getLogger(__name__)

_PKG = "halb._etcdproto"
_STAMP = "STAMP.json"
# Our layout inside the generated tree -> the file in etcd's source tree.
PROTO_SOURCES = {
    "authpb/auth.proto": "auth/authpb/auth.proto",
    "mvccpb/kv.proto": "mvcc/mvccpb/kv.proto",
    "etcdserverpb/rpc.proto": "etcdserver/etcdserverpb/rpc.proto",
}
_PACKAGES = ("authpb", "mvccpb", "etcdserverpb")
_IMPORTS = {
    '"etcd/mvcc/mvccpb/kv.proto"': '"mvccpb/kv.proto"',
    '"etcd/auth/authpb/auth.proto"': '"authpb/auth.proto"',
}
_POOL_MODULE = '''"""The descriptor pool of halb's etcd stubs (private: see halb.etcd.proto)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def source_root() -> Path:
    return Path(os.environ.get("HALB_ETCD_PROTOS", "/usr/share/gocode/src/go.etcd.io/etcd"))


def default_out_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "_etcdproto"


def strip_annotations(text: str) -> str:
    """Drop gogoproto / google.api imports and options; point imports at our layout."""
    text = re.sub(
        r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text, flags=re.M
    )
    text = re.sub(r"^option \(gogoproto\.[a-z_]+\) = [a-z]+;\n", "", text, flags=re.M)
    text = _drop_http_options(text)
    # Field options such as [(gogoproto.nullable) = false] (none in 3.4's three files).
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    for old, new in _IMPORTS.items():
        text = text.replace(f"import {old};", f"import {new};")
    if "gogoproto" in text or "google.api" in text:
        raise RuntimeError("etcd proto still mentions gogoproto/google.api after stripping")
    return text


def _drop_http_options(text: str) -> str:
    """Remove each `option (google.api.http) = { ... };` (braces nest: additional_bindings)."""
    marker = "option (google.api.http) = {"
    while (start := text.find(marker)) >= 0:
        depth, i = 0, start + len(marker) - 1
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        end = text.index(";", i) + 1
        line_start = text.rfind("\n", 0, start)
        text = text[:line_start] + text[end:]
    return text


def _stamp(root: Path) -> dict[str, object]:
    digests = {
        name: hashlib.sha256((root / src).read_bytes()).hexdigest()
        for name, src in PROTO_SOURCES.items()
    }
    return {"protos": digests, **tool_versions()}


def is_fresh(out_dir: Path | None = None, root: Path | None = None) -> bool:
    out = out_dir or default_out_dir()
    src = root or source_root()
    try:
        have = json.loads((out / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if not src.is_dir():
        return True  # installed without the Debian protos: trust the build
    if importlib.util.find_spec("grpc_tools") is None:
        return True  # an installed wheel (no generator): its shipped stubs are the build
    return bool(have == _stamp(src))


def _rewrite(out: Path) -> None:
    pkgs = "|".join(_PACKAGES)
    for path in out.rglob("*.py"):
        text = path.read_text()
        text = re.sub(rf"^from ({pkgs}) import", rf"from {_PKG}.\1 import", text, flags=re.M)
        if path.name.endswith("_pb2.py"):
            anchor = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
            if "_descriptor_pool.Default()" not in text or anchor not in text:
                raise RuntimeError(f"unexpected layout of generated {path.name}")
            text = text.replace(anchor, f"{anchor}from {_PKG}._pool import POOL as _HALB_POOL\n")
            text = text.replace("_descriptor_pool.Default()", "_HALB_POOL")
        path.write_text(text)


def generate(out_dir: Path | str | None = None, root: Path | str | None = None) -> Path:
    """(Re)generate the stubs into out_dir (default halb/_etcdproto); returns out_dir.
    Written beside it and swapped in under a lock, like halb.sync.protogen."""
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    src = Path(root) if root is not None else source_root()
    for name, rel in PROTO_SOURCES.items():
        if not (src / rel).is_file():
            raise RuntimeError(
                f"etcd proto {rel} not found under {src} (for {name}): install the Debian "
                "package golang-etcd-server-dev, or set HALB_ETCD_PROTOS"
            )

    def build(gen: Path) -> None:
        with tempfile.TemporaryDirectory() as stripped_dir:
            stripped = Path(stripped_dir)
            for name, rel in PROTO_SOURCES.items():
                dest = stripped / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(strip_annotations((src / rel).read_text()))
            run_protoc(stripped, gen, PROTO_SOURCES, pyi=False, what="etcd's protos")
        _rewrite(gen)
        (gen / "__init__.py").write_text('"""Generated etcd stubs (git-ignored)."""\n')
        (gen / "_pool.py").write_text(_POOL_MODULE)
        for pkg in _PACKAGES:
            (gen / pkg / "__init__.py").write_text("")
        (gen / _STAMP).write_text(json.dumps(_stamp(src), indent=2, sort_keys=True) + "\n")

    fresh = (lambda: is_fresh(out, src)) if out_dir is None else None
    return replace_tree(out, "etcdproto", build, fresh)


@dataclass(frozen=True, slots=True)
class Stubs:
    """The generated modules, typed Any (as halb.sync.pb does: the generated code has
    no types strict mypy accepts)."""

    rpc: Any  # etcdserverpb.rpc_pb2: requests, responses
    rpc_grpc: Any  # etcdserverpb.rpc_pb2_grpc: KVStub, LeaseStub, WatchStub, ...
    kv: Any  # mvccpb.kv_pb2: KeyValue, Event
    auth: Any  # authpb.auth_pb2


_loaded: Stubs | None = None


class StaleStubsError(RuntimeError):
    """The generated etcd stubs are missing or older than the protos / generator."""


def load() -> Stubs:
    """The stubs, as the build generated them (never regenerated at import time)."""
    global _loaded
    if _loaded is None:
        if not is_fresh():
            out = default_out_dir()
            state = "stale" if (out / _STAMP).exists() else "missing"
            raise StaleStubsError(
                f"the generated etcd stubs in {out} are {state} (not built from the current "
                "etcd protos, grpcio-tools and protobuf): run `python -m halb.build` "
                "(scripts/setup does)"
            )
        _loaded = Stubs(
            rpc=importlib.import_module(f"{_PKG}.etcdserverpb.rpc_pb2"),
            rpc_grpc=importlib.import_module(f"{_PKG}.etcdserverpb.rpc_pb2_grpc"),
            kv=importlib.import_module(f"{_PKG}.mvccpb.kv_pb2"),
            auth=importlib.import_module(f"{_PKG}.authpb.auth_pb2"),
        )
    return _loaded


if __name__ == "__main__":
    print(generate())
