"""The lab's errors, apart so that every lab module can raise them without importing
another's I/O (builder and faults used to import each other for this)."""

from __future__ import annotations

__all__ = ["FaultError", "LabError"]


class LabError(RuntimeError):
    """Building, starting or tearing down the lab failed (a timeout names what)."""


class FaultError(RuntimeError):
    """A fault or control request the lab cannot carry out (no such node, already running)."""
