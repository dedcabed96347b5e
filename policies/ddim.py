"""DDIM through diffusers' scheduler: epsilon prediction, squared-cosine betas, x0 clipped to [-1, 1].

DiT-Block Policy's recipe: 100 training timesteps, 8 DDIM steps at inference (any 1..100 can be chosen later).

Usage::

    sampler = DDIMSampler(DDIMConfig(n_inference_steps=8))
    x = sampler.sample(denoise, torch.randn(1, 16, 7), n_steps=16)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ghil.checkpoint import register_config
from policies.sampling import Denoise, masked_mse

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@register_config("ddim")
@dataclass(frozen=True)
class DDIMConfig:
    n_train_steps: int = 100
    n_inference_steps: int = 8  # default at inference; predict_chunk(n_steps=...) overrides it
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True  # clip predicted x0 to [-1, 1]: actions are min-max normalised onto that range
    prediction_type: str = "epsilon"
    # Where the inference timesteps sit (diffusers' timestep_spacing). "leading" (diffusers' default) starts 10
    # steps at t=90 of 100, treating noise as if signal were left; "trailing" starts at t=99 (Lin et al. 2024).
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        if self.n_train_steps < 1:
            raise ValueError(f"DDIMConfig.n_train_steps must be >= 1, got {self.n_train_steps}")
        if not 1 <= self.n_inference_steps <= self.n_train_steps:
            raise ValueError(f"DDIMConfig.n_inference_steps must be in [1, n_train_steps={self.n_train_steps}], "
                             f"got {self.n_inference_steps}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"DDIMConfig.timestep_spacing must be leading|trailing|linspace, got "
                             f"{self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DDIMConfig.prediction_type must be one of {PREDICTION_TYPES}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"DDIMConfig.beta_schedule {self.beta_schedule!r} is not a diffusers beta schedule")

    def build(self) -> DDIMSampler:
        return DDIMSampler(self)


class DDIMSampler:
    conditions_on_step_size = False
    n_step_sizes = 0

    def __init__(self, config: DDIMConfig):
        from diffusers import DDIMScheduler

        self.config = config
        self.scheduler = DDIMScheduler(num_train_timesteps=config.n_train_steps, beta_schedule=config.beta_schedule,
                                       clip_sample=config.clip_sample, prediction_type=config.prediction_type,
                                       set_alpha_to_one=True, steps_offset=0,
                                       timestep_spacing=config.timestep_spacing)

    def check_steps(self, n_steps: int) -> None:
        if not isinstance(n_steps, int) or not 1 <= n_steps <= self.config.n_train_steps:
            raise ValueError(f"DDIM can sample in 1..{self.config.n_train_steps} steps, got {n_steps!r}")

    def loss(self, denoise: Denoise, target_denoise: Denoise, x1: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        noise = torch.randn_like(x1)
        t = torch.randint(0, self.config.n_train_steps, (x1.shape[0],), device=x1.device)
        xt = self.scheduler.add_noise(x1, noise, t)
        pred = denoise(xt, t.float() / self.config.n_train_steps, None)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = x1
        else:
            target = self.scheduler.get_velocity(x1, noise, t)
        loss = masked_mse(pred, target, mask)
        return loss, {"diffusion_mse": float(loss.detach())}

    def sample(self, denoise: Denoise, noise: Tensor, n_steps: int | None = None) -> Tensor:
        from diffusers import DDIMScheduler

        n_steps = self.config.n_inference_steps if n_steps is None else n_steps
        self.check_steps(n_steps)
        scheduler = DDIMScheduler.from_config(self.scheduler.config)  # set_timesteps mutates: one per call
        scheduler.set_timesteps(n_steps, device=noise.device)
        x = noise
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), float(t) / self.config.n_train_steps, device=x.device)
            x = scheduler.step(denoise(x, tt, None), t, x).prev_sample
        return x
