"""PolicyAgent: a chunk policy, its chunk queue and a goal provider composed into one ``ghil.interfaces.Agent``.

The policy is stateless; the episode state (queued actions, the subgoal in force) lives here, and ``reset()``
(before every subtask, or on a new instruction) clears all of it. ``seed(s)`` restarts every random stream (the
sampler's noise and any seedable goal provider), so a rollout depends only on its seed: ``ghil eval`` calls it at
each subtask reset with a seed derived from the chain's.

The agent sees ``ghil.types.Observation`` only; ``sim_eval.evaluation.adapter`` puts it behind CALVIN's agent
interface for ``ghil eval``, and the ROS policy node will call ``act`` directly.

Usage::

    agent = PolicyAgent(load_pretrained("checkpoints/dit_small"), goals=my_goal_provider)
    agent.seed(0); agent.reset()
    action = agent.act(observation)      # (7,) relative action, gripper exactly +-1 (agent.space == REL_EE)
"""

from __future__ import annotations

import numpy as np
import torch

from ghil.interfaces import ChunkPolicy, GoalProvider, Seedable
from ghil.runtime.chunks import ChunkQueue
from ghil.types import AgentDescription, Observation, Subgoal

# Stream ids mixed into the agent's seed, so the policy's noise and the goal provider's randomness never share
# (or shift) a stream.
_POLICY_STREAM, _GOALS_STREAM = 0, 1


def derive_seed(seed: int, *path: int) -> int:
    """A 32-bit seed that depends only on ``seed`` and the ``path`` of stream ids (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), *map(int, path)]).generate_state(1)[0])


class NoGoal:
    """The goal provider of policies conditioned on language only (the flat baseline)."""

    def reset(self) -> None:
        pass

    def goal(self, obs: Observation) -> None:
        return None


class PolicyAgent:
    """Runs ``policy.predict_chunk`` whenever the queue runs dry, with a fresh goal from ``goals`` each time."""

    def __init__(self, policy: ChunkPolicy, goals: GoalProvider | None = None, exec_len: int | None = None,
                 n_steps: int | None = None, ensemble_decay: float | None = None, seed: int = 0):
        if not isinstance(policy, ChunkPolicy):
            missing = [name for name in ("space", "cameras", "image_sizes", "goal_camera", "uses_goal",
                                         "uses_language", "exec_len", "predict_chunk") if not hasattr(policy, name)]
            raise TypeError(f"PolicyAgent needs a ghil.interfaces.ChunkPolicy; {type(policy).__name__} lacks "
                            f"{missing}")
        goals = goals if goals is not None else NoGoal()
        if not isinstance(goals, GoalProvider):
            raise TypeError(f"goals must be a ghil.interfaces.GoalProvider (reset(), goal(obs)), got "
                            f"{type(goals).__name__}")
        # Stage compatibility is checked here, when the agent is built, not on the first step of an evaluation.
        if policy.uses_goal and isinstance(goals, NoGoal):
            raise ValueError("this policy is goal-conditioned (uses_goal=true): give it a goal provider (e.g. "
                             "agent=oracle_subgoal_policy), or load a language-only checkpoint (agent=flat_policy)")
        if not policy.uses_goal and not isinstance(goals, NoGoal):
            raise ValueError(f"this policy takes no goal image (uses_goal=false, a language-only checkpoint), but "
                             f"the agent was given the goal provider {type(goals).__name__}: use agent=flat_policy, "
                             "or a goal-conditioned checkpoint")
        # Planner stages that work in the policy's encoder token space (planners/token_subgoals.py) check that
        # space here and from now on share the policy's per-frame tokens (each frame encoded once per step).
        bind = getattr(goals, "bind_policy", None)
        if callable(bind):
            bind(policy)
        self.policy = policy
        self.goals = goals
        self.exec_len = int(exec_len or policy.exec_len)
        self.n_steps = n_steps
        self.space = policy.space
        self.queue = ChunkQueue(self.exec_len, ensemble_decay=ensemble_decay, gripper_index=self.space.gripper_index)
        self._subgoal: Subgoal | None = None
        self.seed(seed)

    def seed(self, seed: int) -> None:
        """Restart every random stream from ``seed`` (the policy's sampling noise, a seedable goal provider's)."""
        self._generator = torch.Generator().manual_seed(derive_seed(seed, _POLICY_STREAM))
        if isinstance(self.goals, Seedable):
            self.goals.seed(derive_seed(seed, _GOALS_STREAM))

    def reset(self) -> None:
        self.queue.clear()
        self.goals.reset()
        self._subgoal = None

    def act(self, obs: Observation) -> np.ndarray:
        if self.queue.empty():
            self._subgoal = self.goals.goal(obs)
            if self.policy.uses_goal and self._subgoal is None:
                raise RuntimeError(f"{type(self.goals).__name__} returned no goal for a goal-conditioned policy")
            goal = None if self._subgoal is None else self._subgoal.image
            tokens = None if self._subgoal is None else self._subgoal.tokens
            extra = {} if tokens is None else {"goal_tokens": tokens}  # a token-space subgoal: steer by its tokens
            with torch.no_grad():
                self.queue.push(self.policy.predict_chunk(obs, goal, n_steps=self.n_steps,
                                                          generator=self._generator, **extra))
        return self.queue.pop().numpy().astype(np.float64)

    def describe(self) -> AgentDescription:
        return AgentDescription(status=f"policy: {len(self.queue)} actions queued, {self.queue.n_pushed} chunks",
                                subgoal=self._subgoal)
