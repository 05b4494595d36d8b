"""Build-time code generation shared by halb's two generated trees (FlowSync's stubs in
halb/_proto, etcd's in halb/_etcdproto): running protoc, stamping the generator
versions, and swapping a freshly generated tree in under a lock.

A tree is written into a temporary sibling and renamed into place under a file lock,
so concurrent processes (parallel test runs, an agent starting) never import a
half-written tree; the lock lives outside the source tree (git would see it), keyed by
the output path so unrelated trees do not serialise on each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["replace_tree", "run_protoc", "tool_versions"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tool_versions() -> dict[str, str]:
    """The generator versions a tree depends on (the output of one protoc version is
    byte-for-byte deterministic)."""
    return {"grpcio-tools": _version("grpcio-tools"), "protobuf": _version("protobuf")}


def run_protoc(src: Path, out: Path, files: Iterable[str], *, pyi: bool, what: str) -> None:
    """protoc (grpc_tools) with ``-I src``: Python modules, gRPC stubs and, with ``pyi``,
    type stubs for ``files`` (paths under ``src``) into ``out``."""
    try:
        # Imported here: a build-time tool (the build extra), ~100 ms to import.
        from grpc_tools import protoc
    except ImportError as exc:
        raise RuntimeError(
            f"cannot generate {what}: grpcio-tools is not installed (pip install 'halb[build]')"
        ) from exc
    include = Path(protoc.__file__).parent / "_proto"  # well-known types
    args = [
        "grpc_tools.protoc",
        f"-I{src}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *([f"--pyi_out={out}"] if pyi else []),
        *(str(src / name) for name in files),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {what}")


def replace_tree(
    out: Path, tag: str, build: Callable[[Path], None], fresh: Callable[[], bool] | None = None
) -> Path:
    """Regenerate the tree at ``out``: ``build(dir)`` fills an empty directory, which
    then replaces ``out``. ``fresh``, checked under the lock, skips the work when another
    process generated the tree while we waited."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"halb-{tag}-{digest}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if fresh is not None and fresh():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            build(tmp)
            # mkdtemp made it 0700: every user who runs halb (not only root) imports it.
            tmp.chmod(0o755)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}-old-{os.getpid()}"
                out.rename(old)
            tmp.rename(out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out
