"""Training samples for subgoal generators and subgoal filters: (current frame, frame ``horizon`` steps later,
instruction) from the annotated language windows of a CALVIN-format split.

A sample is the camera frame at f inside an annotated window, the frame ``k`` steps later (k = ``horizon``, or
drawn ``U{lo..hi}`` per sample when ``horizon`` is a pair; clipped to the window's last frame, as SuSIE's CALVIN
relabelling does), and the window's instruction. With ``n_frames > 1`` it also holds a ``clip`` of ``n_frames``
future frames evenly spaced up to the goal (the last one is the goal), for video generators. Every image is
resized to ``image_size`` by ``resize_frames``, the one resize of this stage (bilinear, antialiased when
shrinking: ``ghil.nn.augment.resize``).

Frames come through ``CalvinDataset`` (or, with ``cache``, ``PackedFrames`` over a ``ghil pack`` folder: the same
index and frames, memory-mapped), restricted to ``lang_only`` windows, so every frame is validated on read and a
bad one raises ``DatasetError`` naming its file. Draws are a pure function of (seed, epoch, index), so DataLoader
workers and resumed runs agree; ``set_epoch`` draws new ones. Nothing here imports torch at module level.

Usage::

    ds = SubgoalDataset(SubgoalDataConfig(root="data/playtable_play", horizon=20, image_size=64))
    s = ds[0]      # s["image"], s["goal"]: (64, 64, 3) uint8; s["instruction"]: "open the drawer"
    batch = collate_subgoal([ds[i] for i in range(8)])     # SubgoalBatch: batch.image (8, 64, 64, 3) uint8
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ghil.data.calvin_dataset import CalvinDataset

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["SubgoalBatch", "SubgoalDataConfig", "SubgoalDataset", "collate_subgoal", "resize_frames"]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class SubgoalDataConfig:
    """Where the data is and which (frame, future frame) pairs to draw.

    ``horizon`` is an int (SuSIE on CALVIN: exactly 20) or an inclusive ``(lo, hi)`` pair drawn per sample (the
    GHIL-Glue filter's positives use 16..23). Generator recipes fill ``horizon``, ``camera``, ``image_size`` and
    ``n_frames`` from the model's config, so a checkpoint and its data always agree.
    """

    root: str
    split: str = "training"
    val_split: str | None = "validation"  # held-out episodes for the trainer's validation loss (None: none)
    horizon: int | tuple[int, int] = 20  # the goal is the frame this many steps after the current one
    camera: str = "rgb_static"
    image_size: int = 64  # every returned image is resized to (image_size, image_size)
    n_frames: int = 1  # > 1: also a "clip" of n_frames future frames evenly spaced up to the goal
    cache: str | None = None  # a `ghil pack` folder (<root>/packed): the same frames, memory-mapped
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"SubgoalDataConfig.root must be a non-empty path string, got {self.root!r}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"SubgoalDataConfig.split must be a non-empty split name, got {self.split!r}")
        if self.val_split is not None and (not isinstance(self.val_split, str) or not self.val_split):
            raise ValueError(f"SubgoalDataConfig.val_split must be None or a split name, got {self.val_split!r}")
        horizon = self.horizon
        if isinstance(horizon, Sequence) and not isinstance(horizon, str):
            if len(horizon) != 2 or not all(_is_int(h) for h in horizon):
                raise ValueError(f"SubgoalDataConfig.horizon must be an int or an (lo, hi) pair of ints, got "
                                 f"{horizon!r}")
            horizon = (int(horizon[0]), int(horizon[1]))
            if not 1 <= horizon[0] <= horizon[1]:
                raise ValueError(f"SubgoalDataConfig.horizon (lo, hi) needs 1 <= lo <= hi, got {horizon}")
        elif _is_int(horizon):
            horizon = int(horizon)
            if horizon < 1:
                raise ValueError(f"SubgoalDataConfig.horizon must be >= 1 step, got {horizon}")
        else:
            raise ValueError(f"SubgoalDataConfig.horizon must be an int or an (lo, hi) pair, got {horizon!r}")
        object.__setattr__(self, "horizon", horizon)
        if not isinstance(self.camera, str) or not self.camera.startswith("rgb_"):
            raise ValueError(f"SubgoalDataConfig.camera must be an RGB camera key (rgb_static, rgb_gripper), got "
                             f"{self.camera!r}")
        if not _is_int(self.image_size) or self.image_size < 8:
            raise ValueError(f"SubgoalDataConfig.image_size must be an int >= 8 px, got {self.image_size!r}")
        if not _is_int(self.n_frames) or self.n_frames < 1:
            raise ValueError(f"SubgoalDataConfig.n_frames must be an int >= 1, got {self.n_frames!r}")
        if self.n_frames > self.horizon_range[0]:
            raise ValueError(f"SubgoalDataConfig: n_frames ({self.n_frames}) future frames need a horizon of at least "
                             f"as many steps, got {self.horizon}")
        if self.cache is not None and (not isinstance(self.cache, str) or not self.cache):
            raise ValueError(f"SubgoalDataConfig.cache must be None or a `ghil pack` folder, got {self.cache!r}")
        if not _is_int(self.seed):
            raise ValueError(f"SubgoalDataConfig.seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "n_frames", int(self.n_frames))

    @property
    def horizon_range(self) -> tuple[int, int]:
        """``horizon`` as an inclusive (lo, hi) pair (lo == hi for a fixed horizon)."""
        return (self.horizon, self.horizon) if isinstance(self.horizon, int) else self.horizon


def resize_frames(frames: Any, size: int) -> Any:
    """uint8 ``(..., H, W, 3)`` frames (numpy or torch) -> uint8 ``(..., size, size, 3)`` of the same kind.

    The one resize of the subgoal stage (datasets, generators, filters): ``ghil.nn.augment.resize`` (bilinear,
    antialiased when shrinking), rounded back to uint8. Frames already at ``size`` are returned unchanged.
    """
    import torch

    from ghil.nn.augment import resize

    is_numpy = isinstance(frames, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(frames)) if is_numpy else frames
    if x.dtype != torch.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"resize_frames needs uint8 (..., H, W, 3) frames, got {x.dtype} {tuple(x.shape)}")
    if tuple(x.shape[-3:-1]) == (size, size):
        return frames
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    out = resize(flat, size).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(*lead, size, size, 3)
    return out.numpy() if is_numpy else out


class SubgoalDataset:
    """Map-style dataset of (current frame, future frame, instruction) samples over the annotated windows.

    Each sample is a dict: ``image`` and ``goal`` (S, S, 3) uint8, ``clip`` (n_frames, S, S, 3) uint8 (only when
    ``n_frames > 1``), ``instruction`` and ``task`` (str), ``episode_row``, ``frame_id`` and ``goal_frame_id``
    (int). ``frame_size`` is the stored frames' (H, W) before resizing.
    """

    def __init__(self, config: SubgoalDataConfig):
        if not isinstance(config, SubgoalDataConfig):
            raise TypeError(f"SubgoalDataset needs a SubgoalDataConfig, got {type(config).__qualname__}")
        self.config = config
        self.epoch = 0
        common = dict(keys=(config.camera,), lang_only=True, goal_horizon=None, goal_keys=(), seed=config.seed)
        if config.cache:
            from ghil.data.packed import PackedFrames

            self.frames = PackedFrames(config.root, config.split, config.cache, **common)
        else:
            self.frames = CalvinDataset(config.root, config.split, window_len=1, **common)
        index, lang, episodes = self.frames.index, self.frames.lang, self.frames.episodes
        # The last frame a goal may come from: the annotated window's end, never past its play episode.
        self._window_end = np.minimum(lang.indx[index.lang_rows, 1], episodes[index.episode_rows, 1]).astype(np.int64)
        first = self.frames[0][config.camera][0]
        if first.ndim != 3 or first.shape[-1] != 3:
            raise ValueError(f"{self.frames.split_dir}: {config.camera!r} frames are {first.shape}, not RGB (H, W, 3)")
        self.frame_size: tuple[int, int] = (int(first.shape[0]), int(first.shape[1]))

    def __len__(self) -> int:
        return len(self.frames)

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh (deterministic) set of horizons (only matters for a (lo, hi) horizon)."""
        self.epoch = int(epoch)
        self.frames.set_epoch(epoch)

    def _read(self, frame_id: int, episode_row: int) -> np.ndarray:
        camera = self.config.camera
        if isinstance(self.frames, CalvinDataset):
            return self.frames.read_frame(frame_id, (camera,))[camera]
        return self.frames.read_frame(frame_id, (camera,), episode_row)[camera]

    def horizon_of(self, idx: int) -> int:
        """The step count k drawn for sample ``idx`` this epoch (before clipping to the window's end)."""
        lo, hi = self.config.horizon_range
        if lo == hi:
            return lo
        return int(np.random.default_rng((self.config.seed, self.epoch, int(idx), 2)).integers(lo, hi + 1))

    def pair(self, idx: int) -> dict[str, object]:
        """Sample ``idx`` without its images: ``frame_id``, ``future_ids`` (the clip's frame ids, the goal's last),
        ``goal_frame_id``, ``episode_row``, ``instruction``, ``task`` (token-space datasets read only these)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx = int(idx) % len(self)
        cfg = self.config
        index = self.frames.index
        start = int(index.starts[idx])
        end = int(self._window_end[idx])
        k = self.horizon_of(idx)
        # Future frames at evenly spaced offsets whose last is k (the goal); each clipped to the window's end.
        offsets = np.round(np.linspace(k / cfg.n_frames, k, cfg.n_frames)).astype(np.int64)
        future_ids = np.minimum(start + offsets, end)
        lang_row = int(index.lang_rows[idx])
        return {"frame_id": start, "future_ids": future_ids, "goal_frame_id": int(future_ids[-1]),
                "episode_row": int(index.episode_rows[idx]), "instruction": str(self.frames.lang.ann[lang_row]),
                "task": str(self.frames.lang.task[lang_row])}

    def __getitem__(self, idx: int) -> dict[str, object]:
        pair = self.pair(idx)  # the index check, the horizon draw and the future frame ids
        idx = int(idx) % len(self)
        cfg = self.config
        frame = self.frames[idx]
        row, future_ids = int(pair["episode_row"]), pair["future_ids"]
        read: dict[int, np.ndarray] = {}
        for fid in dict.fromkeys(int(f) for f in future_ids):
            read[fid] = self._read(fid, row)
        size = cfg.image_size
        sample: dict[str, object] = {
            "image": resize_frames(frame[cfg.camera][0], size),
            "goal": resize_frames(read[int(future_ids[-1])], size),
            **{key: pair[key] for key in ("instruction", "task", "episode_row", "frame_id", "goal_frame_id")},
        }
        if cfg.n_frames > 1:
            sample["clip"] = resize_frames(np.stack([read[int(f)] for f in future_ids]), size)
        return sample


@dataclass(frozen=True)
class SubgoalBatch:
    """A training batch for subgoal generators and filters (built by ``collate_subgoal``).

    Usage::

        batch = collate_subgoal(samples).to("cuda")
        loss, metrics = generator.loss(batch)
    """

    image: Tensor  # (B, S, S, 3) uint8 current frames
    goal: Tensor  # (B, S, S, 3) uint8 frames `horizon` steps later
    instructions: tuple[str, ...]  # B instructions
    tasks: tuple[str, ...]  # B CALVIN task names
    episode_rows: Tensor  # (B,) int64
    frame_ids: Tensor  # (B,) int64 global frame id of `image`
    goal_frame_ids: Tensor  # (B,) int64 global frame id of `goal`
    clip: Tensor | None = None  # (B, n_frames, S, S, 3) uint8 future frames, the last equal to `goal`

    @property
    def batch_size(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> SubgoalBatch:
        from torch import Tensor

        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


def collate_subgoal(samples: Sequence[dict]) -> SubgoalBatch:
    """A list of ``SubgoalDataset`` samples -> ``SubgoalBatch`` (torch tensors, uint8 images)."""
    import torch

    if not samples:
        raise ValueError("collate_subgoal needs at least one sample")
    stack = lambda key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples]))  # noqa: E731
    ids = lambda key: torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)  # noqa: E731
    has_clip = [("clip" in s) for s in samples]
    if any(has_clip) and not all(has_clip):
        raise ValueError("collate_subgoal: some samples have a clip and others not (mixed n_frames?)")
    return SubgoalBatch(image=stack("image"), goal=stack("goal"),
                        instructions=tuple(str(s["instruction"]) for s in samples),
                        tasks=tuple(str(s["task"]) for s in samples), episode_rows=ids("episode_row"),
                        frame_ids=ids("frame_id"), goal_frame_ids=ids("goal_frame_id"),
                        clip=stack("clip") if all(has_clip) else None)
