"""Oracle subgoals: the true future frame, as the upper bound of any subgoal generator.

At the start of a subtask the scripted expert solves it in a private copy of the playtable, teleported to the
current state; every frame of that reference rollout is kept. Each later request returns the copy's static-camera
frame ``lookahead`` steps beyond the reference state nearest to where the robot is now (searched forward from the
last match, so progress never runs backwards). Privileged: it reads ``robot_obs`` and ``scene_obs``.

Usage::

    goals = OracleSubgoal(lookahead=16)
    goals.reset()
    goal_image = goals.goal(obs, "pull the handle to open the drawer")   # (200, 200, 3) uint8
"""

from __future__ import annotations

import numpy as np

from sim_eval.expert import ScriptedExpert
from sim_eval.instructions import InstructionIndex
from sim_eval.playtable.env import PlayTableEnv

MAX_REFERENCE_STEPS = 360  # CALVIN's EP_LEN: the expert's plan ends well before
SEARCH_WINDOW = 40  # reference steps searched ahead of the last match


class OracleSubgoal:
    """Goal images from the scripted expert's rollout in a copy of the simulator (see module docstring)."""

    def __init__(self, lookahead: int = 16, static_size: int = 200):
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 step, got {lookahead}")
        self.lookahead = int(lookahead)
        self._sim = PlayTableEnv(static_size=static_size, cameras=["static"])
        self._expert = ScriptedExpert()
        self._index = InstructionIndex()
        self.reset()

    def reset(self) -> None:
        self._frames: list[np.ndarray] = []
        self._states: np.ndarray | None = None  # (T, 3 + 1 + 24): tcp xyz, gripper width, scene_obs
        self._matched = 0
        self._instruction: str | None = None

    @staticmethod
    def _state_key(robot_obs: np.ndarray, scene_obs: np.ndarray) -> np.ndarray:
        return np.concatenate([robot_obs[:3], robot_obs[6:7], scene_obs])

    def _roll_reference(self, obs: dict, instruction: str) -> None:
        task = self._index.tasks_for(instruction)[0]
        sim_obs = self._sim.reset(robot_obs=np.asarray(obs["robot_obs"]), scene_obs=np.asarray(obs["scene_obs"]))
        self._expert.reset(task)
        frames, states = [], []
        for _ in range(MAX_REFERENCE_STEPS):
            frames.append(sim_obs["rgb_obs"]["rgb_static"])
            states.append(self._state_key(sim_obs["robot_obs"], sim_obs["scene_obs"]))
            action, phase = self._expert.act(sim_obs["robot_obs"], sim_obs["scene_obs"])
            if phase == "done":
                break
            sim_obs, *_ = self._sim.step(action)
        self._frames, self._states, self._matched = frames, np.stack(states), 0
        self._instruction = instruction

    def goal(self, obs: dict, instruction: str) -> np.ndarray:
        if instruction != self._instruction or not self._frames:
            self._roll_reference(obs, instruction)
        key = self._state_key(np.asarray(obs["robot_obs"]), np.asarray(obs["scene_obs"]))
        window = self._states[self._matched:self._matched + SEARCH_WINDOW]
        self._matched += int(np.argmin(np.linalg.norm(window - key, axis=1)))
        return self._frames[min(self._matched + self.lookahead, len(self._frames) - 1)]
