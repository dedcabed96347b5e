"""SuSIE-style subgoal generator: an image-editing diffusion model that imagines the frame ``horizon`` steps ahead.

The network is a diffusers ``UNet2DConditionModel`` whose input is the noisy subgoal concatenated on channels with
the current frame (InstructPix2Pix's 8-channel trick), cross-attending to the instruction's text embedding (a frozen
ghil text encoder; pooled encoders give one token, ``ClipTokensConfig`` the 77 CLIP token states Stable Diffusion
UNets expect). Training drops the conditions exactly as InstructPix2Pix does (one uniform draw u per row: text
dropped when u < 2p, image when p <= u < 3p, so p text only, p both, p image only), and sampling applies dual
classifier-free guidance, the three branches in one batched UNet call::

    eps = e(∅, ∅) + s_img * (e(img, ∅) - e(∅, ∅)) + s_txt * (e(img, txt) - e(img, ∅))

where a dropped image is zero context and a dropped text is the embedding of "" (InstructPix2Pix's conventions).
The sampler is the policy's (``policies.ddim.DDIMConfig`` or ``policies.shortcut.ShortcutConfig``): images are
handed to it as ``(B, C, H*W)``, the layout its (B, T, A) arithmetic broadcasts over, so DDIM and few-step shortcut
sampling are literally the policy's code.

The space is swappable. ``vae=None`` works in pixels (scaled to [-1, 1]) at ``image_size`` (the CPU presets);
``vae=HubWeights(path, "vae")`` works in a frozen ``AutoencoderKL``'s latent space, target latents scaled by its
``scaling_factor`` and context latents not (InstructPix2Pix / SuSIE). ``init_unet`` loads pretrained UNet weights
(``timbrooks/instruct-pix2pix`` or a local copy); a 4-channel Stable Diffusion UNet is widened to the context
channels with zero weights, so it starts as the text-to-image model; ``noise_schedule`` takes the pipeline's beta
range for DDIM, so noise levels match the pretrained weights. The frozen VAE and text encoder live outside
the module tree: never trained, never saved in the checkpoint (which stores their source), shared with the
trainer's EMA copy. K candidates come from one batched sampler call and are resized back to the camera's size.

``DiffusionSubgoalModel`` is the shared core; ``SusieGenerator`` (one frame, ``propose -> (K, H, W, 3)``) here and
``planners.video_generator.VideoGenerator`` (a clip, ``propose -> (K, T, H, W, 3)``) are thin subclasses.

Usage::

    gen = SusieGenerator(SusieConfig(frame_size=200, image_size=64), ShortcutConfig())
    loss, metrics = gen.loss(collate_subgoal(samples))                     # ghil.train.Trainer calls this
    goals = gen.propose(obs, "open the drawer", n_candidates=4)            # (4, 200, 200, 3) uint8
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ghil.checkpoint import PretrainedMixin, coerce_config, register, register_config
from ghil.data.subgoal_dataset import SubgoalBatch, resize_frames
from ghil.nn.encoders import (
    ClipTextConfig,
    HashTextConfig,
    MiniLMConfig,
    TextEncoder,
    build_text_encoder,
    cached_rows,
)
from ghil.types import Observation
from policies.ddim import DDIMConfig
from policies.sampling import Denoise
from policies.shortcut import ShortcutConfig

__all__ = ["ClipTokensConfig", "ClipTokenEncoder", "DiffusionSubgoalModel", "GeneratorConfig", "HubWeights",
           "NonFiniteSubgoalError", "check_instruction", "SusieConfig", "SusieGenerator", "UNetConfig", "condition_dropout",
           "dual_guidance", "guided_denoise"]

SAMPLER_CONFIGS = (DDIMConfig, ShortcutConfig)
# Shortcut models feed the step-size index through the UNet's class embedding; DDIM timesteps are the scheduler's
# integers, shortcut times t in [0, 1] are scaled to the same 0..1000 range the sinusoidal embedding expects.
SHORTCUT_TIME_SCALE = 1000.0


class NonFiniteSubgoalError(ValueError):
    """The generator produced NaN/inf pixels (corrupted weights, or guidance blew up): the caller keeps its
    previous subgoal."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# -- configs ----------------------------------------------------------------------------------------------------


