"""bench/bpf/variants.bpf.c built without switches is the production program composed
again for the benchmark: it must give every fixture the same verdict and frame, or the
benchmark's breakdown measures something else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_xdp_fixtures import CASES, PROG, load, too_big_v4, v4_tcp, v6_tcp

from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.loader import BpfObject
from halb.testing.packets import TCP_ACK

pytestmark = pytest.mark.kernel

OVERLAY = Path(__file__).resolve().parents[2] / "bench" / "bpf" / "variants.bpf.c"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BpfObject, BpfObject]]:
    prod = load(build_bpf())
    try:
        overlay = load(build_bpf(tmp_path_factory.mktemp("overlay"), source=OVERLAY))
        try:
            yield prod, overlay
        finally:
            overlay.close()
    finally:
        prod.close()


def test_the_overlay_behaves_as_the_production_program(
    pair: tuple[BpfObject, BpfObject],
) -> None:
    prod, overlay = pair
    frames = [c.frame for c in CASES]
    # Flow hits and an ICMP relay too: the second packet of each flow is a hit.
    frames += [v4_tcp(sport=48000), v4_tcp(sport=48000, flags=TCP_ACK), v6_tcp(sport=48001)]
    frames += [v6_tcp(sport=48001), too_big_v4(80, 48000)]  # the relay quotes a flow above
    for frame in frames:
        a, b = prod.test_run(PROG, frame), overlay.test_run(PROG, frame)
        assert (b.retval, b.data.hex()) == (a.retval, a.data.hex())
