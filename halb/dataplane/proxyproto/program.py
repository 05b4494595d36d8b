"""Load the PROXY protocol programs, keep their flow entries and counters, attach them.

``ProxyProgram`` is the adapter the nft full-NAT dataplane (and the sync client on a
standby) will drive: ``put_flow`` when a flow of a PROXY service is created (or synced),
``delete_flow`` when it ends, ``flows()`` for the sync snapshot, ``stats()`` for metrics.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from halb.dataplane.proxyproto.build import build_proxy_bpf
from halb.dataplane.proxyproto.layout import (
    MAP_TYPES,
    PP_F_ISN,
    STATS,
    PpConfig,
    PpFlow,
    PpKey,
    PpState,
    make_flow,
    make_key,
)
from halb.dataplane.proxyproto.tc import Direction, TcFilter, tc_attach
from halb.dataplane.xdp.layout import addr_from_words
from halb.dataplane.xdp.loader import BpfObject, TestRunResult
from halb.model import IPAddress
from halb.proxy.codec import ProxyHeader, build_v1, build_v2

__all__ = ["EGRESS", "INGRESS", "ProxyFlow", "ProxyProgram"]

EGRESS = "halb_pp_egress"  # toward the backends: inserts, moves seq
INGRESS = "halb_pp_ingress"  # from the backends: moves ack and SACK edges


def _port(net16: int) -> int:
    return int.from_bytes(net16.to_bytes(2, "little"), "big")


@dataclass(frozen=True, slots=True)
class ProxyFlow:
    """One flow's entry: the state a standby needs to continue it (the header's length
    is the offset every later seq / ack moves by)."""

    local: IPAddress
    lport: int
    backend: IPAddress
    bport: int
    header: bytes
    isn_next: int | None  # client ISN + 1; None: not known yet
    state: PpState

    @classmethod
    def new(
        cls,
        version: int,
        client: tuple[IPAddress, int],
        vip: tuple[IPAddress, int],
        local: tuple[IPAddress, int],
        backend: tuple[IPAddress, int],
    ) -> ProxyFlow:
        """The entry for a new full-NAT flow: the header carries the original connection
        (client -> VIP, conntrack's original tuple), the key is the post-NAT one (the
        SNAT source -> backend, its reply tuple reversed); the programs learn the ISN."""
        if version not in (1, 2):
            raise ValueError(f"PROXY protocol version {version} (1 or 2)")
        h = ProxyHeader(version=version, source=client, destination=vip)
        header = build_v1(h) if version == 1 else build_v2(h)
        return cls(local[0], local[1], backend[0], backend[1], header, None, PpState.PENDING)

    @property
    def offset(self) -> int:
        return len(self.header)

    def key(self) -> PpKey:
        return make_key(self.local, self.lport, self.backend, self.bport)

    @classmethod
    def from_entry(cls, key: PpKey, value: PpFlow) -> ProxyFlow:
        return cls(
            local=addr_from_words(key.local, key.family),
            lport=_port(key.lport),
            backend=addr_from_words(key.backend, key.family),
            bport=_port(key.bport),
            header=bytes(value.hdr)[: value.hdr_len],
            isn_next=int(value.isn_next) if value.flags & PP_F_ISN else None,
            state=PpState(value.state),
        )


class ProxyProgram:
    """The loaded object. Close it (or use it as a context manager) to detach and
    release it."""

    def __init__(self, path: Path | None = None) -> None:
        self.obj = BpfObject(path or build_proxy_bpf(), MAP_TYPES)
        self._filters: list[TcFilter] = []

    def __enter__(self) -> ProxyProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- flows ---------------------------------------------------------------------------

    def put_flow(self, flow: ProxyFlow) -> None:
        """Create or replace a flow's entry (a synced flow keeps its state)."""
        self.obj.maps["pp_flows"].update(
            flow.key(), make_flow(flow.header, flow.isn_next, flow.state)
        )

    def get_flow(
        self, local: IPAddress, lport: int, backend: IPAddress, bport: int
    ) -> ProxyFlow | None:
        key = make_key(local, lport, backend, bport)
        value = self.obj.maps["pp_flows"].lookup(key)
        return None if value is None else ProxyFlow.from_entry(key, value)

    def delete_flow(self, local: IPAddress, lport: int, backend: IPAddress, bport: int) -> bool:
        return bool(self.obj.maps["pp_flows"].delete(make_key(local, lport, backend, bport)))

    def flows(self) -> Iterator[ProxyFlow]:
        for key, value in self.obj.maps["pp_flows"].items():
            yield ProxyFlow.from_entry(key, value)

    # -- counters and config ---------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters summed over the CPUs."""
        out: dict[str, int] = {}
        for i, name in enumerate(STATS):
            per_cpu = self.obj.maps["pp_stats"].lookup(i) or []
            out[name] = sum(int(v.value) for v in per_cpu)
        return out

    def reset_stats(self) -> None:
        for i in range(len(STATS)):
            self.obj.maps["pp_stats"].update(i, ctypes.c_uint64(0))

    def set_mtu(self, mtu: int) -> None:
        """The path MTU toward the backends (0: the egress device's)."""
        self.obj.maps["pp_config"].update(0, PpConfig(mtu=mtu))

    # -- attachment ------------------------------------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> None:
        """Egress and ingress of the interface toward the backends."""
        hooks: tuple[tuple[str, Direction], ...] = ((EGRESS, "egress"), (INGRESS, "ingress"))
        for prog, direction in hooks:
            self._filters.append(tc_attach(self.obj.prog_fd(prog), ifname, direction, netns))

    def detach(self) -> None:
        while self._filters:
            self._filters.pop().detach()

    def test_run(
        self, prog: str, frame: bytes, repeat: int = 1, ctx: bytes | None = None
    ) -> TestRunResult:
        return self.obj.test_run(prog, frame, repeat, ctx)

    def close(self) -> None:
        self.detach()
        self.obj.close()
