"""Pure-ish: what a guest pytest run reported, read back on the host.

The guest's tests/vm/guest/conftest.py appends one JSON line per deciding test phase
to ``reports.jsonl`` in the results dir; guest tests append figures to
``measurements.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GuestResults", "parse_jsonl"]


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class GuestResults:
    """Outcomes by node id ("tests/vm/guest/test_x.py::test_y[p]")."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    diagnostics: str = ""
    timings: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def read(cls, results: Path) -> GuestResults:
        out = cls()
        reports = results / "reports.jsonl"
        if reports.exists():
            for rec in parse_jsonl(reports.read_text()):
                # A later phase (teardown error) overrides an earlier pass.
                if rec["nodeid"] not in out.reports or rec["outcome"] != "passed":
                    out.reports[rec["nodeid"]] = rec
        figures = results / "measurements.jsonl"
        if figures.exists():
            out.measurements = parse_jsonl(figures.read_text())
        return out

    def matching(self, test_id: str) -> dict[str, dict[str, Any]]:
        """The reports of one test function, every parametrization included."""
        return {
            k: v for k, v in self.reports.items() if k == test_id or k.startswith(test_id + "[")
        }
