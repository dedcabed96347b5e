"""Batched image augmentation in torch (no torchvision): random resized crop + colour jitter, and a plain resize.

GHIL-Glue's de-synchronised augmentation draws independent parameters for the current and the goal image (and for
each camera), so the policy learns to map mismatched pairs, like a generated subgoal, to the right action. The
ops and ranges are the paper's (appendix B): crop scale 0.8-1.0, ratio 0.9-1.1, then brightness +-0.2, contrast
0.8-1.2, saturation 0.8-1.2, hue +-0.1, each followed by a clip to [0, 1]. All randomness comes from torch's
global generator (or the one passed in), so a resumed run reproduces the same augmentations.

Usage::

    aug = ImageAugment(AugmentConfig())
    x = aug(images, out_size=96)          # (B, 3, H, W) float in [0, 1] -> (B, 3, 96, 96), new params per row
    x = resize(images, 96)                # evaluation: no randomness
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ghil.checkpoint import register_config


@register_config("augment")
@dataclass(frozen=True)
class AugmentConfig:
    """Training-time image augmentation; ``enabled=False`` trains on plain resized images."""

    enabled: bool = True
    desync: bool = True  # independent parameters for current and goal images (GHIL-Glue); False shares them
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the crop
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect ratio w / h of the crop
    brightness: float = 0.2  # max additive delta
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.1  # max hue rotation, as a fraction of a full turn

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "contrast", "saturation"):
            lo, hi = (float(v) for v in getattr(self, name))
            object.__setattr__(self, name, (lo, hi))
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentConfig.{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"AugmentConfig.crop_scale must lie in (0, 1], got {self.crop_scale}")
        if not 0 <= self.brightness <= 1 or not 0 <= self.hue <= 0.5:
            raise ValueError("AugmentConfig: brightness in [0, 1] and hue in [0, 0.5] required")


def _uniform(n: int, lo: float, hi: float, device, generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def resize(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), bilinear with antialiasing when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_resized_crop(images: Tensor, out_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        generator: torch.Generator | None = None) -> Tensor:
    """One random crop per row (area fraction ``scale``, aspect ``ratio``), resampled to ``out_size`` squared."""
    b, device = images.shape[0], images.device
    area = _uniform(b, *scale, device, generator)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), device, generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop size as a fraction of the image side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, device=device, generator=generator) - 1)  # centre in [-1 + w, 1 - w]
    cy = (1 - h) * (2 * torch.rand(b, device=device, generator=generator) - 1)
    theta = torch.zeros(b, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    # Shrink first (antialiased) so grid_sample does not alias when the output is much smaller than the input.
    src = resize(images, max(out_size, int(round(out_size / float(w.min().clamp(min=0.1))))))
    grid = F.affine_grid(theta, [b, images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grayscale(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rotate_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Hue rotation in YIQ space (a rotation of the chroma plane), ``turns`` (B,) fractions of a full turn."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       device=x.device, dtype=x.dtype)
    rgb = torch.linalg.inv(yiq)
    angle = 2 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = rgb @ rot @ yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def color_jitter(images: Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> Tensor:
    b, device = images.shape[0], images.device
    x = images
    x = (x + _uniform(b, -config.brightness, config.brightness, device, generator)[:, None, None, None]).clamp(0, 1)
    c = _uniform(b, *config.contrast, device, generator)[:, None, None, None]
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    s = _uniform(b, *config.saturation, device, generator)[:, None, None, None]
    gray = _grayscale(x)
    x = ((x - gray) * s + gray).clamp(0, 1)
    if config.hue > 0:
        x = _rotate_hue(x, _uniform(b, -config.hue, config.hue, device, generator)).clamp(0, 1)
    return x


class ImageAugment:
    """Random resized crop + colour jitter with fresh parameters for every row of every call."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def __call__(self, images: Tensor, out_size: int, generator: torch.Generator | None = None) -> Tensor:
        if not self.config.enabled:
            return resize(images, out_size)
        x = random_resized_crop(images, out_size, self.config.crop_scale, self.config.crop_ratio, generator)
        return color_jitter(x.clamp(0, 1), self.config, generator)

    def pair(self, current: Tensor, goal: Tensor, out_size: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Augment a current/goal pair: independent parameters if ``desync``, else the same ones for both."""
        if self.config.desync or not self.config.enabled:
            return self(current, out_size, generator), self(goal, out_size, generator)
        # Synchronised: two generators seeded alike draw identical parameters for the two images.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        gens = [torch.Generator(device=current.device).manual_seed(seed) for _ in range(2)]
        return self(current, out_size, gens[0]), self(goal, out_size, gens[1])
