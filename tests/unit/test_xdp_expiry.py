"""halb.dataplane.xdp.expiry and .clock: the user-space twin of the program's expiry
test, and the conversions to the program's clock (jiffies)."""

from __future__ import annotations

import pytest

from halb.config import FlowTimeoutsConfig
from halb.dataplane.xdp.clock import Clock
from halb.dataplane.xdp.expiry import expired_mask, set_timeouts
from halb.dataplane.xdp.layout import FLOW_F_CLOSING, FlowKey, FlowValue, LbConfig
from halb.model import FlowTimeouts

pytestmark = pytest.mark.unit

S = 10**9


def config() -> LbConfig:
    """A clock of one jiffy per second: jiffies read as seconds below."""
    cfg = LbConfig(tick_ns=S)
    set_timeouts(cfg, FlowTimeouts(tcp_established=900, tcp_closing=10, udp=30))
    return cfg


def entry(proto: int, last_seen: int, flags: int = 0) -> tuple[bytes, bytes]:
    key = FlowKey(proto=proto, family=4)
    return bytes(key), bytes(FlowValue(backend_id=1, flags=flags, last_seen=last_seen))


def mask(entries: list[tuple[bytes, bytes]], now: int, since: int = 0) -> list[bool]:
    keys = b"".join(k for k, _ in entries)
    values = b"".join(v for _, v in entries)
    return [bool(x) for x in expired_mask(keys, values, config(), now, since)]


def test_each_protocol_and_phase_has_its_timeout() -> None:
    entries = [entry(6, 1000), entry(6, 1000, FLOW_F_CLOSING), entry(17, 1000)]
    assert mask(entries, 1000 + 9) == [False, False, False]
    assert mask(entries, 1000 + 11) == [False, True, False]
    assert mask(entries, 1000 + 31) == [False, True, True]
    assert mask(entries, 1000 + 901) == [True, True, True]


def test_an_unstamped_flow_counts_from_since_and_no_timeout_means_never() -> None:
    assert mask([entry(6, 0)], now=5000, since=4000) == [True]
    assert mask([entry(6, 0)], now=5000, since=4500) == [False]
    cfg = config()
    assert (cfg.timeout_tcp, cfg.timeout_closing, cfg.timeout_udp) == (900, 10, 30)
    set_timeouts(cfg, None)
    k, v = entry(6, 1)
    assert not expired_mask(k, v, cfg, 10**6).any()


def test_clock_conversions_round_toward_safety() -> None:
    clock = Clock(jiffies=1000, ns=50 * S, tick=4_000_000)  # HZ=250
    assert clock.at(50 * S + 4_000_000 * 10 + 1) == 1010
    # A deadline is never later than the coarse instant: rounded down, one tick off.
    assert clock.deadline(50 * S + 4_000_000 * 10 + 3_999_999) == 1009
    assert clock.deadline(0) == 1  # armed stays armed
    assert clock.ticks(10) == 2500 and clock.ticks(0.001) == 1  # durations round up


def test_config_defaults_are_the_model_defaults() -> None:
    assert FlowTimeoutsConfig().model() == FlowTimeouts() == FlowTimeouts(900.0, 10.0, 30.0)
