"""DiT-Block policy (Dasari et al. 2024): observation tokens -> transformer encoder -> adaLN-Zero action decoder.

Tokens: one GroupNorm ResNet per camera, a separate goal-image encoder, a proprioception token and an optional
language token from a frozen text encoder. A post-norm transformer encoder runs over the tokens once per control
step; decoder block i is conditioned (adaLN-Zero, zero-initialised gates, so every block starts as the identity)
on the mean of encoder layer i's output plus the diffusion time embedding (plus the step-size embedding for
shortcut models). The decoder self-attends over the action chunk only; there is no cross-attention.

The sampler (``DDIMConfig`` or ``ShortcutConfig``) decides the training target and the inference loop, and the
step count is chosen at inference time (``predict_chunk(obs, goal, n_steps=1)``). Actions are min-max normalised
onto [-1, 1] and proprioception mean/std normalised by the policy's own ``Normalizer`` (saved in its weights);
``predict_chunk`` returns robot units, clipped to the action space's range, gripper exactly +-1.

Usage::

    policy = DiTPolicy(DiTConfig(), ShortcutConfig())         # or DDIMConfig()
    policy.fit_normalizer(compute_policy_stats(dataset))
    chunk = policy.predict_chunk(Observation(images=..., proprio=robot_obs, t=0), goal=goal_image)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ghil.checkpoint import PretrainedMixin, coerce_config, register, register_config
from ghil.nn.augment import AugmentConfig, ImageAugment, resize
from ghil.normalizer import Normalizer, VectorStats
from ghil.types import ActionChunk, Observation, PolicyBatch, action_space, binarize_gripper
from policies.ddim import DDIMConfig
from ghil.nn.encoders import (
    ClipTextConfig,
    HashTextConfig,
    MiniLMConfig,
    ResNetGN,
    ResNetGNConfig,
    TextEncoder,
    build_text_encoder,
    sinusoidal_embedding,
)
from policies.shortcut import ShortcutConfig

TEXT_CONFIGS = (MiniLMConfig, ClipTextConfig, HashTextConfig)
# Proprioception further than this many (normaliser) standard deviations from the training mean is refused as not a
# robot state: 1e6 is far past any real state (even a dimension constant in the data, floored at MIN_SCALE = 1e-3,
# allows 1 km), and far below where float32 activations overflow (~1e19).
MAX_PROPRIO_Z = 1e6
SAMPLER_CONFIGS = (DDIMConfig, ShortcutConfig)


@register_config("dit_config")
@dataclass(frozen=True)
class DiTConfig:
    """Sizes and inputs of a DiT-Block policy. The defaults are ``ghil/configs/policy/dit_small.yaml`` (the base
    preset; dit_tiny/base/lang override it; tests/test_settings.py keeps the two equal). Saved checkpoints store
    every field, so these defaults never change what a checkpoint means."""

    cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper")
    image_sizes: tuple[int, ...] = (200, 84)  # expected (square) input size per camera, checked on every call
    encoder_sizes: tuple[int, ...] = (96, 64)  # resolution each camera's encoder sees (after crop / resize)
    image_encoder: ResNetGNConfig = field(default_factory=ResNetGNConfig)
    use_goal: bool = True  # a goal image (same camera as goal_camera) through its own encoder
    goal_camera: str = "rgb_static"
    use_proprio: bool = True
    proprio_dim: int = 15  # CALVIN robot_obs
    proprio_dropout: float = 0.2
    use_language: bool = False  # a language token from the frozen text encoder
    text_encoder: MiniLMConfig | ClipTextConfig | HashTextConfig = field(default_factory=MiniLMConfig)
    action_space: str = "rel_ee"  # ghil.types.ACTION_SPACES: rel_ee (7-D CALVIN) | joint_abs (8-D joints)
    chunk_len: int = 16  # actions predicted per call
    exec_len: int = 8  # actions executed before replanning (ChunkQueue)
    width: int = 128
    depth: int = 4  # encoder layers = decoder blocks (decoder block i is conditioned on encoder layer i)
    n_heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.1
    token_dropout: float = 0.1
    time_dim: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("cameras", tuple(str(c) for c in self.cameras))
        set_("image_sizes", tuple(int(s) for s in self.image_sizes))
        set_("encoder_sizes", tuple(int(s) for s in self.encoder_sizes))
        set_("image_encoder", coerce_config(self.image_encoder, ResNetGNConfig, "DiTConfig.image_encoder"))
        set_("augment", coerce_config(self.augment, AugmentConfig, "DiTConfig.augment"))
        if not isinstance(self.text_encoder, TEXT_CONFIGS):
            raise TypeError(f"DiTConfig.text_encoder must be one of {[c.__name__ for c in TEXT_CONFIGS]}, "
                            f"got {self.text_encoder!r}")
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"DiTConfig.cameras must be non-empty and unique, got {self.cameras}")
        if not len(self.cameras) == len(self.image_sizes) == len(self.encoder_sizes):
            raise ValueError(f"DiTConfig: cameras {self.cameras}, image_sizes {self.image_sizes} and encoder_sizes "
                             f"{self.encoder_sizes} must have one entry per camera")
        if min(self.image_sizes) < 8 or min(self.encoder_sizes) < 8:
            raise ValueError("DiTConfig: image and encoder sizes must be >= 8 px")
        if self.use_goal and self.goal_camera not in self.cameras:
            raise ValueError(f"DiTConfig.goal_camera {self.goal_camera!r} is not one of the cameras {self.cameras}")
        action_space(self.action_space)  # raises for unknown names
        if not 1 <= self.exec_len <= self.chunk_len:
            raise ValueError(f"DiTConfig needs 1 <= exec_len <= chunk_len, got exec_len={self.exec_len}, "
                             f"chunk_len={self.chunk_len}")
        if self.width < 1 or self.depth < 1 or self.n_heads < 1 or self.width % self.n_heads:
            raise ValueError(f"DiTConfig: width ({self.width}) must be a positive multiple of n_heads "
                             f"({self.n_heads}), depth ({self.depth}) >= 1")
        if self.proprio_dim < 1 or self.ffn_mult < 1 or self.time_dim < 2:
            raise ValueError("DiTConfig: proprio_dim >= 1, ffn_mult >= 1 and time_dim >= 2 required")
        for name in ("dropout", "token_dropout", "proprio_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DiTConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def action_dim(self) -> int:
        return action_space(self.action_space).dim

    @property
    def image_size(self) -> dict[str, int]:
        return dict(zip(self.cameras, self.image_sizes))

    @property
    def encoder_size(self) -> dict[str, int]:
        return dict(zip(self.cameras, self.encoder_sizes))


# -- the noise network ------------------------------------------------------------------------------------------


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNZeroBlock(nn.Module):
    """Self-attention + MLP over action tokens, modulated by a condition vector; gates start at zero."""

    def __init__(self, width: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(ffn_mult * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 4 * width))  # shift/scale for both sublayers
        self.gates = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.gates[1].weight)  # adaLN-Zero: the block is the identity at initialisation
        nn.init.zeros_(self.gates[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x (B, T, W), c (B, W)
        shift1, scale1, shift2, scale2 = self.modulation(c).chunk(4, dim=-1)
        gate1, gate2 = self.gates(c).chunk(2, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        h = _modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None] * self.mlp(h)


class DiTNet(nn.Module):
    """Observation tokens -> per-layer conditions; noisy action chunk + time (+ step size) -> prediction."""

    def __init__(self, config: DiTConfig, n_step_sizes: int):
        super().__init__()
        w, a = config.width, config.action_dim
        self.time_dim = config.time_dim
        self.encoder = nn.ModuleList([
            nn.TransformerEncoderLayer(w, config.n_heads, config.ffn_mult * w, config.dropout, activation="gelu",
                                       batch_first=True, norm_first=False)
            for _ in range(config.depth)])
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.step_size = nn.Embedding(n_step_sizes, w) if n_step_sizes else None
        if self.step_size is not None:
            nn.init.normal_(self.step_size.weight, std=0.02)
        self.action_in = nn.Sequential(nn.Linear(a, a), nn.GELU(approximate="tanh"), nn.Linear(a, w))
        self.action_pos = nn.Parameter(torch.randn(config.chunk_len, w) * 0.02)
        self.blocks = nn.ModuleList([AdaLNZeroBlock(w, config.n_heads, config.ffn_mult, config.dropout)
                                     for _ in range(config.depth)])
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.action_out = nn.Linear(w, a)

    def encode(self, tokens: Tensor) -> Tensor:
        """(B, N, W) tokens -> (B, depth, W): the mean of every encoder layer's output."""
        conds = []
        x = tokens
        for layer in self.encoder:
            x = layer(x)
            conds.append(x.mean(dim=1))
        return torch.stack(conds, dim=1)

    def forward(self, x: Tensor, t: Tensor, k: Tensor | None, cond: Tensor) -> Tensor:
        """x (B, T, A) noisy normalised actions, t (B,) in [0, 1], k (B,) step-size index or None, cond (B, D, W)."""
        if (k is None) != (self.step_size is None):
            raise ValueError("step-size index given to a network without a step-size embedding, or missing")
        emb = self.time_mlp(sinusoidal_embedding(t * 1000.0, self.time_dim))
        if k is not None:
            emb = emb + self.step_size(k)
        h = self.action_in(x) + self.action_pos[: x.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, cond[:, i] + emb)
        shift, scale = self.final_modulation(cond[:, -1] + emb).chunk(2, dim=-1)
        return self.action_out(_modulate(self.final_norm(h), shift, scale))


