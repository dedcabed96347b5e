"""AsyncGoals: a goal provider run beside the control loop, so the robot keeps acting on the last accepted subgoal
while the next one is imagined (the ROS graph's mode; ``ghil eval`` keeps the synchronous provider for exact
reproduction of the papers' protocol).

``goal(obs)`` never waits for the inner provider once a first subgoal exists: it hands ``obs`` to one background
worker thread (the newest observation wins: a request that arrives while the worker is busy replaces any waiting
one) and returns the subgoal the worker accepted last. The very first request of an episode is answered
synchronously, because a goal-conditioned policy cannot act without a goal. The inner provider (e.g.
``planners.subgoals.GeneratedSubgoals``) keeps its own replanning cadence and checks, and only the worker thread
touches it after that first call. An exception in the inner provider is kept, logged, and the last good subgoal
stays in force (``errors`` counts them; ``last_error`` holds the newest); the loop never stops for it.

``reset()`` waits for the job in flight, then resets the inner provider (a new subtask: no stale subgoal survives).
``close()`` stops the worker; the provider is a context manager.

Usage::

    goals = AsyncGoals(GeneratedSubgoals(generator, filter, n_candidates=4))
    agent = PolicyAgent(policy, goals=goals, exec_len=4)       # bind_policy and seed pass through
    agent.reset(); agent.act(obs)                               # the first subgoal is computed at once
    goals.close()
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ghil.interfaces import GoalProvider, Seedable
from ghil.types import Observation, Subgoal

log = logging.getLogger(__name__)

__all__ = ["AsyncGoals"]


class AsyncGoals:
    """A ``GoalProvider`` that computes the next subgoal on a worker thread (see the module docstring)."""

    def __init__(self, inner: GoalProvider, name: str = "ghil-goals"):
        if not isinstance(inner, GoalProvider):
            raise TypeError(f"AsyncGoals wraps a ghil.interfaces.GoalProvider (reset(), goal(obs)), got "
                            f"{type(inner).__name__}")
        self.inner = inner
        self._cond = threading.Condition()
        self._pending: Observation | None = None  # the newest observation waiting for the worker
        self._busy = False  # the worker is inside inner.goal()
        self._latest: Subgoal | None = None
        self._closed = False
        self._generation = 0  # bumped by reset(): a result of an older episode is dropped
        self.errors = 0
        self.last_error: BaseException | None = None
        self.n_updates = 0  # subgoals the worker delivered
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- pass-throughs ------------------------------------------------------------------------------------------

    def bind_policy(self, policy: Any) -> None:
        bind = getattr(self.inner, "bind_policy", None)
        if callable(bind):
            bind(policy)

    def seed(self, seed: int) -> None:
        with self._cond:
            self._wait_idle()
            if isinstance(self.inner, Seedable):
                self.inner.seed(seed)

    # -- GoalProvider -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        with self._cond:
            self._wait_idle()
            self._pending, self._latest = None, None
            self._generation += 1
            self.inner.reset()

    def goal(self, obs: Observation) -> Subgoal | None:
        with self._cond:
            if self._closed:
                raise RuntimeError("AsyncGoals was closed")
            if self._latest is None:
                # No subgoal yet this episode: answer this request itself (the policy needs a goal to act).
                self._wait_idle()
                self._latest = self.inner.goal(obs)
                return self._latest
            self._pending = obs  # newest wins
            self._cond.notify_all()
            return self._latest

    # -- the worker ---------------------------------------------------------------------------------------------

    def _wait_idle(self) -> None:
        """Block (holding the condition) until no job is running or waiting."""
        while self._busy or self._pending is not None:
            if not self._thread.is_alive():
                break
            self._cond.wait(timeout=0.05)

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                obs, self._pending = self._pending, None
                generation = self._generation
                self._busy = True
            try:
                result: Subgoal | None = self.inner.goal(obs)
                error = None
            except Exception as err:  # contained: the last good subgoal stays in force
                result, error = None, err
            with self._cond:
                self._busy = False
                if error is not None:
                    self.errors += 1
                    self.last_error = error
                    log.warning("the goal provider %s raised %s: %s; keeping the last subgoal",
                                type(self.inner).__name__, type(error).__name__, error)
                elif result is not None and generation == self._generation:
                    self._latest = result
                    self.n_updates += 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the worker has nothing to do (tests, shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and self._pending is None, timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> AsyncGoals:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
