"""``ghil train recipe=token_generator`` / ``recipe=token_filter``: the token-space SuSIE generator and GHIL-Glue
filter (``planners/token_subgoals.py``) on a ``ghil featurize`` cache of the policy whose encoders define the space.

``build()`` checks before anything is written: the cache exists for the training split, and its tokens *are* the
model's encoder's (the goal encoder of ``config.encoder`` re-encodes a few stored frames and must reproduce the
cached view-0 tokens; a cache of other encoders is refused with the ``ghil featurize`` command that rebuilds it). It
then records the encoders' hash in the model's config (``encoder_sha256``), so the saved stage refuses, at run time,
a policy of another token space. The generator's token normaliser (min-max per dimension over every cached view of
the goal tokens) is fitted for fresh runs.

Usage::

    ghil featurize data.root=data/playtable_play encoder.path=checkpoints/dit_small      # once per dataset
    ghil train recipe=token_generator data.root=data/playtable_play run_name=susie_tokens
    ghil train recipe=token_filter data.root=data/playtable_play run_name=ghil_glue_tokens
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from ghil.data.calvin_format import DatasetError
from ghil.data.features import StaleFeaturesError, featurize_command, load_encoder_checkpoint
from ghil.data.token_subgoal_dataset import TokenSubgoalDataConfig, TokenSubgoalDataset, collate_token_subgoal
from ghil.normalizer import VectorStats
from ghil.train import TrainingSetup, resume_fingerprint, validation_split

log = logging.getLogger(__name__)

__all__ = ["TokenGeneratorRecipe", "TokenFilterRecipe", "check_cache_encoder"]

N_CHECK_FRAMES = 4  # stored frames re-encoded to prove a cache holds this encoder's tokens
TOLERANCE = 2e-2  # float16 cache vs float32 re-encoding (relative to the tokens' scale)


@torch.no_grad()
def check_cache_encoder(dataset: TokenSubgoalDataset, policy: Any) -> float:
    """Re-encode a few of the split's goal-camera frames with ``policy``'s goal encoder and compare them with the
    cached view-0 tokens; StaleFeaturesError when they differ. Returns the largest relative difference."""
    from ghil.nn.augment import resize

    cfg = policy.config
    pairs = dataset.pairs
    worst = 0.0
    for i in np.linspace(0, len(pairs) - 1, N_CHECK_FRAMES).astype(np.int64):
        sample = pairs.frames[int(i)]
        fid, row = int(sample["frame_ids"][0]), int(sample["episode_row"])
        frame = pairs._read(fid, row)
        x = torch.from_numpy(np.ascontiguousarray(frame))[None].permute(0, 3, 1, 2).float() / 255.0
        mine = policy.goal_encoder(resize(x, cfg.encoder_size[cfg.goal_camera]))[0].numpy()
        cached = np.asarray(dataset.arrays["__goal__"][dataset.row_of(fid), 0], dtype=np.float32)
        scale = float(np.abs(cached).max()) + 1e-6
        worst = max(worst, float(np.abs(mine - cached).max()) / scale)
    if worst > TOLERANCE:
        raise StaleFeaturesError(f"{dataset.features.folder} holds tokens of other encoders than the model's encoder "
                                 f"checkpoint (relative difference {worst:.3f} on re-encoded frames): rebuild it with "
                                 f"`{featurize_command(dataset.config.root, dataset.split)}` naming that checkpoint")
    return worst


class _TokenRecipe:
    kind = "stage"

    def __init__(self, model: Any, data: TokenSubgoalDataConfig | Mapping[str, Any]):
        self.model = model
        data = data if isinstance(data, TokenSubgoalDataConfig) else TokenSubgoalDataConfig(**dict(data))
        self.data = self.adapt_data(replace(data, camera=model.config.camera))

    def adapt_data(self, data: TokenSubgoalDataConfig) -> TokenSubgoalDataConfig:
        return data

    def dataset(self, split: str) -> TokenSubgoalDataset:
        return TokenSubgoalDataset(self.data, split)

    def fingerprint(self) -> dict[str, Any]:
        return resume_fingerprint(self.model, asdict(self.data))

    def bind_encoder(self, dataset: TokenSubgoalDataset) -> None:
        """Check the cache against the model's encoder and record the encoders' hash in its config."""
        cfg = self.model.config
        policy, _ = load_encoder_checkpoint(cfg.encoder)
        worst = check_cache_encoder(dataset, policy)
        n, w = dataset.token_shape
        if (n, w) != (cfg.n_tokens, cfg.token_dim):
            raise DatasetError(f"{dataset.features.folder} holds ({n}, {w}) tokens per frame, the {self.kind} expects "
                               f"({cfg.n_tokens}, {cfg.token_dim}) (n_tokens, token_dim)")
        size = policy.config.image_size.get(cfg.camera)
        if cfg.frame_size != size:  # previews and scored candidates are the observations' (the policy's) frames
            raise ValueError(f"the {self.kind}'s frame_size is {cfg.frame_size}, but {cfg.encoder} takes {size}x{size} "
                             f"{cfg.camera} frames: set {self.kind}.config.frame_size={size}")
        sources = getattr(cfg, "sources", None)
        if sources is not None and tuple(sources) != dataset.sources:
            raise DatasetError(f"{dataset.features.folder} has sources {dataset.sources}, the {self.kind} is "
                               f"configured for {tuple(sources)}")
        sha = policy.encoder_sha256()
        if cfg.encoder_sha256 not in (None, sha):
            raise StaleFeaturesError(f"the {self.kind} config names encoder sha256 {cfg.encoder_sha256[:12]}, but "
                                     f"{cfg.encoder} has {sha[:12]}")
        if cfg.encoder_sha256 is None:
            self.model.config = dataclasses.replace(cfg, encoder_sha256=sha)
            self.model.space.encoder_sha256 = sha
        log.info("feature cache %s matches %s (re-encoded frames within %.4f); encoder sha256 %s",
                 dataset.features.folder, cfg.encoder, worst, sha[:12])

    def build(self) -> TrainingSetup:
        dataset = self.dataset(self.data.split)
        if len(dataset) == 0:
            raise ValueError(f"{self.data.root}/{self.data.split} has no language-annotated frames")
        self.bind_encoder(dataset)
        val_dataset = validation_split(self.data.root, self.data.val_split, self.dataset)
        return TrainingSetup(model=self.model, dataset=dataset, collate_fn=collate_token_subgoal,
                             val_dataset=val_dataset, fit_statistics=self.fit_statistics(dataset),
                             fingerprint=self.fingerprint(), eval_command=self.eval_command)

    def fit_statistics(self, dataset: TokenSubgoalDataset):
        return None

    def eval_command(self, checkpoint: str) -> str:
        raise NotImplementedError


class TokenGeneratorRecipe(_TokenRecipe):
    """The token-space SuSIE generator: pairs ``horizon`` steps apart, goal previews at ``preview_size``."""

    kind = "generator"

    def __init__(self, generator: Any, data: TokenSubgoalDataConfig | Mapping[str, Any]):
        super().__init__(generator, data)

    def adapt_data(self, data: TokenSubgoalDataConfig) -> TokenSubgoalDataConfig:
        cfg = self.model.config
        return replace(data, horizon=cfg.horizon, preview_size=cfg.preview_size)

    def fit_statistics(self, dataset: TokenSubgoalDataset):
        def fit() -> None:
            # Streamed over blocks of rows (a CALVIN-sized cache would be GBs as one float32 array).
            arr = dataset.arrays["__goal__"]
            d = arr.shape[-2] * arr.shape[-1]
            total, sq, count = np.zeros(d), np.zeros(d), 0
            low, high = np.full(d, np.inf), np.full(d, -np.inf)
            for start in range(0, len(arr), 8192):
                block = np.asarray(arr[start:start + 8192], dtype=np.float64).reshape(-1, d)
                total += block.sum(0)
                sq += (block ** 2).sum(0)
                count += len(block)
                low, high = np.minimum(low, block.min(0)), np.maximum(high, block.max(0))
            mean = total / count
            std = np.sqrt(np.maximum(sq / count - mean ** 2, 0.0))
            self.model.fit_normalizer({"goal_tokens": VectorStats(mean, std, low, high, count)})
        return fit

    def eval_command(self, checkpoint: str) -> str:
        return f"ghil eval agent=ghil_glue_tokens agent.goals.generator.path={checkpoint}"


class TokenFilterRecipe(_TokenRecipe):
    """The token-space GHIL-Glue filter: positives k ~ ``data.horizon`` (the paper's 16..23), no previews."""

    kind = "filter"

    def __init__(self, filter: Any, data: TokenSubgoalDataConfig | Mapping[str, Any]):
        super().__init__(filter, data)

    def adapt_data(self, data: TokenSubgoalDataConfig) -> TokenSubgoalDataConfig:
        return replace(data, preview_size=0)

    def eval_command(self, checkpoint: str) -> str:
        return f"ghil eval agent=ghil_glue_tokens agent.goals.filter.path={checkpoint}"
