"""The cause an agent reports for a state change (halb.agent.causes)."""

from __future__ import annotations

import pytest

from halb.agent.causes import change_cause, describe_cause
from halb.ha.machine import CampaignWon, Drain, GroupState, State
from halb.model import Term

pytestmark = pytest.mark.unit

T1, T2 = Term(1, 2), Term(3, 4)


def test_a_drain_while_the_interface_is_down_names_the_interface() -> None:
    before = GroupState()
    assert change_cause(Drain(), State.ACTIVE, State.DRAINED, before, "eth0") == (
        "interface eth0 down"
    )
    assert change_cause(Drain(), State.ACTIVE, State.DRAINED, before, None) == "node drained"


def test_filling_a_forced_vacancy_is_a_takeover_from_a_silent_leader() -> None:
    forced = GroupState(last_term=T1, forced=T1)
    cause = change_cause(CampaignWon(T2), State.STANDBY, State.ACTIVE, forced, None)
    assert cause.startswith("took over from a silent leader: no heartbeat of term 1@2")
    # A vacancy left any other way is an ordinary election.
    other = GroupState(last_term=T2, forced=T1)
    won = change_cause(CampaignWon(T2), State.STANDBY, State.ACTIVE, other, None)
    assert won == describe_cause(CampaignWon(T2)) == "won the election"
