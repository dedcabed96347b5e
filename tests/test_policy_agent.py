"""PolicyAgent (policy + chunk queue + goal provider), the CALVIN adapter and the oracle-subgoal provider, on the
playtable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _policy_fixtures import SIZE, fake_stats, tiny_config
from ghil.interfaces import Agent, CalvinAgent, ChunkPolicy, GoalProvider, Seedable
from ghil.runtime.policy_agent import NoGoal, PolicyAgent
from ghil.types import Subgoal
from policies.dit import DiTPolicy
from sim_eval.evaluation.adapter import CalvinAgentAdapter, as_calvin_agent, observation_from_calvin
from sim_eval.evaluation.oracle_goals import OracleSubgoal
from sim_eval.protocol.chains import official_subset
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.protocol.instructions import chain_instructions
from sim_eval.protocol.tasks import eval_instruction
from sim_eval.world.playtable.env import PlayTableEnv


class CountingPolicy:
    """Wraps a tiny DiT and counts predict_chunk calls (every other ChunkPolicy attribute is the DiT's)."""

    def __init__(self, policy):
        self.inner, self.calls, self.goals_seen = policy, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_chunk(self, obs, goal=None, n_steps=None, generator=None):
        self.calls += 1
        self.goals_seen.append(goal)
        assert goal is None or goal.shape == (SIZE, SIZE, 3)
        return self.inner.predict_chunk(obs, goal, n_steps, generator)


@pytest.fixture(scope="module")
def env():
    e = PlayTableEnv(static_size=SIZE, gripper_size=SIZE)
    yield e
    e.close()


def _oracle(**kwargs) -> OracleSubgoal:
    return OracleSubgoal(env=PlayTableEnv(static_size=SIZE, cameras=["static"]), **kwargs)


def _policy(**overrides):
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(**overrides))
    policy.fit_normalizer(fake_stats())
    return CountingPolicy(policy)


def _obs(env_obs, instruction, t=0):
    return observation_from_calvin(env_obs, t, instruction)


def test_stages_satisfy_their_protocols():
    policy = _policy(use_goal=True)
    assert isinstance(policy.inner, ChunkPolicy)
    agent = PolicyAgent(policy, _oracle(lookahead=4))
    assert isinstance(agent, Agent) and isinstance(agent, Seedable) and not isinstance(agent, CalvinAgent)
    assert isinstance(agent.goals, GoalProvider) and isinstance(NoGoal(), GoalProvider)
    calvin = as_calvin_agent(agent)
    assert isinstance(calvin, CalvinAgentAdapter) and isinstance(calvin, CalvinAgent)
    with pytest.raises(TypeError, match="neither a CalvinAgent"):
        as_calvin_agent(object())
    with pytest.raises(TypeError, match="ChunkPolicy"):
        PolicyAgent(object())


def test_agent_replans_every_exec_len_and_emits_valid_actions(env):
    policy = _policy(use_goal=False, use_language=True)
    agent = as_calvin_agent(PolicyAgent(policy, NoGoal()))
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


def test_seed_makes_the_actions_a_function_of_the_seed_alone(env):
    state, tasks = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    observation = _obs(obs, eval_instruction(tasks[0]))
    agent = PolicyAgent(_policy(use_goal=False, use_language=True), NoGoal())

    def first_action(seed: int) -> np.ndarray:
        agent.seed(seed)
        agent.reset()
        return agent.act(observation)

    a = first_action(3)
    for _ in range(3):  # whatever ran before, the same seed gives the same action
        agent.act(observation)
    np.testing.assert_array_equal(first_action(3), a)
    assert any(not np.array_equal(first_action(s), a) for s in (4, 5, 6))


def test_stage_compatibility_is_checked_when_the_agent_is_built():
    with pytest.raises(ValueError, match="goal provider"):
        PolicyAgent(_policy(use_goal=True), NoGoal())
    with pytest.raises(ValueError, match="takes no goal image"):
        PolicyAgent(_policy(use_goal=False, use_language=True), _oracle(lookahead=4))


def test_oracle_subgoal_needs_privileged_state_and_an_instruction(env):
    from ghil.types import Observation

    goals = _oracle(lookahead=4)
    blank = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match="privileged"):
        goals.goal(Observation(images={"rgb_static": blank}, proprio=np.zeros(15), instruction="open the drawer"))
    state, _ = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    with pytest.raises(ValueError, match="instruction"):
        goals.goal(_obs(obs, None))


