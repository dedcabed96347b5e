"""Single camera frames of a CALVIN-format split, for training image autoencoders (``ghil train recipe=autoencoder``).

A sample is one frame of one camera: every frame of every play episode (annotated or not), once per camera in
``cameras``, resized to ``image_size`` (antialiased bilinear, ``ghil.nn.augment.resize``, rounded back to uint8) so
that frames of cameras of different sizes (CALVIN's 200x200 static and 84x84 gripper views) stack into one batch.
Frames are read through ``CalvinDataset`` (or, with ``cache``, ``PackedFrames`` over a ``ghil pack`` folder: the
same frames, memory-mapped), so every frame is validated on read and a bad one raises ``DatasetError`` naming its
file. Nothing here imports torch at module level.

Usage::

    ds = FrameDataset("data/playtable_play", "training", cameras=("rgb_static", "rgb_gripper"), image_size=64,
                      cache="data/playtable_play/packed")
    ds[0]["image"].shape, ds[0]["camera"]                    # (64, 64, 3) uint8, "rgb_static"
    ds.frame_sizes                                           # {"rgb_static": 200, "rgb_gripper": 84}
    batch = collate_frames([ds[i] for i in range(8)])        # FrameBatch: batch.images (8, 64, 64, 3) uint8
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ghil.data.calvin_dataset import CalvinDataset

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["FrameBatch", "FrameDataset", "collate_frames", "resize_uint8"]


def resize_uint8(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)`` (unchanged when already that size)."""
    if frame.shape[:2] == (size, size):
        return frame
    import torch

    from ghil.nn.augment import resize

    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    return resize(x, size)[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


class FrameDataset:
    """Map-style dataset over (frame, camera) pairs: ``len = frames * len(cameras)``, camera-major within a frame."""

    def __init__(self, root: str | os.PathLike, split: str = "training",
                 cameras: Sequence[str] = ("rgb_static", "rgb_gripper"), image_size: int | None = 64,
                 cache: str | os.PathLike | None = None):
        if isinstance(cameras, str) or not cameras:
            raise ValueError(f"FrameDataset.cameras must be a non-empty list of camera keys, got {cameras!r}")
        bad = [c for c in cameras if not (isinstance(c, str) and c.startswith("rgb_"))]
        if bad:
            raise ValueError(f"FrameDataset.cameras must be RGB camera keys (rgb_static, rgb_gripper), got {bad}")
        if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 8):
            raise ValueError(f"FrameDataset.image_size must be None or an int >= 8, got {image_size!r}")
        self.cameras = tuple(cameras)
        self.image_size = None if image_size is None else int(image_size)
        common = dict(keys=self.cameras, lang_only=False, goal_horizon=None, goal_keys=())
        if cache:
            from ghil.data.packed import PackedFrames

            self.frames = PackedFrames(root, split, cache, **common)
        else:
            self.frames = CalvinDataset(root, split, window_len=1, **common)
        self.split_dir = self.frames.split_dir
        first = self.frames[0]
        self.frame_sizes: dict[str, int] = {}
        for cam in self.cameras:
            shape = tuple(first[cam][0].shape)
            if len(shape) != 3 or shape[-1] != 3 or shape[0] != shape[1]:
                raise ValueError(f"{self.split_dir}: {cam!r} frames are {shape}, not square RGB (H, W, 3)")
            self.frame_sizes[cam] = int(shape[0])

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def __len__(self) -> int:
        return len(self.frames) * len(self.cameras)

    def set_epoch(self, epoch: int) -> None:
        self.frames.set_epoch(epoch)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        row, c = divmod(int(idx) % len(self), len(self.cameras))
        cam = self.cameras[c]
        frame_id = int(self.frames.index.starts[row])
        episode_row = int(self.frames.index.episode_rows[row])
        if isinstance(self.frames, CalvinDataset):
            image = self.frames.read_frame(frame_id, (cam,))[cam]
        else:
            image = self.frames.read_frame(frame_id, (cam,), episode_row)[cam]
        if self.image_size is not None:
            image = resize_uint8(image, self.image_size)
        return {"image": image, "camera": cam, "frame_id": frame_id, "episode_row": episode_row}


@dataclass(frozen=True)
class FrameBatch:
    """A batch of single camera frames (``collate_frames``)."""

    images: Tensor  # (B, S, S, 3) uint8
    cameras: tuple[str, ...]
    frame_ids: Tensor  # (B,) int64 global frame ids
    episode_rows: Tensor  # (B,) int64

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> FrameBatch:
        from torch import Tensor

        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


def collate_frames(samples: Sequence[dict]) -> FrameBatch:
    """``FrameDataset`` samples -> ``FrameBatch`` (torch tensors)."""
    import torch

    if not samples:
        raise ValueError("collate_frames needs at least one sample")
    shapes = {np.asarray(s["image"]).shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_frames: images of different shapes {sorted(shapes)} (set image_size to resize)")
    return FrameBatch(images=torch.from_numpy(np.stack([np.asarray(s["image"]) for s in samples])),
                      cameras=tuple(str(s["camera"]) for s in samples),
                      frame_ids=torch.tensor([int(s["frame_id"]) for s in samples], dtype=torch.int64),
                      episode_rows=torch.tensor([int(s["episode_row"]) for s in samples], dtype=torch.int64))
