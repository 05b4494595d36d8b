"""The progress display on stderr while a drill runs.

On a terminal, one status line is rewritten in place; otherwise only phase messages are
printed, so a log stays readable.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.prefix = ""
        self.fault_at: float | None = None
        self.fault = ""
        self.leader: str | None = None
        self._last_echoes = 0
        self._last_t = 0.0
        self._lock = threading.Lock()
        self._width = 0

    def phase(self, msg: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._clear()
            self.stream.write(f"{self.prefix}{msg}\n")
            self.stream.flush()

    def tick(self, ev: dict[str, Any]) -> None:
        """A ``tick`` event from the traffic generator."""
        if not self.live:
            return
        t, echoes = float(ev["t"]), int(ev["echoes"])
        rate = (echoes - self._last_echoes) / (t - self._last_t) if self._last_t else 0.0
        self._last_echoes, self._last_t = echoes, t
        when = f"{t - self.fault_at:+6.2f}s after {self.fault}" if self.fault_at else "before fault"
        line = (
            f"{self.prefix}{when} | leader {self.leader or '-'} | {rate:5.0f} echoes/s | "
            f"{ev['alive']} alive, {ev['stalled']} stalled | new ok {ev['new_ok']} "
            f"failed {ev['new_err']}"
        )
        with self._lock:
            self._clear()
            self.stream.write(line)
            self._width = len(line)
            self.stream.flush()

    def reset(self) -> None:
        self.fault_at, self.leader, self._last_t, self._last_echoes = None, None, 0.0, 0

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0

    def done(self) -> None:
        with self._lock:
            self._clear()
            self.stream.flush()
