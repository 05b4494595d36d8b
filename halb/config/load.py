"""Loading: YAML text or a parsed document -> a validated ClusterConfig, or a
ConfigError naming every problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from halb.config.checks import semantic_issues
from halb.config.errors import ConfigError, ConfigIssue, from_validation_error
from halb.config.schema import ClusterConfig

__all__ = [
    "dump_config",
    "load_config",
    "parse_config",
    "parse_config_text",
]


# --- loading --------------------------------------------------------------------------


def parse_config(data: Any, source: str | None = None) -> ClusterConfig:
    """Validate a parsed document; raise ConfigError listing every issue."""
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", "the config must be a YAML mapping at the top level")], source
        )
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(from_validation_error(exc), source) from None
    issues = list(semantic_issues(cfg))
    if issues:
        raise ConfigError(issues, source)
    return cfg


def parse_config_text(text: str, source: str | None = None) -> ClusterConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("", f"{where}YAML syntax error: {problem}")], source
        ) from None
    return parse_config(data, source)


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror}")], str(p)) from None
    return parse_config_text(text, str(p))


def dump_config(cfg: ClusterConfig) -> str:
    """Serialise to YAML that parse_config_text accepts (used by the lab and etcd store)."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False)
