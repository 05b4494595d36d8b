"""The IPVS dataplane: halb.dataplane.ipvs.adapter.IpvsDataplane."""

from __future__ import annotations

from halb.dataplane.ipvs.adapter import IpvsDataplane, IpvsDataplaneError

__all__ = ["IpvsDataplane", "IpvsDataplaneError"]
