"""AsyncReasoner: a reasoner run beside the control loop; ``reason(obs)`` returns the freshest complete reasoning.

The same worker as the subgoals' (``ghil.runtime.async_goals.AsyncGoals``): the first call of an episode is answered
at once (the lower stages need a subtask), later calls hand the newest observation to one worker thread (newest
wins) and return the last reasoning it completed; an exception in the reasoner is contained and the last one stays
in force. ``reset()`` waits for the job in flight and forgets everything (a new instruction).

Usage::

    reasoner = AsyncReasoner(VLMReasoner(backend))
    agent = ReasonedAgent(lower, reasoner, reason_every=1)     # every step asks; the worker runs at its own pace
    reasoner.close()
"""

from __future__ import annotations

from typing import Any

from ghil.interfaces import Reasoner
from ghil.runtime.async_goals import AsyncGoals
from ghil.types import Observation, Reasoning

__all__ = ["AsyncReasoner"]


class _AsProvider:
    """A Reasoner in the GoalProvider shape AsyncGoals runs (goal = reason)."""

    def __init__(self, reasoner: Reasoner):
        self.reasoner = reasoner

    def reset(self) -> None:
        reset = getattr(self.reasoner, "reset", None)
        if callable(reset):
            reset()

    def goal(self, obs: Observation) -> Reasoning:
        return self.reasoner.reason(obs)


class AsyncReasoner:
    """See the module docstring. ``errors`` / ``last_error`` / ``n_updates`` are the worker's counters."""

    def __init__(self, reasoner: Reasoner):
        if not isinstance(reasoner, Reasoner):
            raise TypeError(f"AsyncReasoner wraps a ghil.interfaces.Reasoner (reason(obs)), got {type(reasoner).__name__}")
        self.reasoner = reasoner
        self._async = AsyncGoals(_AsProvider(reasoner), name="ghil-reasoner")

    def reason(self, obs: Observation) -> Reasoning:
        return self._async.goal(obs)

    def reset(self) -> None:
        self._async.reset()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._async.wait_idle(timeout)

    @property
    def errors(self) -> int:
        return self._async.errors

    @property
    def n_updates(self) -> int:
        return self._async.n_updates

    def close(self) -> None:
        self._async.close()

    def __enter__(self) -> AsyncReasoner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
