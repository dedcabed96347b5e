"""ReasonedAgent: a reasoner in front of any runtime agent. The reasoner's SUBTASK becomes the instruction every
lower stage sees (the generator, the filter and the policy), so one free-form instruction runs as the reasoner
decomposes it.

Every ``reason_every`` steps (and at the first step of an episode) the reasoner sees the observation with the
user's instruction; between those steps its last reasoning stays in force (the reasoner itself decides full vs
frozen-prefix reasoning, ``planners.reasoner.VLMReasoner``); with ``asynchronous=True`` it runs on a worker thread
(``ghil.runtime.async_reasoner.AsyncReasoner``) and each call takes its freshest complete reasoning (robots;
``ghil eval`` keeps the synchronous mode for exact reproduction). When the subtask changes, the inner agent is reset
(its goal provider replans for the new subtask, stale queued actions are dropped), exactly as CALVIN resets an agent
between subtasks. A reasoning with an empty subtask leaves the instruction in force.

Usage::

    agent = ReasonedAgent(PolicyAgent(policy, goals=goals), reasoner=VLMReasoner(backend), reason_every=4)
    agent.reset(); action = agent.act(obs)          # obs.instruction: the user's instruction
    agent.describe().reasoning                      # what the reasoner said, for videos and the status
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ghil.interfaces import Agent, Reasoner, Seedable
from ghil.types import AgentDescription, Observation, Reasoning

__all__ = ["ReasonedAgent"]


class ReasonedAgent:
    """See the module docstring; an ``Agent`` itself (``space``, ``reset``, ``act``, ``describe``, ``seed``)."""

    def __init__(self, agent: Agent, reasoner: Reasoner, reason_every: int = 4, asynchronous: bool = False):
        if not isinstance(agent, Agent):
            raise TypeError(f"agent must be a ghil.interfaces.Agent, got {type(agent).__name__}")
        if not isinstance(reasoner, Reasoner):
            raise TypeError(f"reasoner must be a ghil.interfaces.Reasoner (reason(obs)), got {type(reasoner).__name__}")
        if int(reason_every) < 1:
            raise ValueError(f"reason_every must be >= 1, got {reason_every}")
        if asynchronous:  # beside the control loop: each call returns the freshest complete reasoning
            from ghil.runtime.async_reasoner import AsyncReasoner

            reasoner = AsyncReasoner(reasoner)
        self.agent, self.reasoner, self.reason_every = agent, reasoner, int(reason_every)
        self.space = agent.space
        self._reasoning: Reasoning | None = None
        self._subtask: str | None = None
        self._t_reasoned: int | None = None
        self.subtasks_seen: list[str] = []

    def seed(self, seed: int) -> None:
        if isinstance(self.agent, Seedable):
            self.agent.seed(seed)

    def reset(self) -> None:
        self.agent.reset()
        reset = getattr(self.reasoner, "reset", None)
        if callable(reset):
            reset()
        self._reasoning, self._subtask, self._t_reasoned = None, None, None
        self.subtasks_seen = []

    def act(self, obs: Observation) -> np.ndarray:
        t = int(obs.t)
        if self._t_reasoned is None or t - self._t_reasoned >= self.reason_every or t < self._t_reasoned:
            self._reasoning = self.reasoner.reason(obs)
            self._t_reasoned = t
        subtask = (self._reasoning.subtask or "").strip() or obs.instruction
        if subtask != self._subtask:
            if self._subtask is not None:
                self.agent.reset()  # a new subtask: the goal provider replans, queued actions of the old one go
            self._subtask = subtask
            self.subtasks_seen.append(subtask)
        return self.agent.act(dataclasses.replace(obs, instruction=subtask))

    def describe(self) -> AgentDescription:
        inner = AgentDescription.coerce(self.agent.describe())
        status = f"subtask: {self._subtask}" + (f"; {inner.status}" if inner.status else "")
        return AgentDescription(status=status, reasoning=self._reasoning, subgoal=inner.subgoal)
