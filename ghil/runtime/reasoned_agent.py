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

**Decomposition** (a composite instruction, ``eval.mode=long_horizon``): the reasoning's PLAN is the sequence of
subtasks and the agent keeps a cursor in it that only moves forward, one step at a time, after the reasoner has named
the next subtask in ``advance_after`` new reasonings in a row (the image shows the current one done; ``VLMReasoner``
reasons in full again right after a full reasoning changed the SUBTASK, so the default 2 is two full looks). A SUBTASK naming an earlier
step, one beyond the next, or nothing in the plan leaves the current subtask in force: one misread frame neither
undoes finished work nor skips a step, which the protocol would score as a failure of the unfinished one.

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

__all__ = ["ReasonedAgent", "PlanFollower"]


class PlanFollower:
    """The subtask in force over a stream of reasonings (the decomposition rule of the module docstring); shared by
    ``ReasonedAgent`` and the ROS reasoner node. ``update(reasoning)`` for each new reasoning, ``current(reasoning)``
    to re-read the one in force without counting it again."""

    def __init__(self, advance_after: int = 2):
        if int(advance_after) < 1:
            raise ValueError(f"advance_after must be >= 1, got {advance_after}")
        self.advance_after = int(advance_after)
        self.reset()

    def reset(self) -> None:
        self.plan: tuple[str, ...] | None = None
        self.cursor, self._votes = 0, 0
        self._seen: Reasoning | None = None

    def update(self, reasoning: Reasoning) -> str:
        # The same object again (an asynchronous reasoner with nothing newer) is no new evidence.
        fresh, self._seen = reasoning is not self._seen, reasoning
        return self._follow(reasoning, fresh=fresh)

    def current(self, reasoning: Reasoning) -> str:
        return self._follow(reasoning, fresh=False)

    def _follow(self, reasoning: Reasoning, fresh: bool) -> str:
        """The reasoning's own subtask for a one-step plan, else the plan cursor's ("" when there is none)."""
        said = (reasoning.subtask or "").strip()
        plan = tuple(step.strip() for step in reasoning.plan if step.strip())
        if len(plan) < 2:
            self.plan = None
            return said
        if plan != self.plan:  # a new plan (the first reasoning, or another instruction): start at its first step
            self.plan, self.cursor, self._votes = plan, 0, 0
        if fresh:
            if self.cursor + 1 < len(plan) and said == plan[self.cursor + 1]:
                self._votes += 1
                if self._votes >= self.advance_after:
                    self.cursor, self._votes = self.cursor + 1, 0
            else:
                self._votes = 0  # "in a row": any other reading starts the count again
        return plan[self.cursor]


class ReasonedAgent:
    """See the module docstring; an ``Agent`` itself (``space``, ``reset``, ``act``, ``describe``, ``seed``)."""

    def __init__(self, agent: Agent, reasoner: Reasoner, reason_every: int = 4, asynchronous: bool = False,
                 advance_after: int = 2):
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
        self.follower = PlanFollower(advance_after)
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
        self.follower.reset()

    def act(self, obs: Observation) -> np.ndarray:
        t = int(obs.t)
        fresh = self._t_reasoned is None or t - self._t_reasoned >= self.reason_every or t < self._t_reasoned
        if fresh:
            self._reasoning = self.reasoner.reason(obs)
            self._t_reasoned = t
        follow = self.follower.update if fresh else self.follower.current
        subtask = follow(self._reasoning) or obs.instruction
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
