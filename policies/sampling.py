"""What a sampler is: a training objective plus an inference loop around one denoising network.

The network is passed as ``denoise(x, t, k) -> Tensor`` with the observation conditioning already bound:
``x`` ``(B, chunk_len, action_dim)`` normalised actions (or noise), ``t`` ``(B,)`` float in [0, 1], and ``k``
``(B,)`` long step-size index (``log2(1/d)``) for samplers that condition on the step size, else None.

Usage::

    sampler = DDIMConfig().build()                   # or ShortcutConfig().build(): each config builds its sampler
    loss, metrics = sampler.loss(denoise, target_denoise, actions, mask)
    actions = sampler.sample(denoise, noise, n_steps=4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

Denoise = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@runtime_checkable
class Sampler(Protocol):
    config: Any
    conditions_on_step_size: bool  # the network needs a step-size embedding (shortcut models)
    n_step_sizes: int  # size of that embedding table (0 when unused)

    def loss(self, denoise: Denoise, target_denoise: Denoise, x1: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """Training loss on clean normalised actions ``x1`` (B, T, A) with a (B, T) bool validity ``mask``.

        ``target_denoise`` is the network to bootstrap targets from (EMA weights when the trainer keeps them).
        """
        ...

    def sample(self, denoise: Denoise, noise: Tensor, n_steps: int | None = None) -> Tensor:
        """Clean normalised actions from ``noise`` in ``n_steps`` network calls (None: the config's default)."""
        ...

    def check_steps(self, n_steps: int) -> None:
        """ValueError when this sampler cannot sample in ``n_steps`` steps."""
        ...


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over valid (batch, step) entries, averaged over action dims."""
    per_step = ((pred - target) ** 2).mean(-1)  # (B, T)
    weights = mask.to(per_step.dtype)
    return (per_step * weights).sum() / weights.sum().clamp_min(1.0)
