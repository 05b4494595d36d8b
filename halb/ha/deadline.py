"""One dataplane dead-man switch shared by the VIP groups of a node.

Each group's runtime arms its own deadline; the dataplane holds the latest armed one
and is disarmed when no group is armed. All groups heartbeat from the same process on
the same etcd connection, so their deadlines lie within one heartbeat interval of each
other; the standbys' fence wait includes that interval.
"""

from __future__ import annotations

from halb.ha.runtime import DeadlineSink

__all__ = ["DeadlineMux"]


class DeadlineMux:
    def __init__(self, sink: DeadlineSink) -> None:
        self._sink = sink
        self._armed: dict[str, int] = {}
        self._current: int | None = None

    def port(self, name: str) -> DeadlineSink:
        return _Port(self, name)

    @property
    def current(self) -> int | None:
        return self._current

    def set(self, name: str, monotonic_ns: int | None) -> None:
        # Called from the event loop only (the runtimes' terms): no lock.
        if monotonic_ns is None:
            self._armed.pop(name, None)
        else:
            self._armed[name] = monotonic_ns
        value = max(self._armed.values()) if self._armed else None
        if value != self._current:
            self._current = value
            self._sink.set_deadline(value)


class _Port:
    def __init__(self, mux: DeadlineMux, name: str) -> None:
        self._mux = mux
        self._name = name

    def set_deadline(self, monotonic_ns: int | None) -> None:
        self._mux.set(self._name, monotonic_ns)
