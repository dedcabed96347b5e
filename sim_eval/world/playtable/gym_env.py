"""gymnasium.Env view of the playtable, for RL libraries and vectorised envs.

Usage::

    env = PlayTableGymEnv()
    obs, info = env.reset(seed=0, options={"scene_obs": scene_obs})
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sim_eval.world import layout
from sim_eval.world.playtable.env import PlayTableEnv


class PlayTableGymEnv(gym.Env):
    """Relative 7-D actions in [-1, 1] (the gripper is thresholded at 0 to exactly +-1), dict observations with
    images materialised (gymnasium expects arrays). Reward is 0 and episodes never terminate, as in CALVIN."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": layout.CONTROL_HZ}

    def __init__(self, static_size: int = 200, gripper_size: int = 84, render_mode: str | None = "rgb_array",
                 **env_kwargs):
        self.sim = PlayTableEnv(static_size=static_size, gripper_size=gripper_size, **env_kwargs)
        self.render_mode = render_mode
        self.action_space = spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float64)
        image = {}
        for name, cam in self.sim.cameras.items():
            image[f"rgb_{name}"] = spaces.Box(0, 255, (cam.height, cam.width, 3), np.uint8)
            image[f"depth_{name}"] = spaces.Box(0.0, cam.far, (cam.height, cam.width), np.float32)
        self.observation_space = spaces.Dict({
            **image,
            "robot_obs": spaces.Box(-np.inf, np.inf, (layout.ROBOT_OBS_DIM,), np.float64),
            "scene_obs": spaces.Box(-np.inf, np.inf, (layout.SCENE_OBS_DIM,), np.float64),
        })
        self._last = None

    def _flatten(self, obs: dict) -> dict:
        flat = {k: obs["rgb_obs"][k] for k in obs["rgb_obs"]}
        flat.update({k: obs["depth_obs"][k] for k in obs["depth_obs"]})
        flat["robot_obs"], flat["scene_obs"] = obs["robot_obs"], obs["scene_obs"]
        self._last = flat
        return flat

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.sim.rng = np.random.default_rng(seed)
        options = options or {}
        obs = self.sim.reset(robot_obs=options.get("robot_obs"), scene_obs=options.get("scene_obs"))
        return self._flatten(obs), self.sim.get_info()

    def step(self, action):
        try:
            raw = np.asarray(action)
        except (TypeError, ValueError):  # ragged: the env's validation names the problem
            raw = None
        # Only real numbers are thresholded; strings, complex or bool values go on unconverted, so the env's
        # validation refuses them (np.asarray(..., dtype=float) would turn "0.1" or 1+0j into a number).
        if raw is not None and raw.dtype.kind in "fiu" and raw.shape == (7,):
            action = raw.astype(np.float64)  # a copy
            if np.isfinite(action[6]):
                action[6] = 1.0 if action[6] >= 0 else -1.0
        obs, reward, done, info = self.sim.step(action)
        return self._flatten(obs), float(reward), False, False, info

    def render(self):
        return None if self._last is None else self._last.get("rgb_static")

    def close(self) -> None:
        self.sim.close()
