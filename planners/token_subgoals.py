"""SuSIE's generator and GHIL-Glue's filter in the policy's token space: perception computed once.

The shipped policy (``checkpoints/dit_small``) sees its goal through a frozen goal encoder: one (n_tokens, W) token
per goal frame, and ``ghil featurize`` caches those tokens (and every camera's) for each dataset frame. These stages
work in that space instead of in pixels:

* ``TokenSubgoalGenerator`` (type ``susie_tokens``): a diffusion transformer (adaLN-Zero blocks, the policy's) that
  imagines the goal encoder's tokens of the frame ``horizon`` steps ahead, conditioned on the current frame's tokens
  (every camera + the goal encoder on the current goal-camera frame) and the instruction's sentence embedding.
  SuSIE's recipe otherwise: condition dropout and dual classifier-free guidance (image and text scales, the same
  ``dual_guidance`` as the pixel model), shortcut or DDIM few-step sampling, K candidates from one batched call. A
  small preview decoder (tokens -> 64x64 frame, trained on the side with the target's real tokens) shows each
  candidate in videos; the policy never sees the preview, it steers by the tokens (``Subgoal.tokens``).
* ``TokenProgressFilter`` (type ``ghil_glue_tokens``): GHIL-Glue's classifier on (current goal-space token,
  candidate token, instruction): FiLM-conditioned MLP to one logit, the paper's in-batch negatives
  (``build_negatives``) and de-synchronised augmentation (independent cached views of the current frame and the
  goal). It scores token candidates (``score_tokens``) and, through the bound policy's goal encoder, image
  candidates from any generator (``score``).

Why: at 2 CPU cores a pixel UNet trains at ~10 samples/s and proposes K=4 in ~400 ms; these train at thousands of
samples/s on the cached tokens and replan in a few ms, and their goals are exactly the inputs the policy learnt on
(no blurry generated frame for the policy's encoder to misread).

The token space is named by the policy checkpoint (``encoder``) and its encoders' weights hash
(``encoder_sha256``, ``DiTPolicy.encoder_sha256()``; the recipe records it). ``PolicyAgent`` binds the goal
provider to its policy (``bind_policy``), which refuses a policy of another token space, and then every stage reads
the policy's per-observation ``frame_tokens`` (each frame encoded once per step); unbound, a stage loads
``encoder`` itself.

Usage::

    gen = load_pretrained("checkpoints/susie_tokens")
    tokens, previews = gen.propose_tokens(obs, "open the drawer", n_candidates=4)   # (4, 1, 128), (4, 200, 200, 3)
    filt = load_pretrained("checkpoints/ghil_glue_tokens")
    best = int(np.argmax(filt.score_tokens(obs, tokens, "open the drawer")))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghil.checkpoint import PretrainedMixin, coerce_config, register, register_config
from ghil.nn.encoders import MiniLMConfig, TextEncoder, TextEncoderConfig, build_text_encoder, sinusoidal_embedding
from ghil.normalizer import Normalizer, VectorStats
from ghil.types import Observation
from planners.ghil_glue_filter import (
    TEXT_CONFIGS,
    NegativeFractions,
    build_negatives,
    check_candidates,
    last_frames,
    progress_loss,
)
from planners.image_generator import NonFiniteSubgoalError, check_instruction, condition_dropout, dual_guidance
from policies.ddim import DDIMConfig
from policies.dit import AdaLNZeroBlock, _modulate
from policies.shortcut import ShortcutConfig

__all__ = ["TokenSpace", "TokenGeneratorConfig", "TokenSubgoalGenerator", "TokenFilterConfig",
           "TokenProgressFilter", "TokenSpaceMismatch"]

_SAMPLERS = (DDIMConfig, ShortcutConfig)


class TokenSpaceMismatch(ValueError):
    """A stage trained in one policy's encoder token space was paired with a policy of another."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_text_config(config: Any) -> None:
    if isinstance(config.text_encoder, Mapping):  # a plain mapping of MiniLM's fields
        object.__setattr__(config, "text_encoder", coerce_config(config.text_encoder, MiniLMConfig, "text_encoder"))
    if not isinstance(config.text_encoder, TEXT_CONFIGS):
        raise TypeError(f"{type(config).__name__}.text_encoder must be one of {[c.__name__ for c in TEXT_CONFIGS]}, "
                        f"got {config.text_encoder!r}")


