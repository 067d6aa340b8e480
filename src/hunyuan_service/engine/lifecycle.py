"""The service's one lifecycle state, with the transitions it may take and nothing else."""

from __future__ import annotations

import enum
import logging

logger = logging.getLogger(__name__)


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


# A stop signal may arrive while the model is still loading, hence STARTING -> DRAINING.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.READY, State.DRAINING, State.FAILED}),
    State.READY: frozenset({State.DRAINING}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}


class Lifecycle:
    """Holds the state; `advance` asserts that each transition is one the service may take."""

    def __init__(self) -> None:
        self.state = State.STARTING

    def advance(self, to: State) -> None:
        assert to in TRANSITIONS[self.state], f"lifecycle cannot go {self.state.value} -> {to}"
        logger.debug("lifecycle %s -> %s", self.state.value, to.value)
        self.state = to

    @property
    def accepting(self) -> bool:
        return self.state is State.READY

    def begin_drain(self) -> bool:
        """Stops admission; returns False if the service was already draining or stopped."""
        if self.state in (State.STARTING, State.READY):
            self.advance(State.DRAINING)
            return True
        return False

    def mark_stopped(self) -> None:
        self.begin_drain()
        if self.state is State.DRAINING:
            self.advance(State.STOPPED)
