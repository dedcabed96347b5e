"""The simulator edge: CALVIN observation dicts in, typed ``ghil.types.Observation`` out, and any runtime
``ghil.interfaces.Agent`` behind CALVIN's agent interface. Nothing past this module reads a CALVIN dict.

``Observation.images`` keeps the env's lazy camera mapping (the playtable renders a camera only when it is read),
``proprio`` is ``robot_obs`` and ``state`` carries the privileged ``robot_obs`` / ``scene_obs`` that only simulator
stages (oracle subgoals) may read.

Usage::

    agent = as_calvin_agent(PolicyAgent(policy, goals))     # a CalvinAgent: reset(), step(obs, instruction)
    agent.seed(chain_seed); agent.reset()
    env_action = agent.step(env_obs, "open the drawer")     # (7,) relative action, or a joint_abs action dict
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ghil.interfaces import Agent, CalvinAgent, Seedable
from ghil.types import ActionSpace, AgentDescription, Observation


def observation_from_calvin(obs: Mapping, t: int, instruction: str | None) -> Observation:
    """One CALVIN observation dict (``rgb_obs``, ``robot_obs`` (15,), ``scene_obs`` (24,)) as an ``Observation``."""
    missing = [key for key in ("rgb_obs", "robot_obs", "scene_obs") if key not in obs]
    if missing:
        raise KeyError(f"CALVIN observation lacks {missing} (has {sorted(obs)})")
    robot_obs = np.asarray(obs["robot_obs"], dtype=np.float64)
    scene_obs = np.asarray(obs["scene_obs"], dtype=np.float64)
    return Observation(images=obs["rgb_obs"], proprio=robot_obs.astype(np.float32), t=int(t),
                       instruction=instruction, state={"robot_obs": robot_obs, "scene_obs": scene_obs})


def env_action(action: np.ndarray, space: ActionSpace):
    """An action vector of ``space`` in the form calvin_env's ``step`` takes."""
    if space.name == "rel_ee":
        return action
    if space.name == "joint_abs":
        return {"type": "joint_abs", "action": action}
    raise ValueError(f"no CALVIN env action for action space {space.name!r}")


class CalvinAgentAdapter:
    """A runtime ``Agent`` as a ``CalvinAgent``; ``t`` counts the steps since the last ``reset``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._t = 0

    def seed(self, seed: int) -> None:
        if isinstance(self.agent, Seedable):
            self.agent.seed(seed)

    def reset(self) -> None:
        self.agent.reset()
        self._t = 0

    def step(self, obs: dict, instruction: str):
        action = self.agent.act(observation_from_calvin(obs, self._t, instruction))
        self._t += 1
        return env_action(action, self.agent.space)

    def describe(self) -> AgentDescription:
        return self.agent.describe()


def as_calvin_agent(agent) -> CalvinAgent:
    """``agent`` itself when it already is a ``CalvinAgent``, a ``CalvinAgentAdapter`` around a runtime ``Agent``;
    TypeError for anything else."""
    if isinstance(agent, CalvinAgent):
        return agent
    if isinstance(agent, Agent):
        return CalvinAgentAdapter(agent)
    raise TypeError(f"{type(agent).__name__} is neither a CalvinAgent (reset(), step(obs, instruction)) nor a "
                    "ghil Agent (space, reset(), act(obs), describe())")
