"""The nft dataplane: nftables NAT rules (nat, fullnat; Maglev or round robin) and
nf_conntrack flow state synced through ctnetlink. See adapter.NftDataplane."""

from __future__ import annotations

__all__: list[str] = []
