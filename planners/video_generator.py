"""UniPi-style video subgoal generator: a short clip of ``n_frames`` future frames imagined at once.

The clip's frames (evenly spaced up to ``horizon`` steps ahead, the last one the subgoal) are stacked on the
channels of the same diffusers ``UNet2DConditionModel`` the image generator uses, conditioned the same way (the
current frame concatenated on channels, the instruction through cross-attention, InstructPix2Pix condition dropout
and dual guidance; see ``planners.image_generator``). Stacking on channels rather than a 3-D UNet keeps one tested
code path, runs at CPU speed at low resolution, and lets every frame see every other from the first layer; the
price is a fixed clip length per checkpoint. GHIL-Glue's UniPi re-implementation (DynamiCrafter, 16 frames at 256
px) is a GPU model; ``video_small`` is the CPU stand-in (4 frames, 64 px).

``propose`` returns the K clips ``(K, T, H, W, 3)``, as ``ghil.interfaces.SubgoalGenerator`` specifies for video
generators: ``planners.subgoals.GeneratedSubgoals`` has the filter score each clip's last frame and puts the chosen
clip in ``Subgoal.clip``, so the policy can follow it frame by frame (``agent=ghil_glue_video``).
``propose_clips`` is the same call under an explicit name, ``propose_last_frames`` gives the ``(K, H, W, 3)`` last
frames for a caller that wants image subgoals only.

Usage::

    gen = VideoGenerator(VideoConfig(n_frames=4, horizon=16), ShortcutConfig())
    clips = gen.propose(obs, "open the drawer", n_candidates=4)          # (4, 4, 200, 200, 3) uint8
    goals = gen.propose_last_frames(obs, "open the drawer", 4)           # (4, 200, 200, 3): the clips' last frames
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ghil.checkpoint import register, register_config
from ghil.types import Observation
from planners.image_generator import DiffusionSubgoalModel, GeneratorConfig, _is_int
from policies.ddim import DDIMConfig
from policies.shortcut import ShortcutConfig

__all__ = ["VideoConfig", "VideoGenerator"]


@register_config("video_config")
@dataclass(frozen=True)
class VideoConfig(GeneratorConfig):
    """The video generator's settings: ``GeneratorConfig``'s plus the clip length. The defaults are
    ``ghil/configs/generator/video_small.yaml``'s (tests/test_generators.py keeps the two equal)."""

    horizon: int = 16  # the clip spans this many steps; frame i is ~(i + 1) * horizon / n_frames steps ahead
    n_frames: int = 4  # frames per clip (the last is the subgoal)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.n_frames) or self.n_frames < 1:
            raise ValueError(f"VideoConfig.n_frames must be an int >= 1, got {self.n_frames!r}")
        if self.n_frames > self.horizon:
            raise ValueError(f"VideoConfig: {self.n_frames} frames need a horizon of at least as many steps, got "
                             f"{self.horizon}")


@register("video")
class VideoGenerator(DiffusionSubgoalModel):
    """K imagined clips of ``n_frames`` future frames (a ``ghil.interfaces.SubgoalGenerator`` of clips).

    Usage::

        gen = VideoGenerator(VideoConfig(), ShortcutConfig())
        clips = gen.propose(obs, "lift the red block", n_candidates=2)         # (2, T, H, W, 3) uint8
    """

    config_class = VideoConfig

    def __init__(self, config: VideoConfig | None = None, sampler: DDIMConfig | ShortcutConfig | None = None,
                 unet_config: Mapping[str, Any] | None = None):
        super().__init__(config if config is not None else VideoConfig(), sampler, unet_config)

    def propose_clips(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                      generator: torch.Generator | None = None, image_guidance: float | None = None,
                      text_guidance: float | None = None) -> np.ndarray:
        """``n_candidates`` clips (K, T, H, W, 3) uint8 at the camera's size, from one batched call."""
        return self.generate(obs, subtask, n_candidates, n_steps, generator, image_guidance, text_guidance)

    def propose(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                generator: torch.Generator | None = None) -> np.ndarray:
        """The ``SubgoalGenerator`` call: clips (K, T, H, W, 3); filters score their last frames."""
        return self.propose_clips(obs, subtask, n_candidates, n_steps, generator)

    def propose_last_frames(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                            generator: torch.Generator | None = None) -> np.ndarray:
        """The clips' last frames (K, H, W, 3): image subgoals ``horizon`` steps ahead."""
        return self.propose_clips(obs, subtask, n_candidates, n_steps, generator)[:, -1]
