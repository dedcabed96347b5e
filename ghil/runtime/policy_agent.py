"""PolicyAgent: a chunk policy, its chunk queue and a goal provider behind CALVIN's agent interface.

The policy is stateless; the episode state (queued actions, the goal in force, the step counter) lives here, and
``reset()`` (called by the evaluation loop before every subtask) clears all of it.

Usage::

    agent = PolicyAgent(load_pretrained("checkpoints/dit_small"), goals=OracleSubgoal(lookahead=16))
    agent.reset()
    action = agent.step(obs, "pull the handle to open the drawer")   # (7,) relative action, gripper exactly +-1
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ghil.interfaces import AgentDescription
from ghil.runtime.chunks import ChunkQueue
from ghil.types import Observation


class GoalProvider(Protocol):
    """Where the goal image of a goal-conditioned policy comes from (a subgoal generator, an oracle, nothing)."""

    def reset(self) -> None: ...

    def goal(self, obs: dict, instruction: str) -> np.ndarray | None: ...  # (H, W, 3) uint8, or None


class NoGoal:
    """For policies conditioned on language only (the flat baseline)."""

    def reset(self) -> None:
        pass

    def goal(self, obs: dict, instruction: str) -> None:
        return None


class PolicyAgent:
    """Runs ``policy.predict_chunk`` whenever the queue runs dry, with a fresh goal from ``goals`` each time."""

    def __init__(self, policy, goals: GoalProvider | None = None, exec_len: int | None = None,
                 n_steps: int | None = None, ensemble_decay: float | None = None, seed: int = 0):
        self.policy = policy.eval()
        self.goals = goals or NoGoal()
        cfg = policy.config
        if cfg.use_goal and isinstance(self.goals, NoGoal):
            raise ValueError("this policy is goal-conditioned (use_goal=true): give it a goal provider")
        self.exec_len = int(exec_len or cfg.exec_len)
        self.n_steps = n_steps
        self.space = policy.space
        self.queue = ChunkQueue(self.exec_len, ensemble_decay=ensemble_decay, gripper_index=self.space.gripper_index)
        self._generator = torch.Generator().manual_seed(seed)
        self._goal: np.ndarray | None = None
        self._t = 0

    def reset(self) -> None:
        self.queue.clear()
        self.goals.reset()
        self._goal = None
        self._t = 0

    def step(self, obs: dict, instruction: str):
        if self.queue.empty():
            self._goal = self.goals.goal(obs, instruction)
            images = {cam: obs["rgb_obs"][cam] for cam in self.policy.config.cameras}
            observation = Observation(images=images, proprio=np.asarray(obs["robot_obs"], dtype=np.float32),
                                      t=self._t, instruction=instruction)
            with torch.no_grad():
                self.queue.push(self.policy.predict_chunk(observation, self._goal, n_steps=self.n_steps,
                                                          generator=self._generator))
        action = self.queue.pop().numpy().astype(np.float64)
        self._t += 1
        if self.space.name == "joint_abs":
            return {"type": "joint_abs", "action": action}
        return action

    def describe(self) -> AgentDescription:
        return AgentDescription(reasoning=f"step {self._t}, {len(self.queue)} queued", subgoal=self._goal)
