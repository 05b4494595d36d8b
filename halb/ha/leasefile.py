"""The lease id a group's coordinator keeps in the node's state directory, so an agent
restarted within the lease TTL can resume its term (halb.ha.coord). Writes are atomic
(a rename); an unreadable file counts as none."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

__all__ = ["LeaseFile"]

log = logging.getLogger("halb.ha.coord")


class LeaseFile:
    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: nowhere to keep it (tests, CLI)

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def load(self) -> int | None:
        if self.path is None:
            return None
        try:
            return int(self.path.read_text().strip(), 16)
        except (OSError, ValueError):
            return None

    def store(self, lease: int) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{lease:x}\n")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot store lease id in %s: %s", self.path, exc)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
