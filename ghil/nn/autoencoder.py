"""A small in-domain image autoencoder with diffusers' ``AutoencoderKL`` inside (issue 11, perception option b).

``Autoencoder`` wraps a ``diffusers.AutoencoderKL`` (the VAE of Stable Diffusion, sized down) so that one frozen
latent space can serve every stage that looks at pixels: the policy's feature cache (``tokens``) and the subgoal
generator (``save_pretrained`` also writes a plain diffusers copy under ``vae/``, which
``generator.config.vae={path: <checkpoint>, subfolder: vae}`` loads with ``AutoencoderKL.from_pretrained``).

Frames (uint8 ``(B, H, W, 3)`` camera frames, or float ``(B, 3, H, W)`` in [0, 1]; ``ghil.nn.frames``) of the
accepted ``frame_sizes`` (CALVIN's 200 static / 84 gripper) are resized to ``image_size`` (antialiased bilinear,
``ghil.nn.augment.resize``) and scaled to [-1, 1]; the encoder's posterior mean (or a sample) is shifted and scaled
to unit variance: ``latents = (z - shift_factor) * scale``. ``scale`` is ``scaling_factor`` when set (0.18215 for
SD's VAE), otherwise ``1 / latent_std``, a running estimate of the latents' standard deviation kept in a buffer
during training (so the exported ``vae/config.json`` carries the right ``scaling_factor``).

The training loss (``loss``: ``ghil train recipe=autoencoder``, ``ghil.nn.autoencoder_recipe``) is LDM's without
the perceptual and GAN terms: ``l1_weight * |x - x'| + l2_weight * (x - x')^2`` (means over pixel values in
[-1, 1]) ``+ kl_weight * KL`` where KL is the posterior's KL to N(0, I) summed over a sample's latent elements and
divided by its pixel values, i.e. LDM's ``sum(rec) + w * sum(KL)`` per pixel value, so ``kl_weight=1e-6`` is the
setting Stable Diffusion's VAE was trained with.

``from_pretrained`` takes a ghil checkpoint folder (``save_pretrained``'s) or anything
``AutoencoderKL.from_pretrained`` takes: a hub id (``stabilityai/sd-vae-ft-mse``, downloaded, so it needs the
network once) or a local diffusers folder (``subfolder="vae"`` for a full Stable Diffusion folder). The
architecture is read from the diffusers config; the weights are copied in, and the result saves and loads as a
ghil checkpoint (no hub access needed again).

Usage::

    ae = Autoencoder(AutoencoderConfig())                                  # the 2-core CPU preset (64 px, 0.7 M)
    z = ae.encode(frames)                                                  # (B, 4, 16, 16) unit-variance latents
    images = ae.decode(z)                                                  # (B, 3, 64, 64) float in [0, 1]
    ae.tokens(frames).shape                                                # (B, 16, 64): 4x4 latent patches
    loss, metrics = ae.loss(batch)                                         # batch.images uint8 (B, S, S, 3)
    sd = Autoencoder.from_pretrained("stabilityai/sd-vae-ft-mse", image_size=256)   # GPU users: SD's VAE
    ae.save_pretrained("runs/ae/x"); load_pretrained("runs/ae/x")          # + runs/ae/x/vae/ (diffusers format)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ghil.checkpoint import CONFIG_FILE, CheckpointError, PretrainedMixin, load_state_strict, register, register_config
from ghil.nn.frames import as_float_images

__all__ = ["DIFFUSERS_SUBFOLDER", "Autoencoder", "AutoencoderConfig", "from_pretrained"]

DIFFUSERS_SUBFOLDER = "vae"  # save_pretrained's plain diffusers copy (AutoencoderKL.from_pretrained(ckpt, "vae"))
LATENT_STD_MOMENTUM = 0.01  # running estimate of the latents' variance, per training step
# AutoencoderKL's architecture settings that a diffusers config fixes (from_pretrained reads them, never overrides)
ARCHITECTURE_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "act_fn",
                       "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")


def _ints(values: Any) -> tuple[int, ...]:
    if isinstance(values, (int, str)):
        values = (values,)
    return tuple(int(v) for v in values)


@register_config("autoencoder_kl")
@dataclass(frozen=True)
class AutoencoderConfig:
    """An ``AutoencoderKL`` (diffusers' ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` stacks) and its input/loss.

    The defaults are the 2-core CPU preset, ``ghil/configs/autoencoder/autoencoder_small.yaml`` (tests keep the
    two equal): 64 px in, three stages (16, 32, 64 channels: downsampling 4), 4 x 16 x 16 latents.
    """

    image_size: int = 64  # frames are resized to image_size x image_size before encoding
    frame_sizes: tuple[int, ...] = (200, 84)  # accepted (square) input frame sizes; empty: any size
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # one encoder/decoder stage each; 2^(n-1) downsampling
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float | None = None  # None: 1 / the running latent std learned in training (SD's VAE: 0.18215)
    shift_factor: float | None = None  # subtracted before scaling (SD3/Flux VAEs); None: 0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1.0e-6  # times KL summed over latent elements / pixel values (LDM's convention)
    token_patch: int = 4  # tokens(): latent patches of token_patch x token_patch

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("frame_sizes", _ints(self.frame_sizes))
        set_("block_out_channels", _ints(self.block_out_channels))
        for name in ("image_size", "layers_per_block", "latent_channels", "norm_num_groups", "token_patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be a positive int, got {value!r}")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"AutoencoderConfig.block_out_channels must be positive channel counts, got "
                             f"{self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"AutoencoderConfig: every block_out_channels entry must be divisible by norm_num_groups="
                             f"{self.norm_num_groups} (GroupNorm), {bad} are not")
        if self.image_size < 8 or self.image_size % self.downsample_factor:
            raise ValueError(f"AutoencoderConfig.image_size {self.image_size} must be >= 8 and divisible by the "
                             f"downsampling factor {self.downsample_factor} (2^(len(block_out_channels) - 1))")
        if any(s < 8 for s in self.frame_sizes):
            raise ValueError(f"AutoencoderConfig.frame_sizes must be frame sizes >= 8 px, got {self.frame_sizes}")
        if self.latent_size % self.token_patch:
            raise ValueError(f"AutoencoderConfig.token_patch {self.token_patch} must divide the latent size "
                             f"{self.latent_size} (image_size {self.image_size} / {self.downsample_factor})")
        if self.scaling_factor is not None and not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"AutoencoderConfig.scaling_factor must be None or > 0, got {self.scaling_factor!r}")
        if self.shift_factor is not None and not math.isfinite(self.shift_factor):
            raise ValueError(f"AutoencoderConfig.shift_factor must be None or finite, got {self.shift_factor!r}")
        weights = (self.l1_weight, self.l2_weight, self.kl_weight)
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights) \
                or self.l1_weight + self.l2_weight <= 0:
            raise ValueError(f"AutoencoderConfig: l1_weight, l2_weight, kl_weight must be >= 0 with l1 + l2 > 0, got "
                             f"{weights}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def n_tokens(self) -> int:
        return (self.latent_size // self.token_patch) ** 2

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.token_patch ** 2

    @property
    def floats_per_image(self) -> int:
        return self.latent_channels * self.latent_size ** 2

    def diffusers_kwargs(self) -> dict[str, Any]:
        """``AutoencoderKL(**kwargs)`` for this architecture."""
        n = len(self.block_out_channels)
        return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=self.block_out_channels,
                    layers_per_block=self.layers_per_block, act_fn=self.act_fn, latent_channels=self.latent_channels,
                    norm_num_groups=self.norm_num_groups, sample_size=self.image_size,
                    scaling_factor=self.scaling_factor if self.scaling_factor is not None else 1.0,
                    shift_factor=self.shift_factor, use_quant_conv=self.use_quant_conv,
                    use_post_quant_conv=self.use_post_quant_conv,
                    mid_block_add_attention=self.mid_block_add_attention)


def _is_ghil_checkpoint(folder: Path) -> bool:
    """A folder whose config.json is a ghil checkpoint's (a diffusers config names its ``_class_name``)."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (folder / CONFIG_FILE).is_file()  # unreadable: let the ghil loader name the problem
    return isinstance(meta, dict) and "_class_name" not in meta


@register("autoencoder")
class Autoencoder(PretrainedMixin, nn.Module):
    """Frames -> unit-variance ``AutoencoderKL`` latents -> frames; a ``ghil.interfaces.Learnable``."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = config if config is not None else AutoencoderConfig()
        self.vae = AutoencoderKL(**self.config.diffusers_kwargs())
        # Running std of the (shifted) latents, learned in training; gives `scale` when scaling_factor is None.
        self.register_buffer("latent_std", torch.ones(()))

    def init_kwargs(self) -> dict[str, Any]:
        return {"config": self.config}

    def attach_ema(self, ema: Any) -> None:
        """The trainer's EMA copy is not needed (no bootstrapped targets)."""

    @property
    def device(self) -> torch.device:
        return self.latent_std.device

    @property
    def scale(self) -> float:
        """What latents are multiplied by after the shift: ``scaling_factor``, or ``1 / latent_std``."""
        c = self.config
        return float(c.scaling_factor) if c.scaling_factor is not None else float(1.0 / self.latent_std.clamp(min=1e-6))

    @property
    def shift(self) -> float:
        return float(self.config.shift_factor or 0.0)

    # -- pixels <-> latents -------------------------------------------------------------------------------------

    def prepare(self, images: Any) -> Tensor:
        """Frames (uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1], an accepted size) -> float (B, 3, S, S) in
        [-1, 1] at ``image_size`` on the model's device. ValueError/TypeError naming the problem otherwise."""
        from ghil.nn.augment import resize

        c = self.config
        accepted = (*c.frame_sizes, c.image_size) if c.frame_sizes else ()
        x = as_float_images(images, accepted, "Autoencoder", "autoencoder.config.frame_sizes", self.device)
        return resize(x, c.image_size) * 2.0 - 1.0

    def posterior(self, images: Any):
        """The encoder's ``DiagonalGaussianDistribution`` over the raw (unshifted, unscaled) latents."""
        return self.vae.encode(self.prepare(images)).latent_dist

    def encode(self, images: Any, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Frames -> latents ``(B, C, h, w)``, ``(z - shift) * scale`` (z the posterior mean, or a sample)."""
        dist = self.posterior(images)
        z = dist.sample(generator=generator) if sample else dist.mode()
        return (z - self.shift) * self.scale

    def check_latents(self, latents: Any) -> Tensor:
        if not isinstance(latents, Tensor) or not latents.dtype.is_floating_point:
            raise TypeError(f"Autoencoder.decode needs float latents, got {type(latents).__qualname__}"
                            + (f" of {latents.dtype}" if isinstance(latents, Tensor) else ""))
        if latents.ndim == 3:
            latents = latents[None]
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.config.latent_shape:
            raise ValueError(f"Autoencoder.decode: latents must be (B, {', '.join(map(str, self.config.latent_shape))})"
                             f" for image_size {self.config.image_size}, got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("Autoencoder.decode: latents contain NaN or inf")
        return latents.to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents from ``encode`` -> images, float ``(B, 3, image_size, image_size)`` in [0, 1]."""
        z = self.check_latents(latents) / self.scale + self.shift
        return ((self.vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0)

    def reconstruct(self, images: Any) -> tuple[Tensor, Tensor]:
        """(input resized to ``image_size``, its reconstruction from the posterior mean), both float [0, 1]."""
        x = self.prepare(images)
        rec = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        return (x + 1.0) / 2.0, ((rec + 1.0) / 2.0).clamp(0.0, 1.0)

    def psnr(self, images: Any) -> Tensor:
        """Per-image reconstruction PSNR (dB, peak 1) at ``image_size``: ``(B,)``."""
        x, rec = self.reconstruct(images)
        mse = (rec - x).pow(2).flatten(1).mean(1).clamp(min=1e-10)
        return 10.0 * torch.log10(1.0 / mse)

    def tokens(self, images: Any) -> Tensor:
        """Frames -> ``(B, n_tokens, token_dim)``: the latents (posterior mean, scaled) cut into ``token_patch``
        squared patches, row-major; what a feature cache stores per frame and camera."""
        z = self.encode(images)
        b, ch, h, w = z.shape
        p = self.config.token_patch
        return z.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p),
                                                                                          ch * p * p)

    # -- training -----------------------------------------------------------------------------------------------

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction (L1 / L2) + ``kl_weight`` KL on a batch of frames (``batch.images``, or the frames)."""
        c = self.config
        images = getattr(batch, "images", batch)
        x = self.prepare(images)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample()
        rec = self.vae.decode(z).sample
        err = rec - x
        l1, l2 = err.abs().mean(), err.pow(2).mean()
        kl = dist.kl().mean() / x[0].numel()
        loss = c.l1_weight * l1 + c.l2_weight * l2 + c.kl_weight * kl
        if self.training and c.scaling_factor is None:
            with torch.no_grad():
                var = (z - self.shift).float().var()
                self.latent_std.copy_(torch.sqrt(torch.lerp(self.latent_std.pow(2), var, LATENT_STD_MOMENTUM)))
        with torch.no_grad():
            mse01 = ((rec.detach().clamp(-1, 1) - x) / 2).pow(2).mean().clamp(min=1e-10)
        return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item(), "psnr": float(10 * torch.log10(1 / mse01)),
                      "latent_std": float(self.latent_std)}

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """The ghil checkpoint (config.json + model.safetensors) and, under ``vae/``, the same weights as a plain
        diffusers ``AutoencoderKL`` whose ``scaling_factor`` is ``scale`` (what the subgoal generator loads)."""
        path = super().save_pretrained(path)
        self.vae.register_to_config(scaling_factor=self.scale, sample_size=self.config.image_size)
        self.vae.save_pretrained(str(path / DIFFUSERS_SUBFOLDER), safe_serialization=True)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                        subfolder: str | None = None, **overrides: Any) -> Autoencoder:
        """A ghil checkpoint folder, or a diffusers ``AutoencoderKL`` by hub id or local folder (``subfolder``:
        e.g. ``"vae"`` inside a Stable Diffusion folder). ``overrides`` set the non-architecture fields of the
        config (``image_size``, ``frame_sizes``, loss weights, ``token_patch``) of a diffusers model."""
        local = Path(path)
        if subfolder is None and local.is_dir() and _is_ghil_checkpoint(local):
            if overrides:
                raise ValueError(f"{path} is a ghil checkpoint: its settings are fixed ({sorted(overrides)} given)")
            return super().from_pretrained(local, map_location)
        return cls.from_diffusers(path, subfolder=subfolder, map_location=map_location, **overrides)

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike, subfolder: str | None = None,
                       map_location: str | torch.device = "cpu", **overrides: Any) -> Autoencoder:
        """Any ``AutoencoderKL`` that ``AutoencoderKL.from_pretrained(path, subfolder=...)`` loads, wrapped."""
        from diffusers import AutoencoderKL

        where = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        try:
            vae = AutoencoderKL.from_pretrained(str(path), **({"subfolder": subfolder} if subfolder else {}))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load a diffusers AutoencoderKL from {where}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''} (a hub id needs the network or "
                                  "the hub cache; a local folder needs config.json + diffusion_pytorch_model."
                                  "safetensors)") from err
        return cls.from_autoencoder_kl(vae, **overrides).to(map_location).eval()

    @classmethod
    def from_autoencoder_kl(cls, vae: nn.Module, **overrides: Any) -> Autoencoder:
        """Wrap an ``AutoencoderKL`` instance (its weights are copied)."""
        vc = vae.config
        n = len(vc.block_out_channels)
        if tuple(vc.down_block_types) != ("DownEncoderBlock2D",) * n or \
                tuple(vc.up_block_types) != ("UpDecoderBlock2D",) * n or vc.in_channels != 3 or vc.out_channels != 3:
            raise ValueError(f"Autoencoder wraps RGB AutoencoderKLs of DownEncoderBlock2D/UpDecoderBlock2D stacks, "
                             f"got in/out {vc.in_channels}/{vc.out_channels}, {list(vc.down_block_types)} / "
                             f"{list(vc.up_block_types)}")
        fixed = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
        if fixed:
            raise ValueError(f"{fixed} are fixed by the pretrained AutoencoderKL's architecture, not overridable")
        arch = {name: getattr(vc, name) for name in ARCHITECTURE_FIELDS}
        image_size = int(overrides.pop("image_size", vc.sample_size))
        latent = image_size // 2 ** (n - 1)
        settings = dict(arch, image_size=image_size, frame_sizes=(), scaling_factor=float(vc.scaling_factor),
                        shift_factor=None if vc.shift_factor is None else float(vc.shift_factor),
                        token_patch=4 if latent % 4 == 0 else 1)
        settings.update(overrides)
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(AutoencoderConfig)})
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields {unknown}")
        model = cls(AutoencoderConfig(**settings))
        load_state_strict(model.vae, vae.state_dict(), f"AutoencoderKL ({type(vae).__qualname__})")
        return model


def from_pretrained(path: str, subfolder: str | None = None, **overrides: Any) -> Autoencoder:
    """``Autoencoder.from_pretrained`` as a plain function: the Hydra ``_target_`` of the ``sd_vae_ft_mse``
    preset (Hydra's targets name module attributes, not classmethods)."""
    return Autoencoder.from_pretrained(path, subfolder=subfolder, **overrides)
