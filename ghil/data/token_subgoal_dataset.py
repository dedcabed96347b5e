"""Training samples for token-space subgoal generators and filters: the (current frame, frame ``horizon`` steps
later, instruction) pairs of ``SubgoalDataset``, read as the frozen policy encoder's cached tokens (``ghil
featurize``) instead of pixels, plus a small preview of the goal frame for the generator's preview decoder.

A sample holds, for the current frame f and the goal frame g (the same annotated window, as ``SubgoalDataset``
draws them): ``context`` (n_sources, n_tokens, W) = every camera's tokens at f and the goal encoder's tokens of
f's goal camera frame (``"__goal__"`` = where the goal lives), ``goal`` (n_tokens, W) = the goal encoder's tokens
of g, and ``preview`` (S, S, 3) uint8 = g's frame resized to ``preview_size`` (absent with ``preview_size=0``).

Views. The cache holds K views per frame: view 0 is the plain resize the policy sees at run time, views 1..K-1
independently augmented ones, one random stream per camera and one for the goal encoder. With ``augment=True``
every source of every sample draws its own view (uniform over all K), so the current frame and the goal are
augmented independently: GHIL-Glue's de-synchronised augmentation, for free. Draws are a pure function of
(seed, epoch, index, source), so DataLoader workers and resumed runs agree.

Usage::

    ds = TokenSubgoalDataset(TokenSubgoalDataConfig(root="data/playtable_play", horizon=20, preview_size=64))
    s = ds[0]       # s["context"] (3, 1, 128) float32, s["goal"] (1, 128), s["preview"] (64, 64, 3) uint8
    batch = collate_token_subgoal([ds[i] for i in range(8)])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ghil.data.calvin_format import EXPERT_GOAL_KEY, DatasetError
from ghil.data.features import GOAL_KEY, FeatureSplit, default_features_dir
from ghil.data.subgoal_dataset import SubgoalDataConfig, SubgoalDataset, resize_frames

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["TokenSubgoalBatch", "TokenSubgoalDataConfig", "TokenSubgoalDataset", "collate_token_subgoal"]


@dataclass(frozen=True)
class TokenSubgoalDataConfig:
    """Where the frames and their tokens are, and which pairs to draw (``SubgoalDataConfig``'s fields plus the
    feature cache). ``features`` null: ``<root>/features`` (``ghil featurize``'s default)."""

    root: str
    split: str = "training"
    val_split: str | None = "validation"
    horizon: int | tuple[int, int] = 20
    camera: str = "rgb_static"  # the goal camera (the goal encoder's)
    preview_size: int = 64  # goal previews for the preview decoder; 0: none (filters)
    features: str | None = None
    cache: str | None = None  # a `ghil pack` folder for the previews (null: the npz episodes)
    augment: bool = True  # draw a random cached view per source (de-synchronised); False: view 0 only
    seed: int = 0

    def __post_init__(self) -> None:
        # The pair settings are SubgoalDataConfig's; building one checks them with its messages.
        self.subgoal_config()
        if not isinstance(self.preview_size, int) or self.preview_size < 0:
            raise ValueError(f"TokenSubgoalDataConfig.preview_size must be an int >= 0, got {self.preview_size!r}")

    def subgoal_config(self, split: str | None = None) -> SubgoalDataConfig:
        return SubgoalDataConfig(root=self.root, split=split or self.split, val_split=self.val_split,
                                 horizon=self.horizon, camera=self.camera, image_size=max(self.preview_size, 8),
                                 cache=self.cache, seed=self.seed)

    @property
    def features_dir(self) -> str:
        return self.features or default_features_dir(self.root)


class TokenSubgoalDataset:
    """Map-style dataset of token pairs over the annotated windows (see the module docstring).

    ``sources`` names the context rows in order: the cache's cameras, then ``"__goal__"``.
    """

    def __init__(self, config: TokenSubgoalDataConfig, split: str | None = None):
        if not isinstance(config, TokenSubgoalDataConfig):
            raise TypeError(f"TokenSubgoalDataset needs a TokenSubgoalDataConfig, got {type(config).__qualname__}")
        self.config = config
        self.split = split or config.split
        self.pairs = SubgoalDataset(config.subgoal_config(self.split))
        self.features = FeatureSplit.open(config.root, self.split, config.features_dir)
        manifest = self.features.manifest
        enc = manifest["encoder"]["settings"]
        if enc.get("goal_camera") != config.camera:
            raise DatasetError(f"{self.features.folder}: the cached goal encoder saw {enc.get('goal_camera')!r}, "
                               f"these pairs are of camera {config.camera!r}")
        if manifest.get("goal_source") == EXPERT_GOAL_KEY:
            # A `ghil dagger` pack: row r of the goal tokens encodes frame r's stored expert goal, not frame r.
            raise DatasetError(f"{self.features.folder}: its goal-encoder tokens are of the stored expert goal frames "
                               f"({EXPERT_GOAL_KEY}, a `ghil dagger` pack), not of each frame's {config.camera}; "
                               "token subgoal stages need the tokens of the frames themselves: train them on a "
                               "dataset without expert labels")
        self.cameras: tuple[str, ...] = tuple(enc["cameras"])
        self.sources: tuple[str, ...] = (*self.cameras, "__goal__")
        self.arrays = {**{c: self.features.arrays[c] for c in self.cameras}, "__goal__": self.features.arrays[GOAL_KEY]}
        self.n_views = int(self.arrays["__goal__"].shape[1])
        ids = np.asarray(self.features.frame_ids, dtype=np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self.epoch = 0

    @property
    def token_shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.arrays["__goal__"].shape[2:])  # (n_tokens, W)

    def row_of(self, frame_id: int) -> int:
        """The cache row of a global frame id (DatasetError when the cache lacks it)."""
        i = int(np.searchsorted(self._sorted_ids, frame_id))
        if i >= len(self._sorted_ids) or self._sorted_ids[i] != frame_id:
            raise DatasetError(f"{self.features.folder} has no tokens of frame {frame_id}: rebuild the cache with "
                               "`ghil featurize`")
        return int(self._order[i])

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.pairs.set_epoch(epoch)

    def _views(self, idx: int) -> np.ndarray:
        """One view per source plus one for the goal (the last entry)."""
        n = len(self.sources) + 1
        if not self.config.augment or self.n_views == 1:
            return np.zeros(n, dtype=np.int64)
        return np.random.default_rng((self.config.seed, self.epoch, int(idx), 7)).integers(0, self.n_views, n)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx = int(idx) % len(self)
        pair = self.pairs.pair(idx)
        row, goal_row = self.row_of(int(pair["frame_id"])), self.row_of(int(pair["goal_frame_id"]))
        views = self._views(idx)
        context = np.stack([np.asarray(self.arrays[s][row, views[i]], dtype=np.float32)
                            for i, s in enumerate(self.sources)])
        goal = np.asarray(self.arrays["__goal__"][goal_row, views[-1]], dtype=np.float32)
        if not (np.isfinite(context).all() and np.isfinite(goal).all()):
            raise DatasetError(f"{self.features.folder}: non-finite tokens at rows {row}/{goal_row}; rebuild it")
        sample: dict[str, Any] = {
            "context": context, "goal": goal, "instruction": pair["instruction"], "task": pair["task"],
            "episode_row": pair["episode_row"], "frame_id": pair["frame_id"], "goal_frame_id": pair["goal_frame_id"],
        }
        if self.config.preview_size:
            frame = self.pairs._read(int(pair["goal_frame_id"]), int(pair["episode_row"]))
            sample["preview"] = resize_frames(frame, self.config.preview_size)
        return sample


@dataclass(frozen=True)
class TokenSubgoalBatch:
    """A batch for token-space generators and filters (``collate_token_subgoal``)."""

    context: Tensor  # (B, n_sources, n_tokens, W) float32: the current frame's tokens (cameras, then goal encoder)
    goal: Tensor  # (B, n_tokens, W) float32: the goal encoder's tokens of the frame `horizon` steps later
    instructions: tuple[str, ...]
    tasks: tuple[str, ...]
    episode_rows: Tensor  # (B,) int64
    frame_ids: Tensor
    goal_frame_ids: Tensor
    preview: Tensor | None = None  # (B, S, S, 3) uint8 goal frames for the preview decoder

    @property
    def batch_size(self) -> int:
        return int(self.goal.shape[0])

    def to(self, device: torch.device | str) -> TokenSubgoalBatch:
        from torch import Tensor

        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


def collate_token_subgoal(samples: Sequence[dict]) -> TokenSubgoalBatch:
    import torch

    if not samples:
        raise ValueError("collate_token_subgoal needs at least one sample")
    stack = lambda key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples]))  # noqa: E731
    ids = lambda key: torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)  # noqa: E731
    has_preview = ["preview" in s for s in samples]
    if any(has_preview) and not all(has_preview):
        raise ValueError("collate_token_subgoal: some samples have a preview and others not")
    return TokenSubgoalBatch(context=stack("context"), goal=stack("goal"),
                             instructions=tuple(str(s["instruction"]) for s in samples),
                             tasks=tuple(str(s["task"]) for s in samples), episode_rows=ids("episode_row"),
                             frame_ids=ids("frame_id"), goal_frame_ids=ids("goal_frame_id"),
                             preview=stack("preview") if all(has_preview) else None)

