"""Test tiers by directory: unit (no root, no network), loopback (no root: a real etcd
and gRPC on 127.0.0.1, loopback servers), kernel and lab (root, namespaces), vm (QEMU),
deploy (systemd-nspawn machines and ansible). Root-only tiers are skipped with a reason
when not root; CI runs as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "loopback", "kernel", "lab", "vm", "deploy")
ROOT_TIERS = {"kernel", "lab", "vm", "deploy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        tier = next((t for t in TIERS if t in parts), None)
        if tier is None:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier in ROOT_TIERS and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"{tier} tests need root"))
