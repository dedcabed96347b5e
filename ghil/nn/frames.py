"""Camera frames in, float images out: the one input check of the frozen perception encoders (``autoencoder.py``,
``efficientnet.py``).

A frame batch is either what cameras and datasets hold, uint8 ``(B, H, W, 3)`` (or one ``(H, W, 3)`` frame), numpy
or torch, or what the augmentation pipeline produces, float ``(B, 3, H, W)`` (or ``(3, H, W)``) in [0, 1], the
input convention of ``ghil.nn.encoders``. ``as_float_images`` returns float32 ``(B, 3, H, W)`` in [0, 1] on
``device``, refusing with one ``ValueError`` / ``TypeError`` that names the problem: another layout, a non-square
or unexpected size, an empty batch, NaN/inf, or float values outside [0, 1].

Usage::

    x = as_float_images(frames, accepted=(200, 84), what="Autoencoder", setting="autoencoder.config.frame_sizes")
    x.shape                     # (B, 3, H, W), H == W in accepted
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["FLOAT_TOLERANCE", "as_float_images"]

FLOAT_TOLERANCE = 1e-4  # float images may exceed [0, 1] by this much (resampling round-off)


def as_float_images(images, accepted: Sequence[int] = (), what: str = "encoder", setting: str | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """uint8 ``(B, H, W, 3)`` / float ``(B, 3, H, W)`` in [0, 1] frames -> float32 ``(B, 3, H, W)`` in [0, 1].

    ``accepted``: the square frame sizes allowed (empty: any square size); ``setting`` names the config field that
    sets them in the error message.
    """
    if isinstance(images, np.ndarray):
        if images.dtype not in (np.uint8, np.float16, np.float32, np.float64):
            raise TypeError(f"{what}: images must be uint8 (B, H, W, 3) frames or float (B, 3, H, W) in [0, 1], got "
                            f"a {images.dtype} array")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(f"{what}: images must be a numpy array or torch tensor, got {type(images).__qualname__}")
    if images.dtype == torch.uint8:
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{what}: uint8 images must be (B, H, W, 3) RGB frames (or one (H, W, 3) frame), got "
                             f"shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)
    elif images.dtype.is_floating_point:
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{what}: float images must be (B, 3, H, W) in [0, 1] (or one (3, H, W) image), got "
                             f"shape {tuple(images.shape)}; uint8 frames are (B, H, W, 3)")
        x = images
    else:
        raise TypeError(f"{what}: images must be uint8 (B, H, W, 3) frames or float (B, 3, H, W) in [0, 1], got "
                        f"{images.dtype}")
    b, _, h, w = x.shape
    if b == 0:
        raise ValueError(f"{what}: empty batch (0 images)")
    if h != w:
        raise ValueError(f"{what}: frames must be square, got {h}x{w}")
    if accepted and h not in accepted:
        hint = f" (set {setting} to accept them)" if setting else ""
        raise ValueError(f"{what}: {h}x{w} frames are not an accepted size {sorted(set(int(s) for s in accepted))}"
                         f"{hint}")
    if device is not None:
        x = x.to(device)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: images contain NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
        raise ValueError(f"{what}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (uint8 frames "
                         "are scaled by the encoder; pass them as uint8)")
    return x.clamp(0.0, 1.0)