# -- the token space ----------------------------------------------------------------------------------------------


class TokenSpace:
    """The frozen encoders a stage works on: the bound policy's, or the ``encoder`` checkpoint loaded on first use.

    Not an ``nn.Module`` attribute of the stage (the encoders are the policy's and never saved twice).
    """

    def __init__(self, encoder: str, encoder_sha256: str | None, owner: str):
        self.encoder, self.encoder_sha256, self.owner = encoder, encoder_sha256, owner
        self._policy: Any = None

    def bind(self, policy: Any) -> None:
        if not callable(getattr(policy, "frame_tokens", None)) or not callable(getattr(policy, "encoder_sha256",
                                                                                        None)):
            raise TokenSpaceMismatch(f"{self.owner} works in a policy's encoder token space, but "
                                     f"{type(policy).__name__} has no frame_tokens()/encoder_sha256() (a DiTPolicy "
                                     "has)")
        sha = policy.encoder_sha256()
        if self.encoder_sha256 is not None and sha != self.encoder_sha256:
            raise TokenSpaceMismatch(f"{self.owner} was trained on the frozen encoders of {self.encoder} (encoder "
                                     f"sha256 {self.encoder_sha256[:12]}), but the policy's encoders are "
                                     f"{sha[:12]}: pair it with a policy trained on those encoders, or retrain it "
                                     "on a feature cache of this policy (`ghil featurize encoder.path=<policy>`)")
        self._policy = policy

    @property
    def policy(self) -> Any:
        if self._policy is None:
            from ghil.data.features import load_encoder_checkpoint

            policy, _ = load_encoder_checkpoint(self.encoder)
            self.bind(policy)
        return self._policy

    def tokens(self, obs: Observation) -> dict[str, Tensor]:
        if not isinstance(obs, Observation):
            raise ValueError(f"obs must be a ghil.types.Observation, got {type(obs).__name__}")
        return self.policy.frame_tokens(obs)

    @torch.no_grad()
    def encode_goals(self, images: np.ndarray) -> Tensor:
        """(K, H, W, 3) uint8 goal-camera frames -> (K, n_tokens, W) goal-encoder tokens (no augmentation)."""
        from ghil.nn.augment import resize

        policy = self.policy
        cfg = policy.config
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        device = next(policy.parameters()).device
        return policy.goal_encoder(resize(x.to(device), cfg.encoder_size[cfg.goal_camera]))


def _context(tokens: Mapping[str, Tensor], sources: Sequence[str]) -> Tensor:
    """(1, n_sources, n_tokens, W) from ``frame_tokens``' dict, in the stage's source order."""
    missing = [s for s in sources if s not in tokens]
    if missing:
        raise TokenSpaceMismatch(f"the policy's frame tokens lack {missing} (has {sorted(tokens)})")
    return torch.stack([tokens[s][0] for s in sources])[None].float()


# -- the generator ------------------------------------------------------------------------------------------------


