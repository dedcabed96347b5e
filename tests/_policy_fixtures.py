"""Shared tiny policy configs and a synthetic CALVIN-format dataset for the learning tests (no simulator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ghil.data.calvin_format import DatasetWriter, FrameSpec
from ghil.normalizer import VectorStats
from ghil.types import Observation, PolicyBatch
from policies.dit import DiTConfig
from ghil.nn.encoders import HashTextConfig, ResNetGNConfig

SIZE = 32


def tiny_config(**overrides) -> DiTConfig:
    base = dict(cameras=("rgb_static", "rgb_gripper"), image_sizes=(SIZE, SIZE), encoder_sizes=(SIZE, 24),
                image_encoder=ResNetGNConfig(channels=(8, 16), blocks=(1, 1), groups=4), width=32, depth=2,
                n_heads=2, ffn_mult=2, chunk_len=4, exec_len=2, time_dim=16, text_encoder=HashTextConfig(16))
    base.update(overrides)
    return DiTConfig(**base)


def fake_stats(action_dim: int = 7, key: str = "rel_actions") -> dict[str, VectorStats]:
    rng = np.random.default_rng(0)
    return {"robot_obs": VectorStats.of(rng.normal(size=(64, 15))),
            key: VectorStats.of(rng.uniform(-1, 1, size=(64, action_dim)))}


def fake_batch(config: DiTConfig, b: int = 3, seed: int = 0) -> PolicyBatch:
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (b, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)  # noqa: E731
    return PolicyBatch(images={c: img() for c in config.cameras}, proprio=torch.randn(b, 15, generator=g),
                       actions=torch.rand(b, config.chunk_len, config.action_dim, generator=g) * 2 - 1,
                       action_mask=torch.ones(b, config.chunk_len, dtype=torch.bool),
                       goal=img() if config.use_goal else None,
                       instructions=tuple(["open the drawer", None, "lift the red block"][i % 3] for i in range(b))
                       if config.use_language else None)


def fake_obs(config: DiTConfig, t: int = 0) -> Observation:
    rng = np.random.default_rng(t)
    return Observation(images={c: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for c in config.cameras},
                       proprio=rng.normal(size=15).astype(np.float32), t=t,
                       instruction="open the drawer" if config.use_language else None)


def fake_goal(config: DiTConfig):
    return np.full((SIZE, SIZE, 3), 128, np.uint8) if config.use_goal else None


def write_synthetic_dataset(root: Path, n_episodes: int = 2, frames_per_episode: int = 12, seed: int = 0) -> Path:
    """A small CALVIN-format dataset whose images encode the frame index (so goals and chunks are learnable)."""
    rng = np.random.default_rng(seed)
    spec = FrameSpec(static_size=SIZE, gripper_size=SIZE, depth=False)
    with DatasetWriter(root, splits=("training",), spec=spec) as writer:
        for e in range(n_episodes):
            frames = []
            for i in range(frames_per_episode):
                rel = np.clip(rng.normal(0, 0.3, 7), -1, 1)
                rel[6] = 1.0 if (i // 4) % 2 == 0 else -1.0
                static = np.zeros((SIZE, SIZE, 3), np.uint8)
                static[:, : 2 + 2 * i] = 200  # a bar growing with time
                robot = rng.normal(size=15)
                robot[14] = rel[6]
                joint = np.r_[rng.normal(size=7) * 0.5, rel[6]]
                frames.append({"actions": np.r_[rng.normal(size=6), rel[6]], "rel_actions": rel, "robot_obs": robot,
                               "scene_obs": np.zeros(24), "rgb_static": static,
                               "rgb_gripper": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                               "joint_actions": joint})
            writer.commit_episode("training", frames, lang=[(0, frames_per_episode - 1, "open_drawer",
                                                             "open the drawer")], episode_key=f"ep{e}")
        writer.finalize()
    return root
