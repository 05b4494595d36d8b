"""Idle flows in the XDP flow map: which raw entries are expired (pure numpy; no maps).

The program stamps each flow with CLOCK_MONOTONIC_COARSE on every tick it forwards a
packet of it (``flow_value.last_seen_ns``) and treats a flow idle past its timeout as a
miss (bpf/expiry.h). The active's flow source deletes such entries with this mask, so
its scan reports them gone and the standbys delete them too.

A stamp of 0 is a flow user space wrote (synced from the previous active) that no
packet has touched here: the program never expires it, and the sweep counts its idle
time from ``since`` (when this node started sweeping, i.e. became active), so a dead
synced flow leaves one timeout after a takeover and a live one is stamped by its next
packet first.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

from halb.dataplane.xdp.layout import FLOW_F_CLOSING, FlowKey, FlowValue, LbConfig
from halb.model import FlowTimeouts

__all__ = ["CLOCK_MONOTONIC_COARSE", "coarse_now_ns", "expired_mask", "set_timeouts", "timeouts_ns"]

CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; Python's time module does not name it
_TCP = 6
_KEY_SIZE = ctypes.sizeof(FlowKey)
_VALUE_SIZE = ctypes.sizeof(FlowValue)

Mask = np.ndarray[Any, np.dtype[np.bool_]]


def coarse_now_ns() -> int:
    """The program's clock (bpf_ktime_get_coarse_ns) read from user space."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def timeouts_ns(t: FlowTimeouts) -> tuple[int, int, int]:
    """(tcp established, tcp closing, udp) in ns, as lb_config holds them."""
    return (round(t.tcp_established * 1e9), round(t.tcp_closing * 1e9), round(t.udp * 1e9))


def set_timeouts(cfg: LbConfig, t: FlowTimeouts | None) -> None:
    """Write the timeouts into a config entry (None: flows never expire)."""
    tcp, closing, udp = timeouts_ns(t) if t is not None else (0, 0, 0)
    cfg.timeout_tcp_ns, cfg.timeout_closing_ns, cfg.timeout_udp_ns = tcp, closing, udp


def expired_mask(keys: bytes, values: bytes, cfg: LbConfig, now_ns: int, since_ns: int = 0) -> Mask:
    """For each raw flow-map entry: whether it is idle past its timeout at ``now_ns``
    (the same test as the program's, with unseen synced flows counted from
    ``since_ns``). Timeouts come from the config entry the program reads."""
    k = np.frombuffer(keys, np.uint8).reshape(-1, _KEY_SIZE)
    v = np.frombuffer(values, np.uint8).reshape(-1, _VALUE_SIZE)
    if len(k) != len(v):
        raise ValueError(f"{len(k)} flow keys but {len(v)} values")
    at = FlowValue.last_seen_ns.offset
    last = np.ascontiguousarray(v[:, at : at + 8]).view(np.uint64).ravel().astype(np.int64)
    at = FlowValue.flags.offset
    flags = np.ascontiguousarray(v[:, at : at + 4]).view(np.uint32).ravel()
    tcp = k[:, FlowKey.proto.offset] == _TCP
    closing = (flags & FLOW_F_CLOSING) != 0
    timeout = np.where(
        tcp,
        np.where(closing, cfg.timeout_closing_ns, cfg.timeout_tcp_ns),
        cfg.timeout_udp_ns,
    ).astype(np.int64)
    last = np.where(last == 0, since_ns, last)
    expired: Mask = (timeout > 0) & (np.int64(now_ns) - last > timeout)
    return expired
