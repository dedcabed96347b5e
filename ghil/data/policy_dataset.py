"""Training samples for action-chunk policies from a CALVIN-format split, and their statistics.

A sample is the observation at frame f (each camera, proprioception), a goal image from the same play episode
``goal_horizon`` steps ahead (``CalvinDataset``'s deterministic goal draw), the language annotation when the
dataset is restricted to annotated windows, and the ``chunk_len`` actions starting at f. Chunks that run past the
end of the episode are padded with the last action and masked out of the loss (``action_mask``).

With ``config.cache`` (a ``ghil pack`` folder) frames come from memory-mapped arrays instead of the npz files: the
same samples, index, goal draws and statistics, without decompressing anything (``ghil/data/packed.py``).

With ``config.features`` (a ``ghil featurize`` folder) a sample carries no pixels: ``features`` (camera -> the
frozen encoder's (n_tokens, width) float16 tokens of frame f) and ``goal_features`` (the goal encoder's tokens of the
goal frame), each from one of the cache's K views, drawn independently per source and sample, seeded per
(seed, epoch, idx) (``feature_view=v`` pins view v, e.g. 0 = un-augmented for validation). The frames, goal draws
and statistics are those of the pixel path (``ghil/data/features.py``).

A DAgger dataset (``ghil dagger``: its frame spec has ``expert_chunk > 0``) labels each frame itself: the target
chunk is the expert's chunk from that state (``expert_rel_actions``, not the next frames' actions) and the goal is
the frame the expert reached from it (``expert_goal_rgb_static``, not a frame of the same episode).
``config.extra_roots`` adds such datasets (or any other CALVIN-format roots) to the training split: their samples
follow the main root's, each read from ``<root>/packed`` and ``<root>/features`` when the main root uses a cache /
feature cache. Normaliser statistics come from the main root alone.

Per-episode vectors (actions, proprioception) are read once and cached: they are small, and a chunk needs 16+ of
them per sample. Nothing here imports torch except ``collate_policy``.

Usage::

    ds = PolicyDataset(PolicyDataConfig(root="data/playtable_D"), cameras=("rgb_static",), goal_camera="rgb_static",
                       action_key="rel_actions", chunk_len=16)
    stats = compute_policy_stats(ds, keys=("robot_obs", "rel_actions"))     # -> policy.fit_normalizer(stats)
    loader = DataLoader(ds, batch_size=32, collate_fn=collate_policy)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghil.data.calvin_dataset import CalvinDataset
from ghil.data.calvin_format import EXPERT_CHUNK_KEY, EXPERT_GOAL_KEY, read_dataset_meta
from ghil.normalizer import VectorStats


@dataclass(frozen=True)
class PolicyDataConfig:
    """Where the data is and how goals are drawn; cameras, chunk length and action key come from the policy.

    The defaults are the ``data`` node of ``ghil/configs/recipe/policy.yaml`` (tests/test_settings.py checks).
    """

    root: str
    split: str = "training"
    val_split: str | None = "validation"  # held-out episodes for the trainer's validation loss (None: none)
    goal_horizon: tuple[int, int] = (0, 24)  # goal frame drawn U{lo..hi} steps after the observation
    lang_only: bool = False  # only annotated language windows (needed for language-conditioned policies)
    proprio_key: str = "robot_obs"
    seed: int = 0
    max_stat_frames: int | None = 200_000  # frames (whole episodes, evenly spread) used for normaliser statistics
    cache: str | None = None  # a `ghil pack` folder (<root>/packed): read memory-mapped arrays, not the npz frames
    features: str | None = None  # a `ghil featurize` folder (<root>/features): frozen-encoder tokens, no pixels
    extra_roots: tuple[str, ...] = ()  # more roots for the training split (DAgger rounds), same settings

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_roots", tuple(str(r) for r in (self.extra_roots or ())))
        lo, hi = (int(v) for v in self.goal_horizon)
        object.__setattr__(self, "goal_horizon", (lo, hi))
        if not 0 <= lo <= hi:
            raise ValueError(f"PolicyDataConfig.goal_horizon must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        if self.max_stat_frames is not None and self.max_stat_frames < 1:
            raise ValueError("PolicyDataConfig.max_stat_frames must be None or positive")


class PolicyDataset:
    """Map-style dataset of (observation, goal, instruction, action chunk) samples as numpy dicts."""

    def __init__(self, config: PolicyDataConfig, cameras: Sequence[str], goal_camera: str | None, action_key: str,
                 chunk_len: int, feature_view: int | None = None, policy=None):
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        self.config = config
        self.cameras = tuple(cameras)
        self.goal_camera = goal_camera
        self.action_key = action_key
        self.chunk_len = int(chunk_len)
        self.features = None
        if config.features:  # tokens of a frozen encoder instead of pixels (ghil/data/features.py)
            from ghil.data.features import FeatureSplit

            self.features = FeatureSplit.open(config.root, config.split, config.features, policy=policy)
            missing = [c for c in (*self.cameras, *(["goal"] if goal_camera else [])) if c not in self.features.arrays]
            if missing:
                raise KeyError(f"the feature cache {self.features.folder} has no tokens for {missing}")
            if feature_view is not None and not 0 <= feature_view < self.features.n_views:
                raise ValueError(f"feature_view {feature_view} not in 0..{self.features.n_views - 1}")
        self.feature_view = feature_view
        pixels = self.features is None
        self.expert_labelled = is_expert_labelled(config.root)
        if self.expert_labelled:
            self._check_expert_labels(goal_camera)
        # DAgger frames carry their own goal: no goal frame is drawn from the episode.
        draw_goal = bool(goal_camera) and not self.expert_labelled
        own = ((EXPERT_CHUNK_KEY,) + ((EXPERT_GOAL_KEY,) if goal_camera and pixels else ())
               if self.expert_labelled else ())
        common = dict(keys=((*self.cameras,) if pixels else ()) + (config.proprio_key,) + own,
                      lang_only=config.lang_only, goal_horizon=config.goal_horizon if draw_goal else None,
                      goal_keys=(goal_camera,) if draw_goal and pixels else (), seed=config.seed)
        if config.cache:  # the same samples, from the checked memory-mapped cache (ghil/data/packed.py)
            from ghil.data.packed import PackedFrames

            self.frames = PackedFrames(config.root, config.split, config.cache, **common)
        else:
            self.frames = CalvinDataset(config.root, config.split, window_len=1, **common)
        self._check_action_key()
        if self.features is not None and not np.array_equal(self.features.episodes, self.frames.episodes):
            raise ValueError(f"the feature cache {self.features.folder} lists other episodes than "
                             f"{self.frames.split_dir}: rebuild it with {self.features.rebuild}")
        self._offsets = np.r_[0, np.cumsum(self.frames.episodes[:, 1] - self.frames.episodes[:, 0] + 1)[:-1]]
        self._vectors: dict[tuple[int, str], np.ndarray] = {}

    def _check_expert_labels(self, goal_camera: str | None) -> None:
        where = f"{self.config.root} holds DAgger frames (ghil dagger)"
        if self.action_key != "rel_actions":
            raise ValueError(f"{where} labelled with the expert's relative actions; this policy trains on "
                             f"{self.action_key!r}")
        if goal_camera not in (None, "rgb_static"):
            raise ValueError(f"{where} whose goals are static-camera frames; this policy's goal camera is "
                             f"{goal_camera!r}")
        if self.features is not None and goal_camera and self.features.manifest.get("goal_source") != EXPERT_GOAL_KEY:
            raise ValueError(f"the feature cache {self.features.folder} encodes in-episode goal frames, not the "
                             f"DAgger frames' own goals: rebuild it with {self.features.rebuild}")

    def _check_action_key(self) -> None:
        if self.action_key not in self.frames.stored_keys:
            raise KeyError(f"action key {self.action_key!r} is not stored in {self.frames.split_dir} (frames have "
                           f"{sorted(self.frames.stored_keys)}); joint_actions exist only in ghil-collected data")

    def __len__(self) -> int:
        return len(self.frames)

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh (deterministic) set of goal frames."""
        self.frames.set_epoch(epoch)

    def episode_vectors(self, row: int, key: str) -> np.ndarray:
        """(n_frames, d) float32 values of ``key`` over episode ``row`` (cached)."""
        cache_key = (int(row), key)
        if cache_key not in self._vectors:
            # Through the loader, so every frame is validated (finite, rel_actions within [-1, 1], ...): the
            # normaliser statistics are fitted from these vectors and one bad frame would poison them.
            self._vectors[cache_key] = self.frames.episode_array(row, key).astype(np.float32)
        return self._vectors[cache_key]

    def __getitem__(self, idx: int) -> dict[str, object]:
        frame = self.frames[idx]
        row = int(frame["episode_row"])
        start = int(self.frames.episodes[row, 0])
        f = int(frame["frame_ids"][0]) - start
        if self.expert_labelled:  # the expert's own chunk from this state (a finished plan is padded with holds)
            chunk = np.asarray(frame[EXPERT_CHUNK_KEY][0], dtype=np.float32)
            if len(chunk) < self.chunk_len:
                raise ValueError(f"{self.config.root} stores expert chunks of {len(chunk)} steps; the policy's "
                                 f"chunk_len is {self.chunk_len} (re-run ghil dagger with dagger.chunk_len >= it)")
            chunk = chunk[:self.chunk_len]
        else:
            chunk = self.episode_vectors(row, self.action_key)[f:f + self.chunk_len]
        n_valid = len(chunk)
        if n_valid < self.chunk_len:  # past the episode's end: repeat the last action, masked out of the loss
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.chunk_len - n_valid, axis=0)])
        sample: dict[str, object] = {
            "images": {cam: frame[cam][0] for cam in self.cameras} if self.features is None else {},
            "proprio": np.asarray(frame[self.config.proprio_key][0], dtype=np.float32),
            "actions": chunk.astype(np.float32),
            "action_mask": np.arange(self.chunk_len) < n_valid,
            "goal": (frame[EXPERT_GOAL_KEY][0] if self.expert_labelled else frame[f"goal_{self.goal_camera}"])
            if self.goal_camera and self.features is None else None,
            "instruction": frame.get("ann"),
        }
        if self.features is not None:
            sources = (*self.cameras, *(["goal"] if self.goal_camera else []))
            if self.feature_view is None:  # one view per source, independent (de-synchronised augmentation)
                rng = np.random.default_rng((self.config.seed, self.frames.epoch, int(idx) % len(self), 1))
                views = rng.integers(0, self.features.n_views, size=len(sources))
            else:
                views = [self.feature_view] * len(sources)
            r = int(self._offsets[row]) + f
            sample["features"] = {cam: np.array(self.features.arrays[cam][r, int(v)])
                                  for cam, v in zip(self.cameras, views)}
            if self.goal_camera:
                # a DAgger cache's goal row r holds frame r's own goal (ghil/data/features.py:goal_source)
                g = r if self.expert_labelled else int(self._offsets[row]) + int(frame["goal_frame_id"]) - start
                sample["goal_features"] = np.array(self.features.arrays["goal"][g, int(views[-1])])
        return sample


