"""halb's import structure: no cycles between modules, no lower layer importing a higher
one, and test fixtures (halb.testing) kept out of production code.

Every module's imports are read with ``ast`` (module-level, function-local and
``TYPE_CHECKING`` ones, relative ones, and ``importlib.import_module("literal")``), so a
lazy import inside a function cannot hide a cycle. The exceptions are listed below,
each with its reason; an exception that no longer occurs fails the test too, so the
lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import halb

pytestmark = pytest.mark.unit

ROOT = Path(halb.__file__).parent

# Lowest first. A module may import its own layer and the layers below it; within a
# layer only the cycle check applies. Units are halb's top-level packages and modules
# ("" is halb/__init__.py).
LAYERS: tuple[frozenset[str], ...] = (
    # The version string; generated protobuf stubs (FlowSync's, imported by halb.sync.pb
    # by name; etcd's, loaded by halb.etcd.proto in a private pool).
    frozenset({"", "_proto", "_etcdproto"}),
    # Value types, asyncio helpers, config and its timing derivation, pure Maglev and
    # planning, addresses and frames. "etcd" is the etcd client package (issue 13: a
    # bottom adapter that ha and agent build on).
    # "proxy" is the pure PROXY protocol codec.
    frozenset(
        {
            "model",
            "aio",
            "protoc",
            "timing",
            "keys",
            "config",
            "lb",
            "net",
            "etcd",
            "flows",
            "proxy",
        }
    ),
    frozenset({"dataplane"}),
    frozenset({"ha"}),
    # The sync client installs into a dataplane (halb.dataplane.base).
    frozenset({"sync"}),
    # The health publisher writes under the term it is handed (ha.coord, ha.clock).
    frozenset({"checks"}),
    frozenset({"agent"}),
    # The lab starts agents and reads their status keys (agent.etcdio / agent.status);
    # it is a test and demo facility, never imported by the agent.
    frozenset({"lab"}),
    # Drills run traffic and faults on the lab, so they sit above it.
    frozenset({"drill"}),
    # Entry points: the CLI, and `python -m halb.build` (its steps are named in a table).
    frozenset({"cli", "build"}),
)
TESTING = "testing"  # may import anything; imported only by the units below (and tests/)
TESTING_IMPORTERS = frozenset({"lab", TESTING})

# (importer, imported) pairs that go up a layer, with why they are still there.
ALLOWED_UPWARD: Mapping[tuple[str, str], str] = {}

# Import cycles (as sets of modules) that remain, with why.
ALLOWED_CYCLES: Mapping[frozenset[str], str] = {
    # source.py types its dataplane as NftDataplane (under TYPE_CHECKING) while the
    # adapter builds the source; the flow-source capability of dataplane/base.py
    # (issue 13, another engineer's files) replaces that annotation.
    frozenset({"halb.dataplane.nft.adapter", "halb.dataplane.nft.source"}): "flow source",
    # Type-only (TYPE_CHECKING) back-references from a helper to the object that owns
    # it: the keepalive stream and the watches annotate the client that opens them, the
    # XDP flow source the adapter whose maps it reads.
    frozenset({"halb.etcd.client", "halb.etcd.lease", "halb.etcd.watch"}): "type-only",
    frozenset({"halb.dataplane.xdp.adapter", "halb.dataplane.xdp.flowsource"}): "type-only",
}


# --- reading the imports ---------------------------------------------------------------


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at ``root``."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module an import of ``name`` loads last (its longest existing prefix)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = next(iter(modules)).split(".")[0]
    wanted: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            wanted.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from pkg import mod` depends on the submodule; `from pkg import name` on
            # pkg itself (its __init__ or module).
            for a in node.names:
                sub = f"{source}.{a.name}"
                wanted.add(sub if sub in modules else source)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            wanted.add(node.args[0].value)
    found = {_resolve(w, modules) for w in wanted if w.split(".")[0] == top}
    return {m for m in found if m is not None and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int | None:
    return next((i for i, units in enumerate(LAYERS) if unit(module) in units), None)


def upward_imports(graph: Mapping[str, set[str]]) -> Iterator[tuple[str, str]]:
    for importer, imported in sorted((a, b) for a, bs in graph.items() for b in bs):
        low, high = layer_of(importer), layer_of(imported)
        if low is not None and high is not None and high > low:
            yield importer, imported


def fixture_imports(graph: Mapping[str, set[str]]) -> Iterator[tuple[str, str]]:
    for importer, imported in sorted((a, b) for a, bs in graph.items() for b in bs):
        if unit(imported) == TESTING and unit(importer) not in TESTING_IMPORTERS:
            yield importer, imported


# --- halb ------------------------------------------------------------------------------

GRAPH = import_graph(ROOT)


def test_every_unit_of_halb_has_a_layer() -> None:
    placed = set().union(*LAYERS) | {TESTING}
    missing = sorted({unit(m) for m in GRAPH} - placed)
    assert not missing, f"halb.{missing[0]} is in no layer: add it to LAYERS in {__file__}"
    assert len(set().union(*LAYERS)) == sum(map(len, LAYERS)), "a unit is in two layers"


def test_no_import_cycles_between_modules() -> None:
    found = set(cycles(GRAPH))
    new = [sorted(c) for c in found - ALLOWED_CYCLES.keys()]
    assert not new, f"import cycles: {new}"
    stale = [sorted(c) for c in ALLOWED_CYCLES.keys() - found]
    assert not stale, f"cycles no longer there: remove them from ALLOWED_CYCLES: {stale}"


def test_no_module_imports_a_higher_layer() -> None:
    found = set(upward_imports(GRAPH))
    new = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, b in sorted(found - ALLOWED_UPWARD.keys())
    ]
    assert not new, "lower layers import higher ones:\n" + "\n".join(new)
    stale = sorted(ALLOWED_UPWARD.keys() - found)
    assert not stale, f"no longer imported: remove from ALLOWED_UPWARD: {stale}"


def test_only_the_lab_imports_test_fixtures() -> None:
    bad = list(fixture_imports(GRAPH))
    assert not bad, f"production code imports halb.testing: {bad}"


# --- the checker itself, on a package made for it ---------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "halb"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "model.py": "",
            "lab/__init__.py": "",
            "lab/builder.py": "def up():\n    from halb.lab.faults import start\n",
            "lab/faults.py": "from . import builder\n",
            "lab/agents.py": "from .. import model\nfrom halb.lab import builder, faults\n",
            "dataplane/__init__.py": "",
            "dataplane/xdp.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from halb.agent.main import Agent\n"
                "import importlib\nimportlib.import_module('halb.testing.fake')\n"
            ),
            "agent/__init__.py": "",
            "agent/main.py": "import halb.dataplane.xdp as x\nimport os.path\n",
            "testing/__init__.py": "",
            "testing/fake.py": "import halb.agent.main\n",
            "lab/demo.py": "from halb.testing import fake\n",
        },
    )
    graph = import_graph(root)
    assert graph["halb.lab.builder"] == {"halb.lab.faults"}
    assert graph["halb.lab.faults"] == {"halb.lab.builder"}
    assert graph["halb.lab.agents"] == {"halb.model", "halb.lab.builder", "halb.lab.faults"}
    assert graph["halb.dataplane.xdp"] == {"halb.agent.main", "halb.testing.fake"}
    assert graph["halb.agent.main"] == {"halb.dataplane.xdp"}
    assert sorted(map(sorted, cycles(graph))) == [
        ["halb.agent.main", "halb.dataplane.xdp", "halb.testing.fake"],
        ["halb.lab.builder", "halb.lab.faults"],
    ]
    assert list(upward_imports(graph)) == [("halb.dataplane.xdp", "halb.agent.main")]
    assert list(fixture_imports(graph)) == [("halb.dataplane.xdp", "halb.testing.fake")]
