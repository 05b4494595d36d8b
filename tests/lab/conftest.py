"""The lab fixture: one lab for the session, rebuilt if a test took it down.

A lab that was up before the session (a developer's) is rebuilt with the same size and
dataplane when the session ends, so running the tests does not take it away.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from halb.lab import builder
from halb.lab.agents import agent_log_lines

# A failing lab test's agent logs are copied here (the lab dir goes with the lab).
FAILED_LOGS = Path(os.environ.get("HALB_LAB_FAILED_LOGS", "/tmp/halb-lab-failed"))


def _default_etcd(state: dict[str, Any]) -> bool:
    """The lab's etcd is the default one (one member, plaintext): tests that need
    another (test_etcd_lab's three TLS members) bring up their own."""
    return len(state.get("etcd_members", [None])) == 1 and not state.get("etcd_tls")


def _ensure_up() -> dict[str, Any]:
    if builder.is_up():
        state = builder.load_state()
        assert state is not None
        if _default_etcd(state):
            return state
    builder.down()
    return builder.up()


@pytest.fixture(scope="session")
def lab_session() -> Iterator[None]:
    before = builder.load_state() if builder.is_up() else None
    builder.down()  # leftovers from a crashed run, or a developer's lab
    yield
    builder.down()
    if before is not None:
        builder.up(
            len(before["nodes"]),
            len(before["backends"]),
            before["dataplane"],
            etcd_members_n=len(before.get("etcd_members", [])) or 1,
            etcd_tls=bool(before.get("etcd_tls")),
        )


@pytest.fixture
def lab(lab_session: None) -> dict[str, Any]:
    """The running lab's state (what `halb lab status --output json` prints)."""
    return _ensure_up()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    """A failed lab test carries the tail of every agent's log in its report (CI shows
    it) and leaves the whole logs under FAILED_LOGS/<test>."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    state = builder.load_state() if builder.is_up() else None
    if state is None:
        return
    logs = Path(state["lab_dir"]) / "logs"
    if not logs.is_dir():
        return
    dest = FAILED_LOGS / item.name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(logs, dest, dirs_exist_ok=True)
    every_line = ("",)  # unfiltered: the tail as it is
    with contextlib.suppress(OSError):  # a node whose agent never started has no log
        tail = agent_log_lines(state, keep=every_line, last=80)
        report.sections.append((f"agent logs (last 80 lines each; all in {dest})", tail))
