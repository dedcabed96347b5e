"""Oracle subgoals: the true future frame, as the upper bound of any subgoal generator.

Two ways to pick "the true future", both with the scripted expert in a private copy of the playtable teleported to
the robot's state (privileged: they read ``robot_obs`` and ``scene_obs``):

* ``from_current_state=False`` (reference): at the start of a subtask the expert solves it once and every frame of
  that rollout is kept; each request returns the frame ``lookahead`` steps beyond the reference state nearest to
  where the robot is now (searched forward from the last match, so progress never runs backwards). Cheap, but once
  the policy strays from the reference its goals still show the reference's path.
* ``from_current_state=True`` (re-rolled): every request teleports the copy to the current state, lets the expert
  act for ``lookahead`` steps and renders the last frame, so each goal is exactly what the expert would reach from
  here (the training distribution: goals are frames of the same trajectory ``k`` steps ahead). ~50 ms per request.

Usage::

    goals = OracleSubgoal(lookahead=16, from_current_state=True)
    goals.reset()
    goal_image = goals.goal(obs, "pull the handle to open the drawer")   # (200, 200, 3) uint8
"""

from __future__ import annotations

import numpy as np

from sim_eval.demonstrations.expert import ScriptedExpert
from sim_eval.protocol.instructions import InstructionIndex
from sim_eval.world.playtable.env import PlayTableEnv

MAX_REFERENCE_STEPS = 360  # CALVIN's EP_LEN: the expert's plan ends well before
SEARCH_WINDOW = 40  # reference steps searched ahead of the last match


class OracleSubgoal:
    """Goal images from the scripted expert's rollout in a copy of the simulator (see module docstring)."""

    def __init__(self, lookahead: int = 16, static_size: int = 200, from_current_state: bool = False):
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 step, got {lookahead}")
        self.lookahead = int(lookahead)
        self.from_current_state = bool(from_current_state)
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

    def _roll_from_current(self, obs: dict, instruction: str) -> np.ndarray:
        sim_obs = self._sim.reset(robot_obs=np.asarray(obs["robot_obs"]), scene_obs=np.asarray(obs["scene_obs"]))
        self._expert.reset(self._index.tasks_for(instruction)[0])
        for _ in range(self.lookahead):
            action, phase = self._expert.act(sim_obs["robot_obs"], sim_obs["scene_obs"])
            if phase == "done":
                break
            sim_obs, *_ = self._sim.step(action)
        return sim_obs["rgb_obs"]["rgb_static"]  # rendered here only: the intermediate frames are never read

    def goal(self, obs: dict, instruction: str) -> np.ndarray:
        if self.from_current_state:
            return self._roll_from_current(obs, instruction)
        if instruction != self._instruction or not self._frames:
            self._roll_reference(obs, instruction)
        key = self._state_key(np.asarray(obs["robot_obs"]), np.asarray(obs["scene_obs"]))
        window = self._states[self._matched:self._matched + SEARCH_WINDOW]
        self._matched += int(np.argmin(np.linalg.norm(window - key, axis=1)))
        return self._frames[min(self._matched + self.lookahead, len(self._frames) - 1)]
