"""Typed values passed between ghil's stages: what a stage sees, what it says and what it returns.

Units are CALVIN's: positions in metres, angles in radians, images uint8 RGB, gripper commands exactly -1 (close)
or +1 (open). Nothing here is ever normalised: normalisation lives inside each model (``ghil.normalizer``).
torch is imported lazily, so the core (simulator, evaluation of the scripted expert) runs without it.

The flow: ``Observation`` -> ``Reasoning`` (reasoner) -> ``Subgoal`` (generator + filter) -> ``ActionChunk``
(policy); ``AgentDescription`` carries what an agent thought at a step, for videos and logs.

Usage::

    obs = Observation(images={"rgb_static": static, "rgb_gripper": wrist}, proprio=robot_obs, t=0,
                      instruction="open the drawer")
    chunk = policy.predict_chunk(obs, goal=subgoal.image)      # ActionChunk
    chunk.actions.shape                                        # (chunk_len, 7) for the rel_ee action space
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import Tensor

ArrayLike = Any  # np.ndarray | torch.Tensor (torch stays an optional import)


@dataclass(frozen=True)
class ActionSpace:
    """One kind of action a policy can emit, with where the dataset stores it and where its gripper lives."""

    name: str  # short key used in configs: "rel_ee" | "joint_abs"
    dataset_key: str  # the CALVIN frame key holding the per-step action vector
    dim: int  # length of one action vector
    gripper_index: int  # index of the +-1 gripper command inside the vector
    low: tuple[float, ...] | None  # per-dimension hard bounds in robot units (None: the normaliser's fitted range)
    high: tuple[float, ...] | None
    units: str  # a human-readable description, for model cards and errors


# CALVIN's relative end-effector actions: [dx, dy, dz, droll, dpitch, dyaw] scaled so that |a| <= 1 (calvin_env
# multiplies by 0.02 m / 0.05 rad per step), and the gripper command.
REL_EE = ActionSpace("rel_ee", "rel_actions", 7, 6, (-1.0,) * 7, (1.0,) * 7,
                     "relative end-effector [dx, dy, dz, droll, dpitch, dyaw] in [-1, 1] (CALVIN scaling), gripper +-1")
# Absolute Panda joint targets (ghil's joint_actions key, published as joint commands by the ROS node).
JOINT_ABS = ActionSpace("joint_abs", "joint_actions", 8, 7, None, None,
                        "absolute Panda joint targets q1..q7 in rad, gripper +-1")
ACTION_SPACES: dict[str, ActionSpace] = {space.name: space for space in (REL_EE, JOINT_ABS)}


def action_space(name: str) -> ActionSpace:
    """The ActionSpace called ``name``; ValueError naming the known ones otherwise."""
    if name not in ACTION_SPACES:
        raise ValueError(f"unknown action space {name!r}; known: {sorted(ACTION_SPACES)}")
    return ACTION_SPACES[name]


def binarize_gripper(actions: Tensor, gripper_index: int) -> Tensor:
    """A copy of ``actions`` (..., d) whose gripper column is exactly +1 (open, also for 0) or -1 (close)."""
    import torch

    out = actions.clone()
    g = out[..., gripper_index]
    out[..., gripper_index] = torch.where(g >= 0, torch.ones_like(g), -torch.ones_like(g))
    return out


@dataclass(frozen=True)
class Observation:
    """One control step's observation, as the robot or simulator produced it.

    Usage::

        Observation(images={"rgb_static": env_obs["rgb_obs"]["rgb_static"]}, proprio=env_obs["robot_obs"], t=k)
    """

    images: Mapping[str, ArrayLike]  # camera name -> (H, W, 3) uint8 RGB
    proprio: ArrayLike  # (15,) CALVIN robot_obs: tcp pos m (3), tcp euler rad (3), gripper width m, 7 joints rad, gripper action +-1
    t: int = 0  # control step of this observation within the episode
    instruction: str | None = None  # the language instruction in force
    # Privileged simulator state (CALVIN: "robot_obs" (15,), "scene_obs" (24,)), read only by simulator-side stages
    # (oracle subgoals, the scripted expert); always empty on a robot.
    state: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionChunk:
    """Actions predicted from the observation at step ``t0``, in robot units (never normalised)."""

    actions: Tensor  # (chunk_len, action_dim) float32, in the units of ``space``
    t0: int  # control step of the observation this chunk was predicted from
    space: str = "rel_ee"  # ActionSpace name

    def __post_init__(self) -> None:
        if self.actions.ndim != 2:
            raise ValueError(f"ActionChunk.actions must be (chunk_len, action_dim), got shape {tuple(self.actions.shape)}")


@dataclass(frozen=True)
class PolicyBatch:
    """A training batch for a goal-conditioned action-chunk policy (built by ``ghil.data.policy_dataset``).

    Usage::

        batch = collate_policy(samples).to("cuda")
        loss, metrics = policy.loss(batch)
    """

    images: dict[str, Tensor]  # camera name -> (B, H, W, 3) uint8
    proprio: Tensor  # (B, proprio_dim) float32, robot units
    actions: Tensor  # (B, chunk_len, action_dim) float32, robot units
    action_mask: Tensor  # (B, chunk_len) bool; False for steps past the end of the episode (padding)
    goal: Tensor | None = None  # (B, H, W, 3) uint8 goal image from the same trajectory, or None
    instructions: tuple[str | None, ...] | None = None  # B language instructions (None: no annotation)
    # Frozen-encoder training (``data.features``, ghil/data/features.py): per-camera (B, n_tokens, width) tokens of
    # the frozen image encoders, and the goal encoder's (B, n_tokens, width); the policy then reads no pixels
    # (``images`` is empty and ``goal`` None).
    features: dict[str, Tensor] | None = None
    goal_features: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.proprio.shape[0])

    def to(self, device: torch.device | str) -> PolicyBatch:
        from torch import Tensor

        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                moved[f.name] = value.to(device, non_blocking=True)
            elif isinstance(value, dict):
                moved[f.name] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        return replace(self, **moved)


# -- what the planning stages say -------------------------------------------------------------------------------

# How a composite instruction joins its parts ("open the drawer, then push the blue block left"): the long-horizon
# evaluation's wording, and how a reasoner's TASK splits into its PLAN.
COMPOSITE_SEPARATOR = ", then "
ECOT_TAGS = ("TASK", "PLAN", "VISIBLE OBJECTS", "SUBTASK REASONING", "SUBTASK", "MOVE REASONING", "MOVE",
             "GRIPPER POSITION")  # Embodied Chain-of-Thought's tags, always in this order


@dataclass(frozen=True)
class Reasoning:
    """One Embodied-Chain-of-Thought reasoning (the fields of ``ECOT_TAGS``, in order). Its ``subtask`` is the
    language that conditions the subgoal generator, the filter and the policy.

    Usage::

        Reasoning(task="open the drawer", plan=("open the drawer",), subtask="open the drawer", move="move left")
    """

    task: str  # the instruction, restated
    plan: tuple[str, ...] = ()  # the high-level steps, in order
    visible_objects: Mapping[str, tuple[int, int, int, int]] = field(default_factory=dict)  # name -> [x0, y0, x1, y1] px
    subtask_reasoning: str = ""  # why this subtask now
    subtask: str = ""  # the current subtask
    move_reasoning: str = ""  # why this motion
    move: str = ""  # motion primitive phrase ("move left down", "close gripper", "stop")
    gripper_position: tuple[tuple[float, float], ...] = ()  # future gripper pixels (u, v), now first

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", tuple(str(p) for p in self.plan))
        object.__setattr__(self, "visible_objects",
                           {str(k): tuple(int(c) for c in box) for k, box in dict(self.visible_objects).items()})
        object.__setattr__(self, "gripper_position", tuple((float(u), float(v)) for u, v in self.gripper_position))
        bad = [k for k, box in self.visible_objects.items() if len(box) != 4 or box[0] > box[2] or box[1] > box[3]]
        if bad:
            raise ValueError(f"Reasoning.visible_objects: boxes must be [x0, y0, x1, y1] with x0 <= x1, y0 <= y1; "
                             f"bad: {bad}")


def _check_image(name: str, value: np.ndarray, ndim: int) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != ndim or value.shape[-1] != 3:
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"Subgoal.{name} must be a uint8 array of {ndim} dims ending in 3 (RGB), got shape {shape} "
                         f"dtype {dtype}")


@dataclass(frozen=True)
class Subgoal:
    """The goal the low-level policy steers towards, with the candidates it was chosen from.

    An image generator gives ``image`` alone; a video generator also gives ``clip`` (the imagined future frames, the
    last one the filter scored) and the policy may follow it frame by frame. ``candidates``/``scores`` are what the
    filter saw (None when the goal did not come from a filtered generator, e.g. oracle goals).

    Usage::

        Subgoal(image=frames[k], candidates=frames, scores=np.array([0.1, 0.9]), chosen=1, source="susie")
    """

    image: np.ndarray  # (H, W, 3) uint8: the goal frame in force
    clip: np.ndarray | None = None  # (T, H, W, 3) uint8 imagined future frames (video generators)
    candidates: np.ndarray | None = None  # (K, H, W, 3) or (K, T, H, W, 3) uint8
    scores: np.ndarray | None = None  # (K,) float, higher means keep
    chosen: int = 0  # index of the kept candidate
    source: str = ""  # which stage made it: "oracle", "susie", ...
    tokens: np.ndarray | None = None  # (n_tokens, W) float: the goal in the policy's goal-encoder space, when a
    # token-space generator made it (``image`` is then its decoded preview); the policy steers by these

    def __post_init__(self) -> None:
        _check_image("image", self.image, 3)
        if self.tokens is not None:
            tokens = np.asarray(self.tokens)
            if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.floating) or not np.isfinite(tokens).all():
                raise ValueError(f"Subgoal.tokens must be finite float (n_tokens, W), got {tokens.dtype} "
                                 f"{tokens.shape}")
        if self.clip is not None:
            _check_image("clip", self.clip, 4)
        if self.candidates is not None:
            if self.candidates.ndim not in (4, 5):
                raise ValueError(f"Subgoal.candidates must be (K, H, W, 3) or (K, T, H, W, 3), got "
                                 f"{self.candidates.shape}")
            _check_image("candidates", self.candidates, self.candidates.ndim)
            k = len(self.candidates)
            if not 0 <= self.chosen < k:
                raise ValueError(f"Subgoal.chosen {self.chosen} is not one of the {k} candidates")
            if self.scores is not None and np.shape(self.scores) != (k,):
                raise ValueError(f"Subgoal.scores must be ({k},), one per candidate, got {np.shape(self.scores)}")
        elif self.scores is not None:
            raise ValueError("Subgoal.scores given without candidates")


@dataclass(frozen=True)
class AgentDescription:
    """What an agent thought at the current step, for rollout videos and logs.

    Usage::

        AgentDescription(status="step 12, 4 queued", reasoning=reasoning, subgoal=subgoal)
    """

    status: str | None = None  # one free-text line: phase, queue, replan counter
    reasoning: Reasoning | None = None  # the reasoner's current output
    subgoal: Subgoal | None = None  # the goal in force, with its candidates and their scores

    @property
    def goal_image(self) -> np.ndarray | None:
        return None if self.subgoal is None else self.subgoal.image

    @staticmethod
    def coerce(value: AgentDescription | Mapping | None) -> AgentDescription:
        """Accept the dataclass, a CALVIN-style ``{"status" | "reasoning": str, "subgoal": image}`` mapping or None."""
        if value is None:
            return AgentDescription()
        if isinstance(value, AgentDescription):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"status", "reasoning", "subgoal"}
            if unknown:
                raise ValueError(f"describe() returned unknown keys {sorted(unknown)}; expected status, reasoning, "
                                 "subgoal")
            reasoning = value.get("reasoning")
            status = value.get("status")
            if isinstance(reasoning, str):  # free-text reasoning of a CALVIN-style agent: shown as its status
                status, reasoning = " ".join(s for s in (status, reasoning) if s), None
            subgoal = value.get("subgoal")
            if subgoal is not None and not isinstance(subgoal, Subgoal):
                image = np.asarray(subgoal)
                if image.dtype != np.uint8:  # float images in [0, 1], as CALVIN-style agents often keep them
                    image = (np.clip(np.nan_to_num(image.astype(np.float64)), 0.0, 1.0) * 255).round().astype(np.uint8)
                subgoal = Subgoal(image=image[..., :3])
            return AgentDescription(status, reasoning, subgoal)
        raise TypeError(f"describe() must return an AgentDescription or a mapping, got {type(value).__name__}")
