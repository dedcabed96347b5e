"""AsyncGoals: the subgoal is imagined beside the control loop; the loop never waits for it after the first goal."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ghil.runtime.async_goals import AsyncGoals
from ghil.types import Observation, Subgoal


def _obs(t: int) -> Observation:
    return Observation(images={"rgb_static": np.zeros((8, 8, 3), np.uint8)}, proprio=np.zeros(15), t=t,
                       instruction="open the drawer")


class SlowProvider:
    """Returns a subgoal whose pixel value is the observation's step; sleeps ``delay`` s after the first call."""

    def __init__(self, delay: float = 0.0, fail_on: set[int] | None = None):
        self.delay, self.fail_on = delay, fail_on or set()
        self.seen: list[int] = []
        self.resets = 0
        self.seeds: list[int] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def reset(self) -> None:
        self.resets += 1

    def seed(self, seed: int) -> None:
        self.seeds.append(seed)

    def goal(self, obs: Observation) -> Subgoal:
        self.threads.add(threading.current_thread().name)
        self.seen.append(obs.t)
        if self.seen[1:]:
            self.gate.wait(5)
            time.sleep(self.delay)
        if obs.t in self.fail_on:
            raise RuntimeError(f"generator failed at step {obs.t}")
        return Subgoal(image=np.full((8, 8, 3), obs.t % 256, np.uint8), source="slow")


def _value(subgoal: Subgoal) -> int:
    return int(subgoal.image[0, 0, 0])


def test_the_first_goal_is_computed_at_once_then_requests_never_wait():
    inner = SlowProvider(delay=0.3)
    with AsyncGoals(inner) as goals:
        assert _value(goals.goal(_obs(0))) == 0  # synchronous: the policy needs a goal to act
        t0 = time.perf_counter()
        got = goals.goal(_obs(4))
        assert time.perf_counter() - t0 < 0.1 and _value(got) == 0  # the last accepted subgoal, at once
        assert goals.wait_idle(5)
        assert _value(goals.goal(_obs(8))) == 4  # the worker's result is now in force
        assert "ghil-goals" in inner.threads  # later calls ran on the worker thread


def test_the_newest_observation_wins_while_the_worker_is_busy():
    inner = SlowProvider()
    with AsyncGoals(inner) as goals:
        goals.goal(_obs(0))
        inner.gate.clear()  # the worker blocks inside its next job
        goals.goal(_obs(1))
        deadline = time.time() + 5
        while len(inner.seen) < 2 and time.time() < deadline:
            time.sleep(0.01)
        for t in (2, 3, 4):  # arrive while busy: only the newest is kept
            goals.goal(_obs(t))
        inner.gate.set()
        assert goals.wait_idle(5)
        assert inner.seen == [0, 1, 4]
        assert _value(goals.goal(_obs(5))) == 4


def test_an_exception_in_the_provider_keeps_the_last_subgoal_and_is_counted():
    inner = SlowProvider(fail_on={4})
    with AsyncGoals(inner) as goals:
        goals.goal(_obs(0))
        goals.goal(_obs(4))
        assert goals.wait_idle(5)
        assert goals.errors == 1 and isinstance(goals.last_error, RuntimeError)
        assert _value(goals.goal(_obs(8))) == 0  # still the last good one; the loop goes on
        assert goals.wait_idle(5)
        assert _value(goals.goal(_obs(12))) == 8 and goals.n_updates == 1


def test_reset_waits_for_the_job_in_flight_and_drops_its_subgoal():
    inner = SlowProvider(delay=0.2)
    with AsyncGoals(inner) as goals:
        goals.goal(_obs(0))
        goals.goal(_obs(4))  # in flight while reset() runs
        goals.reset()
        assert inner.resets == 1 and goals.wait_idle(1)
        # A new episode starts without any subgoal of the old one: the next request is answered afresh.
        assert _value(goals.goal(_obs(100))) == 100


def test_seed_and_bind_pass_through_and_close_stops_the_worker():
    inner = SlowProvider()
    bound = []
    inner.bind_policy = bound.append  # type: ignore[attr-defined]
    goals = AsyncGoals(inner)
    goals.seed(7)
    goals.bind_policy("policy")
    assert inner.seeds == [7] and bound == ["policy"]
    goals.close()
    assert not goals._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        goals.goal(_obs(0))


def test_only_goal_providers_are_wrapped():
    with pytest.raises(TypeError, match="GoalProvider"):
        AsyncGoals(object())
