"""Build the dataplane adapter a node's config asks for."""

from __future__ import annotations

from ipaddress import IPv6Address

from halb.config import ClusterConfig, NodeConfig
from halb.dataplane.base import Dataplane
from halb.model import DataplaneKind

__all__ = ["DataplaneUnavailable", "make_dataplane"]


class DataplaneUnavailable(RuntimeError):
    pass


def make_dataplane(cfg: ClusterConfig, node: NodeConfig) -> Dataplane:
    kind = cfg.dataplane.kind
    if kind is DataplaneKind.XDP:
        from halb.dataplane.xdp.adapter import XdpDataplane, default_pin_dir

        v6 = [
            n.address.ip
            for n in [node]
            if isinstance(n.address.ip, IPv6Address)  # the node's own v6 outer source
        ]
        return XdpDataplane(
            node.interface,
            node.address.ip,
            cfg.dataplane.xdp_mode,
            pin_dir=default_pin_dir(cfg.cluster, node.name),
            node_address6=v6[0] if v6 else None,
            flow_timeouts=cfg.dataplane.flow_timeouts.model(),
        )
    if kind is DataplaneKind.NFT:
        try:
            from halb.dataplane.nft.adapter import NftDataplane
        except ImportError as exc:
            raise DataplaneUnavailable(f"the nft dataplane is not available: {exc}") from exc
        return NftDataplane.from_config(cfg, node)
    if kind is DataplaneKind.IPVS:
        from halb.dataplane.ipvs.adapter import IpvsDataplane

        return IpvsDataplane()
    raise DataplaneUnavailable(f"the {kind.value} dataplane is not available on this build")