# -- the policy -------------------------------------------------------------------------------------------------


def _to_tensor(x: Any, name: str = "input") -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as err:  # strings, objects, ragged lists; an object's own __array__ may raise anything
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} ({type(err).__name__}: "
                        f"{err})") from None


@register("dit")
class DiTPolicy(PretrainedMixin, nn.Module):
    """Goal- (and/or language-) conditioned diffusion-transformer policy predicting action chunks.

    Usage::

        policy = DiTPolicy(DiTConfig(chunk_len=16), ShortcutConfig())
        loss, metrics = policy.loss(batch)                  # training (ghil.train.Trainer calls this)
        chunk = policy.predict_chunk(obs, goal, n_steps=1)  # ActionChunk, robot units
    """

    def __init__(self, config: DiTConfig | None = None,
                 sampler: DDIMConfig | ShortcutConfig | None = None):
        super().__init__()
        config = config if config is not None else DiTConfig()
        sampler = sampler if sampler is not None else ShortcutConfig()  # the recommended one (ghil train default)
        if not isinstance(config, DiTConfig):
            raise TypeError(f"DiTPolicy needs a DiTConfig, got {type(config).__qualname__}")
        if not isinstance(sampler, SAMPLER_CONFIGS):
            raise TypeError(f"DiTPolicy sampler must be a DDIMConfig or ShortcutConfig, got {sampler!r}")
        self.config = config
        self.space = action_space(config.action_space)
        self.sampler = sampler.build()
        w = config.width
        self.normalizer = Normalizer({"proprio": (config.proprio_dim, "mean_std"),
                                      "actions": (config.action_dim, "min_max")})
        self.camera_encoders = nn.ModuleDict({cam: ResNetGN(config.image_encoder, w) for cam in config.cameras})
        self.goal_encoder = ResNetGN(config.image_encoder, w) if config.use_goal else None
        n_sources = len(config.cameras) + int(config.use_goal) + int(config.use_proprio) + int(config.use_language)
        self.source_embedding = nn.Parameter(torch.randn(n_sources, w) * 0.02)  # which input a token came from
        self.proprio_in = (nn.Sequential(nn.Dropout(config.proprio_dropout), nn.Linear(config.proprio_dim, w))
                           if config.use_proprio else None)
        if config.use_language:
            self.language_in = nn.Linear(config.text_encoder.dim, w)
            self.no_language = nn.Parameter(torch.zeros(w))  # the token for unannotated samples
        else:
            self.language_in, self.no_language = None, None
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.net = DiTNet(config, self.sampler.n_step_sizes)
        self.augment = ImageAugment(config.augment)
        self._text: list[TextEncoder] = []  # built lazily; outside the module tree (frozen, not checkpointed)
        self._ema: list[nn.Module] = []  # EMA copy for bootstrap targets, attached by the trainer
        self._frame_memo: tuple[Any, dict[str, Tensor]] | None = None  # frame_tokens' one-entry cache

    def init_kwargs(self) -> dict[str, Any]:
        return {"config": self.config, "sampler": self.sampler.config}

    # -- the ChunkPolicy contract (ghil.interfaces): what a runtime needs to know without reading DiTConfig ------

    @property
    def cameras(self) -> tuple[str, ...]:
        return self.config.cameras

    @property
    def image_sizes(self) -> tuple[int, ...]:
        return self.config.image_sizes

    @property
    def goal_camera(self) -> str | None:
        return self.config.goal_camera if self.config.use_goal else None

    @property
    def uses_goal(self) -> bool:
        return self.config.use_goal

    @property
    def uses_language(self) -> bool:
        return self.config.use_language

    @property
    def exec_len(self) -> int:
        return self.config.exec_len

    # -- set-up -------------------------------------------------------------------------------------------------

    def fit_normalizer(self, stats: Mapping[str, VectorStats]) -> None:
        """Fit from dataset statistics keyed by dataset key (``robot_obs`` and the action space's key)."""
        needed = ["robot_obs", self.space.dataset_key]
        missing = [k for k in needed if k not in stats]
        if missing:
            raise KeyError(f"fit_normalizer needs statistics for {needed}; missing {missing}")
        self.normalizer.fit({"proprio": stats["robot_obs"], "actions": stats[self.space.dataset_key]})

    def attach_ema(self, ema: DiTPolicy | None) -> None:
        """Use ``ema`` (a copy kept by the trainer) for the shortcut model's self-consistency targets (None: the
        live weights are their own targets)."""
        self._ema[:] = [] if ema is None else [ema]

    def text_encoder(self) -> TextEncoder:
        if not self._text:
            self._text.append(build_text_encoder(self.config.text_encoder))
        return self._text[0]

    # -- input checks -------------------------------------------------------------------------------------------

    def _check_image(self, name: str, image: Tensor, size: int, batched: bool) -> None:
        shape = (size, size, 3)
        if image.dtype != torch.uint8:
            raise TypeError(f"image {name!r} must be uint8 RGB (H, W, 3), got dtype {image.dtype}")
        got = tuple(image.shape[1:] if batched else image.shape)
        if got != shape or (batched and image.ndim != 4):
            raise ValueError(f"image {name!r} must have shape {'(B, ' if batched else '('}{size}, {size}, 3), got "
                             f"{tuple(image.shape)} (resize frames to the policy's image_sizes)")

    def _check_inputs(self, images: Mapping[str, Tensor], goal: Tensor | None, proprio: Tensor,
                      instructions: Sequence[str | None] | None, batched: bool, check_images: bool = True) -> None:
        cfg = self.config
        if check_images:  # False for a batch of cached encoder tokens (PolicyBatch.features)
            missing = [c for c in cfg.cameras if c not in images]
            if missing:
                raise KeyError(f"missing camera(s) {missing}; the policy needs {list(cfg.cameras)}, got "
                               f"{sorted(images)}")
            for cam in cfg.cameras:
                self._check_image(cam, images[cam], cfg.image_size[cam], batched)
            if cfg.use_goal:
                if goal is None:
                    raise ValueError("this policy is goal-conditioned (use_goal=True) but no goal image was given")
                self._check_image("goal", goal, cfg.image_size[cfg.goal_camera], batched)
            elif goal is not None:
                raise ValueError("this policy takes no goal image (use_goal=False); pass goal=None")
        if cfg.use_proprio:
            want = (proprio.shape[0], cfg.proprio_dim) if batched else (cfg.proprio_dim,)
            if tuple(proprio.shape) != want:
                raise ValueError(f"proprio must have shape {want}, got {tuple(proprio.shape)}")
            if not torch.isfinite(proprio).all():
                raise ValueError(f"proprio contains NaN/inf values: {proprio.tolist() if not batched else '...'}")
            self._check_proprio_range(proprio)
        if cfg.use_language and not batched:
            text = instructions[0] if instructions else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError("this policy is language-conditioned (use_language=True): Observation.instruction "
                                 "must be a non-empty string")

    def _check_proprio_range(self, proprio: Tensor) -> None:
        """Refuse proprioception no robot state can have (issue 10): more than ``MAX_PROPRIO_Z`` dataset standard
        deviations from the mean, or beyond float32 (what the network computes in). Such values overflow inside
        the network and would surface as NaN actions blamed on the weights."""
        if not self.normalizer.is_fitted:
            return  # sample_actions refuses an unfitted policy with its own message
        as_float = proprio.to(torch.float32)
        if not torch.isfinite(as_float).all():
            raise ValueError(f"proprio has values beyond float32's range (|x| > 3.4e38), max |x| "
                             f"{float(proprio.abs().max()):.3g}")
        z = self.normalizer.encode("proprio", as_float).abs()
        if bool((z > MAX_PROPRIO_Z).any()):
            worst = z.reshape(-1, z.shape[-1]).amax(0)
            idx = [int(i) for i in torch.nonzero(worst > MAX_PROPRIO_Z).flatten()]
            raise ValueError(f"proprio is not a plausible robot state: dims {idx} lie more than {MAX_PROPRIO_Z:g} "
                             f"training-data standard deviations from the mean (max {float(worst.max()):.3g}); "
                             "check the units and the order of the 15 robot_obs values")

    # -- shared forward pieces ----------------------------------------------------------------------------------

    def _prepare(self, images: Mapping[str, Tensor], goal: Tensor | None, train: bool) -> dict[str, Tensor]:
        """uint8 (B, H, W, 3) -> float (B, 3, s, s) at each encoder's size; augmented when training."""
        cfg = self.config
        as_float = lambda x: x.permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
        out: dict[str, Tensor] = {}
        for cam in cfg.cameras:
            x, size = as_float(images[cam]), cfg.encoder_size[cam]
            if cam == cfg.goal_camera and goal is not None:
                g = as_float(goal)
                out[cam], out["__goal__"] = (self.augment.pair(x, g, size) if train
                                             else (resize(x, size), resize(g, size)))
            else:
                out[cam] = self.augment(x, size) if train else resize(x, size)
        return out

    def image_tokens(self, prepared: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The image encoders: camera (and ``"__goal__"``) -> (B, n_tokens, W) tokens. ``ghil featurize`` caches
        exactly these, so frozen-encoder training (``PolicyBatch.features``) and run time see the same tokens."""
        cfg = self.config
        out = {cam: self.camera_encoders[cam](prepared[cam]) for cam in cfg.cameras}
        if cfg.use_goal:
            out["__goal__"] = self.goal_encoder(prepared["__goal__"])
        return out

    def _condition(self, prepared: Mapping[str, Tensor], proprio: Tensor | None,
                   instructions: Sequence[str | None] | None) -> Tensor:
        """Encoder pass: (B, depth, W) conditions."""
        return self._condition_from_tokens(self.image_tokens(prepared), proprio, instructions)

    def _condition_from_tokens(self, image_tokens: Mapping[str, Tensor], proprio: Tensor | None,
                               instructions: Sequence[str | None] | None) -> Tensor:
        """Transformer encoder over the image tokens (from ``image_tokens`` or a feature cache) and the others."""
        cfg = self.config
        tokens = [image_tokens[cam] for cam in cfg.cameras]
        if cfg.use_goal:
            tokens.append(image_tokens["__goal__"])
        b = tokens[0].shape[0]
        if cfg.use_proprio:
            tokens.append(self.proprio_in(self.normalizer.encode("proprio", proprio.float()))[:, None])
        if cfg.use_language:
            tokens.append(self._language_tokens(instructions, b, tokens[0].device))
        tokens = [t + self.source_embedding[i] for i, t in enumerate(tokens)]
        return self.net.encode(self.token_dropout(torch.cat(tokens, dim=1)))

    def _language_tokens(self, instructions: Sequence[str | None] | None, b: int, device) -> Tensor:
        texts = list(instructions) if instructions is not None else [None] * b
        if len(texts) != b:
            raise ValueError(f"{len(texts)} instructions for a batch of {b}")
        out = self.no_language.expand(b, -1).clone()
        have = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        if have:
            emb = self.text_encoder()([texts[i] for i in have]).to(device)
            out[have] = self.language_in(emb)
        return out[:, None]

    # -- training -----------------------------------------------------------------------------------------------

    # -- frozen-encoder mode (issue 11, option a) -----------------------------------------------------------------

    def freeze_image_encoders(self) -> None:
        """Stop training the camera and goal encoders (the trainer optimises only parameters with gradients)."""
        for module in (*self.camera_encoders.values(), self.goal_encoder):
            if module is not None:
                module.requires_grad_(False)

    @property
    def image_encoders_frozen(self) -> bool:
        """True once ``freeze_image_encoders`` ran (no camera or goal encoder parameter takes gradients)."""
        encoders = [*self.camera_encoders.values(), *([self.goal_encoder] if self.goal_encoder is not None else [])]
        return not any(p.requires_grad for module in encoders for p in module.parameters())

    def load_image_encoders(self, source: DiTPolicy) -> None:
        """Copy ``source``'s camera and goal encoder weights (a checkpoint of the same encoder settings)."""
        mine, theirs = self.config, source.config
        keys = ("cameras", "image_sizes", "encoder_sizes", "image_encoder", "width", "use_goal", "goal_camera")
        diff = [k for k in keys if getattr(mine, k) != getattr(theirs, k)]
        if diff:
            raise ValueError(f"the encoder checkpoint's {diff} differ from this policy's: "
                             f"{[getattr(theirs, k) for k in diff]} vs {[getattr(mine, k) for k in diff]}")
        self.camera_encoders.load_state_dict(source.camera_encoders.state_dict())
        if self.goal_encoder is not None:
            self.goal_encoder.load_state_dict(source.goal_encoder.state_dict())

    def _feature_tokens(self, batch: PolicyBatch) -> dict[str, Tensor]:
        """Check and return ``batch.features`` (+ ``goal_features``) as float (B, n_tokens, W) tokens."""
        cfg = self.config
        feats = dict(batch.features)
        missing = [c for c in cfg.cameras if c not in feats]
        if missing:
            raise KeyError(f"batch features lack camera(s) {missing}; the policy needs {list(cfg.cameras)}")
        if cfg.use_goal:
            if batch.goal_features is None:
                raise ValueError("this policy is goal-conditioned: a batch with features needs goal_features")
            feats["__goal__"] = batch.goal_features
        elif batch.goal_features is not None:
            raise ValueError("this policy takes no goal (use_goal=False); goal_features must be None")
        b = batch.batch_size
        out = {}
        for name, value in feats.items():
            if name not in (*cfg.cameras, "__goal__"):
                continue
            if value.ndim != 3 or value.shape[0] != b or value.shape[2] != cfg.width:
                raise ValueError(f"features {name!r} must be (B={b}, n_tokens, width={cfg.width}), got "
                                 f"{tuple(value.shape)}")
            if not torch.is_floating_point(value) or not torch.isfinite(value).all():
                raise ValueError(f"features {name!r} must be finite floats (a damaged feature cache?)")
            out[name] = value.float()
        return out

    def loss(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        use_features = batch.features is not None
        # Frozen-encoder training: cached tokens, no pixels, no augmentation (the augmented views are cached).
        self._check_inputs(batch.images, batch.goal, batch.proprio, batch.instructions, batched=True,
                           check_images=not use_features)
        if tuple(batch.actions.shape[1:]) != (cfg.chunk_len, cfg.action_dim):
            raise ValueError(f"batch actions must be (B, {cfg.chunk_len}, {cfg.action_dim}) for the "
                             f"{cfg.action_space} action space, got {tuple(batch.actions.shape)}")
        if not torch.isfinite(batch.actions).all():
            raise ValueError("batch actions contain NaN/inf values")
        prepared: dict[str, Tensor] = {}
        if use_features:
            image_tokens = self._feature_tokens(batch)
        else:
            prepared = self._prepare(batch.images, batch.goal, train=self.training)
            image_tokens = self.image_tokens(prepared)
        cond = self._condition_from_tokens(image_tokens, batch.proprio, batch.instructions)
        x1 = self.normalizer.encode("actions", batch.actions.float())

        def denoise(x: Tensor, t: Tensor, k: Tensor | None) -> Tensor:
            return self.net(x, t, k, cond[: x.shape[0]])

        target_denoise = denoise
        if self._ema:
            ema = self._ema[0]
            cache: dict[int, Tensor] = {}

            def target_denoise(x: Tensor, t: Tensor, k: Tensor | None) -> Tensor:
                n = x.shape[0]  # samplers bootstrap from the first n rows of the batch
                if n not in cache:
                    with torch.no_grad():
                        # The EMA network's own encoders (equal to the live ones when those are frozen).
                        tokens = ({k_: v[:n] for k_, v in image_tokens.items()} if use_features else
                                  ema.image_tokens({k_: v[:n] for k_, v in prepared.items()}))
                        cache[n] = ema._condition_from_tokens(tokens, batch.proprio[:n],
                                                              None if batch.instructions is None
                                                              else batch.instructions[:n])
                return ema.net(x, t, k, cache[n])

        loss, metrics = self.sampler.loss(denoise, target_denoise, x1, batch.action_mask)
        return loss, {"loss": float(loss.detach()), **metrics}

    # -- inference ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_observation(self, images: Mapping[str, Tensor], goal: Tensor | None, proprio: Tensor,
                           instructions: Sequence[str | None] | None = None) -> Tensor:
        """The encoder pass alone, without augmentation: (B, depth, W) conditions shared by every sampler step."""
        return self._condition(self._prepare(images, goal, train=False), proprio, instructions)

    # -- tokens shared with the planner stages ---------------------------------------------------------------------

    def encoder_sha256(self) -> str:
        """SHA-256 of the camera and goal encoders' weights: the identity of the token space that planner stages
        trained on this policy's frozen encoders (``planners/token_subgoals.py``) work in."""
        import hashlib

        digest = hashlib.sha256()
        modules = {f"camera_encoders.{c}": m for c, m in self.camera_encoders.items()}
        if self.goal_encoder is not None:
            modules["goal_encoder"] = self.goal_encoder
        for prefix, module in sorted(modules.items()):
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(f"{prefix}.{name}".encode())
                digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def frame_tokens(self, obs: Observation) -> dict[str, Tensor]:
        """(1, n_tokens, W) tokens of ``obs``'s frames without augmentation: every camera, and ``"__goal__"`` = the
        goal encoder on the goal camera's *current* frame (the space goal tokens live in). Computed once per
        observation object and kept until the next one, so the generator, the filter and the policy bound to this
        policy encode each frame once per step (``ghil featurize`` caches the same tokens for training)."""
        memo = self._frame_memo  # one immutable (obs, tokens) pair: safe to read while another thread replaces it
        if memo is not None and memo[0] is obs:
            return memo[1]
        cfg = self.config
        missing = [c for c in cfg.cameras if c not in obs.images]
        if missing:
            raise KeyError(f"missing camera(s) {missing}; the policy's encoders need {list(cfg.cameras)}, got "
                           f"{sorted(obs.images)}")
        images = {c: _to_tensor(obs.images[c], f"image {c!r}") for c in cfg.cameras}
        for cam in cfg.cameras:
            self._check_image(cam, images[cam], cfg.image_size[cam], batched=False)
        device = next(self.parameters()).device
        batch = {c: v[None].to(device) for c, v in images.items()}
        goal = batch[cfg.goal_camera] if cfg.use_goal else None
        was_training = self.training
        self.eval()
        try:
            tokens = self.image_tokens(self._prepare(batch, goal, train=False))
        finally:
            self.train(was_training)
        self._frame_memo = (obs, tokens)
        return tokens

    @torch.no_grad()
    def sample_actions(self, images: Mapping[str, Tensor], goal: Tensor | None, proprio: Tensor,
                       instructions: Sequence[str | None] | None = None, n_steps: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """Batched sampling: uint8 (B, H, W, 3) images -> (B, chunk_len, action_dim) actions in robot units."""
        cfg = self.config
        if n_steps is not None:
            self.sampler.check_steps(n_steps)
        self._check_inputs(images, goal, proprio, instructions, batched=True)
        if not self.normalizer.is_fitted:
            raise RuntimeError("policy normaliser was never fitted: this model was not trained (or its checkpoint "
                               "lost its statistics)")
        device = next(self.parameters()).device
        images = {k: v.to(device) for k, v in images.items()}
        goal = goal.to(device) if goal is not None else None
        proprio = proprio.to(device).float()
        was_training = self.training
        self.eval()
        try:
            cond = self.encode_observation(images, goal, proprio, instructions)
        finally:
            self.train(was_training)
        return self._sample_from_condition(cond, n_steps, generator)

    def _sample_from_condition(self, cond: Tensor, n_steps: int | None,
                               generator: torch.Generator | None) -> Tensor:
        """(B, depth, W) conditions -> (B, chunk_len, action_dim) actions in robot units, clipped and checked."""
        cfg = self.config
        device = cond.device
        was_training = self.training
        self.eval()
        try:
            b = cond.shape[0]
            noise = torch.randn(b, cfg.chunk_len, cfg.action_dim, generator=generator,
                                device=generator.device if generator is not None else device).to(device)
            x = self.sampler.sample(lambda x, t, k: self.net(x, t, k, cond), noise, n_steps)
        finally:
            self.train(was_training)
        actions = self.normalizer.decode("actions", x.clamp(-1.0, 1.0))
        if not torch.isfinite(actions).all():
            raise FloatingPointError("the policy produced NaN/inf actions (corrupted weights?); refusing to act")
        if self.space.low is not None:
            low = torch.tensor(self.space.low, device=device)
            high = torch.tensor(self.space.high, device=device)
        else:
            low, high = self.normalizer.bounds("actions")
        return binarize_gripper(torch.maximum(torch.minimum(actions, high), low), self.space.gripper_index)

    def predict_chunk(self, obs: Observation, goal: Any = None, n_steps: int | None = None,
                      generator: torch.Generator | None = None, goal_tokens: Any = None) -> ActionChunk:
        """One chunk for one observation. ``goal``: (H, W, 3) uint8 image (None for no-goal policies).

        ``goal_tokens``: the goal already in this policy's goal-encoder space, (n_tokens, W) floats (a token-space
        subgoal generator's output, ``Subgoal.tokens``); it replaces the goal image, and the cameras' tokens come
        from ``frame_tokens(obs)``, shared with the planner stages."""
        if goal_tokens is not None:
            return self._predict_from_tokens(obs, goal_tokens, n_steps, generator)
        # Only the policy's cameras are read: a lazy camera mapping (the playtable's) renders nothing else.
        images = {k: _to_tensor(obs.images[k], f"image {k!r}") for k in self.config.cameras if k in obs.images}
        proprio = _to_tensor(obs.proprio, "proprio")
        if proprio.is_complex() or proprio.dtype == torch.bool:  # .float() would drop the imaginary part silently
            raise TypeError(f"proprio must hold real numbers, got dtype {proprio.dtype}")
        if not torch.is_floating_point(proprio):
            proprio = proprio.float()
        goal_t = _to_tensor(goal, "goal") if goal is not None else None
        self._check_inputs(images, goal_t, proprio, [obs.instruction], batched=False)
        actions = self.sample_actions({k: v[None] for k, v in images.items()},
                                      goal_t[None] if goal_t is not None else None, proprio[None],
                                      [obs.instruction] if self.config.use_language else None, n_steps, generator)
        return ActionChunk(actions=actions[0].cpu(), t0=int(obs.t), space=self.space.name)


    @torch.no_grad()
    def _predict_from_tokens(self, obs: Observation, goal_tokens: Any, n_steps: int | None,
                             generator: torch.Generator | None) -> ActionChunk:
        cfg = self.config
        if not cfg.use_goal:
            raise ValueError("this policy takes no goal (use_goal=False); goal_tokens must be None")
        if n_steps is not None:
            self.sampler.check_steps(n_steps)
        if not self.normalizer.is_fitted:
            raise RuntimeError("policy normaliser was never fitted: this model was not trained (or its checkpoint "
                               "lost its statistics)")
        goal = _to_tensor(goal_tokens, "goal_tokens")
        want = (cfg.image_encoder.n_tokens, cfg.width)
        if tuple(goal.shape) != want or not torch.is_floating_point(goal):
            raise ValueError(f"goal_tokens must be float {want} (the goal encoder's tokens), got {goal.dtype} "
                             f"{tuple(goal.shape)}")
        if not torch.isfinite(goal).all():
            raise ValueError("goal_tokens contain NaN/inf values")
        proprio = _to_tensor(obs.proprio, "proprio")
        if proprio.is_complex() or proprio.dtype == torch.bool:
            raise TypeError(f"proprio must hold real numbers, got dtype {proprio.dtype}")
        proprio = proprio.float()
        self._check_inputs({}, None, proprio, [obs.instruction], batched=False, check_images=False)
        tokens = dict(self.frame_tokens(obs))
        device = tokens["__goal__"].device
        tokens["__goal__"] = goal.to(device).float()[None]
        was_training = self.training
        self.eval()
        try:
            cond = self._condition_from_tokens(tokens, proprio[None].to(device),
                                               [obs.instruction] if cfg.use_language else None)
        finally:
            self.train(was_training)
        actions = self._sample_from_condition(cond, n_steps, generator)
        return ActionChunk(actions=actions[0].cpu(), t0=int(obs.t), space=self.space.name)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["DiTConfig", "DiTNet", "DiTPolicy", "AdaLNZeroBlock", "count_parameters"]
