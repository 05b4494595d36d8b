"""etcd's v3 protos -> Python stubs in a private descriptor pool (generated at build time).

Source: Debian's ``golang-etcd-server-dev`` (etcd 3.4), the same protos etcd is built
from. They import gogoproto and google.api annotations that only matter to Go and to
grpc-gateway; those imports and options are stripped, the packages (``etcdserverpb``,
``mvccpb``, ``authpb``) are kept, since they are part of the gRPC method paths.

Why a private pool (PLATFORM.md "etcd client"): every Python etcd client registers
these same files in protobuf's default pool, so two of them cannot live in one
process; registering ours in the default pool would clash with any of them. The
generated ``*_pb2.py`` are rewritten to add their files to :data:`POOL` instead.

Output: ``halb/_etcdproto`` (git-ignored), written by ``python -m halb.build`` and, in
a source checkout, on first import when its stamp is missing or stale. Load the
modules with :func:`load`, never by importing ``halb._etcdproto`` directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PROTO_SOURCES",
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


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _stamp(root: Path) -> dict[str, object]:
    digests = {
        name: hashlib.sha256((root / src).read_bytes()).hexdigest()
        for name, src in PROTO_SOURCES.items()
    }
    return {
        "protos": digests,
        "grpcio-tools": _version("grpcio-tools"),
        "protobuf": _version("protobuf"),
    }


def is_fresh(out_dir: Path | None = None, root: Path | None = None) -> bool:
    out = out_dir or default_out_dir()
    src = root or source_root()
    try:
        have = json.loads((out / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if not src.is_dir():
        return True  # installed without the Debian protos: trust the build
    return bool(have == _stamp(src))


def _protoc(src: Path, out: Path) -> None:
    from grpc_tools import protoc  # build-time tool; ~100 ms to import

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{src}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *(str(src / name) for name in PROTO_SOURCES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for etcd's protos")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"halb-etcdproto-{digest}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out_dir is None and is_fresh(out, src):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            stripped = tmp / "src"
            for name, rel in PROTO_SOURCES.items():
                dest = stripped / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(strip_annotations((src / rel).read_text()))
            gen = tmp / "gen"
            gen.mkdir()
            _protoc(stripped, gen)
            _rewrite(gen)
            (gen / "__init__.py").write_text('"""Generated etcd stubs (git-ignored)."""\n')
            (gen / "_pool.py").write_text(_POOL_MODULE)
            for pkg in _PACKAGES:
                (gen / pkg / "__init__.py").write_text("")
            (gen / _STAMP).write_text(json.dumps(_stamp(src), indent=2, sort_keys=True) + "\n")
            old = None
            if out.exists():
                old = out.parent / f".{out.name}-old-{os.getpid()}"
                out.rename(old)
            gen.rename(out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass(frozen=True, slots=True)
class Stubs:
    """The generated modules, typed Any (as halb.sync.pb does: the generated code has
    no types strict mypy accepts)."""

    rpc: Any  # etcdserverpb.rpc_pb2: requests, responses
    rpc_grpc: Any  # etcdserverpb.rpc_pb2_grpc: KVStub, LeaseStub, WatchStub, ...
    kv: Any  # mvccpb.kv_pb2: KeyValue, Event
    auth: Any  # authpb.auth_pb2


_loaded: Stubs | None = None


def load() -> Stubs:
    """The stubs, generated first when missing or stale."""
    global _loaded
    if _loaded is None:
        if not is_fresh():
            log.info("generating etcd stubs into %s (missing or stale)", default_out_dir())
            generate()
            importlib.invalidate_caches()
        _loaded = Stubs(
            rpc=importlib.import_module(f"{_PKG}.etcdserverpb.rpc_pb2"),
            rpc_grpc=importlib.import_module(f"{_PKG}.etcdserverpb.rpc_pb2_grpc"),
            kv=importlib.import_module(f"{_PKG}.mvccpb.kv_pb2"),
            auth=importlib.import_module(f"{_PKG}.authpb.auth_pb2"),
        )
    return _loaded


if __name__ == "__main__":
    print(generate())
