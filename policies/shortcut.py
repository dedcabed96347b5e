"""Shortcut models (Frans et al. 2024): one velocity network, conditioned on the step size, samples in 1..M steps.

Convention: x0 is noise, x1 clean (normalised) actions, ``x_t = (1 - (1 - eps) t) x0 + t x1``. The network sees
``k = log2(1/d)``. Each batch mixes

* flow matching (a ``1 - bootstrap_fraction`` share): t on the 1/M grid, k = log2 M, target ``x1 - (1 - eps) x0``;
* self-consistency (``bootstrap_fraction``): d = 2^-k with k in {0..log2 M - 1}, t on the d grid; the target is two
  half steps of the target network (EMA weights when the trainer attaches them, no gradient), clipped to +-clip.

Sampling with n steps (a power of two <= M) iterates ``x <- x + d v(x, t, log2 n)``; one step is ``x0 + v(x0, 0, 0)``.

Usage::

    sampler = ShortcutSampler(ShortcutConfig(n_inference_steps=2))
    x = sampler.sample(denoise, torch.randn(1, 16, 7), n_steps=1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ghil.checkpoint import register_config
from policies.sampling import Denoise, masked_mse


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


@register_config("shortcut")
@dataclass(frozen=True)
class ShortcutConfig:
    n_max_steps: int = 128  # M: the finest step is 1/M (flow matching)
    n_inference_steps: int = 2  # default at inference (power of two <= M); predict_chunk(n_steps=...) overrides
    bootstrap_fraction: float = 0.125  # share of each batch trained for self-consistency
    target_clip: float = 4.0  # clip of the bootstrap targets (assumes unit-scale normalised actions)
    noise_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.n_max_steps) or self.n_max_steps < 2:
            raise ValueError(f"ShortcutConfig.n_max_steps must be a power of two >= 2, got {self.n_max_steps}")
        if not _is_power_of_two(self.n_inference_steps) or self.n_inference_steps > self.n_max_steps:
            raise ValueError(f"ShortcutConfig.n_inference_steps must be a power of two <= {self.n_max_steps}, "
                             f"got {self.n_inference_steps}")
        if not 0.0 <= self.bootstrap_fraction < 1.0:
            raise ValueError(f"ShortcutConfig.bootstrap_fraction must be in [0, 1), got {self.bootstrap_fraction}")
        if self.target_clip <= 0 or not 0 <= self.noise_eps < 0.1:
            raise ValueError("ShortcutConfig: target_clip > 0 and 0 <= noise_eps < 0.1 required")

    @property
    def log2_max_steps(self) -> int:
        return int(math.log2(self.n_max_steps))

    def build(self) -> ShortcutSampler:
        return ShortcutSampler(self)


class ShortcutSampler:
    conditions_on_step_size = True

    def __init__(self, config: ShortcutConfig):
        self.config = config
        self.n_step_sizes = config.log2_max_steps + 1  # k = 0 (one step) .. log2 M (flow matching)

    def check_steps(self, n_steps: int) -> None:
        if not _is_power_of_two(n_steps) or n_steps > self.config.n_max_steps:
            raise ValueError(f"a shortcut model samples in a power of two of steps <= {self.config.n_max_steps} "
                             f"(1, 2, 4, ...), got {n_steps!r}")

    def _interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        t = t[:, None, None]
        return (1 - (1 - self.config.noise_eps) * t) * x0 + t * x1

    def loss(self, denoise: Denoise, target_denoise: Denoise, x1: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        cfg = self.config
        b, device = x1.shape[0], x1.device
        n_boot = int(b * cfg.bootstrap_fraction)
        if cfg.bootstrap_fraction > 0 and b >= 2:
            n_boot = max(n_boot, 1)
        x0 = torch.randn_like(x1)
        # Flow-matching rows: finest step size.
        k = torch.full((b,), cfg.log2_max_steps, dtype=torch.long, device=device)
        t = torch.randint(0, cfg.n_max_steps, (b,), device=device).float() / cfg.n_max_steps
        target = x1 - (1 - cfg.noise_eps) * x0
        if n_boot:
            # Self-consistency rows: d = 2^-kb, t on that grid; target = two half steps of size d/2.
            kb = torch.randint(0, cfg.log2_max_steps, (n_boot,), device=device)
            n_grid = (2 ** kb).float()
            tb = torch.floor(torch.rand(n_boot, device=device) * n_grid) / n_grid
            d = 1.0 / n_grid
            xb = self._interpolate(x0[:n_boot], x1[:n_boot], tb)
            with torch.no_grad():
                v1 = target_denoise(xb, tb, kb + 1)
                x_mid = (xb + (d / 2)[:, None, None] * v1).clamp(-cfg.target_clip, cfg.target_clip)
                v2 = target_denoise(x_mid, tb + d / 2, kb + 1)
                boot_target = ((v1 + v2) / 2).clamp(-cfg.target_clip, cfg.target_clip)
            k = torch.cat([kb, k[n_boot:]])
            t = torch.cat([tb, t[n_boot:]])
            target = torch.cat([boot_target, target[n_boot:]])
        xt = self._interpolate(x0, x1, t)
        pred = denoise(xt, t, k)
        loss = masked_mse(pred, target, mask)
        metrics = {"flow_mse": float(masked_mse(pred[n_boot:], target[n_boot:], mask[n_boot:]).detach())}
        if n_boot:
            metrics["bootstrap_mse"] = float(masked_mse(pred[:n_boot], target[:n_boot], mask[:n_boot]).detach())
        return loss, metrics

    def sample(self, denoise: Denoise, noise: Tensor, n_steps: int | None = None) -> Tensor:
        n_steps = self.config.n_inference_steps if n_steps is None else n_steps
        self.check_steps(n_steps)
        b = noise.shape[0]
        k = torch.full((b,), int(math.log2(n_steps)), dtype=torch.long, device=noise.device)
        d = 1.0 / n_steps
        x = noise
        for i in range(n_steps):
            t = torch.full((b,), i * d, device=noise.device)
            x = x + d * denoise(x, t, k)
        return x.clamp(-1.0, 1.0)