@register_config("token_generator_config")
@dataclass(frozen=True)
class TokenGeneratorConfig:
    """Sizes and guidance of the token-space SuSIE generator (defaults: ``generator/susie_tokens.yaml``)."""

    encoder: str = "checkpoints/dit_small"  # the policy checkpoint whose frozen encoders define the token space
    encoder_sha256: str | None = None  # its encoders' hash (set by the recipe; None: not checked)
    sources: tuple[str, ...] = ("rgb_static", "rgb_gripper", "__goal__")  # context rows (cache / frame_tokens keys)
    n_tokens: int = 1  # tokens per source (the encoder's tokens_side ** 2)
    token_dim: int = 128  # W, the policy's width
    camera: str = "rgb_static"  # the goal camera
    frame_size: int = 200  # the goal camera's frames (previews are resized to this)
    horizon: int = 20  # the subgoal is the frame this many steps ahead (SuSIE on CALVIN: 20)
    width: int = 160
    depth: int = 4
    n_heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.0
    time_dim: int = 64
    text_encoder: TextEncoderConfig = field(default_factory=MiniLMConfig)
    cond_drop_prob: float = 0.05  # InstructPix2Pix's: 5 % text, 5 % image, 5 % both dropped
    image_guidance: float = 1.5
    text_guidance: float = 1.5
    max_text_len: int = 256
    preview_size: int = 64  # the preview decoder's output (0: no previews; candidates show the current frame)
    preview_channels: tuple[int, ...] = (64, 48, 32, 16)  # 4x4 -> 64x64 in four upsamplings
    preview_weight: float = 1.0
    preview_rows: int = 32  # the decoder trains on this many rows per batch (it costs more than the rest)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "preview_channels", tuple(int(c) for c in self.preview_channels))
        _check_text_config(self)
        for name in ("n_tokens", "token_dim", "frame_size", "horizon", "width", "depth", "n_heads", "ffn_mult",
                     "time_dim", "max_text_len", "preview_rows"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"TokenGeneratorConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.width % self.n_heads:
            raise ValueError(f"TokenGeneratorConfig.width {self.width} must divide by n_heads {self.n_heads}")
        if "__goal__" not in self.sources:
            raise ValueError("TokenGeneratorConfig.sources must include '__goal__' (the current frame in goal space)")
        if not 0.0 <= self.cond_drop_prob <= 1.0 / 3.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1/3], got {self.cond_drop_prob}")
        for name in ("image_guidance", "text_guidance", "preview_weight"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"TokenGeneratorConfig.{name} must be finite")
        if self.preview_size and self.preview_size != 4 * 2 ** len(self.preview_channels):
            raise ValueError(f"preview_size {self.preview_size} must be 4 * 2**len(preview_channels) = "
                             f"{4 * 2 ** len(self.preview_channels)}")


class PreviewDecoder(nn.Module):
    """Goal tokens -> a small RGB frame in [-1, 1], for showing candidates (never fed to the policy)."""

    def __init__(self, in_dim: int, channels: Sequence[int]):
        super().__init__()
        self.channels = tuple(channels)
        self.stem = nn.Linear(in_dim, self.channels[0] * 16)
        layers: list[nn.Module] = []
        c_in = self.channels[0]
        for c in self.channels:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c, 3, padding=1),
                       nn.GroupNorm(8 if c % 8 == 0 else 1, c), nn.SiLU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, n, W) -> (B, 3, S, S)
        x = self.stem(tokens.flatten(1)).view(len(tokens), self.channels[0], 4, 4)
        return torch.tanh(self.body(x))