@register_config("unet2d")
@dataclass(frozen=True)
class UNetConfig:
    """A from-scratch ``UNet2DConditionModel``. The defaults are ``susie_small``'s (~2 M parameters, < 10 MB).

    Cross-attention blocks sit only at the two coarsest levels: attention at 64x64 costs more than the rest of
    the network on a CPU, and the instruction mostly decides *what* moves, which coarse features carry.
    """

    block_out_channels: tuple[int, ...] = (32, 48, 64, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    cross_attention_dim: int = 64
    n_heads: int = 4  # attention heads per block (diffusers' UNet2DConditionModel calls it attention_head_dim)
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        n = len(self.block_out_channels)
        if n < 1 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: block_out_channels {self.block_out_channels}, down_block_types and "
                             "up_block_types need one entry per level")
        if min(self.block_out_channels) < 1 or self.layers_per_block < 1 or self.cross_attention_dim < 1:
            raise ValueError("UNetConfig: channels, layers_per_block and cross_attention_dim must be positive")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups or c % self.n_heads]
        if self.norm_num_groups < 1 or self.n_heads < 1 or bad:
            raise ValueError(f"UNetConfig: every block_out_channels entry must be a multiple of norm_num_groups "
                             f"({self.norm_num_groups}) and n_heads ({self.n_heads}); {bad} are not")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def build(self, in_channels: int, out_channels: int, sample_size: int, text_dim: int, n_step_sizes: int):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=self.block_out_channels, down_block_types=self.down_block_types,
            up_block_types=self.up_block_types, layers_per_block=self.layers_per_block,
            cross_attention_dim=self.cross_attention_dim, attention_head_dim=self.n_heads,
            norm_num_groups=self.norm_num_groups,
            # The text encoder's width differs from the UNet's attention width: diffusers' own projection.
            encoder_hid_dim=text_dim if text_dim != self.cross_attention_dim else None,
            num_class_embeds=n_step_sizes or None)


@register_config("hf_weights")
@dataclass(frozen=True)
class HubWeights:
    """Pretrained diffusers/transformers weights: a hub id or a local folder, and the subfolder inside it."""

    path: str
    subfolder: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"HubWeights.path must be a hub id or a folder, got {self.path!r}")


@register_config("clip_tokens")
@dataclass(frozen=True)
class ClipTokensConfig:
    """A CLIP text tower's per-token last hidden states ``(B, max_length, dim)``: what Stable Diffusion and
    InstructPix2Pix UNets cross-attend to (``CLIPTextModel`` + its tokenizer from one pipeline folder or hub id)."""

    path: str = "timbrooks/instruct-pix2pix"
    subfolder: str | None = "text_encoder"
    tokenizer_subfolder: str | None = "tokenizer"
    dim: int = 768
    max_length: int = 77


TEXT_CONFIGS = (MiniLMConfig, ClipTextConfig, HashTextConfig, ClipTokensConfig)


