"""The program's clock (jiffies, inlined by the verifier: no helper call on the hit path)
seen from user space, which only has CLOCK_MONOTONIC_COARSE.

Both advance together in the kernel's tick: jiffies = J + (coarse - C) / tick for a pair
(J, C) read together, which the program's ``halb_clock`` entry reads under
BPF_PROG_TEST_RUN. The conversion of a deadline rounds down and takes one more tick
off for the pairing (the two reads are not atomic): the fence starts at most a tick
earlier than the coarse clock would have started it, never later.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from halb.dataplane.xdp.layout import LbConfig
from halb.dataplane.xdp.loader import BpfObject

__all__ = ["CLOCK_MONOTONIC_COARSE", "Clock", "calibrate", "coarse_now_ns", "tick_ns"]

CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; Python's time module does not name it
CLOCK_PROGRAM = "halb_clock"


def coarse_now_ns() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def tick_ns() -> int:
    """One jiffy: the resolution of CLOCK_MONOTONIC_COARSE (e.g. 4 ms at HZ=250)."""
    return max(1, round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9))


@dataclass(frozen=True, slots=True)
class Clock:
    jiffies: int  # read together with
    ns: int  # this CLOCK_MONOTONIC_COARSE value
    tick: int  # ns per jiffy

    @classmethod
    def of(cls, cfg: LbConfig) -> Clock:
        """The pair the adapter stored in the config entry."""
        return cls(int(cfg.clock_jiffies), int(cfg.clock_ns), int(cfg.tick_ns) or tick_ns())

    def store(self, cfg: LbConfig) -> None:
        cfg.clock_jiffies, cfg.clock_ns, cfg.tick_ns = self.jiffies, self.ns, self.tick

    def at(self, coarse_ns: int) -> int:
        """The jiffies value at a CLOCK_MONOTONIC_COARSE instant (rounded down)."""
        return self.jiffies + (coarse_ns - self.ns) // self.tick

    def now(self) -> int:
        return self.at(coarse_now_ns())

    def deadline(self, coarse_ns: int) -> int:
        """A deadline on the program's clock, never later than ``coarse_ns`` (>= 1)."""
        return max(1, self.at(coarse_ns) - 1)

    def ticks(self, seconds: float) -> int:
        """A duration in jiffies, rounded up."""
        return -(-round(seconds * 1e9) // self.tick)


def calibrate(obj: BpfObject, tries: int = 10) -> Clock:
    """Read the program's clock beside CLOCK_MONOTONIC_COARSE (BPF_PROG_TEST_RUN of
    ``halb_clock``): a pair whose two coarse readings agree, i.e. with no tick between."""
    for _ in range(tries):
        res = obj.test_run(CLOCK_PROGRAM, bytes(64))
        before, jiffies, after = struct.unpack_from("=3Q", res.data)
        if before == after:
            return Clock(jiffies, before, tick_ns())
    return Clock(jiffies, before, tick_ns())
