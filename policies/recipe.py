"""``ghil train recipe=policy``: what the one trainer needs to train a low-level chunk policy.

Hydra builds ``PolicyRecipe`` from ``ghil/configs/recipe/policy.yaml`` with the instantiated ``policy`` node (its
``sampler`` and ``text_encoder`` resolved) and the ``data`` settings (``PolicyDataConfig``). ``build()`` checks the
data against the policy *before* anything is written (the split exists, every camera's frames have the policy's
``image_sizes``, the action key is stored) and returns a ``ghil.train.TrainingSetup``: the policy, the training and
validation ``PolicyDataset``, ``collate_policy``, the normaliser fit, the fingerprint a resume must match (the
policy's saved configuration and the data settings, ``data.root`` resolved) and the ``ghil eval`` command for its
checkpoints (``agent=oracle_subgoal_policy`` for goal-conditioned policies, ``agent=flat_policy`` for
language-only ones).

``data.features=<ghil featurize folder>`` trains with frozen encoders (issue 11, option a): the policy's camera
and goal encoders are loaded from the checkpoint the cache was built with (its ``weights_sha256`` checked) and
frozen, the samples carry the cached tokens instead of pixels (validation uses view 0, the un-augmented one), and
only the transformer, the token embeddings and the decoder train. The saved checkpoint holds those encoders, so at
run time ``predict_chunk`` encodes the pixels with the same frozen weights.

Usage::

    ghil train policy=dit_small sampler=shortcut data.root=data/playtable_play run_name=dit_small    # recipe=policy
    setup = PolicyRecipe(DiTPolicy(DiTConfig(), ShortcutConfig()), {"root": "data/playtable_play"}).build()
    setup.fit_statistics()                                       # policy.fit_normalizer(dataset statistics)
    Trainer.from_setup(setup, TrainConfig(out_dir="runs/x")).fit()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ghil.data.policy_dataset import (
    ConcatPolicyDataset,
    PolicyDataConfig,
    PolicyDataset,
    collate_policy,
    compute_policy_stats,
)
from ghil.train import COLLECT_SIZE_SETTINGS, TrainingSetup, resume_fingerprint, validation_split

log = logging.getLogger(__name__)


class PolicyRecipe:
    """Dataset, statistics and checks for a chunk policy (``DiTPolicy`` or anything with its config attributes)."""

    def __init__(self, policy: Any, data: PolicyDataConfig | Mapping[str, Any]):
        self.policy = policy
        self.data = data if isinstance(data, PolicyDataConfig) else PolicyDataConfig(**dict(data))

    def dataset(self, split: str, root: str | None = None) -> PolicyDataset:
        """``split`` of the main root, or of ``root`` (an extra root: its own ``packed``/``features`` folders)."""
        pc = self.policy.config
        data = replace(self.data, split=split)
        if root is not None:
            data = replace(data, root=root, extra_roots=(),
                           cache=str(Path(root) / "packed") if self.data.cache else None,
                           features=str(Path(root) / "features") if self.data.features else None)
        features = {}
        if data.features:
            features = {"policy": self.policy, "feature_view": None if split == self.data.split else 0}
        return PolicyDataset(data, cameras=pc.cameras, goal_camera=pc.goal_camera if pc.use_goal else None,
                             action_key=self.policy.space.dataset_key, chunk_len=pc.chunk_len, **features)

    def training_dataset(self, main: PolicyDataset):
        """The main root's training split, followed by each extra root's (DAgger rounds)."""
        if not self.data.extra_roots:
            return main
        parts = [main]
        for root in self.data.extra_roots:
            part = self.dataset(self.data.split, root)
            if main.features is not None and any(part.features.manifest["encoder"][k] != main.features.manifest[
                    "encoder"][k] for k in ("weights_sha256", "settings")):
                raise ValueError(f"the feature cache {part.features.folder} was made by another encoder than "
                                 f"{main.features.folder}: rebuild it with {part.features.rebuild}")
            parts.append(part)
        log.info("training on %s", ", ".join(f"{p.config.root} ({len(p)} samples)" for p in parts))
        return ConcatPolicyDataset(parts)

    def load_frozen_encoders(self, dataset: PolicyDataset) -> None:
        """Frozen-encoder mode: the encoders the feature cache was built with, loaded and frozen. Called again after
        ``init_from``: the cached tokens were made by these encoders, so they win over the checkpoint's (warned)."""
        import torch

        from ghil.data.features import load_encoder_checkpoint

        path = dataset.features.check_encoder()  # refused when the checkpoint's weights changed since
        source, _ = load_encoder_checkpoint(path)
        mine = {**self.policy.camera_encoders.state_dict(), **({} if self.policy.goal_encoder is None else {
            f"goal.{k}": v for k, v in self.policy.goal_encoder.state_dict().items()})}
        theirs = {**source.camera_encoders.state_dict(), **({} if source.goal_encoder is None else {
            f"goal.{k}": v for k, v in source.goal_encoder.state_dict().items()})}
        if self.policy.image_encoders_frozen and any(not torch.equal(mine[k], theirs[k]) for k in theirs):
            log.warning("init_from's image encoders differ from the ones the feature cache %s was made with (%s); "
                        "keeping the cache's encoders, frozen (re-run ghil featurize with encoder.path=<init_from> "
                        "to train on init_from's)", dataset.features.folder, path)
        self.policy.load_image_encoders(source)
        self.policy.freeze_image_encoders()
        log.info("frozen-encoder training: image encoders from %s (frozen), tokens from %s", path,
                 dataset.features.folder)

    def check_frame_sizes(self, dataset: PolicyDataset) -> None:
        """Refuse data whose frames are not the policy's ``image_sizes``, naming the collect settings that fit."""
        pc = self.policy.config
        sample = dataset[0]
        got = {cam: tuple(sample["images"][cam].shape[:2]) for cam in pc.cameras}
        wrong = {cam: shape for cam, shape in got.items() if shape != (pc.image_size[cam],) * 2}
        if not wrong:
            return
        have = ", ".join(f"{cam} {h}x{w}" for cam, (h, w) in got.items())
        want = ", ".join(f"{cam} {s}x{s}" for cam, s in pc.image_size.items())
        collect = " ".join(f"{COLLECT_SIZE_SETTINGS[cam]}={pc.image_size[cam]}" for cam in pc.cameras
                           if cam in COLLECT_SIZE_SETTINGS)
        hint = (f"collect matching data with `ghil collect {collect} collect.out_dir=<folder>` and train on it, or "
                if collect else "")
        raise ValueError(f"the policy expects {want} frames (policy.config.image_sizes={list(pc.image_sizes)}), but "
                         f"{self.data.root} has {have}: {hint}choose a policy preset for these frames "
                         f"(policy=dit_small expects CALVIN's 200x200 / 84x84)")

    def fit_statistics(self, dataset: PolicyDataset) -> None:
        key = self.policy.space.dataset_key
        stats = compute_policy_stats(dataset, keys=(self.data.proprio_key, key))
        self.policy.fit_normalizer({"robot_obs" if k == self.data.proprio_key else k: v for k, v in stats.items()})

    def fingerprint(self) -> dict[str, Any]:
        """What a resume must match: the policy's saved configuration and the data settings (root resolved)."""
        data = asdict(self.data)
        data["extra_roots"] = [str(Path(r).resolve()) for r in self.data.extra_roots]
        if not data["extra_roots"]:
            del data["extra_roots"]  # (absent when unused: fingerprints of earlier runs stay valid)
        return resume_fingerprint(self.policy, data)

    def eval_command(self, checkpoint: str) -> str:
        agent = "oracle_subgoal_policy" if self.policy.config.use_goal else "flat_policy"
        return f"ghil eval agent={agent} agent.policy.path={checkpoint}"

    def build(self) -> TrainingSetup:
        pc = self.policy.config
        if pc.use_language and not self.data.lang_only:
            log.warning("language-conditioned policy trained on all windows: unannotated samples get the "
                        "no-language token")
        dataset = self.dataset(self.data.split)
        if self.data.features:
            self.load_frozen_encoders(dataset)  # frame sizes: checked against the cache's encoder settings
        else:
            self.check_frame_sizes(dataset)
        val_dataset = validation_split(self.data.root, self.data.val_split, self.dataset)
        return TrainingSetup(model=self.policy, dataset=self.training_dataset(dataset), collate_fn=collate_policy,
                             val_dataset=val_dataset,
                             fit_statistics=lambda: self.fit_statistics(dataset), fingerprint=self.fingerprint(),
                             eval_command=self.eval_command,
                             after_init_from=(lambda: self.load_frozen_encoders(dataset)) if self.data.features
                             else None)
