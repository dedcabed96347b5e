"""Agents for ``ghil eval``: everything here satisfies ``ghil.interfaces.CalvinAgent`` and is built from
``ghil/configs/agent/<name>.yaml``.

* ``ExpertAgent`` (``agent=expert``): the scripted expert behind the CalvinBaseModel interface. Privileged: it reads
  ``robot_obs`` and ``scene_obs`` (never the simulator), and maps the instruction back to its task through every
  known phrasing. A composite (long-horizon) instruction is split into its subtasks, and the agent moves to the next
  one when the current plan is finished.
* ``HoldAgent`` (``agent=hold``): keeps still; the floor of every metric, and a cheap env-speed probe.
* ``FaultyAgent`` (``agent=faulty``): wraps another agent and injects one fault (malformed action or exception)
  at a chosen step, to exercise the harness's error paths.

Usage::

    agent = ExpertAgent()
    agent.reset()
    action = agent.step(obs, "pull the handle to open the drawer")   # (7,) relative action, gripper +-1
    agent.describe().status                                         # 'expert: open_drawer (1/1), phase ...'
"""

from __future__ import annotations

import numpy as np

from ghil.interfaces import CalvinAgent
from ghil.types import AgentDescription
from sim_eval.demonstrations.expert import ScriptedExpert
from sim_eval.protocol.instructions import InstructionIndex


class ExpertAgent:
    """The scripted expert as a ``CalvinAgent`` (privileged state, no images).

    Example::

        agent = ExpertAgent(); agent.reset()
        agent.step(obs, "pull the handle to open the drawer, then go push the red block right")
    """

    def __init__(self) -> None:
        self._expert = ScriptedExpert()
        self._index = InstructionIndex()
        self.reset()

    def reset(self) -> None:
        self._instruction: str | None = None
        self._queue: list[str] = []  # subtasks of the instruction not started yet
        self._n_subtasks = 0
        self._phase = "idle"

    def step(self, obs: dict, instruction: str) -> np.ndarray:
        if instruction != self._instruction:
            tasks = self._index.tasks_for(instruction)  # an unknown phrasing raises UnknownInstructionError
            self._instruction, self._queue, self._n_subtasks = instruction, tasks, len(tasks)
            self._expert.reset(self._queue.pop(0))
        robot_obs, scene_obs = np.asarray(obs["robot_obs"]), np.asarray(obs["scene_obs"])
        action, self._phase = self._expert.act(robot_obs, scene_obs)
        while self._phase == "done" and self._queue:  # long-horizon: this plan is over, start the next subtask
            self._expert.reset(self._queue.pop(0))
            action, self._phase = self._expert.act(robot_obs, scene_obs)
        return action

    def describe(self) -> AgentDescription:
        if self._instruction is None:
            return AgentDescription(status="expert: idle")
        k = self._n_subtasks - len(self._queue)
        return AgentDescription(status=f"expert: {self._expert.task} ({k}/{self._n_subtasks}), phase {self._phase}")


class HoldAgent:
    """Holds the arm still with the gripper open: every subtask times out (unless the scene does it by itself)."""

    def reset(self) -> None:
        pass

    def step(self, obs: dict, instruction: str) -> np.ndarray:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])


FAULTS = ("non_finite", "wrong_length", "bad_gripper", "raise")


class AgentFault(RuntimeError):
    """Raised by ``FaultyAgent(fault="raise")``: a stand-in for an agent that crashes."""


class FaultyAgent:
    """Wraps ``inner`` and injects ``fault`` at step ``at_step`` of the subtask started by reset number
    ``at_reset`` (0-based, counted over the agent's lifetime, i.e. over the chains one worker runs).

    Faults: ``non_finite`` (a NaN in the action), ``wrong_length`` (6 values), ``bad_gripper`` (gripper 0.5),
    ``raise`` (an ``AgentFault`` exception). ``every_step=True`` injects it at every step instead (a misconfigured
    agent that can never act).
    """

    def __init__(self, inner: CalvinAgent, fault: str = "non_finite", at_reset: int = 0, at_step: int = 0,
                 every_step: bool = False) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
        self.inner, self.fault, self.at_reset, self.at_step = inner, fault, int(at_reset), int(at_step)
        self.every_step = bool(every_step)
        self._n_resets = -1
        self._n_steps = 0

    def reset(self) -> None:
        self._n_resets += 1
        self._n_steps = 0
        self.inner.reset()

    def step(self, obs: dict, instruction: str):
        action = np.array(self.inner.step(obs, instruction), dtype=np.float64)
        fire = self.every_step or (self._n_resets == self.at_reset and self._n_steps == self.at_step)
        self._n_steps += 1
        if not fire:
            return action
        if self.fault == "raise":
            if self.every_step:
                raise AgentFault("injected agent failure at every step")
            raise AgentFault(f"injected agent failure at reset {self.at_reset}, step {self.at_step}")
        if self.fault == "non_finite":
            action[0] = np.nan
            return action
        if self.fault == "wrong_length":
            return action[:6]
        action[-1] = 0.5
        return action