def test_oracle_subgoal_follows_the_expert_reference(env):
    goals = _oracle(lookahead=8)
    state, tasks = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    instruction = eval_instruction(tasks[0])
    goals.reset()
    first = goals.goal(_obs(obs, instruction))
    assert isinstance(first, Subgoal) and first.source == "oracle"
    assert first.image.shape == (SIZE, SIZE, 3) and first.image.dtype == np.uint8
    n_ref = len(goals._frames)
    assert n_ref > 20  # the expert's whole plan for the subtask
    # Replaying the reference's own states moves the match forward monotonically.
    matched = []
    for t in range(0, n_ref, 10):
        ref_state = goals._states[t]
        fake = {"rgb_obs": {}, "robot_obs": np.r_[ref_state[:3], np.zeros(3), ref_state[3], np.zeros(8)],
                "scene_obs": ref_state[4:]}
        goals.goal(_obs(fake, instruction))
        matched.append(goals._matched)
    assert matched == sorted(matched) and matched[-1] >= n_ref - 11
    goals.reset()
    assert goals._frames == []


def test_oracle_subgoal_from_current_state_is_the_experts_frame_k_steps_from_here(env):
    from sim_eval.demonstrations.expert import ScriptedExpert

    k = 6
    goals = _oracle(lookahead=k, from_current_state=True)
    state, tasks = official_subset(1)[0]
    obs = env.reset(*state_to_obs(state))
    start_frame = obs["rgb_obs"]["rgb_static"]
    instruction = eval_instruction(tasks[0])
    goal = goals.goal(_obs(obs, instruction)).image
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
    again = goals.goal(_obs(moved, instruction)).image
    assert not np.array_equal(again, goal)


def test_oracle_subgoal_follows_the_subtask_queue_of_a_composite_instruction(env):
    """eval.mode=long_horizon: one instruction for five subtasks; the goals move on as subtasks are done."""
    from sim_eval.demonstrations.expert import ScriptedExpert

    state, tasks = official_subset(1)[0]
    composite = chain_instructions(tasks, "long_horizon", np.random.default_rng(0))[0]
    goals = _oracle(lookahead=4, from_current_state=True)
    obs = env.reset(*state_to_obs(state))
    goals.goal(_obs(obs, composite))
    assert goals._tasks == list(tasks) and goals._k == 0
    # Solve the first subtask with the expert in the eval env; the next request's goal serves the second.
    expert = ScriptedExpert()
    expert.reset(tasks[0])
    for _ in range(360):
        action, phase = expert.act(obs["robot_obs"], obs["scene_obs"])
        if phase == "done":
            break
        obs, *_ = env.step(action)
    goal = goals.goal(_obs(obs, composite)).image
    assert goals._k == 1
    # ... and it is the frame the expert reaches on the second subtask from this state (teleported, as the oracle
    # does: the state vectors do not hold contact velocities, so a teleported world differs slightly from a live one).
    expert.reset(tasks[1])
    moved = env.reset(robot_obs=obs["robot_obs"], scene_obs=obs["scene_obs"])
    for _ in range(4):
        action, _ = expert.act(moved["robot_obs"], moved["scene_obs"])
        moved, *_ = env.step(action)
    np.testing.assert_array_equal(goal, moved["rgb_obs"]["rgb_static"])


def test_policy_agent_runs_in_the_evaluation_loop(env):
    from sim_eval.evaluation.rollout import Chain, run_chain
    from sim_eval.protocol.oracle import TaskOracle

    policy = _policy(use_goal=True, use_language=False)
    agent = as_calvin_agent(PolicyAgent(policy, _oracle(lookahead=8)))
    state, tasks = official_subset(1)[0]
    chain = Chain(index=0, initial_state=state, tasks=tasks)
    record = run_chain(env, agent, TaskOracle(), chain, mode="standard", ep_len=6, seed=0)
    # An untrained policy does not solve the first subtask in 6 steps: one subtask, 3 chunks (exec_len 2).
    assert record.n_completed == 0 and len(record.subtasks) == 1
    assert policy.calls == 3
    again = run_chain(env, agent, TaskOracle(), chain, mode="standard", ep_len=6, seed=0)
    assert again.subtasks == record.subtasks  # seeded per subtask: the second run repeats the first


@pytest.mark.parametrize("env_name", ["playtable", "calvin"])
def test_oracle_goals_are_rendered_by_a_copy_of_the_evaluated_env(env_name):
    """agent=oracle_subgoal_policy builds its private goal env from the same env config as the evaluation, so
    env=calvin gives calvin_env goals (same renderer, camera and size as the observations)."""
    from hydra import compose, initialize_config_dir

    from ghil.paths import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["agent=oracle_subgoal_policy", f"env={env_name}", "env.static_size=64"])
    assert cfg.agent.goals.env == cfg.env and cfg.agent.goals.env.static_size == 64
