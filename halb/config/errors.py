"""Config errors: every issue with its field path (``vip_groups[0].vips[1].address``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import (
    ValidationError,
)

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "from_validation_error",
]


# --- errors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every issue found, each with its path."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__("\n".join(str(i) for i in self.issues))


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "enum":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err['input']!r} is not one of {expected}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err['input']!r} is not one of {expected}"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def from_validation_error(exc: ValidationError) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        issues.append(ConfigIssue(_path(err["loc"]), _message(err)))
    return issues
