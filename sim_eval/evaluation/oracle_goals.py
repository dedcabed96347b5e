"""Oracle subgoals: the true future frame, as the upper bound of any subgoal generator (a ``GoalProvider``).

Privileged, so it lives on the simulator side: it reads ``Observation.state`` (``robot_obs``, ``scene_obs``) and
runs the scripted expert in a private copy of the *evaluated* env (built from the same env config, so goals come
from the same renderer and camera as the observations; ``env=calvin`` gives calvin_env goals).

Two ways to pick "the true future":

* ``from_current_state=False`` (reference): at the start of a subtask the expert solves it once and every frame of
  that rollout is kept; each request returns the frame ``lookahead`` steps beyond the reference state nearest to
  where the robot is now (searched forward from the last match, so progress never runs backwards). Cheap, but once
  the policy strays from the reference its goals still show the reference's path.
* ``from_current_state=True`` (re-rolled): every request teleports the copy to the current state, lets the expert
  act for ``lookahead`` steps and renders the last frame, so each goal is exactly what the expert would reach from
  here (the training distribution: goals are frames of the same trajectory ``k`` steps ahead). ~50 ms per request.

A composite instruction (``eval.mode=long_horizon``: five subtasks in one sentence) is split into its subtasks; the
goals follow the current one and move to the next when the task oracle, checked on the private copy at the
robot's state, reports the current one done.

Usage::

    goals = OracleSubgoal(env=PlayTableEnv(cameras=["static"]), lookahead=16, from_current_state=True)
    goals.reset()
    subgoal = goals.goal(observation)       # Subgoal(image=(200, 200, 3) uint8, source="oracle")
"""

from __future__ import annotations

import numpy as np

from ghil.types import Observation, Subgoal
from sim_eval.demonstrations.expert import ScriptedExpert
from sim_eval.protocol.instructions import InstructionIndex
from sim_eval.protocol.oracle import oracle_for

MAX_REFERENCE_STEPS = 360  # CALVIN's EP_LEN: the expert's plan ends well before
SEARCH_WINDOW = 40  # reference steps searched ahead of the last match


class OracleSubgoal:
    """Goal images from the scripted expert's rollout in a private copy of the env (see module docstring)."""

    def __init__(self, env, lookahead: int = 16, from_current_state: bool = False):
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 step, got {lookahead}")
        if "static" not in getattr(env, "camera_names", ["static"]):
            raise ValueError("OracleSubgoal renders goals with the env's static camera; its env has cameras "
                             f"{env.camera_names}")
        self.lookahead = int(lookahead)
        self.from_current_state = bool(from_current_state)
        self._sim = env
        self._oracle = oracle_for(env)
        self._expert = ScriptedExpert()
        self._index = InstructionIndex()
        self.reset()

    def seed(self, seed: int) -> None:
        """Seeds the private env's visual variation (playtable ``env.variation``), as the evaluation does its env."""
        if isinstance(getattr(self._sim, "rng", None), np.random.Generator):
            self._sim.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        self._instruction: str | None = None
        self._tasks: list[str] = []  # the instruction's subtasks (one, except for composite instructions)
        self._k = 0  # index of the current subtask
        self._start_info: dict | None = None  # env info when the current subtask started (composite only)
        self._frames: list[np.ndarray] = []
        self._states: np.ndarray | None = None  # (T, 3 + 1 + 24): tcp xyz, gripper width, scene_obs
        self._matched = 0

    @staticmethod
    def _state_key(robot_obs: np.ndarray, scene_obs: np.ndarray) -> np.ndarray:
        return np.concatenate([robot_obs[:3], robot_obs[6:7], scene_obs])

    def _teleport(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> dict:
        return self._sim.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def _current_task(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> str:
        """The subtask in force; for composite instructions, advance when the oracle says the current one is done."""
        if len(self._tasks) > 1:
            self._teleport(robot_obs, scene_obs)
            info = self._sim.get_info()
            if self._start_info is None:
                self._start_info = info
            elif self._k + 1 < len(self._tasks) and self._oracle.get_task_info_for_set(
                    self._start_info, info, {self._tasks[self._k]}):
                self._k += 1
                self._start_info = info
                self._frames = []  # the reference belongs to the finished subtask
        return self._tasks[self._k]

    def _roll_reference(self, task: str, robot_obs: np.ndarray, scene_obs: np.ndarray) -> None:
        sim_obs = self._teleport(robot_obs, scene_obs)
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

    def _roll_from_current(self, task: str, robot_obs: np.ndarray, scene_obs: np.ndarray) -> np.ndarray:
        sim_obs = self._teleport(robot_obs, scene_obs)
        self._expert.reset(task)
        for _ in range(self.lookahead):
            action, phase = self._expert.act(sim_obs["robot_obs"], sim_obs["scene_obs"])
            if phase == "done":
                break
            sim_obs, *_ = self._sim.step(action)
        return sim_obs["rgb_obs"]["rgb_static"]  # rendered here only: the intermediate frames are never read

    def goal(self, obs: Observation) -> Subgoal:
        missing = [key for key in ("robot_obs", "scene_obs") if key not in obs.state]
        if missing:
            raise ValueError(f"OracleSubgoal is privileged: it needs the simulator state {missing} in "
                             "Observation.state, which only a simulator provides (use a subgoal generator on a robot)")
        if not obs.instruction:
            raise ValueError("OracleSubgoal needs the instruction (Observation.instruction) to know the task")
        robot_obs = np.asarray(obs.state["robot_obs"], dtype=np.float64)
        scene_obs = np.asarray(obs.state["scene_obs"], dtype=np.float64)
        if obs.instruction != self._instruction:
            self.reset()
            self._tasks = self._index.tasks_for(obs.instruction)  # an unknown phrasing raises
            self._instruction = obs.instruction
        task = self._current_task(robot_obs, scene_obs)
        if self.from_current_state:
            image = self._roll_from_current(task, robot_obs, scene_obs)
        else:
            if not self._frames:
                self._roll_reference(task, robot_obs, scene_obs)
            key = self._state_key(robot_obs, scene_obs)
            window = self._states[self._matched:self._matched + SEARCH_WINDOW]
            self._matched += int(np.argmin(np.linalg.norm(window - key, axis=1)))
            image = self._frames[min(self._matched + self.lookahead, len(self._frames) - 1)]
        return Subgoal(image=np.ascontiguousarray(image, dtype=np.uint8), source="oracle")
