"""halb: high-availability Layer-4 load-balancer pair manager."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