@register("susie_tokens")
class TokenSubgoalGenerator(PretrainedMixin, nn.Module):
    """SuSIE in the policy's goal-token space (see the module docstring); a ``SubgoalGenerator`` and ``Learnable``."""

    def __init__(self, config: TokenGeneratorConfig | None = None, sampler: DDIMConfig | ShortcutConfig | None = None):
        super().__init__()
        config = config if config is not None else TokenGeneratorConfig()
        sampler = sampler if sampler is not None else ShortcutConfig()
        if not isinstance(config, TokenGeneratorConfig):
            raise TypeError(f"TokenSubgoalGenerator needs a TokenGeneratorConfig, got {type(config).__qualname__}")
        if not isinstance(sampler, _SAMPLERS):
            raise TypeError(f"sampler must be a DDIMConfig or ShortcutConfig, got {sampler!r}")
        self.config, self.sampler_config = config, sampler
        self.sampler = sampler.build()
        c, d = config, config.width
        n_src = len(c.sources)
        self.normalizer = Normalizer({"goal_tokens": (c.n_tokens * c.token_dim, "min_max")})
        self.context_in = nn.Sequential(nn.LayerNorm(c.token_dim), nn.Linear(c.token_dim, d))
        self.text_in = nn.Linear(c.text_encoder.dim, d)
        self.x_in = nn.Linear(c.token_dim, d)
        self.pos = nn.Parameter(torch.randn((n_src + 1) * c.n_tokens + 1, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(c.time_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.step_size = nn.Embedding(self.sampler.n_step_sizes, d) if self.sampler.n_step_sizes else None
        self.blocks = nn.ModuleList([AdaLNZeroBlock(d, c.n_heads, c.ffn_mult, c.dropout) for _ in range(c.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, c.token_dim)
        self.preview = PreviewDecoder(c.n_tokens * c.token_dim, c.preview_channels) if c.preview_size else None
        self.space = TokenSpace(c.encoder, c.encoder_sha256, type(self).__name__)
        self._text: list[TextEncoder] = []
        self._ema: list[nn.Module] = []
        self._generator: torch.Generator | None = None

    def init_kwargs(self) -> dict[str, Any]:
        return {"config": self.config, "sampler": self.sampler_config}

    def attach_ema(self, ema: nn.Module | None) -> None:
        self._ema[:] = [] if ema is None else [ema]

    def fit_normalizer(self, stats: Mapping[str, VectorStats]) -> None:
        self.normalizer.fit(stats)

    def seed(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(int(seed))

    def bind_policy(self, policy: Any) -> None:
        self.space.bind(policy)

    @property
    def type_name(self) -> str:
        return "susie_tokens"

    @property
    def camera(self) -> str:
        return self.config.camera

    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def device(self) -> torch.device:
        return self.out.weight.device

    def text_encoder(self) -> TextEncoder:
        if not self._text:
            self._text.append(build_text_encoder(self.config.text_encoder))
        return self._text[0]

    def _text_embedding(self, texts: Sequence[str]) -> Tensor:
        return self.text_encoder()(list(texts)).to(self.device).float()  # (B, text_dim)

    # -- the network --------------------------------------------------------------------------------------------

    def _denoise(self, x: Tensor, t: Tensor, k: Tensor | None, context: Tensor, text: Tensor) -> Tensor:
        """x (B, n, W) noisy normalised goal tokens; context (B, n_src, n, W) raw tokens (zeros: dropped); text
        (B, D_text) (the empty sentence's embedding: dropped) -> (B, n, W) velocity / noise prediction."""
        b = x.shape[0]
        seq = torch.cat([self.x_in(x), self.context_in(context.flatten(1, 2)), self.text_in(text)[:, None]], dim=1)
        h = seq + self.pos[: seq.shape[1]]
        emb = self.time_mlp(sinusoidal_embedding(t * 1000.0, self.config.time_dim))
        if k is not None and self.step_size is not None:
            emb = emb + self.step_size(k)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_modulation(emb).chunk(2, dim=-1)
        n = self.config.n_tokens
        return self.out(_modulate(self.final_norm(h[:, :n]), shift, scale)).view(b, n, -1)

    def _check_tokens(self, name: str, x: Tensor, rows: int | None) -> None:
        c = self.config
        want = (c.n_tokens, c.token_dim)
        if tuple(x.shape[-2:]) != want or (rows is not None and x.shape[1] != rows) or not torch.is_floating_point(x):
            raise ValueError(f"{name} must be float (B, {'' if rows is None else f'{rows}, '}{c.n_tokens}, "
                             f"{c.token_dim}) tokens, got {x.dtype} {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contain NaN/inf values")

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Shortcut / DDIM loss on the normalised goal tokens, plus the preview decoder's MSE on the real ones."""
        c = self.config
        context, goal = batch.context.to(self.device).float(), batch.goal.to(self.device).float()
        self._check_tokens("batch.context", context, len(c.sources))
        self._check_tokens("batch.goal", goal[:, None], 1)
        if not self.normalizer.is_fitted:
            raise RuntimeError("the generator's token normaliser was never fitted (the recipe fits it)")
        texts = [check_instruction(t, c.max_text_len, "instruction") for t in batch.instructions]
        b = goal.shape[0]
        text = self._text_embedding(texts)
        if self.training and c.cond_drop_prob > 0:
            drop_text, drop_image = condition_dropout(b, c.cond_drop_prob, self.device)
            text = torch.where(drop_text[:, None], self._text_embedding([""]).expand_as(text), text)
            context = context * (~drop_image).to(context.dtype)[:, None, None, None]
        x1 = self.normalizer.encode("goal_tokens", goal.flatten(1)).view_as(goal).clamp(-1.0, 1.0)

        def make(model: TokenSubgoalGenerator):
            def denoise(x: Tensor, t: Tensor, k: Tensor | None) -> Tensor:
                m = x.shape[0]  # samplers bootstrap from the first m rows
                return model._denoise(x, t, k, context[:m], text[:m])
            return denoise

        denoise = make(self)
        target = make(self._ema[0]) if self._ema else denoise
        mask = torch.ones(b, c.n_tokens, dtype=torch.bool, device=self.device)
        loss, metrics = self.sampler.loss(denoise, target, x1, mask)
        metrics = {"diffusion": float(loss.detach()), **metrics}
        if self.preview is not None and getattr(batch, "preview", None) is not None:
            m = min(c.preview_rows, b)
            real = batch.preview[:m].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            preview_loss = F.mse_loss(self.preview(goal[:m]), real)
            loss = loss + c.preview_weight * preview_loss
            metrics["preview_mse"] = float(preview_loss.detach())
        return loss, {"loss": float(loss.detach()), **metrics}

    # -- inference ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_tokens(self, context: Tensor, subtask: str, n_candidates: int, n_steps: int | None = None,
                      generator: torch.Generator | None = None, image_guidance: float | None = None,
                      text_guidance: float | None = None) -> Tensor:
        """(1, n_src, n, W) context -> (K, n, W) goal tokens (robot-free units: the goal encoder's), one batch."""
        c = self.config
        if not _is_int(n_candidates) or n_candidates < 1:
            raise ValueError(f"n_candidates must be an int >= 1, got {n_candidates!r}")
        check_instruction(subtask, c.max_text_len)
        self._check_tokens("context", context, len(c.sources))
        if n_steps is not None:
            self.sampler.check_steps(n_steps)
        s_img = c.image_guidance if image_guidance is None else float(image_guidance)
        s_txt = c.text_guidance if text_guidance is None else float(text_guidance)
        if not (math.isfinite(s_img) and math.isfinite(s_txt)):
            raise ValueError(f"guidance scales must be finite, got image {s_img}, text {s_txt}")
        if not self.normalizer.is_fitted:
            raise RuntimeError("the generator's token normaliser was never fitted: this model was not trained")
        k = int(n_candidates)
        was_training = self.training
        self.eval()
        try:
            ctx = context.to(self.device).float().expand(k, -1, -1, -1)
            text = self._text_embedding([subtask]).expand(k, -1)
            null = self._text_embedding([""]).expand(k, -1)
            generator = generator if generator is not None else self._generator
            noise = torch.randn(k, c.n_tokens, c.token_dim, generator=generator,
                                device=generator.device if generator is not None else self.device).to(self.device)
            if s_img == 1.0 and s_txt == 1.0:
                denoise = lambda x, t, ks: self._denoise(x, t, ks, ctx, text)  # noqa: E731
            else:
                def denoise(x: Tensor, t: Tensor, ks: Tensor | None) -> Tensor:
                    out = self._denoise(torch.cat([x, x, x]), t.repeat(3), None if ks is None else ks.repeat(3),
                                        torch.cat([ctx, ctx, torch.zeros_like(ctx)]), torch.cat([text, null, null]))
                    e_full, e_image, e_none = out.chunk(3)
                    return dual_guidance(e_full, e_image, e_none, s_img, s_txt)
            x = self.sampler.sample(denoise, noise, n_steps)
            tokens = self.normalizer.decode("goal_tokens", x.clamp(-1.0, 1.0).flatten(1)).view(k, c.n_tokens, -1)
        finally:
            self.train(was_training)
        if not torch.isfinite(tokens).all():
            raise NonFiniteSubgoalError(f"{type(self).__name__} produced NaN/inf tokens for {subtask!r}")
        return tokens

    @torch.no_grad()
    def previews(self, tokens: Tensor, fallback: np.ndarray | None = None) -> np.ndarray:
        """(K, n, W) tokens -> (K, frame_size, frame_size, 3) uint8 previews (the fallback frame without a decoder)."""
        from ghil.data.subgoal_dataset import resize_frames

        c = self.config
        if self.preview is None:
            frame = fallback if fallback is not None else np.zeros((c.frame_size, c.frame_size, 3), np.uint8)
            return np.repeat(np.asarray(frame, dtype=np.uint8)[None], len(tokens), axis=0)
        was_training = self.training
        self.eval()
        try:
            pixels = self.preview(tokens.to(self.device).float())
        finally:
            self.train(was_training)
        images = ((pixels.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return resize_frames(images, c.frame_size).numpy()

    def propose_tokens(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                       generator: torch.Generator | None = None, image_guidance: float | None = None,
                       text_guidance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(K, n, W) float32 goal tokens and their (K, H, W, 3) uint8 previews, from one batched call."""
        check_instruction(subtask, self.config.max_text_len)
        context = _context(self.space.tokens(obs), self.config.sources)
        tokens = self.sample_tokens(context, subtask, n_candidates, n_steps, generator, image_guidance, text_guidance)
        frame = obs.images.get(self.config.camera) if hasattr(obs.images, "get") else None
        return tokens.cpu().numpy().astype(np.float32), self.previews(tokens, frame)

    def propose(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                generator: torch.Generator | None = None) -> np.ndarray:
        """The ``SubgoalGenerator`` contract: (K, H, W, 3) uint8 previews of the imagined goals."""
        return self.propose_tokens(obs, subtask, n_candidates, n_steps, generator)[1]


# -- the filter ---------------------------------------------------------------------------------------------------


@register_config("token_filter_config")
@dataclass(frozen=True)
class TokenFilterConfig:
    """GHIL-Glue's classifier on goal-space tokens (defaults: ``filter/ghil_glue_tokens.yaml``)."""

    encoder: str = "checkpoints/dit_small"
    encoder_sha256: str | None = None
    n_tokens: int = 1
    token_dim: int = 128
    camera: str = "rgb_static"
    frame_size: int = 200
    hidden: tuple[int, ...] = (256, 256)  # the paper's head: [256, 256], LayerNorm, swish, dropout
    dropout: float = 0.1
    text_encoder: TextEncoderConfig = field(default_factory=MiniLMConfig)
    max_text_len: int = 256
    negatives: NegativeFractions = field(default_factory=NegativeFractions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        _check_text_config(self)
        object.__setattr__(self, "negatives", coerce_config(self.negatives, NegativeFractions, "negatives"))
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"TokenFilterConfig.hidden must be widths >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TokenFilterConfig.dropout must be in [0, 1), got {self.dropout}")


@register("ghil_glue_tokens")
class TokenProgressFilter(PretrainedMixin, nn.Module):
    """GHIL-Glue's progress classifier on goal-space tokens; a ``SubgoalFilter`` and a ``Learnable``."""

    def __init__(self, config: TokenFilterConfig | None = None):
        super().__init__()
        config = config if config is not None else TokenFilterConfig()
        if not isinstance(config, TokenFilterConfig):
            raise TypeError(f"TokenProgressFilter needs a TokenFilterConfig, got {type(config).__qualname__}")
        self.config = config
        dim = config.n_tokens * config.token_dim
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList()
        self.films = nn.ModuleList()
        c_in = 3 * dim  # current, candidate, and their difference (progress is a change)
        for h in config.hidden:
            self.layers.append(nn.Linear(c_in, h))
            film = nn.Linear(config.text_encoder.dim, 2 * h)
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
            self.films.append(film)
            c_in = h
        self.layer_norms = nn.ModuleList([nn.LayerNorm(h) for h in config.hidden])
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in, 1)
        self.space = TokenSpace(config.encoder, config.encoder_sha256, type(self).__name__)
        self._text: list[TextEncoder] = []

    def init_kwargs(self) -> dict[str, Any]:
        return {"config": self.config}

    def attach_ema(self, ema: nn.Module | None) -> None:
        """Nothing to bootstrap; the trainer still ships the EMA weights."""

    def bind_policy(self, policy: Any) -> None:
        self.space.bind(policy)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def text_encoder(self) -> TextEncoder:
        if not self._text:
            self._text.append(build_text_encoder(self.config.text_encoder))
        return self._text[0]

    def _logits(self, current: Tensor, goal: Tensor, text: Tensor) -> Tensor:
        cur, g = self.norm(current.flatten(1)), self.norm(goal.flatten(1))
        h = torch.cat([cur, g, g - cur], dim=-1)
        for layer, film, norm in zip(self.layers, self.films, self.layer_norms):
            gamma, beta = film(text).chunk(2, dim=-1)
            h = self.drop(F.silu(norm(layer(h)) * (1 + gamma) + beta))
        return self.head(h).squeeze(-1)

    def _check_tokens(self, name: str, x: Tensor) -> Tensor:
        c = self.config
        if x.ndim != 3 or tuple(x.shape[1:]) != (c.n_tokens, c.token_dim) or not torch.is_floating_point(x):
            raise ValueError(f"{name} must be float (B, {c.n_tokens}, {c.token_dim}) tokens, got {x.dtype} "
                             f"{tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contain NaN/inf values")
        return x.to(self.device).float()

    @torch.no_grad()
    def logits(self, current: Tensor, goal: Tensor, instructions: Sequence[str]) -> Tensor:
        """(B, n, W) current goal-space tokens, (B, n, W) candidates, B instructions -> (B,) logits."""
        current, goal = self._check_tokens("current", torch.as_tensor(current)), self._check_tokens(
            "goal", torch.as_tensor(goal))
        if len(instructions) != len(current) or len(goal) != len(current):
            raise ValueError(f"{len(current)} current, {len(goal)} goals, {len(instructions)} instructions: need one "
                             "of each per row")
        texts = [check_instruction(t, self.config.max_text_len, "instruction") for t in instructions]
        was_training = self.training
        self.eval()
        try:
            return self._logits(current, goal, self.text_encoder()(texts).to(self.device).float())
        finally:
            self.train(was_training)

    @torch.no_grad()
    def score_tokens(self, obs: Observation, candidates: Any, subtask: str) -> np.ndarray:
        """(K,) float64 logits for (K, n, W) goal-token candidates from ``obs``'s current frame."""
        text = check_instruction(subtask, self.config.max_text_len)
        cand = self._check_tokens("candidates", torch.as_tensor(np.asarray(candidates, dtype=np.float32)))
        current = self.space.tokens(obs)["__goal__"].to(self.device).float().expand(len(cand), -1, -1)
        return self.logits(current, cand, [text] * len(cand)).double().cpu().numpy()

    @torch.no_grad()
    def score(self, obs: Observation, candidates: np.ndarray, subtask: str) -> np.ndarray:
        """The ``SubgoalFilter`` contract: image candidates (K, H, W, 3) (clips: their last frames), encoded by the
        bound policy's goal encoder, then scored like tokens."""
        check_instruction(subtask, self.config.max_text_len)
        s = self.config.frame_size
        goals = last_frames(check_candidates(candidates, (s, s)))
        return self.score_tokens(obs, self.space.encode_goals(goals).cpu().numpy(), subtask)

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """BCE on the paper's in-batch negatives of a ``TokenSubgoalBatch`` of positives (the current frame's goal-
        space tokens are the context's ``"__goal__"`` row, its last)."""
        current = self._check_tokens("batch current", batch.context[:, -1].float())
        goal = self._check_tokens("batch goals", batch.goal.float())
        instructions = [check_instruction(t, self.config.max_text_len, "instruction") for t in batch.instructions]
        plan = build_negatives(instructions, batch.episode_rows, self.config.negatives, tasks=batch.tasks)
        stack = torch.cat([current, goal])
        text = self.text_encoder()([instructions[i] for i in plan.text.tolist()]).to(self.device).float()
        logits = self._logits(stack[plan.current.to(self.device)], stack[plan.goal.to(self.device)], text)
        return progress_loss(logits, plan)
