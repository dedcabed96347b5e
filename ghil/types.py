"""Typed values passed between ghil's stages: what a policy sees, what it returns, and what it trains on.

Units are CALVIN's: positions in metres, angles in radians, images uint8 RGB, gripper commands exactly -1 (close)
or +1 (open). Nothing here is ever normalised: normalisation lives inside each model (``ghil.normalizer``).

Usage::

    obs = Observation(images={"rgb_static": static, "rgb_gripper": wrist}, proprio=robot_obs, t=0)
    chunk = policy.predict_chunk(obs, goal=subgoal_image)      # ActionChunk
    chunk.actions.shape                                        # (chunk_len, 7) for the rel_ee action space
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


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
    instruction: str | None = None  # the language instruction in force, when the policy uses language


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

    @property
    def batch_size(self) -> int:
        return int(self.proprio.shape[0])

    def to(self, device: torch.device | str) -> PolicyBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                moved[f.name] = value.to(device, non_blocking=True)
            elif isinstance(value, dict):
                moved[f.name] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        return replace(self, **moved)
