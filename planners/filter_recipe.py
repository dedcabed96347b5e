"""``ghil train recipe=filter``: what the one trainer needs to train the GHIL-Glue subgoal filter.

Hydra builds ``FilterRecipe`` from ``ghil/configs/recipe/filter.yaml`` with the instantiated ``filter`` node (its
``text_encoder`` resolved) and the ``data`` settings (``ghil.data.subgoal_dataset.SubgoalDataConfig``). The recipe
fills the data's ``camera`` and ``image_size`` from the filter's config (one clip frame: the filter scores images),
so a checkpoint and its data always agree. ``build()`` checks the data *before* anything is written (the split
exists and has annotated windows, its frames are the filter's ``image_size``) and returns a
``ghil.train.TrainingSetup``: the filter, the training and validation ``SubgoalDataset``, ``collate_subgoal``, the
fingerprint a resume must match (the filter's saved configuration and the data settings, ``data.root`` resolved)
and the ``ghil eval`` command for its checkpoints. The filter has no statistics to fit (pixels are scaled by its
encoders, the text encoder is frozen).

Positives are (frame, frame k steps later, instruction) from the annotated windows, k drawn from ``data.horizon``
(the paper's 16..23); the negatives are built inside each batch by the filter's loss.

Usage::

    ghil train recipe=filter filter=ghil_glue_small data.root=data/playtable_play run_name=ghil_glue_filter
    setup = FilterRecipe(GhilGlueFilter(GhilGlueFilterConfig()), {"root": "data/playtable_play"}).build()
    Trainer.from_setup(setup, TrainConfig(out_dir="runs/ghil_glue_filter")).fit()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from ghil.data.subgoal_dataset import SubgoalDataConfig, SubgoalDataset, collate_subgoal
from ghil.train import COLLECT_SIZE_SETTINGS, TrainingSetup, resume_fingerprint, validation_split


class FilterRecipe:
    """Dataset, checks and fingerprint for a subgoal filter (``GhilGlueFilter`` or anything with its config)."""

    def __init__(self, filter: Any, data: SubgoalDataConfig | Mapping[str, Any]):
        self.filter = filter
        fc = filter.config
        data = data if isinstance(data, SubgoalDataConfig) else SubgoalDataConfig(**dict(data))
        # The filter decides what it sees; a data setting that disagrees would train another model than the saved one.
        self.data = replace(data, camera=fc.camera, image_size=fc.image_size, n_frames=1)

    def dataset(self, split: str) -> SubgoalDataset:
        return SubgoalDataset(replace(self.data, split=split))

    def check_frames(self, dataset: SubgoalDataset) -> None:
        """Refuse data whose frames are not the filter's ``image_size`` (it would learn on resampled frames and
        run on real ones), naming the settings that fit."""
        size = self.filter.config.image_size
        if dataset.frame_size == (size, size):
            return
        h, w = dataset.frame_size
        camera = self.data.camera
        setting = COLLECT_SIZE_SETTINGS.get(camera)
        collect = (f"collect matching data with `ghil collect {setting}={size} collect.out_dir=<folder>`, or "
                   if setting else "")
        raise ValueError(f"the filter expects {camera} frames of {size}x{size} (filter.config.image_size={size}), but "
                         f"{self.data.root} has {h}x{w}: {collect}set filter.config.image_size={h} to train a filter "
                         "for these frames")

    def fingerprint(self) -> dict[str, Any]:
        """What a resume must match: the filter's saved configuration and the data settings (root resolved)."""
        return resume_fingerprint(self.filter, asdict(self.data))

    def eval_command(self, checkpoint: str) -> str:
        return f"ghil eval agent=ghil_glue agent.goals.filter.path={checkpoint}"

    def build(self) -> TrainingSetup:
        dataset = self.dataset(self.data.split)
        if len(dataset) == 0:
            raise ValueError(f"{self.data.root}/{self.data.split} has no language-annotated frames: the filter trains "
                             "on annotated windows only")
        self.check_frames(dataset)
        val_dataset = validation_split(self.data.root, self.data.val_split, self.dataset)
        return TrainingSetup(model=self.filter, dataset=dataset, collate_fn=collate_subgoal, val_dataset=val_dataset,
                             fingerprint=self.fingerprint(), eval_command=self.eval_command)


__all__ = ["FilterRecipe"]