@dataclass(frozen=True)
class GeneratorConfig:
    """Settings shared by the image (``SusieConfig``) and video (``VideoConfig``) generators."""

    camera: str = "rgb_static"  # the camera whose future is imagined (its frames condition the model)
    frame_size: int = 200  # the camera's (square) frame size: propose() checks its input and returns this size
    image_size: int = 64  # what the model generates at (pixels; in latent mode the VAE's input)
    horizon: int = 20  # the subgoal is the frame this many steps ahead (SuSIE on CALVIN: 20)
    unet: UNetConfig = field(default_factory=UNetConfig)  # the architecture when not loaded from init_unet
    init_unet: HubWeights | None = None  # pretrained UNet weights (diffusers folder / hub id), e.g. InstructPix2Pix
    vae: HubWeights | None = None  # a frozen AutoencoderKL: generate in its latent space (None: in pixels)
    # A pretrained pipeline's scheduler config (its beta range): DDIM then uses the noise levels the pretrained UNet
    # was trained at (Stable Diffusion's scaled_linear 0.00085..0.012, not diffusers' 0.0001..0.02 default).
    noise_schedule: HubWeights | None = None
    text_encoder: MiniLMConfig | ClipTextConfig | HashTextConfig | ClipTokensConfig = field(
        default_factory=MiniLMConfig)
    cond_drop_prob: float = 0.05  # InstructPix2Pix: this share drops the text only, the image only, and both
    image_guidance: float = 1.5  # s_img (GHIL-Glue CALVIN: 1.5)
    text_guidance: float = 7.5  # s_txt (GHIL-Glue CALVIN: 7.5)
    max_text_len: int = 256  # characters; longer instructions are refused

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("unet", coerce_config(self.unet, UNetConfig, f"{type(self).__name__}.unet"))
        set_("init_unet", coerce_config(self.init_unet, HubWeights, f"{type(self).__name__}.init_unet",
                                        optional=True))
        set_("vae", coerce_config(self.vae, HubWeights, f"{type(self).__name__}.vae", optional=True))
        set_("noise_schedule", coerce_config(self.noise_schedule, HubWeights,
                                             f"{type(self).__name__}.noise_schedule", optional=True))
        name = type(self).__name__
        if not isinstance(self.text_encoder, TEXT_CONFIGS):
            raise TypeError(f"{name}.text_encoder must be one of {[c.__name__ for c in TEXT_CONFIGS]}, got "
                            f"{self.text_encoder!r}")
        if not isinstance(self.camera, str) or not self.camera.startswith("rgb_"):
            raise ValueError(f"{name}.camera must be an RGB camera key, got {self.camera!r}")
        for key in ("frame_size", "image_size"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 8:
                raise ValueError(f"{name}.{key} must be an int >= 8 px, got {getattr(self, key)!r}")
        if self.vae is None and self.init_unet is None and self.image_size % self.unet.downsample_factor:
            raise ValueError(f"{name}.image_size ({self.image_size}) must be a multiple of the UNet's downsampling "
                             f"factor {self.unet.downsample_factor} ({len(self.unet.block_out_channels)} levels)")
        if not _is_int(self.horizon) or self.horizon < 1:
            raise ValueError(f"{name}.horizon must be an int >= 1 step, got {self.horizon!r}")
        if not 0.0 <= self.cond_drop_prob <= 1.0 / 3.0:
            raise ValueError(f"{name}.cond_drop_prob must be in [0, 1/3] (3 disjoint shares of the batch), got "
                             f"{self.cond_drop_prob}")
        for key in ("image_guidance", "text_guidance"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}.{key} must be a finite number >= 0, got {value!r}")
        if not _is_int(self.max_text_len) or self.max_text_len < 1:
            raise ValueError(f"{name}.max_text_len must be a positive int, got {self.max_text_len!r}")

    @property
    def n_frames(self) -> int:
        return 1


@register_config("susie_config")
@dataclass(frozen=True)
class SusieConfig(GeneratorConfig):
    """The image generator's settings. The defaults are ``ghil/configs/generator/susie_small.yaml`` (the CPU
    preset; tests/test_generators.py keeps the two equal); ``instruct_pix2pix.yaml`` is the latent GPU preset."""


def check_instruction(text: Any, max_len: int, name: str = "subtask") -> str:
    """``text`` when it is a non-empty string of at most ``max_len`` characters; a ValueError naming ``name``
    otherwise (every subgoal stage checks its instruction with this)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string instruction, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: a subgoal stage needs an instruction to work towards")
    if len(text) > max_len:
        raise ValueError(f"{name} is too long: {len(text)} characters, at most {max_len} (max_text_len) "
                         f"({text[:60]!r}...)")
    return text


# -- guidance and condition dropout -----------------------------------------------------------------------------


def dual_guidance(e_full: Tensor, e_image: Tensor, e_none: Tensor, image_scale: float, text_scale: float) -> Tensor:
    """InstructPix2Pix's guidance: ``e(∅,∅) + s_img (e(img,∅) - e(∅,∅)) + s_txt (e(img,txt) - e(img,∅))``."""
    return e_none + image_scale * (e_image - e_none) + text_scale * (e_full - e_image)


def guided_denoise(denoise: Callable[..., Tensor], context: Tensor, text: Tensor, null_text: Tensor,
                   image_scale: float, text_scale: float) -> Denoise:
    """A sampler ``denoise(x, t, k)`` applying dual guidance to ``denoise(x, t, k, context, text)``.

    The three branches (image + text, image only, neither) run as one batch of 3B rows; a dropped image is zero
    context, a dropped text ``null_text``. With both scales 1 the formula is the conditional branch alone, which is
    then the only one computed.
    """
    if image_scale == 1.0 and text_scale == 1.0:
        return lambda x, t, k: denoise(x, t, k, context, text)

    def guided(x: Tensor, t: Tensor, k: Tensor | None) -> Tensor:
        out = denoise(torch.cat([x, x, x]), t.repeat(3), None if k is None else k.repeat(3),
                      torch.cat([context, context, torch.zeros_like(context)]),
                      torch.cat([text, null_text, null_text]))
        e_full, e_image, e_none = out.chunk(3)
        return dual_guidance(e_full, e_image, e_none, image_scale, text_scale)

    return guided


def condition_dropout(n: int, prob: float, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(drop_text, drop_image)`` (n,) bool masks, InstructPix2Pix's: one uniform u per row, text dropped for
    u < 2p, image for p <= u < 3p, so a share p drops the text only, p both, p the image only."""
    u = torch.rand(n, device=device, generator=generator)
    return u < 2 * prob, (u >= prob) & (u < 3 * prob)


# -- frozen parts ----------------------------------------------------------------------------------------------


class ClipTokenEncoder:
    """Strings -> ``(B, max_length, dim)`` CLIP last hidden states (padded to max_length, as Stable Diffusion),
    frozen and cached per string. Instructions longer than ``max_length`` tokens are refused, not truncated."""

    def __init__(self, config: ClipTokensConfig, cache_size: int = 1024):
        from transformers import AutoTokenizer, CLIPTextModel

        kwargs = lambda sub: {"subfolder": sub} if sub else {}  # noqa: E731
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.path, **kwargs(config.tokenizer_subfolder))
        self.model = CLIPTextModel.from_pretrained(config.path, **kwargs(config.subfolder)).eval().requires_grad_(False)
        if self.model.config.hidden_size != config.dim:
            raise ValueError(f"ClipTokensConfig.dim is {config.dim} but {config.path} has hidden size "
                             f"{self.model.config.hidden_size}")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def check(self, text: str) -> None:
        n = len(self.tokenizer(text, truncation=False)["input_ids"])
        if n > self.config.max_length:
            raise ValueError(f"instruction is too long: {n} tokens, the text encoder takes at most "
                             f"{self.config.max_length} ({text[:60]!r}...)")

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        def encode(todo: list[str]) -> Tensor:
            tokens = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.config.max_length,
                                    return_tensors="pt")
            device = next(self.model.parameters()).device
            return self.model(input_ids=tokens["input_ids"].to(device)).last_hidden_state.float().cpu()

        return cached_rows(self._cache, list(texts), encode, self.cache_size)


class _FrozenParts:
    """The frozen text encoder and VAE, kept outside the module tree: never in ``state_dict`` (the checkpoint names
    their source), never optimised, and shared rather than copied by ``copy.deepcopy`` (the trainer's EMA copy)."""

    def __init__(self) -> None:
        self.text: TextEncoder | ClipTokenEncoder | None = None
        self.vae: nn.Module | None = None

    def __deepcopy__(self, memo: dict) -> _FrozenParts:
        return self


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as plain JSON data, without its private keys (paths, versions), so it hashes and
    compares the same before and after a checkpoint round trip."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _load_unet(weights: HubWeights, in_channels: int, out_channels: int):
    """Pretrained UNet weights; a UNet with fewer input channels (Stable Diffusion's 4) is widened with zero
    weights for the context channels (InstructPix2Pix's initialisation: it starts as the text-to-image model)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(weights.path, **({"subfolder": weights.subfolder}
                                                                 if weights.subfolder else {}))
    have = unet.config.in_channels
    if unet.config.out_channels != out_channels or have > in_channels:
        raise ValueError(f"the UNet at {weights.path} maps {have} -> {unet.config.out_channels} channels; this "
                         f"generator needs {in_channels} -> {out_channels} (another VAE, or a video clip length an "
                         "image UNet cannot produce?)")
    if have < in_channels:
        old = unet.conv_in
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :have] = old.weight
            new.bias.copy_(old.bias)
        unet.conv_in = new
        unet.register_to_config(in_channels=in_channels)
    return unet


# -- the model --------------------------------------------------------------------------------------------------


class DiffusionSubgoalModel(PretrainedMixin, nn.Module):
    """The shared core of the image and video generators: ``n_frames`` future frames stacked on the UNet's channels,
    conditioned on the current frame (concatenated) and the instruction (cross-attention)."""

    config_class: type = GeneratorConfig

    def __init__(self, config: GeneratorConfig, sampler: DDIMConfig | ShortcutConfig | None = None,
                 unet_config: Mapping[str, Any] | None = None):
        super().__init__()
        sampler = sampler if sampler is not None else ShortcutConfig()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__qualname__}")
        if not isinstance(sampler, SAMPLER_CONFIGS):
            raise TypeError(f"{type(self).__name__} sampler must be a DDIMConfig or ShortcutConfig, got {sampler!r}")
        if config.vae is not None or config.init_unet is not None:
            # Latents are not confined to [-1, 1] and pretrained UNets have no step-size embedding.
            if not isinstance(sampler, DDIMConfig) or sampler.clip_sample:
                raise ValueError("a latent-space or pretrained generator needs the DDIM sampler with "
                                 "clip_sample=false (the shortcut sampler clamps to [-1, 1], which fits pixels only, "
                                 "and pretrained UNets have no step-size embedding)")
        if config.noise_schedule is not None and not isinstance(sampler, DDIMConfig):
            raise ValueError("noise_schedule sets DDIM's beta range: it needs the DDIM sampler")
        self.config = config
        self.sampler = sampler.build()
        if config.noise_schedule is not None:
            self._adopt_noise_schedule(config.noise_schedule)
        self._time_scale = (float(sampler.n_train_steps) if isinstance(sampler, DDIMConfig)
                            else SHORTCUT_TIME_SCALE)
        self._frozen = _FrozenParts()
        self._ema: list[nn.Module] = []
        self._generator: torch.Generator | None = None
        self.latent_channels, self.latent_size = 3, config.image_size
        if config.vae is not None:
            vae = self._load_vae(config.vae)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if config.image_size % factor:
                raise ValueError(f"{type(config).__name__}.image_size ({config.image_size}) must be a multiple of the "
                                 f"VAE's downsampling factor {factor}")
            self.latent_channels, self.latent_size = int(vae.config.latent_channels), config.image_size // factor
        c, n = self.latent_channels, self.n_frames
        in_channels, out_channels = (n + 1) * c, n * c
        if unet_config is not None:  # a checkpoint: the exact architecture it was saved with, weights loaded after
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_config(dict(unet_config))
        elif config.init_unet is not None:
            unet = _load_unet(config.init_unet, in_channels, out_channels)
        else:
            unet = config.unet.build(in_channels, out_channels, self.latent_size, config.text_encoder.dim,
                                     self.sampler.n_step_sizes)
        self._check_unet(unet, in_channels, out_channels)
        self.unet = unet

    def _adopt_noise_schedule(self, weights: HubWeights) -> None:
        """Replace the DDIM sampler's scheduler by one with the pretrained pipeline's beta range. The sampler reads
        ``self.sampler.scheduler`` for training noise and copies its config for every sampling call, so both use it;
        the sampler's own settings (steps, clipping, prediction type, spacing) stay as configured."""
        from diffusers import DDIMScheduler

        source = DDIMScheduler.load_config(weights.path, **({"subfolder": weights.subfolder} if weights.subfolder
                                                            else {}))
        mine = self.sampler.config
        theirs = (source.get("num_train_timesteps", 1000), source.get("beta_schedule", "linear"))
        if theirs != (mine.n_train_steps, mine.beta_schedule):
            raise ValueError(f"the pretrained schedule at {weights.path} has {theirs[0]} {theirs[1]} steps, the DDIM "
                             f"sampler is configured for {mine.n_train_steps} {mine.beta_schedule}: make them equal")
        self.sampler.scheduler = DDIMScheduler(
            num_train_timesteps=mine.n_train_steps, beta_start=float(source.get("beta_start", 0.0001)),
            beta_end=float(source.get("beta_end", 0.02)), beta_schedule=mine.beta_schedule,
            clip_sample=mine.clip_sample, prediction_type=mine.prediction_type, set_alpha_to_one=True, steps_offset=0,
            timestep_spacing=mine.timestep_spacing)

    def _load_vae(self, weights: HubWeights) -> nn.Module:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(weights.path, **({"subfolder": weights.subfolder}
                                                             if weights.subfolder else {}))
        self._frozen.vae = vae.eval().requires_grad_(False)
        return vae

    def _check_unet(self, unet: nn.Module, in_channels: int, out_channels: int) -> None:
        cfg = unet.config
        if (cfg.in_channels, cfg.out_channels) != (in_channels, out_channels):
            raise ValueError(f"the UNet maps {cfg.in_channels} -> {cfg.out_channels} channels, this generator needs "
                             f"{in_channels} -> {out_channels}")
        n_steps = self.sampler.n_step_sizes
        if (cfg.num_class_embeds or 0) != n_steps:
            raise ValueError(f"the UNet has {cfg.num_class_embeds} class embeddings but the "
                             f"{type(self.sampler.config).__name__} sampler needs {n_steps} (a step-size embedding "
                             "for shortcut models, none for DDIM): was it built for another sampler?")
        text_in = cfg.encoder_hid_dim or cfg.cross_attention_dim
        if text_in != self.config.text_encoder.dim:
            raise ValueError(f"the UNet cross-attends to {text_in}-d text but the text encoder gives "
                             f"{self.config.text_encoder.dim}-d embeddings")

    def init_kwargs(self) -> dict[str, Any]:
        return {"config": self.config, "sampler": self.sampler.config, "unet_config": _public_config(self.unet.config)}

    @property
    def n_frames(self) -> int:
        return self.config.n_frames

    @property
    def camera(self) -> str:
        return self.config.camera

    @property
    def horizon(self) -> int:
        """Env steps from the observation to the (last) imagined frame; ``GeneratedSubgoals`` times clips by it."""
        return self.config.horizon

    def attach_ema(self, ema: nn.Module | None) -> None:
        """Use ``ema`` (the trainer's copy) for the shortcut model's self-consistency targets (None: live weights)."""
        self._ema[:] = [] if ema is None else [ema]

    def seed(self, seed: int) -> None:
        """Restart the sampling noise stream (``ghil.interfaces.Seedable``; evaluation seeds every subtask)."""
        self._generator = torch.Generator().manual_seed(int(seed))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # -- text -----------------------------------------------------------------------------------------------------

    def text_encoder(self) -> TextEncoder | ClipTokenEncoder:
        if self._frozen.text is None:
            te = self.config.text_encoder
            self._frozen.text = ClipTokenEncoder(te) if isinstance(te, ClipTokensConfig) else build_text_encoder(te)
        return self._frozen.text

    def check_text(self, text: Any, name: str = "subtask") -> str:
        """ValueError unless ``text`` is a non-empty instruction the text encoder can take whole."""
        check_instruction(text, self.config.max_text_len, name)
        encoder = self.text_encoder()
        if isinstance(encoder, ClipTokenEncoder):
            encoder.check(text)
        return text

    def text_tokens(self, texts: Sequence[str]) -> Tensor:
        """``(B, n_tokens, dim)`` text states on the model's device (pooled encoders give one token)."""
        emb = self.text_encoder()(list(texts))
        return (emb if emb.ndim == 3 else emb[:, None]).to(self.device)

    # -- the working space (pixels or VAE latents) ----------------------------------------------------------------

    @staticmethod
    def _to_unit(frames: Tensor) -> Tensor:
        """uint8 (N, S, S, 3) -> float (N, 3, S, S) in [-1, 1]."""
        return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def _vae(self) -> nn.Module:
        vae = self._frozen.vae
        if next(vae.parameters()).device != self.device:
            vae.to(self.device)
        return vae

    @torch.no_grad()
    def encode(self, frames: Tensor, target: bool) -> Tensor:
        """uint8 (N, S, S, 3) at ``image_size`` -> (N, c, s, s) in the working space. Latent targets are scaled by
        the VAE's scaling_factor, context latents are not (InstructPix2Pix, SuSIE)."""
        x = self._to_unit(frames.to(self.device))
        if self._frozen.vae is None:
            return x
        vae = self._vae()
        dist = vae.encode(x).latent_dist
        return dist.sample() * vae.config.scaling_factor if target else dist.mode()

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """(N, c, s, s) working space -> float (N, 3, S, S) pixels, nominally in [-1, 1]."""
        if self._frozen.vae is None:
            return x
        vae = self._vae()
        return vae.decode(x / vae.config.scaling_factor).sample

    # -- the network ----------------------------------------------------------------------------------------------

    def _denoise(self, unet: nn.Module, x: Tensor, t: Tensor, k: Tensor | None, context: Tensor,
                 text: Tensor) -> Tensor:
        """The sampler's view ``x`` (B, n_frames * c, s*s) -> the UNet's prediction in the same layout."""
        b, s = x.shape[0], self.latent_size
        sample = torch.cat([x.reshape(b, -1, s, s), context], dim=1)
        timestep = t * self._time_scale
        if isinstance(self.sampler.config, DDIMConfig):
            timestep = timestep.round()  # the scheduler's integer timesteps, exactly
        out = unet(sample, timestep, encoder_hidden_states=text, class_labels=k).sample
        return out.reshape(b, x.shape[1], -1)

    def _check_batch(self, batch: SubgoalBatch) -> None:
        s = self.config.image_size
        if not isinstance(batch, SubgoalBatch):
            raise TypeError(f"{type(self).__name__}.loss needs a SubgoalBatch (ghil.data.subgoal_dataset), got "
                            f"{type(batch).__qualname__}")
        frames = {"image": batch.image, "goal": batch.goal}
        if self.n_frames > 1:
            if batch.clip is None:
                raise ValueError(f"this video generator needs batch.clip ({self.n_frames} frames); build the data with "
                                 f"n_frames={self.n_frames}")
            frames["clip"] = batch.clip
        for name, value in frames.items():
            want = (s, s, 3) if name != "clip" else (self.n_frames, s, s, 3)
            if value.dtype != torch.uint8 or tuple(value.shape[1:]) != want:
                raise ValueError(f"batch.{name} must be uint8 (B, {', '.join(map(str, want))}) at the generator's "
                                 f"image_size, got {value.dtype} {tuple(value.shape)}")
        if len(batch.instructions) != batch.batch_size:
            raise ValueError(f"{len(batch.instructions)} instructions for a batch of {batch.batch_size}")
        for text in set(batch.instructions):
            self.check_text(text, "a batch instruction")

    def loss(self, batch: SubgoalBatch) -> tuple[Tensor, dict[str, float]]:
        self._check_batch(batch)
        b, n, c = batch.batch_size, self.n_frames, self.latent_channels
        context = self.encode(batch.image, target=False)  # (B, c, s, s)
        future = batch.goal[:, None] if n == 1 else batch.clip  # (B, n, S, S, 3)
        x1 = self.encode(future.reshape(b * n, *future.shape[2:]), target=True).reshape(b, n * c, -1)
        text = self.text_tokens(batch.instructions)  # (B, L, D)
        if self.training and self.config.cond_drop_prob > 0:
            drop_text, drop_image = condition_dropout(b, self.config.cond_drop_prob, self.device)
            text = torch.where(drop_text[:, None, None], self.text_tokens([""]).expand_as(text), text)
            context = context * (~drop_image).to(context.dtype)[:, None, None, None]

        def denoise(x: Tensor, t: Tensor, k: Tensor | None) -> Tensor:
            m = x.shape[0]  # samplers bootstrap from the first m rows
            return self._denoise(self.unet, x, t, k, context[:m], text[:m])

        target_denoise = denoise
        if self._ema:
            ema_unet = self._ema[0].unet

            def target_denoise(x: Tensor, t: Tensor, k: Tensor | None) -> Tensor:
                m = x.shape[0]
                return self._denoise(ema_unet, x, t, k, context[:m], text[:m])

        mask = torch.ones(b, n * c, dtype=torch.bool, device=x1.device)
        loss, metrics = self.sampler.loss(denoise, target_denoise, x1, mask)
        return loss, {"loss": float(loss.detach()), **metrics}

    # -- inference ------------------------------------------------------------------------------------------------

    def _frame(self, obs: Observation) -> Tensor:
        if not isinstance(obs, Observation):
            raise ValueError(f"obs must be a ghil.types.Observation, got {type(obs).__name__}")
        if self.camera not in obs.images:
            raise ValueError(f"obs.images has no {self.camera!r} camera (it has {sorted(obs.images)}); the generator "
                             "is conditioned on that camera's frame")
        frame = obs.images[self.camera]
        try:  # a copy: the caller's frame is never touched
            frame = frame.detach().cpu().clone() if isinstance(frame, Tensor) else torch.from_numpy(np.array(frame))
        except (TypeError, ValueError) as err:  # strings, objects, ragged lists
            raise ValueError(f"frame {self.camera!r} is not a numeric image ({type(err).__name__}: {err})") from None
        size = self.config.frame_size
        if frame.dtype != torch.uint8 or tuple(frame.shape) != (size, size, 3):
            raise ValueError(f"frame {self.camera!r} must be uint8 ({size}, {size}, 3) (frame_size={size}), got "
                             f"{frame.dtype} {tuple(frame.shape)}")
        return frame

    @staticmethod
    def _check_n_candidates(n_candidates: Any) -> int:
        if not _is_int(n_candidates) or n_candidates < 1:
            raise ValueError(f"n_candidates must be an int >= 1, got {n_candidates!r}")
        return int(n_candidates)

    @torch.no_grad()
    def generate(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                 generator: torch.Generator | None = None, image_guidance: float | None = None,
                 text_guidance: float | None = None) -> np.ndarray:
        """``n_candidates`` imagined futures from one batched sampler call: uint8 (K, n_frames, H, W, 3) at the
        camera's frame size. ``generator`` (or the one ``seed`` set) makes the noise reproducible."""
        cfg = self.config
        k_cand = self._check_n_candidates(n_candidates)
        self.check_text(subtask)
        frame = self._frame(obs)
        if n_steps is not None:
            self.sampler.check_steps(n_steps)
        s_img = cfg.image_guidance if image_guidance is None else float(image_guidance)
        s_txt = cfg.text_guidance if text_guidance is None else float(text_guidance)
        if not (math.isfinite(s_img) and math.isfinite(s_txt)):
            raise ValueError(f"guidance scales must be finite, got image {s_img}, text {s_txt}")
        was_training = self.training
        self.eval()
        try:
            small = resize_frames(frame, cfg.image_size)[None]  # (1, S, S, 3)
            context = self.encode(small, target=False).expand(k_cand, -1, -1, -1)
            text = self.text_tokens([subtask]).expand(k_cand, -1, -1)
            null = self.text_tokens([""]).expand(k_cand, -1, -1)
            n, c, s = self.n_frames, self.latent_channels, self.latent_size
            generator = generator if generator is not None else self._generator
            noise = torch.randn(k_cand, n * c, s * s, generator=generator,
                                device=generator.device if generator is not None else self.device).to(self.device)
            net = lambda x, t, k, ctx, txt: self._denoise(self.unet, x, t, k, ctx, txt)  # noqa: E731
            x = self.sampler.sample(guided_denoise(net, context, text, null, s_img, s_txt), noise, n_steps)
            pixels = self.decode(x.reshape(k_cand * n, c, s, s))  # (K * n, 3, S, S)
        finally:
            self.train(was_training)
        if not torch.isfinite(pixels).all():
            raise NonFiniteSubgoalError(f"{type(self).__name__} produced NaN/inf pixels for {subtask!r} (corrupted "
                                        "weights or diverging guidance); refusing the candidates")
        images = ((pixels.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        out = resize_frames(images, cfg.frame_size)  # (K * n, H, W, 3)
        return out.reshape(k_cand, n, cfg.frame_size, cfg.frame_size, 3).numpy()


@register("susie")
class SusieGenerator(DiffusionSubgoalModel):
    """SuSIE: K imagined goal frames ``horizon`` steps ahead (a ``ghil.interfaces.SubgoalGenerator``).

    Usage::

        gen = SusieGenerator(SusieConfig(), ShortcutConfig())       # or load_pretrained("runs/susie/checkpoints/last")
        gen.seed(0)
        goals = gen.propose(obs, "open the drawer", n_candidates=4)  # (4, 200, 200, 3) uint8
    """

    config_class = SusieConfig

    def __init__(self, config: SusieConfig | None = None, sampler: DDIMConfig | ShortcutConfig | None = None,
                 unet_config: Mapping[str, Any] | None = None):
        super().__init__(config if config is not None else SusieConfig(), sampler, unet_config)

    def propose(self, obs: Observation, subtask: str, n_candidates: int, n_steps: int | None = None,
                generator: torch.Generator | None = None, image_guidance: float | None = None,
                text_guidance: float | None = None) -> np.ndarray:
        """``n_candidates`` goal images (K, H, W, 3) uint8 at the camera's size, from one batched call."""
        return self.generate(obs, subtask, n_candidates, n_steps, generator, image_guidance, text_guidance)[:, 0]
