"""The lab fixture: one lab for the session, rebuilt if a test took it down.

A lab that was up before the session (a developer's) is rebuilt with the same size and
dataplane when the session ends, so running the tests does not take it away.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from halb.lab import builder


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
