"""Several groups share one dataplane dead-man switch."""

from __future__ import annotations

import pytest

from halb.ha.deadline import DeadlineMux

pytestmark = pytest.mark.unit


class Sink:
    def __init__(self) -> None:
        self.writes: list[int | None] = []

    def set_deadline(self, monotonic_ns: int | None) -> None:
        self.writes.append(monotonic_ns)


def test_switch_holds_the_latest_armed_deadline_and_disarms_with_the_last_group() -> None:
    sink = Sink()
    mux = DeadlineMux(sink)
    a, b = mux.port("a"), mux.port("b")
    a.set_deadline(100)
    b.set_deadline(150)
    a.set_deadline(120)  # still below b's: no write
    assert sink.writes == [100, 150]
    b.set_deadline(None)  # b's term ended cleanly: a's deadline rules again
    assert sink.writes[-1] == 120
    a.set_deadline(None)
    assert sink.writes[-1] is None and mux.current is None
    # Disarming twice writes nothing more.
    a.set_deadline(None)
    assert sink.writes == [100, 150, 120, None]
