"""What an agent says about a state change: the cause in an operator's words, for
`halb status`, the failover metric and the log (pure)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from halb.ha.machine import (
    Action,
    CampaignWon,
    Drain,
    Event,
    FenceDeadlinePassed,
    GroupState,
    HandoverObserved,
    LeaderObserved,
    LeaderUnresponsive,
    LeaseLost,
    Machine,
    MachineConfig,
    Shutdown,
    State,
    TimerFired,
    Undrain,
)

__all__ = ["ObservedMachine", "change_cause", "describe_cause"]


def describe_cause(ev: Event) -> str:
    """Why a state change happened, in words an operator reads in `halb status`."""
    match ev:
        case CampaignWon():
            return "won the election"
        case LeaderObserved(leader=None):
            return "leader key gone (leader lease expired or revoked)"
        case LeaderObserved(leader=leader) if leader is not None:
            return f"leader is {leader.holder} (term {leader.term})"
        case FenceDeadlinePassed():
            return (
                "keepalives or heartbeats to etcd failed: self-fenced before a standby "
                "could take over"
            )
        case LeaseLost():
            return "lease lost"
        case HandoverObserved(handover=h) if h is not None:
            return f"handover to {h.target} requested ({h.reason})"
        case Drain():
            return "node drained"
        case Undrain():
            return "node undrained"
        case Shutdown():
            return "agent stopping"
        case LeaderUnresponsive(term=term):
            return f"no heartbeat from the leader of term {term}: revoking its lease"
        case TimerFired(timer=t):
            return f"{t} timer fired"
    return type(ev).__name__


class ObservedMachine(Machine):
    """A Machine that reports every state or term change with the event that caused it."""

    def __init__(
        self, cfg: MachineConfig, on_change: Callable[[State, State, Event, Machine], None]
    ) -> None:
        super().__init__(cfg)
        self._on_change = on_change
        # The state before the event being reported (what the change came from).
        self.before = self.st

    def feed(self, ev: Event) -> Sequence[Action]:
        self.before = self.st
        before_state, before_term = self.st.state, self.st.term
        actions = super().feed(ev)
        if self.st.state is not before_state or self.st.term != before_term:
            self._on_change(before_state, self.st.state, ev, self)
        return actions


def change_cause(
    ev: Event, old: State, new: State, before: GroupState, down_interface: str | None
) -> str:
    """The cause of a change from ``old`` to ``new`` on ``ev``; ``before`` is the
    machine's state before the event, ``down_interface`` the VIP interface if it is
    down (a drain the agent applied itself)."""
    if isinstance(ev, Drain) and down_interface is not None:
        return f"interface {down_interface} down"
    if (
        new is State.ACTIVE
        and old is not State.ACTIVE
        and before.forced is not None
        and before.forced == before.last_term
    ):
        # The vacancy just filled was left by a revoke for missing heartbeats.
        return (
            f"took over from a silent leader: no heartbeat of term {before.forced}, "
            "its lease revoked, the fence waited out"
        )
    return describe_cause(ev)
