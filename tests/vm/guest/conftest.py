"""Runs inside the VM (HALB_VM_GUEST=1): report every test's outcome as one JSON line
to $HALB_VM_RESULTS, which the host-side tests (tests/vm/test_guest.py) read."""

from __future__ import annotations

import json
import os

import pytest

IN_GUEST = bool(os.environ.get("HALB_VM_GUEST"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not IN_GUEST:
        for item in items:
            item.add_marker(pytest.mark.skip(reason="runs inside the VM (tests/vm/test_guest.py)"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("HALB_VM_RESULTS")
    if not path:
        return
    # One line per phase that decides the outcome: a failed or skipped setup, the call,
    # a failed teardown.
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if report.when == "teardown" and report.failed:
            outcome = "error"
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        elif report.failed:
            reason = report.longreprtext
        rec = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": outcome,
            "duration": round(report.duration, 2),
            "reason": reason,
        }
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
