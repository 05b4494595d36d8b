"""Idle flows in the XDP flow map: which raw entries are expired (pure numpy; no maps).

The program stamps each flow with its clock (jiffies, halb.dataplane.xdp.clock) on every
tick it forwards a packet of it (``flow_value.last_seen``) and treats a flow idle past
its timeout as a miss (bpf/expiry.h). The active's flow source deletes such entries
with this mask, so its scan reports them gone and the standbys delete them too.

A stamp of 0 is a flow user space wrote (synced from the previous active) that no
packet has touched here: the program never expires it, and the sweep counts its idle
time from ``since`` (when this node started sweeping, i.e. became active), so a dead
synced flow leaves one timeout after a takeover and a live one is stamped by its next
packet first.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from halb.dataplane.xdp.clock import Clock
from halb.dataplane.xdp.layout import FLOW_F_CLOSING, FlowKey, FlowValue, LbConfig
from halb.model import FlowTimeouts

__all__ = ["expired_mask", "set_timeouts"]

_TCP = 6
_KEY_SIZE = ctypes.sizeof(FlowKey)
_VALUE_SIZE = ctypes.sizeof(FlowValue)

Mask = np.ndarray[Any, np.dtype[np.bool_]]


def set_timeouts(cfg: LbConfig, t: FlowTimeouts | None) -> None:
    """Write the timeouts into a config entry, in jiffies of its clock (its tick_ns
    must be set); None: flows never expire."""
    clock = Clock.of(cfg)
    if t is None:
        cfg.timeout_tcp = cfg.timeout_closing = cfg.timeout_udp = 0
        return
    cfg.timeout_tcp = clock.ticks(t.tcp_established)
    cfg.timeout_closing = clock.ticks(t.tcp_closing)
    cfg.timeout_udp = clock.ticks(t.udp)


def expired_mask(keys: bytes, values: bytes, cfg: LbConfig, now: int, since: int = 0) -> Mask:
    """For each raw flow-map entry: whether it is idle past its timeout at ``now``
    (jiffies; the same test as the program's, with unseen synced flows counted from
    ``since``). Timeouts come from the config entry the program reads."""
    k = np.frombuffer(keys, np.uint8).reshape(-1, _KEY_SIZE)
    v = np.frombuffer(values, np.uint8).reshape(-1, _VALUE_SIZE)
    if len(k) != len(v):
        raise ValueError(f"{len(k)} flow keys but {len(v)} values")
    at = FlowValue.last_seen.offset
    last = np.ascontiguousarray(v[:, at : at + 8]).view(np.uint64).ravel().astype(np.int64)
    at = FlowValue.flags.offset
    flags = np.ascontiguousarray(v[:, at : at + 4]).view(np.uint32).ravel()
    tcp = k[:, FlowKey.proto.offset] == _TCP
    closing = (flags & FLOW_F_CLOSING) != 0
    timeout = np.where(
        tcp,
        np.where(closing, cfg.timeout_closing, cfg.timeout_tcp),
        cfg.timeout_udp,
    ).astype(np.int64)
    last = np.where(last == 0, since, last)
    expired: Mask = (timeout > 0) & (np.int64(now) - last > timeout)
    return expired
