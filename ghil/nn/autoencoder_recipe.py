"""``ghil train recipe=autoencoder``: what the one trainer needs to fit the in-domain image autoencoder
(``ghil.nn.autoencoder.Autoencoder``, issue 11 perception option b).

Hydra builds ``AutoencoderRecipe`` from ``ghil/configs/recipe/autoencoder.yaml`` with the instantiated
``autoencoder`` node (``autoencoder=autoencoder_small|autoencoder_tiny|sd_vae_ft_mse``) and the ``data`` settings
(``AutoencoderDataConfig``). Samples are single frames of every listed camera over every frame of the split
(``ghil.data.frame_dataset.FrameDataset``), resized to the model's ``image_size``. ``build()`` checks the data
before anything is written (the split exists, each camera's frames are a size the model accepts) and returns a
``ghil.train.TrainingSetup``: the autoencoder, training and validation frames, ``collate_frames``, the fingerprint a
resume must match (the model's saved configuration and the data settings, ``data.root`` resolved) and the command
that reports a checkpoint's reconstruction PSNR on held-out frames. There are no statistics to fit: the latent
scale is tracked during training (``Autoencoder.latent_std``).

Usage::

    ghil train recipe=autoencoder data.root=data/playtable_play data.cache=data/playtable_play/packed \
        train.total_steps=4000 train.lr=1e-3 run_name=autoencoder_small
    setup = AutoencoderRecipe(Autoencoder(AutoencoderConfig()), {"root": "data/playtable_play"}).build()
    Trainer.from_setup(setup, TrainConfig(out_dir="runs/autoencoder_small")).fit()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ghil.data.frame_dataset import FrameDataset, collate_frames
from ghil.train import COLLECT_SIZE_SETTINGS, TrainingSetup, resume_fingerprint, validation_split

__all__ = ["AutoencoderDataConfig", "AutoencoderRecipe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderDataConfig:
    """The recipe's ``data`` node. The defaults are ``ghil/configs/recipe/autoencoder.yaml``'s."""

    root: str
    split: str = "training"
    val_split: str | None = "validation"  # held-out episodes for the validation loss (None: none)
    cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper")  # one autoencoder for every listed camera
    cache: str | None = None  # a `ghil pack` folder (<root>/packed): the same frames, memory-mapped

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"AutoencoderDataConfig.root must be a non-empty path string, got {self.root!r}")
        cameras = (self.cameras,) if isinstance(self.cameras, str) else tuple(self.cameras)
        if not cameras or not all(isinstance(c, str) and c.startswith("rgb_") for c in cameras):
            raise ValueError(f"AutoencoderDataConfig.cameras must be RGB camera keys (rgb_static, rgb_gripper), got "
                             f"{self.cameras!r}")
        object.__setattr__(self, "cameras", cameras)


class AutoencoderRecipe:
    """Frames, checks and fingerprint for an ``Autoencoder``."""

    def __init__(self, autoencoder: Any, data: AutoencoderDataConfig | Mapping[str, Any]):
        self.autoencoder = autoencoder
        self.data = data if isinstance(data, AutoencoderDataConfig) else AutoencoderDataConfig(**dict(data))

    def dataset(self, split: str) -> FrameDataset:
        return FrameDataset(self.data.root, split, cameras=self.data.cameras,
                            image_size=self.autoencoder.config.image_size, cache=self.data.cache)

    def check_frames(self, dataset: FrameDataset) -> None:
        """Refuse cameras whose frames the autoencoder does not accept (``config.frame_sizes``), naming settings
        that fit."""
        accepted = self.autoencoder.config.frame_sizes
        if not accepted:
            return
        wrong = {cam: size for cam, size in dataset.frame_sizes.items() if size not in accepted}
        if not wrong:
            return
        have = ", ".join(f"{cam} {s}x{s}" for cam, s in dataset.frame_sizes.items())
        sizes = sorted({*accepted, *dataset.frame_sizes.values()})
        raise ValueError(f"the autoencoder accepts frames of {list(accepted)} px (autoencoder.config.frame_sizes), "
                         f"but {self.data.root} has {have}: set autoencoder.config.frame_sizes={sizes} to train on "
                         "them, or collect data with the expected sizes ("
                         + ", ".join(f"{COLLECT_SIZE_SETTINGS.get(cam, cam)}" for cam in wrong) + ")")

    def fingerprint(self) -> dict[str, Any]:
        """What a resume must match: the model's saved configuration and the data settings (root resolved)."""
        data = asdict(self.data)
        data["cameras"] = list(data["cameras"])
        return resume_fingerprint(self.autoencoder, data)

    def eval_command(self, checkpoint: str) -> str:
        cache = f" --cache {self.data.cache}" if self.data.cache else ""
        return (f"python benchmarks/encoder_options.py --autoencoder {checkpoint} --data-root {self.data.root}"
                f"{cache} --split {self.data.val_split or self.data.split}")

    def build(self) -> TrainingSetup:
        dataset = self.dataset(self.data.split)
        self.check_frames(dataset)
        val_dataset = validation_split(self.data.root, self.data.val_split, self.dataset)
        if val_dataset is not None:
            self.check_frames(val_dataset)
        log.info("autoencoder training on %d frames x %d camera(s) of %s", dataset.n_frames, len(self.data.cameras),
                 dataset.split_dir)
        return TrainingSetup(model=self.autoencoder, dataset=dataset, collate_fn=collate_frames,
                             val_dataset=val_dataset, fit_statistics=None, fingerprint=self.fingerprint(),
                             eval_command=self.eval_command)
