"""The `nft` command: load a script in one transaction, read counters, test for the table.

`nft -f` sends the whole script as one netlink batch, which the kernel commits or
rejects as a whole; that is what makes a ruleset swap atomic.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from halb.dataplane.base import Counter
from halb.dataplane.nft.netns import nft_argv
from halb.dataplane.nft.ruleset import FAMILY, TABLE

log = logging.getLogger(__name__)

__all__ = ["NftError", "list_counters", "load", "table_exists"]


class NftError(RuntimeError):
    """nft refused a command; ``stderr`` carries its explanation (line and column)."""

    def __init__(self, what: str, stderr: str) -> None:
        self.stderr = stderr.strip()
        super().__init__(f"{what}: {self.stderr}")


def _run(netns: str | None, args: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(
        [*nft_argv(netns), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(args)} failed ({proc.returncode})", proc.stderr)
    return proc.stdout


def load(netns: str | None, script: str) -> None:
    """Apply ``script`` atomically (all or nothing)."""
    _run(netns, ["-f", "-"], stdin=script)


def table_exists(netns: str | None) -> bool:
    out = _run(netns, ["list", "tables", FAMILY])
    return any(line.split() == ["table", FAMILY, TABLE] for line in out.splitlines())


def list_counters(netns: str | None) -> dict[str, Counter]:
    """Named counters of halb's table; empty when the table does not exist."""
    if not table_exists(netns):
        return {}
    data: dict[str, Any] = json.loads(
        _run(netns, ["-j", "list", "counters", "table", FAMILY, TABLE])
    )
    out: dict[str, Counter] = {}
    for item in data.get("nftables", []):
        c = item.get("counter")
        if c is not None and c.get("table") == TABLE:
            out[str(c["name"])] = Counter(packets=int(c["packets"]), bytes=int(c["bytes"]))
    return out
