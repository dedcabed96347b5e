"""PolicyAgent (policy + chunk queue + goal provider) and the oracle-subgoal provider, on the playtable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _policy_fixtures import SIZE, fake_stats, tiny_config
from ghil.runtime.policy_agent import NoGoal, PolicyAgent
from planners.oracle_subgoal import OracleSubgoal
from policies.dit import DiTPolicy
from sim_eval.protocol.chains import official_subset
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.world.playtable.env import PlayTableEnv
from sim_eval.protocol.tasks import eval_instruction


class CountingPolicy:
    """Wraps a tiny DiT and counts predict_chunk calls."""

    def __init__(self, policy):
        self.inner, self.calls = policy, 0
        self.config, self.space = policy.config, policy.space

    def eval(self):
        return self

    def predict_chunk(self, obs, goal=None, n_steps=None, generator=None):
        self.calls += 1
        assert goal is None or goal.shape == (SIZE, SIZE, 3)
        return self.inner.predict_chunk(obs, goal, n_steps, generator)


@pytest.fixture(scope="module")
def env():
    e = PlayTableEnv(static_size=SIZE, gripper_size=SIZE)
    yield e
    e.close()


def _policy(**overrides):
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(**overrides))
    policy.fit_normalizer(fake_stats())
    return CountingPolicy(policy)


def test_agent_replans_every_exec_len_and_emits_valid_actions(env):
    policy = _policy(use_goal=False, use_language=True)
    agent = PolicyAgent(policy, NoGoal())
    state, tasks = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    agent.reset()
    for _ in range(5):
        action = agent.step(obs, eval_instruction(tasks[0]))
        assert action.shape == (7,) and np.isfinite(action).all()
        assert action[6] in (-1.0, 1.0) and np.abs(action).max() <= 1.0
        obs, *_ = env.step(action)
    assert policy.calls == 3  # exec_len 2: chunks at steps 0, 2, 4
    agent.reset()  # a new subtask: the queue is cleared, so the next step predicts again
    agent.step(obs, eval_instruction(tasks[0]))
    assert policy.calls == 4


def test_goal_conditioned_policy_needs_a_goal_provider():
    with pytest.raises(ValueError, match="goal provider"):
        PolicyAgent(_policy(use_goal=True), NoGoal())


def test_oracle_subgoal_follows_the_expert_reference(env):
    goals = OracleSubgoal(lookahead=8, static_size=SIZE)
    state, tasks = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    instruction = eval_instruction(tasks[0])
    goals.reset()
    first = goals.goal(obs, instruction)
    assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
    n_ref = len(goals._frames)
    assert n_ref > 20  # the expert's whole plan for the subtask
    # Replaying the reference's own states moves the match forward monotonically.
    matched = []
    for t in range(0, n_ref, 10):
        ref_state = goals._states[t]
        fake = {"robot_obs": np.r_[ref_state[:3], np.zeros(3), ref_state[3], np.zeros(8)],
                "scene_obs": ref_state[4:]}
        goals.goal(fake, instruction)
        matched.append(goals._matched)
    assert matched == sorted(matched) and matched[-1] >= n_ref - 11
    goals.reset()
    assert goals._frames == []


def test_oracle_subgoal_from_current_state_is_the_experts_frame_k_steps_from_here(env):
    from sim_eval.demonstrations.expert import ScriptedExpert

    k = 6
    goals = OracleSubgoal(lookahead=k, static_size=SIZE, from_current_state=True)
    state, tasks = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    start_frame = obs["rgb_obs"]["rgb_static"]
    instruction = eval_instruction(tasks[0])
    goal = goals.goal(obs, instruction)
    # The same k expert steps taken in the evaluation env itself end on the same frame.
    expert = ScriptedExpert()
    expert.reset(tasks[0])
    moved = obs
    for _ in range(k):
        action, _ = expert.act(moved["robot_obs"], moved["scene_obs"])
        moved, *_ = env.step(action)
    np.testing.assert_array_equal(goal, moved["rgb_obs"]["rgb_static"])
    assert not np.array_equal(goal, start_frame)
    # Asked again from the new state, it looks k steps beyond that state (not along a stored reference).
    again = goals.goal(moved, instruction)
    assert not np.array_equal(again, goal)


def test_policy_agent_runs_in_the_evaluation_loop(env):
    from sim_eval.protocol.oracle import TaskOracle
    from sim_eval.evaluation.rollout import Chain, run_chain

    policy = _policy(use_goal=True, use_language=False)
    agent = PolicyAgent(policy, OracleSubgoal(lookahead=8, static_size=SIZE))
    state, tasks = official_subset(1)[0]
    chain = Chain(index=0, initial_state=state, tasks=tasks)
    record = run_chain(env, agent, TaskOracle(), chain, mode="standard", ep_len=6, seed=0)
    # An untrained policy does not solve the first subtask in 6 steps: one subtask, 3 chunks (exec_len 2).
    assert record.n_completed == 0 and len(record.subtasks) == 1
    assert policy.calls == 3
