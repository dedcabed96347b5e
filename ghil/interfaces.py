"""The small interfaces the stages of ghil meet at: the only things stages share (with the values in ``ghil.types``).

The hierarchy, one Protocol per stage, each taking a typed ``Observation`` (never a simulator dict)::

    Reasoner          reason(obs) -> Reasoning                           instruction + image -> plan, subtask, ...
    SubgoalGenerator  propose(obs, subtask, n_candidates) -> (K, H, W, 3)  K imagined goal frames, one batched call
    SubgoalFilter     score(obs, candidates, subtask) -> (K,)            higher means "makes progress on the task"
    GoalProvider      goal(obs) -> Subgoal | None                        generator + filter, an oracle, or nothing
    ChunkPolicy       predict_chunk(obs, goal) -> ActionChunk            the low-level policy
    Agent             act(obs) -> action                                 the runtime composition (ghil.runtime)

``CalvinAgent`` is CALVIN's ``CalvinBaseModel`` contract (``reset()`` / ``step(obs_dict, instruction)``), the edge
where ``ghil eval`` meets an agent; ``sim_eval.evaluation.adapter`` turns any ``Agent`` into one. Stages that draw
random numbers are ``Seedable``: the evaluation seeds them from the chain's seed at every subtask reset, so records
do not depend on workers, shards or what ran before.

Usage::

    class Zero:                                   # satisfies CalvinAgent
        def reset(self) -> None: ...
        def step(self, obs: dict, instruction: str): return np.r_[np.zeros(6), 1.0]
    isinstance(Zero(), CalvinAgent)               # True (structural, checked at runtime)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ghil.types import ActionChunk, ActionSpace, AgentDescription, Observation, Reasoning, Subgoal

if TYPE_CHECKING:
    import torch

__all__ = ["CalvinAgent", "DescribedAgent", "Seedable", "Agent", "Reasoner", "SubgoalGenerator", "SubgoalFilter",
           "GoalProvider", "ChunkPolicy", "Learnable", "TrainingRecipe", "Logger", "AgentDescription"]


# -- the evaluation edge ----------------------------------------------------------------------------------------


@runtime_checkable
class CalvinAgent(Protocol):
    """CALVIN's ``CalvinBaseModel``: ``reset()`` before every subtask, then one ``step`` per env step.

    ``obs`` is the env's observation dict (``rgb_obs``, ``depth_obs``, ``robot_obs`` (15,), ``scene_obs`` (24,));
    ``instruction`` is the raw language string. The returned action is anything calvin_env accepts, normally a
    7-vector ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` of relative values in [-1, 1], gripper exactly +-1.
    """

    def reset(self) -> None: ...

    def step(self, obs: dict, instruction: str) -> Any: ...


@runtime_checkable
class DescribedAgent(CalvinAgent, Protocol):
    """A ``CalvinAgent`` that can explain its current step (optional; videos use it when present)."""

    def describe(self) -> AgentDescription: ...


@runtime_checkable
class Seedable(Protocol):
    """A stage that draws random numbers; ``seed`` restarts its streams (called at every chain and subtask reset)."""

    def seed(self, seed: int) -> None: ...


# -- the runtime agent and its stages ---------------------------------------------------------------------------


@runtime_checkable
class Agent(Protocol):
    """A composed agent (ghil.runtime.PolicyAgent): one action per observation, episode state inside.

    ``act`` returns one action vector in the units of ``space`` (``rel_ee``: the 7-D CALVIN relative action;
    ``joint_abs``: 7 joint targets + gripper). ``reset`` clears the episode state (new instruction or subtask).
    """

    space: ActionSpace

    def reset(self) -> None: ...

    def act(self, obs: Observation) -> np.ndarray: ...

    def describe(self) -> AgentDescription: ...


@runtime_checkable
class Reasoner(Protocol):
    """Instruction (``obs.instruction``) + camera image -> Embodied-Chain-of-Thought ``Reasoning``."""

    def reason(self, obs: Observation) -> Reasoning: ...


@runtime_checkable
class SubgoalGenerator(Protocol):
    """Imagines the scene a few steps ahead: ``n_candidates`` goal frames from one batched call.

    Returns uint8 ``(K, H, W, 3)`` images, or ``(K, T, H, W, 3)`` clips for video generators.
    """

    def propose(self, obs: Observation, subtask: str, n_candidates: int) -> np.ndarray: ...


@runtime_checkable
class SubgoalFilter(Protocol):
    """Scores candidates by whether they make progress on ``subtask`` from ``obs``: ``(K,)`` floats, higher = keep.

    Clip candidates are scored on their last frame.
    """

    def score(self, obs: Observation, candidates: np.ndarray, subtask: str) -> np.ndarray: ...


@runtime_checkable
class GoalProvider(Protocol):
    """Where a goal-conditioned policy's goal comes from (generator + filter, oracle, nothing). ``goal`` is asked
    whenever the policy plans a new chunk; ``reset`` clears any per-subtask state."""

    def reset(self) -> None: ...

    def goal(self, obs: Observation) -> Subgoal | None: ...


@runtime_checkable
class ChunkPolicy(Protocol):
    """Predicts a chunk of actions towards a goal. Holds no episode state: the queue lives in ``ghil.runtime``.

    ``goal`` is an (H, W, 3) uint8 goal image of camera ``goal_camera``, or None when ``uses_goal`` is false (the
    flat language baseline). ``obs.images`` must hold every camera in ``cameras`` at ``image_sizes``. Returns an
    ``ActionChunk`` in robot units of ``space``; ``exec_len`` of its actions are meant to run before replanning.
    ``generator`` makes sampling reproducible; ``n_steps`` picks the sampler's step count (None: its default).
    """

    space: ActionSpace
    cameras: tuple[str, ...]
    image_sizes: tuple[int, ...]
    goal_camera: str | None
    uses_goal: bool
    uses_language: bool
    exec_len: int

    def predict_chunk(self, obs: Observation, goal: np.ndarray | None = None, n_steps: int | None = None,
                      generator: torch.Generator | None = None) -> ActionChunk: ...


# -- learning (trainer) -----------------------------------------------------------------------------------------


@runtime_checkable
class Learnable(Protocol):
    """Anything ``ghil.train.Trainer`` can optimise: a loss on a batch plus ``save_pretrained`` for checkpoints.

    ``loss`` returns the scalar to minimise and a dict of floats to log (named without the ``train/`` prefix).
    ``attach_ema`` hands the model the trainer's EMA copy of itself (None: no EMA kept); models that bootstrap
    targets from it (shortcut models) keep it, others ignore it.
    """

    def loss(self, batch: Any) -> tuple[Any, dict[str, float]]: ...

    def save_pretrained(self, path: Any) -> Any: ...

    def attach_ema(self, ema: Any) -> None: ...


@runtime_checkable
class TrainingRecipe(Protocol):
    """What ``ghil train`` trains (``recipe=<name>``): builds the model, its datasets and statistics.

    ``build()`` checks everything it can (data present, image sizes, action space) *before* the run folder exists
    and returns a ``ghil.train.TrainingSetup``.
    """

    def build(self) -> Any: ...


@runtime_checkable
class Logger(Protocol):
    """Where training metrics go (TensorBoard, JSONL): ``log(step, {"train/loss": 0.1})``."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...