def is_expert_labelled(root: str | Path) -> bool:
    """Whether ``root`` is a DAgger dataset: its stored frame spec has ``expert_chunk > 0`` (``ghil dagger``)."""
    meta = read_dataset_meta(root)
    spec = (meta or {}).get("config", {}).get("spec", {}) if isinstance(meta, dict) else {}
    return bool(isinstance(spec, dict) and spec.get("expert_chunk", 0))


class ConcatPolicyDataset:
    """Several ``PolicyDataset``s one after another (the main root, then ``extra_roots``), as one dataset."""

    def __init__(self, parts: Sequence[PolicyDataset]):
        if not parts:
            raise ValueError("ConcatPolicyDataset needs at least one dataset")
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts])

    @property
    def main(self) -> PolicyDataset:
        return self.parts[0]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, idx: int) -> dict[str, object]:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        k = int(np.searchsorted(self._ends, idx, side="right"))
        return self.parts[k][idx - (int(self._ends[k - 1]) if k else 0)]


def compute_policy_stats(dataset: PolicyDataset, keys: Sequence[str]) -> dict[str, VectorStats]:
    """Per-dimension statistics of vector ``keys`` over whole episodes, evenly spread up to max_stat_frames."""
    episodes = dataset.frames.episodes
    lengths = episodes[:, 1] - episodes[:, 0] + 1
    budget = dataset.config.max_stat_frames
    order = np.arange(len(episodes))
    if budget is not None and lengths.sum() > budget:
        order = np.random.default_rng(dataset.config.seed).permutation(len(episodes))
        keep = np.cumsum(lengths[order]) <= budget
        keep[0] = True
        order = np.sort(order[keep])
    return {key: VectorStats.of(np.concatenate([dataset.episode_vectors(int(r), key) for r in order]))
            for key in keys}


