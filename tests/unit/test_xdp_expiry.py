"""halb.dataplane.xdp.expiry: the user-space twin of the program's expiry test."""

from __future__ import annotations

import pytest

from halb.config import FlowTimeoutsConfig
from halb.dataplane.xdp.expiry import expired_mask, set_timeouts
from halb.dataplane.xdp.layout import FLOW_F_CLOSING, FlowKey, FlowValue, LbConfig
from halb.model import FlowTimeouts

pytestmark = pytest.mark.unit

S = 10**9


def entry(proto: int, last_seen_s: float, flags: int = 0) -> tuple[bytes, bytes]:
    key = FlowKey(proto=proto, family=4)
    return bytes(key), bytes(
        FlowValue(backend_id=1, flags=flags, last_seen_ns=int(last_seen_s * S))
    )


def mask(entries: list[tuple[bytes, bytes]], now_s: float, since_s: float = 0) -> list[bool]:
    cfg = LbConfig()
    set_timeouts(cfg, FlowTimeouts(tcp_established=900, tcp_closing=10, udp=30))
    keys = b"".join(k for k, _ in entries)
    values = b"".join(v for _, v in entries)
    return [bool(x) for x in expired_mask(keys, values, cfg, int(now_s * S), int(since_s * S))]


def test_each_protocol_and_phase_has_its_timeout() -> None:
    entries = [
        entry(6, 1000),
        entry(6, 1000, FLOW_F_CLOSING),
        entry(17, 1000),
    ]
    assert mask(entries, 1000 + 9) == [False, False, False]
    assert mask(entries, 1000 + 11) == [False, True, False]
    assert mask(entries, 1000 + 31) == [False, True, True]
    assert mask(entries, 1000 + 901) == [True, True, True]


def test_an_unstamped_flow_counts_from_since_and_no_timeout_means_never() -> None:
    assert mask([entry(6, 0)], now_s=5000, since_s=4000) == [True]
    assert mask([entry(6, 0)], now_s=5000, since_s=4500) == [False]
    cfg = LbConfig()
    set_timeouts(cfg, None)
    k, v = entry(6, 1)
    assert not expired_mask(k, v, cfg, 10**6 * S).any()


def test_config_defaults_are_the_model_defaults() -> None:
    assert FlowTimeoutsConfig().model() == FlowTimeouts() == FlowTimeouts(900.0, 10.0, 30.0)
