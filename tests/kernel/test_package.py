"""The wheel is all a balancer needs: built by deploy/build-wheelhouse, installed offline
into a fresh venv outside the tree, it runs the CLI, validates configs, imports the
generated gRPC code and loads its shipped BPF object, with no clang, no grpcio-tools and
no checkout on PATH or sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util, json, sys
from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.loader import BpfObject
from halb.sync import pb
from halb.etcd import proto
stubs = proto.load()
path = build_bpf()
obj = BpfObject(path)
out = {
    "object": str(path),
    "maps": sorted(obj.maps),
    "grpc_tools": importlib.util.find_spec("grpc_tools") is not None,
    "service": pb.SERVICE,
    "pb2": pb.sync_pb2.__file__,
    "halb": __import__("halb").__file__,
    "etcd_rpc": stubs.rpc.__file__,
    "etcd_kv_stub": hasattr(stubs.rpc_grpc, "KVStub"),
}
obj.close()
from halb.dataplane.proxyproto.program import ProxyProgram
with ProxyProgram() as pp:
    out["proxy_object"] = str(pp.obj.path)
    out["proxy_maps"] = sorted(pp.obj.maps)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("halbt-pkg")
    wheelhouse = base / "wheelhouse"
    subprocess.run(
        [str(TOP / "deploy/build-wheelhouse"), str(wheelhouse)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    venv = base / "opt-halb"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin/pip"),
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            "halb",
        ],
        check=True,
        capture_output=True,
    )
    yield venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Only the venv on PATH: no clang, no checkout; run from outside the tree.
    env = {"PATH": f"{venv / 'bin'}:/usr/sbin:/sbin", "HOME": str(cwd), "LANG": "C.UTF-8"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def test_cli_and_validate(installed: Path, tmp_path: Path) -> None:
    r = _run(installed, str(installed / "bin/halb"), "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "agent" in r.stdout and "drill" in r.stdout
    examples = sorted(str(p) for p in (TOP / "examples").glob("*.yaml"))
    assert examples
    r = _run(installed, str(installed / "bin/halb"), "config", "validate", *examples, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: x\nnodes: 3\n")
    r = _run(installed, str(installed / "bin/halb"), "config", "validate", str(bad), cwd=tmp_path)
    assert r.returncode == 2


def test_shipped_bpf_object_and_proto(installed: Path, tmp_path: Path) -> None:
    import json

    r = _run(installed, str(installed / "bin/python"), "-c", PROBE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    site = str(installed / "lib")
    assert out["halb"].startswith(site), "halb imported from the checkout, not the venv"
    assert out["object"].startswith(site) and out["object"].endswith("balancer.bpf.o")
    assert out["pb2"].startswith(site)
    assert out["etcd_rpc"].startswith(site) and out["etcd_kv_stub"]
    assert not out["grpc_tools"], "grpcio-tools is a build-time tool, not a runtime dependency"
    from halb.dataplane.xdp.layout import MAP_TYPES

    assert out["maps"] == sorted(MAP_TYPES), "the shipped object's maps differ from layout.py"
    assert out["service"] == "halb.v1.FlowSync"
    from halb.dataplane.proxyproto.layout import MAP_TYPES as PP_MAP_TYPES

    assert out["proxy_object"].startswith(site) and out["proxy_object"].endswith("proxy.bpf.o")
    assert out["proxy_maps"] == sorted(PP_MAP_TYPES)
