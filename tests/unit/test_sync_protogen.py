"""The generated protobuf modules are fresh and regenerate deterministically."""

from __future__ import annotations

import shutil
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
    assert pb.sync_pb2 is not None  # importing pb generated the tree if it was missing
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
