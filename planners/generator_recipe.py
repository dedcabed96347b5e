"""``ghil train recipe=generator``: what the one trainer needs to train a subgoal generator (image or video).

Hydra builds ``GeneratorRecipe`` from ``ghil/configs/recipe/generator.yaml`` with the instantiated ``generator``
node (its ``sampler`` and ``text_encoder`` resolved) and the ``data`` settings. The horizon, camera, working image
size and clip length come from the generator's config, so the data always matches what the checkpoint claims to
predict. ``build()`` checks everything before anything is written (the split exists and has annotated windows,
its frames have the generator's ``frame_size``, the text encoder loads and takes every instruction) and returns a
``ghil.train.TrainingSetup``: the generator, the training and validation ``SubgoalDataset``, ``collate_subgoal``,
the fingerprint a resume must match (the generator's saved configuration and the data settings, ``data.root``
resolved) and the ``ghil run`` command that shows a checkpoint at work. Generators have no statistics to fit:
pixels are scaled to [-1, 1] inside the model.

Usage::

    ghil train recipe=generator generator=susie_small data.root=data/playtable_play run_name=susie_small
    setup = GeneratorRecipe(SusieGenerator(SusieConfig()), {"root": "data/playtable_play"}).build()
    Trainer.from_setup(setup, TrainConfig(out_dir="runs/susie_small")).fit()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ghil.data.subgoal_dataset import SubgoalDataConfig, SubgoalDataset, collate_subgoal
from ghil.train import COLLECT_SIZE_SETTINGS, TrainingSetup, resume_fingerprint, validation_split


# the agent that runs each generator type in `ghil run` (issue 12's agent configs)
RUN_AGENTS = {"susie": "ghil_glue", "video": "ghil_glue_video"}


@dataclass(frozen=True)
class GeneratorDataConfig:
    """The recipe's ``data`` node: where the data is. The defaults are ``ghil/configs/recipe/generator.yaml``'s."""

    root: str
    split: str = "training"
    val_split: str | None = "validation"  # held-out episodes for the validation loss (None: none)
    cache: str | None = None  # a `ghil pack` folder (<root>/packed): the same frames, memory-mapped
    seed: int = 0


class GeneratorRecipe:
    """Datasets and checks for a subgoal generator (``SusieGenerator``, ``VideoGenerator``)."""

    def __init__(self, generator: Any, data: GeneratorDataConfig | Mapping[str, Any]):
        self.generator = generator
        self.data = data if isinstance(data, GeneratorDataConfig) else GeneratorDataConfig(**dict(data))

    def data_config(self, split: str) -> SubgoalDataConfig:
        gc = self.generator.config
        return SubgoalDataConfig(root=self.data.root, split=split, val_split=self.data.val_split,
                                 horizon=gc.horizon, camera=gc.camera, image_size=gc.image_size,
                                 n_frames=self.generator.n_frames, cache=self.data.cache, seed=self.data.seed)

    def dataset(self, split: str) -> SubgoalDataset:
        return SubgoalDataset(self.data_config(split))

    def check_frames(self, dataset: SubgoalDataset) -> None:
        """Refuse data whose frames are not the generator's ``frame_size``, naming the collect setting that fits."""
        gc = self.generator.config
        if dataset.frame_size == (gc.frame_size, gc.frame_size):
            return
        setting = COLLECT_SIZE_SETTINGS.get(gc.camera)
        hint = (f"collect matching data with `ghil collect {setting}={gc.frame_size} collect.out_dir=<folder>`, or "
                if setting else "")
        raise ValueError(f"the generator expects {gc.camera} frames of {gc.frame_size}x{gc.frame_size} "
                         f"(generator.config.frame_size), but {self.data.root} has "
                         f"{dataset.frame_size[0]}x{dataset.frame_size[1]}: {hint}set "
                         f"generator.config.frame_size={dataset.frame_size[0]}")

    def check_instructions(self, dataset: SubgoalDataset) -> None:
        """Every annotated instruction must be one the generator takes (loads the text encoder once, up front)."""
        for text in dict.fromkeys(dataset.frames.lang.ann):
            self.generator.check_text(text, f"an instruction of {self.data.root}")

    def fingerprint(self) -> dict[str, Any]:
        """What a resume must match: the generator's saved configuration and the data settings (root resolved)."""
        return resume_fingerprint(self.generator, asdict(self.data))

    def eval_command(self, checkpoint: str) -> str:
        agent = RUN_AGENTS.get(getattr(self.generator, "type_name", ""), "ghil_glue")
        return f'ghil run "open the drawer" agent={agent} agent.goals.generator.path={checkpoint}'

    def build(self) -> TrainingSetup:
        dataset = self.dataset(self.data.split)
        self.check_frames(dataset)
        self.check_instructions(dataset)
        val_dataset = validation_split(self.data.root, self.data.val_split, self.dataset)
        if val_dataset is not None:
            self.check_instructions(val_dataset)
        return TrainingSetup(model=self.generator, dataset=dataset, collate_fn=collate_subgoal,
                             val_dataset=val_dataset, fit_statistics=None, fingerprint=self.fingerprint(),
                             eval_command=self.eval_command)


__all__ = ["GeneratorDataConfig", "GeneratorRecipe"]
