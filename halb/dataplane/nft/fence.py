"""The nft dataplane's dead-man switch (DESIGN.md "Direction").

Two tables of their own, so reloading ``table inet halb`` never resets the switch:

- ``table inet halb_fence``: at prerouting, before conntrack, a packet to a VIP address
  that is not in the ``live`` set is dropped (and counted);
- ``table arp halb_fence``: an ARP request for such an address is dropped, so a frozen
  agent's kernel stops answering for the VIP it still holds.

Disarmed, every VIP is in ``live`` for good; armed, each VIP element carries a timeout
that ends at the deadline (nftables expires it in the kernel, with nobody running);
past it the sets are empty. Re-adding an element does not refresh its timeout, so each
refresh flushes and refills the sets in one transaction.

IPv6 neighbour solicitations go to a solicited-node multicast address, not to the VIP:
the fence matches their target address instead, 16 bytes at offset 8 of the ICMPv6
header (``@th,64,128``), against the sets ``nd_vips6`` / ``nd_live6`` that hold the
IPv6 VIPs as 128-bit integers (a raw payload does not compare with ``ipv6_addr``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

from halb.dataplane.nft.libnft import Nft
from halb.model import IPAddress

__all__ = ["FENCE_TABLE", "NftFence", "delete_fence_script", "fence_script", "refresh_script"]

log = logging.getLogger(__name__)

FENCE_TABLE = "halb_fence"
FENCED_COUNTER = "fenced"


def _elements(addrs: Iterable[IPAddress], suffix: str = "") -> str:
    return ", ".join(f"{a}{suffix}" for a in addrs)


def _set(name: str, kind: str, addrs: Sequence[IPAddress], *, timeout: bool = False) -> str:
    flags = " flags timeout;" if timeout else ""
    elems = f" elements = {{ {_elements(addrs)} }};" if addrs and not timeout else ""
    return f"  set {name} {{ type {kind};{flags}{elems} }}\n"


def _raw(addrs: Iterable[IPAddress], suffix: str = "") -> str:
    """IPv6 addresses as the big-endian integers a raw payload match compares."""
    return ", ".join(f"0x{int(a):032x}{suffix}" for a in addrs)


def _nd_set(name: str, addrs: Sequence[IPAddress], *, timeout: bool = False) -> str:
    flags = " flags timeout;" if timeout else ""
    elems = f" elements = {{ {_raw(addrs)} }};" if addrs and not timeout else ""
    return f"  set {name} {{ typeof @th,64,128;{flags}{elems} }}\n"


def _by_family(vips: Iterable[IPAddress]) -> tuple[list[IPAddress], list[IPAddress]]:
    addrs = set(vips)  # read once: callers may pass a generator
    v4: list[IPAddress] = sorted((a for a in addrs if a.version == 4), key=int)
    v6: list[IPAddress] = sorted((a for a in addrs if a.version == 6), key=int)
    return v4, v6


def delete_fence_script() -> str:
    """Remove both tables if they exist (the first line of each creates it if absent)."""
    return "".join(
        f"table {fam} {FENCE_TABLE}\ndelete table {fam} {FENCE_TABLE}\n" for fam in ("inet", "arp")
    )


def fence_script(vips: Iterable[IPAddress]) -> str:
    """Re-create both tables for ``vips``, with empty ``live`` sets (as if expired):
    load it together with a ``refresh_script`` in one transaction."""
    v4, v6 = _by_family(vips)
    return (
        delete_fence_script()
        + f"table inet {FENCE_TABLE} {{\n"
        + _set("vips4", "ipv4_addr", v4)
        + _set("live4", "ipv4_addr", [], timeout=True)
        + _set("vips6", "ipv6_addr", v6)
        + _set("live6", "ipv6_addr", [], timeout=True)
        + _nd_set("nd_vips6", v6)
        + _nd_set("nd_live6", [], timeout=True)
        + f"  counter {FENCED_COUNTER} {{ }}\n"
        + "  chain pre {\n"
        + "    type filter hook prerouting priority -300; policy accept;\n"
        + f"    ip daddr @vips4 ip daddr != @live4 counter name {FENCED_COUNTER} drop\n"
        + f"    ip6 daddr @vips6 ip6 daddr != @live6 counter name {FENCED_COUNTER} drop\n"
        + "    icmpv6 type nd-neighbor-solicit @th,64,128 @nd_vips6 @th,64,128 != @nd_live6 "
        + f"counter name {FENCED_COUNTER} drop\n"
        + "  }\n}\n"
        + f"table arp {FENCE_TABLE} {{\n"
        + _set("vips", "ipv4_addr", v4)
        + _set("live", "ipv4_addr", [], timeout=True)
        + f"  counter {FENCED_COUNTER} {{ }}\n"
        + "  chain in {\n"
        + "    type filter hook input priority 0; policy accept;\n"
        + "    arp operation request arp daddr ip @vips arp daddr ip != @live "
        + f"counter name {FENCED_COUNTER} drop\n"
        + "  }\n}\n"
    )


def refresh_script(vips: Iterable[IPAddress], remaining_ms: int | None) -> str:
    """Refill the ``live`` sets: for good (None: disarmed), for ``remaining_ms``, or
    not at all (<= 0: past the deadline)."""
    out = [
        f"flush set inet {FENCE_TABLE} live4\n",
        f"flush set inet {FENCE_TABLE} live6\n",
        f"flush set inet {FENCE_TABLE} nd_live6\n",
        f"flush set arp {FENCE_TABLE} live\n",
    ]
    if remaining_ms is not None and remaining_ms <= 0:
        return "".join(out)
    suffix = "" if remaining_ms is None else f" timeout {remaining_ms}ms"
    v4, v6 = _by_family(vips)
    if v4:
        out.append(f"add element inet {FENCE_TABLE} live4 {{ {_elements(v4, suffix)} }}\n")
        out.append(f"add element arp {FENCE_TABLE} live {{ {_elements(v4, suffix)} }}\n")
    if v6:
        out.append(f"add element inet {FENCE_TABLE} live6 {{ {_elements(v6, suffix)} }}\n")
        out.append(f"add element inet {FENCE_TABLE} nd_live6 {{ {_raw(v6, suffix)} }}\n")
    return "".join(out)


class NftFence:
    """The switch for one node: ``set_vips`` on every apply, ``set_deadline`` on every
    heartbeat (CLOCK_MONOTONIC ns, or None to disarm)."""

    def __init__(self, netns: str | None = None) -> None:
        self._nft = Nft(netns)
        self._lock = threading.Lock()
        self._vips: tuple[IPAddress, ...] | None = None
        self._deadline: int | None = None

    def _remaining_ms(self) -> int | None:
        if self._deadline is None:
            return None
        # Round down: the kernel's expiry must not come after the agent's deadline.
        return (self._deadline - time.monotonic_ns()) // 1_000_000

    def set_vips(self, vips: Iterable[IPAddress]) -> None:
        new = tuple(sorted(set(vips), key=lambda a: (a.version, int(a))))
        with self._lock:
            if new == self._vips:
                return
            self._nft.run(fence_script(new) + refresh_script(new, self._remaining_ms()))
            self._vips = new
        log.info("nft dead-man switch covers %d VIP addresses", len(new))

    def set_deadline(self, monotonic_ns: int | None) -> None:
        with self._lock:
            self._deadline = monotonic_ns
            if self._vips:
                self._nft.run(refresh_script(self._vips, self._remaining_ms()))

    def close(self) -> None:
        with self._lock:
            try:
                self._nft.run(delete_fence_script())
            finally:
                self._nft.close()
                self._vips = None
