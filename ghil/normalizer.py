"""One ``Normalizer`` per model: per-key affine transforms whose statistics are buffers saved in model.safetensors.

Every key is an affine map ``y = (x - loc) / scale`` fitted once from the dataset (``ghil.data.stats``):

* ``mean_std``: loc = mean, scale = std (proprioception);
* ``min_max``: loc = (max + min) / 2, scale = (max - min) / 2, so the data range maps onto [-1, 1] (diffusion
  targets, whose samplers clip to [-1, 1]).

Scales are floored at ``MIN_SCALE`` so a constant dimension (a gripper never opened in the data) cannot blow up.
Unknown keys, wrong widths and an unfitted normaliser raise instead of passing data through silently.

Usage::

    norm = Normalizer({"proprio": (15, "mean_std"), "actions": (7, "min_max")})
    norm.fit({"proprio": stats["robot_obs"], "actions": stats["rel_actions"]})
    y = norm.encode("actions", x); x_again = norm.decode("actions", y)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

MODES = ("mean_std", "min_max")
MIN_SCALE = 1e-3


@dataclass(frozen=True)
class VectorStats:
    """Per-dimension statistics of one vector key over a dataset (robot units)."""

    mean: np.ndarray  # (d,)
    std: np.ndarray  # (d,)
    min: np.ndarray  # (d,)
    max: np.ndarray  # (d,)
    count: int  # number of vectors the statistics were computed from

    def __post_init__(self) -> None:
        dims = {np.asarray(getattr(self, k)).shape for k in ("mean", "std", "min", "max")}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"VectorStats fields must be 1-D arrays of one length, got shapes {sorted(dims)}")
        for k in ("mean", "std", "min", "max"):
            if not np.isfinite(getattr(self, k)).all():
                raise ValueError(f"VectorStats.{k} has NaN/inf values")

    @property
    def dim(self) -> int:
        return int(np.asarray(self.mean).shape[0])

    @classmethod
    def of(cls, x: np.ndarray) -> VectorStats:
        """Statistics of an (n, d) array."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"VectorStats.of needs a non-empty (n, d) array, got shape {x.shape}")
        return cls(x.mean(0), x.std(0), x.min(0), x.max(0), int(len(x)))


def _buffer_name(key: str, what: str) -> str:
    return f"{key.replace('.', '_')}__{what}"


class Normalizer(nn.Module):
    """Affine per-key normalisation with statistics stored as buffers (saved and loaded with the model)."""

    def __init__(self, specs: Mapping[str, tuple[int, str]]):
        super().__init__()
        self.specs = {key: (int(dim), mode) for key, (dim, mode) in specs.items()}
        for key, (dim, mode) in self.specs.items():
            if mode not in MODES:
                raise ValueError(f"Normalizer key {key!r}: mode must be one of {MODES}, got {mode!r}")
            if dim < 1:
                raise ValueError(f"Normalizer key {key!r}: dim must be positive, got {dim}")
            self.register_buffer(_buffer_name(key, "loc"), torch.zeros(dim))
            self.register_buffer(_buffer_name(key, "scale"), torch.ones(dim))
        # 0 until fit(): a model trained or run with identity statistics is almost always a bug.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item())

    def fit(self, stats: Mapping[str, VectorStats]) -> None:
        missing = sorted(set(self.specs) - set(stats))
        unknown = sorted(set(stats) - set(self.specs))
        if missing or unknown:
            raise KeyError(f"Normalizer.fit: missing statistics for {missing}, unknown keys {unknown}; "
                           f"expected exactly {sorted(self.specs)}")
        for key, (dim, mode) in self.specs.items():
            s = stats[key]
            if s.dim != dim:
                raise ValueError(f"Normalizer.fit: {key!r} statistics have {s.dim} dims, expected {dim}")
            if mode == "mean_std":
                loc, scale = np.asarray(s.mean), np.asarray(s.std)
            else:
                loc, scale = (np.asarray(s.max) + s.min) / 2, (np.asarray(s.max) - s.min) / 2
            getattr(self, _buffer_name(key, "loc")).copy_(torch.as_tensor(loc, dtype=torch.float32))
            getattr(self, _buffer_name(key, "scale")).copy_(
                torch.as_tensor(np.maximum(scale, MIN_SCALE), dtype=torch.float32))
        self.fitted.fill_(1)

    def _affine(self, key: str, x: Tensor) -> tuple[Tensor, Tensor]:
        if key not in self.specs:
            raise KeyError(f"Normalizer has no key {key!r}; known keys: {sorted(self.specs)}")
        if not self.is_fitted:
            raise RuntimeError("Normalizer used before fit(): compute statistics with ghil.data.stats and call "
                               "model.fit_normalizer(...) (the trainer does this for a fresh run)")
        dim = self.specs[key][0]
        if x.shape[-1] != dim:
            raise ValueError(f"Normalizer key {key!r} expects a last dimension of {dim}, got shape {tuple(x.shape)}")
        loc = getattr(self, _buffer_name(key, "loc")).to(x.dtype)
        scale = getattr(self, _buffer_name(key, "scale")).to(x.dtype)
        return loc, scale

    def encode(self, key: str, x: Tensor) -> Tensor:
        loc, scale = self._affine(key, x)
        return (x - loc) / scale

    def decode(self, key: str, x: Tensor) -> Tensor:
        loc, scale = self._affine(key, x)
        return x * scale + loc

    def bounds(self, key: str) -> tuple[Tensor, Tensor]:
        """The fitted data range of a ``min_max`` key in robot units (what decode maps [-1, 1] onto)."""
        loc = getattr(self, _buffer_name(key, "loc"))
        scale = getattr(self, _buffer_name(key, "scale"))
        return loc - scale, loc + scale

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {d} {m}" for k, (d, m) in self.specs.items())
