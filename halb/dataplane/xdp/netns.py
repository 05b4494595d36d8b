"""Run a function inside a named network namespace: halb.net.netns.in_netns, kept
under this name for the XDP and IPVS adapters."""

from __future__ import annotations

from halb.net.netns import in_netns

__all__ = ["in_netns"]
