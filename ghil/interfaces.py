"""The small interfaces the stages of ghil meet at.

``CalvinAgent`` is CALVIN's ``CalvinBaseModel`` contract (``reset()`` / ``step(obs, goal)``): anything with these two
methods can be evaluated by ``ghil eval``, whether it is the scripted expert reading privileged state, a flat
policy or the full hierarchy. An agent may also expose ``describe()``; rollout videos then show its reasoning text
and chosen subgoal image next to the camera.

Usage::

    class Zero:                                   # satisfies CalvinAgent
        def reset(self) -> None: ...
        def step(self, obs: dict, instruction: str): return np.r_[np.zeros(6), 1.0]
    isinstance(Zero(), CalvinAgent)               # True (structural, checked at runtime)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class CalvinAgent(Protocol):
    """CALVIN's ``CalvinBaseModel``: ``reset()`` before every subtask, then one ``step`` per env step.

    ``obs`` is the env's observation dict (``rgb_obs``, ``depth_obs``, ``robot_obs`` (15,), ``scene_obs`` (24,));
    ``instruction`` is the raw language string. The returned action is anything calvin_env accepts, normally a
    7-vector ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` of relative values in [-1, 1], gripper exactly +-1.
    """

    def reset(self) -> None: ...

    def step(self, obs: dict, instruction: str) -> Any: ...


@dataclass(frozen=True)
class AgentDescription:
    """What an agent is thinking at the current step, for rollout videos and logs."""

    reasoning: str | None = None  # free text: plan, current subtask, chain-of-thought
    subgoal: np.ndarray | None = None  # (H, W, 3) uint8 image the low-level policy is steering towards

    @staticmethod
    def coerce(value: AgentDescription | Mapping | None) -> AgentDescription:
        """Accept the dataclass, a ``{"reasoning", "subgoal"}`` mapping (CALVIN-style agents) or ``None``."""
        if value is None:
            return AgentDescription()
        if isinstance(value, AgentDescription):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"reasoning", "subgoal"}
            if unknown:
                raise ValueError(f"describe() returned unknown keys {sorted(unknown)}; expected reasoning, subgoal")
            return AgentDescription(value.get("reasoning"), value.get("subgoal"))
        raise TypeError(f"describe() must return an AgentDescription or a mapping, got {type(value).__name__}")


@runtime_checkable
class DescribedAgent(CalvinAgent, Protocol):
    """A ``CalvinAgent`` that can explain its current step (optional; videos use it when present)."""

    def describe(self) -> AgentDescription: ...


# -- learning (policies, trainer) -------------------------------------------------------------------------------


@runtime_checkable
class ChunkPolicy(Protocol):
    """Predicts a chunk of actions towards a goal. Holds no episode state: the queue lives in ``ghil.runtime``.

    ``obs`` is a ``ghil.types.Observation``; ``goal`` an (H, W, 3) uint8 goal image, or None for policies that
    take no goal image (the flat language baseline). Returns a ``ghil.types.ActionChunk`` in robot units.
    """

    def predict_chunk(self, obs: Any, goal: Any) -> Any: ...


@runtime_checkable
class Learnable(Protocol):
    """Anything ``ghil.train.Trainer`` can optimise: a loss on a batch plus ``save_pretrained`` for checkpoints.

    ``loss`` returns the scalar to minimise and a dict of floats to log (named without the ``train/`` prefix).
    """

    def loss(self, batch: Any) -> tuple[Any, dict[str, float]]: ...

    def save_pretrained(self, path: Any) -> None: ...


@runtime_checkable
class Logger(Protocol):
    """Where training metrics go (TensorBoard, JSONL): ``log(step, {"train/loss": 0.1})``."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...