def collate_policy(samples: Sequence[dict]):
    """A list of PolicyDataset samples -> ``ghil.types.PolicyBatch`` (torch tensors, uint8 images)."""
    import torch

    from ghil.types import PolicyBatch

    cameras = samples[0]["images"].keys()
    goal = None
    if samples[0]["goal"] is not None:
        goal = torch.from_numpy(np.stack([s["goal"] for s in samples]))
    instructions = tuple(s["instruction"] for s in samples)
    features = goal_features = None
    if samples[0].get("features") is not None:
        features = {cam: torch.from_numpy(np.stack([s["features"][cam] for s in samples]))
                    for cam in samples[0]["features"]}
        if samples[0].get("goal_features") is not None:
            goal_features = torch.from_numpy(np.stack([s["goal_features"] for s in samples]))
    return PolicyBatch(
        images={cam: torch.from_numpy(np.stack([s["images"][cam] for s in samples])) for cam in cameras},
        proprio=torch.from_numpy(np.stack([s["proprio"] for s in samples])),
        actions=torch.from_numpy(np.stack([s["actions"] for s in samples])),
        action_mask=torch.from_numpy(np.stack([s["action_mask"] for s in samples])),
        goal=goal,
        instructions=instructions if any(i is not None for i in instructions) else None,
        features=features,
        goal_features=goal_features,
    )
