"""The generated protobuf modules: built (with type stubs) by the build step, fresh,
deterministic, readable by every user, and never regenerated at import time."""

from __future__ import annotations

import ast
import shutil
import stat
from pathlib import Path

import pytest

from halb.sync import pb, protogen

pytestmark = pytest.mark.unit


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_tree_is_fresh_and_deterministic(tmp_path: Path) -> None:
    assert pb.sync_pb2 is not None  # the build (scripts/setup) generated the tree
    assert protogen.is_fresh()
    fresh = protogen.generate(tmp_path / "out")
    assert _files(fresh) == _files(protogen.default_out_dir())


def test_grpc_module_imports_the_package_path() -> None:
    text = (protogen.default_out_dir() / "halb/v1/sync_pb2_grpc.py").read_text()
    assert "from halb._proto.halb.v1 import sync_pb2" in text
    assert "\nfrom halb.v1 import" not in text
    assert pb.sync_pb2_grpc.FlowSyncStub is not None


def test_a_changed_proto_makes_the_tree_stale(tmp_path: Path) -> None:
    root = tmp_path / "protos"
    shutil.copytree(protogen.proto_root(), root)
    out = protogen.generate(tmp_path / "out", root=root)
    assert protogen.is_fresh(out, root)
    proto = root / protogen.PROTO_FILES[0]
    proto.write_text(proto.read_text() + "\n// changed\n")
    assert not protogen.is_fresh(out, root)
    protogen.generate(out, root=root)
    assert protogen.is_fresh(out, root)


def test_service_path_matches_the_proto() -> None:
    svc = pb.sync_pb2.DESCRIPTOR.services_by_name["FlowSync"]
    assert svc.full_name == pb.SERVICE
    assert f"/{svc.full_name}/{svc.methods_by_name['Sync'].name}" == pb.SYNC_METHOD
    assert pb.sync_pb2.DESCRIPTOR.name == "halb/v1/sync.proto"


def test_type_stubs_declare_every_message(tmp_path: Path) -> None:
    out = protogen.generate(tmp_path / "out")
    stub = out / "halb/v1/sync_pb2.pyi"
    classes = {n.name for n in ast.parse(stub.read_text()).body if isinstance(n, ast.ClassDef)}
    messages = set(pb.sync_pb2.DESCRIPTOR.message_types_by_name)
    assert messages and messages <= classes


def test_generated_tree_is_readable_by_every_user(tmp_path: Path) -> None:
    out = protogen.generate(tmp_path / "out")
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o555 if path.is_dir() else 0o444
        assert mode & want == want, f"{path} is {mode:o}"


def test_a_missing_or_stale_tree_is_refused_not_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing"
    monkeypatch.setattr(protogen, "default_out_dir", lambda: missing)
    with pytest.raises(protogen.StaleProtoError, match=f"{missing} are missing .* halb.build"):
        pb._load()
    assert not missing.exists()  # importing never writes the tree
    root = tmp_path / "protos"
    shutil.copytree(protogen.proto_root(), root)
    out = protogen.generate(tmp_path / "out", root=root)
    protogen.check_fresh(out, root)
    (root / protogen.PROTO_FILES[0]).write_text("// changed\n")
    with pytest.raises(protogen.StaleProtoError, match="are stale"):
        protogen.check_fresh(out, root)
