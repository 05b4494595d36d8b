"""Host side of the vm tier: one test per guest test (tests/vm/guest/test_*.py), each
asserting the outcome the guest reported from the session's single VM boot."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from halb.testing.vm.results import GuestResults

GUEST = Path(__file__).parent / "guest"


def _guest_tests() -> list[str]:
    ids = []
    for path in sorted(GUEST.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                ids.append(f"tests/vm/guest/{path.name}::{node.name}")
    return ids


pytestmark = pytest.mark.timeout(1200)


def test_vm_boots_and_guest_pytest_passes(guest_results: GuestResults) -> None:
    assert guest_results.exit_code == 0, guest_results.diagnostics


@pytest.mark.parametrize("test_id", _guest_tests(), ids=lambda t: t.split("::")[-1])
def test_in_vm(guest_results: GuestResults, test_id: str) -> None:
    cases = guest_results.matching(test_id)
    assert cases, f"{test_id} did not run in the guest{guest_results.diagnostics}"
    failed = {k: v for k, v in cases.items() if v["outcome"] in ("failed", "error")}
    assert not failed, "\n\n".join(f"{k}:\n{v['reason']}" for k, v in failed.items())
    if all(v["outcome"] == "skipped" for v in cases.values()):
        pytest.skip(next(iter(cases.values()))["reason"])
