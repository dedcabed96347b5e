"""The evaluation loop's contract (protocol §5) against a fake env and oracle: one reset per chain, agent.reset per
subtask (once per chain in long-horizon mode), the oracle compared with the subtask's start info after every step,
EP_LEN respected, the chain stopped at the first failure."""

from __future__ import annotations

import numpy as np
import pytest

from sim_eval.protocol.chains import load_official_chains
from sim_eval.evaluation.rollout import Chain, chain_seed, run_chain

STATE, TASKS = load_official_chains()[0]
NOOP = np.array([0, 0, 0, 0, 0, 0, 1.0])


class FakeEnv:
    def __init__(self):
        self.n_resets = self.t = 0

    def reset(self, robot_obs=None, scene_obs=None):
        self.n_resets += 1
        return self._obs()

    def step(self, action):
        self.t += 1
        return self._obs(), 0, False, {"t": self.t}

    def get_info(self):
        return {"t": self.t}

    def _obs(self):
        return {"robot_obs": np.zeros(15), "scene_obs": np.zeros(24), "rgb_obs": {}}


class FakeOracle:
    """Task k succeeds once ``needed[k]`` steps have passed since its start info (None: never)."""

    def __init__(self, needed):
        self.needed = dict(zip(TASKS, needed))
        self.calls = []

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        (task,) = task_filter
        self.calls.append((task, start_info["t"], end_info["t"]))
        need = self.needed[task]
        return {task} if need is not None and end_info["t"] - start_info["t"] >= need else set()


class CountingAgent:
    def __init__(self):
        self.n_resets, self.instructions = 0, []

    def reset(self):
        self.n_resets += 1

    def step(self, obs, instruction):
        self.instructions.append(instruction)
        return NOOP


def test_full_chain_success():
    env, agent, oracle = FakeEnv(), CountingAgent(), FakeOracle([3, 1, 5, 2, 4])
    rec = run_chain(env, agent, oracle, Chain(0, STATE, TASKS), "standard", ep_len=360, seed=chain_seed(0, 0))
    assert env.n_resets == 1 and agent.n_resets == 5 and rec.n_completed == 5
    assert [s.n_steps for s in rec.subtasks] == [3, 1, 5, 2, 4] and env.t == 15
    assert len(oracle.calls) == 15  # after every step
    starts = sorted({(task, start) for task, start, _ in oracle.calls}, key=lambda x: x[1])
    assert [s for _, s in starts] == [0, 3, 4, 9, 11]  # start info taken when each subtask begins


def test_chain_stops_at_the_first_failure_after_ep_len_steps():
    env, agent, oracle = FakeEnv(), CountingAgent(), FakeOracle([2, None, 1, 1, 1])
    rec = run_chain(env, agent, oracle, Chain(0, STATE, TASKS), "standard", ep_len=7, seed=1)
    assert rec.n_completed == 1 and len(rec.subtasks) == 2
    assert rec.subtasks[1].failure == "timeout" and rec.subtasks[1].n_steps == 7
    assert env.t == 2 + 7 and agent.n_resets == 2


def test_long_horizon_resets_the_agent_once():
    env, agent, oracle = FakeEnv(), CountingAgent(), FakeOracle([1, 1, 1, 1, 1])
    rec = run_chain(env, agent, oracle, Chain(0, STATE, TASKS), "long_horizon", ep_len=360, seed=1)
    assert rec.n_completed == 5 and agent.n_resets == 1 and len(set(agent.instructions)) == 1


@pytest.mark.parametrize("bad", [np.zeros(6), np.full(7, np.nan), [0, 0, 0, 0, 0, 0, 0.0], "open"])
def test_malformed_action_fails_without_stepping(bad):
    class Bad(CountingAgent):
        def step(self, obs, instruction):
            return bad

    env = FakeEnv()
    rec = run_chain(env, Bad(), FakeOracle([1] * 5), Chain(0, STATE, TASKS), "standard", ep_len=360, seed=1)
    assert rec.subtasks[0].failure == "invalid_action" and rec.subtasks[0].detail and env.t == 0
