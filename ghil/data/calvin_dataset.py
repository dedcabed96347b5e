"""A map-style loader for CALVIN-format datasets: real CALVIN downloads and ghil's own (DatasetWriter output).

Samples are windows of consecutive frames that never cross a play-episode boundary (``ep_start_end_ids.npy``),
optionally restricted to annotated language windows, each with a goal frame sampled a few steps ahead in the same
episode. Only ``__len__``/``__getitem__`` are needed by a torch DataLoader, so nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghil.data.calvin_format import (
    DATASET_META_FILE,
    EP_START_END_FILE,
    FORMAT_VERSION,
    GHIL_EXTRA_KEYS,
    JOURNAL_FILE,
    LABELS_FOLDER,
    LANG_FILE,
    LANG_FOLDER,
    frame_file_name,
    label_file_name,
    read_dataset_meta,
    read_journal,
    read_statistics,
)

LABEL_KEY = "ecot_labels"  # a pseudo-key: the window's reasoning labels, read from the ecot_labels/ sidecar
DEFAULT_KEYS = ("rgb_static", "rgb_gripper", "robot_obs", "scene_obs", "actions", "rel_actions")


class IncompleteDatasetError(RuntimeError):
    """A ghil dataset whose journal lists episodes that finalize() has not yet indexed."""


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist (or is not a folder)")
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(f"split folder {split_dir} does not exist; {root} has {found or 'no folders'}")
    return split_dir


def _check_finalized(root: Path, split_dir: Path) -> None:
    """Refuse a ghil split whose journal is ahead of its ep_start_end_ids.npy (collection not finalized)."""
    meta = read_dataset_meta(root)
    if meta is not None and meta.get("format_version") != FORMAT_VERSION:
        raise IncompleteDatasetError(f"{root / DATASET_META_FILE} has format_version {meta.get('format_version')!r}; "
                                     f"this loader reads version {FORMAT_VERSION}")
    records = read_journal(split_dir / JOURNAL_FILE)
    if not records:
        return
    committed = np.array([[r.start, r.end] for r in records], dtype=np.int64)
    index_path = split_dir / EP_START_END_FILE
    indexed = np.load(index_path).reshape(-1, 2) if index_path.exists() else None
    if indexed is None or not np.array_equal(indexed, committed):
        state = "is missing" if indexed is None else f"lists {len(indexed)} episode(s)"
        raise IncompleteDatasetError(
            f"{split_dir} is half-written: its journal has {len(records)} committed episode(s) but {EP_START_END_FILE} "
            f"{state}. Run `DatasetWriter.resume({str(root)!r}).finalize()` (ghil.data.calvin_format), or resume the "
            "collection, which finalizes when it ends")


def _load_episodes(split_dir: Path) -> np.ndarray:
    path = split_dir / EP_START_END_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {split_dir} is not a CALVIN dataset split (expected "
                                f"episode_XXXXXXX.npz frames, {EP_START_END_FILE} and {LANG_FOLDER}/{LANG_FILE})")
    episodes = np.load(path).astype(np.int64).reshape(-1, 2)
    # Released CALVIN splits do not promise sorted rows; sorting lets frame -> episode be a binary search.
    episodes = episodes[np.argsort(episodes[:, 0], kind="stable")]
    if (episodes[:, 1] < episodes[:, 0]).any() or (episodes[1:, 0] <= episodes[:-1, 1]).any():
        raise ValueError(f"{path}: episodes must be disjoint inclusive [start, end] rows with start <= end")
    return episodes


@dataclass(frozen=True)
class LanguageAnnotations:
    """The annotated windows of one split (CALVIN's ``auto_lang_ann.npy``), inclusive global frame ids.

    Usage::

        lang = LanguageAnnotations.load(split_dir)
        lang.indx[0], lang.ann[0], lang.task[0]    # (start, end), "open the drawer", "open_drawer"
        lang.emb.shape                             # (n, 384)
    """

    indx: np.ndarray  # (n, 2) int64
    ann: tuple[str, ...]
    task: tuple[str, ...]
    emb: np.ndarray  # (n, d) float32

    @classmethod
    def load(cls, split_dir: Path, folder: str = LANG_FOLDER) -> LanguageAnnotations:
        path = split_dir / folder / LANG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; lang_only=True needs the split's language annotations")
        data = np.load(path, allow_pickle=True).item()
        indx = np.asarray(data["info"]["indx"], dtype=np.int64).reshape(-1, 2)
        emb = np.asarray(data["language"]["emb"], dtype=np.float32)
        emb = emb.reshape(len(emb), -1) if len(emb) else np.zeros((0, 0), np.float32)
        return cls(indx=indx, ann=tuple(data["language"]["ann"]), task=tuple(data["language"]["task"]), emb=emb)


class EcotLabelReader:
    """Per-frame ECoT reasoning labels from ``<split>/ecot_labels/ep_<start>_<end>.jsonl``, by global frame id.

    Usage::

        labels = EcotLabelReader(split_dir, episodes)      # episodes: (n, 2) ep_start_end_ids
        labels.available                                   # False for real CALVIN data
        labels.label(1234)["subtask"]
    """

    def __init__(self, split_dir: Path, episodes: np.ndarray):
        self.folder = split_dir / LABELS_FOLDER
        self.episodes = episodes
        self.available = self.folder.is_dir()
        self._cached: tuple[int, list[dict]] | None = None  # one episode: windows read frames in order

    def label(self, frame_id: int) -> dict:
        if not self.available:
            raise KeyError(f"{LABEL_KEY!r}: {self.folder} does not exist (real CALVIN data has no ECoT labels)")
        episode = _episode_of(self.episodes, frame_id)
        if self._cached is None or self._cached[0] != episode:
            self._cached = (episode, self._read_episode(*self.episodes[episode]))
        return self._cached[1][frame_id - self.episodes[episode][0]]

    def _read_episode(self, start: int, end: int) -> list[dict]:
        path = self.folder / label_file_name(int(start), int(end))
        if not path.exists():
            raise KeyError(f"{LABEL_KEY!r}: episode [{start}, {end}] was committed without labels ({path.name} absent)")
        labels = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        if len(labels) != end - start + 1:
            raise ValueError(f"{path} has {len(labels)} labels for {end - start + 1} frames")
        return labels


def _episode_of(episodes: np.ndarray, frame_id: int) -> int:
    """Row of ``episodes`` containing ``frame_id``; KeyError when it lies in none."""
    row = int(np.searchsorted(episodes[:, 0], frame_id, side="right")) - 1
    if row < 0 or frame_id > episodes[row, 1]:
        raise KeyError(f"frame {frame_id} lies in no episode of ep_start_end_ids")
    return row


@dataclass(frozen=True)
class WindowIndex:
    """Flat index of samples: first frame id, episode row, and language-window row (-1 without language)."""

    starts: np.ndarray
    episode_rows: np.ndarray
    lang_rows: np.ndarray

    @classmethod
    def over_episodes(cls, episodes: np.ndarray, window_len: int) -> WindowIndex:
        parts = [(np.arange(s, e + 2 - window_len), row) for row, (s, e) in enumerate(episodes)
                 if e + 1 - s >= window_len]
        return cls._from_parts([(starts, row, -1) for starts, row in parts])

    @classmethod
    def over_lang_windows(cls, episodes: np.ndarray, lang: LanguageAnnotations, window_len: int) -> WindowIndex:
        parts = []
        for lang_row, (start, end) in enumerate(lang.indx):
            try:
                row = _episode_of(episodes, int(start))
            except KeyError:
                continue  # an annotation of frames this split does not contain
            end = min(int(end), int(episodes[row, 1]))  # a window must not leak into the next play episode
            if end + 1 - start >= window_len:
                parts.append((np.arange(start, end + 2 - window_len), row, lang_row))
        return cls._from_parts(parts)

    @classmethod
    def _from_parts(cls, parts: list[tuple[np.ndarray, int, int]]) -> WindowIndex:
        if not parts:
            empty = np.zeros(0, np.int64)
            return cls(empty, empty, empty)
        return cls(starts=np.concatenate([p[0] for p in parts]).astype(np.int64),
                   episode_rows=np.concatenate([np.full(len(p[0]), p[1]) for p in parts]).astype(np.int64),
                   lang_rows=np.concatenate([np.full(len(p[0]), p[2]) for p in parts]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.starts)


class CalvinDataset:
    """Windows of consecutive frames from one split of a CALVIN-format dataset, as dicts of numpy arrays.

    Usage::

        ds = CalvinDataset("data/task_D_D", "training", keys=("rgb_static", "rel_actions"), window_len=10)
        sample = ds[0]     # sample["rgb_static"]: (10, 200, 200, 3) uint8; sample["goal_rgb_static"]: (200, 200, 3)
        torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)   # works: only __len__/__getitem__ needed

    Each sample holds, per requested key, an array stacked over the window (``(window_len, ...)``, also for
    ``window_len=1``); ``frame_ids``; ``episode_row``; with ``lang_only`` the window's ``ann``, ``task`` and
    ``lang_emb``; with ``goal_horizon`` a ``goal_frame_id`` and ``goal_<key>`` for each of ``goal_keys``, drawn
    ``U{lo..hi}`` steps after the window's last frame and clipped to its episode's end. The pseudo-key
    ``"ecot_labels"`` gives the window's reasoning labels as a list of dicts (use a collate_fn that keeps lists).
    Goals are a deterministic function of (seed, epoch, index): call ``set_epoch`` to draw new ones.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", keys: Sequence[str] = DEFAULT_KEYS,
                 window_len: int = 1, lang_only: bool = False, goal_horizon: tuple[int, int] | None = (0, 24),
                 goal_keys: Sequence[str] = ("rgb_static",), seed: int = 0, lang_folder: str = LANG_FOLDER):
        if isinstance(keys, str):
            raise TypeError(f"keys must be a sequence of key names, got the string {keys!r}")
        if not isinstance(window_len, (int, np.integer)) or window_len < 1:
            raise ValueError(f"window_len must be a positive int, got {window_len!r}")
        if goal_horizon is not None and not (0 <= goal_horizon[0] <= goal_horizon[1]):
            raise ValueError(f"goal_horizon must be (lo, hi) with 0 <= lo <= hi, got {goal_horizon!r}")
        self.root = Path(root)
        self.split_dir = _split_dir(self.root, split)
        _check_finalized(self.root, self.split_dir)
        self.episodes = _load_episodes(self.split_dir)
        self.keys = tuple(keys)
        self.window_len = int(window_len)
        self.lang_only = lang_only
        self.goal_horizon = None if goal_horizon is None else (int(goal_horizon[0]), int(goal_horizon[1]))
        self.goal_keys = tuple(goal_keys) if goal_horizon is not None else ()
        self.seed = seed
        self.epoch = 0
        self.labels = EcotLabelReader(self.split_dir, self.episodes)
        self.lang = LanguageAnnotations.load(self.split_dir, lang_folder) if lang_only else None
        self._check_keys_available()
        self.index = (WindowIndex.over_lang_windows(self.episodes, self.lang, self.window_len) if lang_only
                      else WindowIndex.over_episodes(self.episodes, self.window_len))
        if len(self.index) == 0:
            what = "annotated language window" if lang_only else "episode"
            raise ValueError(f"{self.split_dir}: no {what} is at least window_len={self.window_len} frames long "
                             f"({len(self.episodes)} episode(s))")

    def _check_keys_available(self) -> None:
        """Fail at construction, not in a DataLoader worker, when a requested key is not stored."""
        frame_keys = [k for k in self.keys if k != LABEL_KEY]
        if LABEL_KEY in self.keys and not self.labels.available:
            raise KeyError(f"{LABEL_KEY!r} requested but {self.split_dir} has no {LABELS_FOLDER}/ folder "
                           "(real CALVIN data has no ECoT labels)")
        if not len(self.episodes):
            return
        with np.load(self._frame_path(int(self.episodes[0, 0]))) as first:
            stored = set(first.files)
        missing = [k for k in dict.fromkeys([*frame_keys, *self.goal_keys]) if k not in stored]
        if missing:
            hint = [k for k in missing if k in GHIL_EXTRA_KEYS]
            raise KeyError(f"{missing} not stored in {self.split_dir} (frames have {sorted(stored)})"
                           + (f"; {hint} exist only in ghil-collected data, not in real CALVIN" if hint else ""))

    def _frame_path(self, frame_id: int) -> Path:
        path = self.split_dir / frame_file_name(frame_id)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing although {EP_START_END_FILE} lists frame {frame_id}")
        return path

    def _read_frame(self, frame_id: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        with np.load(self._frame_path(frame_id)) as npz:  # NpzFile reads (and decompresses) only the keys asked
            return {key: npz[key] for key in keys}

    # -- map-style dataset protocol -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, object]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx = int(idx) % len(self)
        start = int(self.index.starts[idx])
        episode_row = int(self.index.episode_rows[idx])
        frame_ids = np.arange(start, start + self.window_len, dtype=np.int64)
        frame_keys = [k for k in self.keys if k != LABEL_KEY]
        frames = [self._read_frame(int(f), frame_keys) for f in frame_ids]
        sample: dict[str, object] = {key: np.stack([f[key] for f in frames]) for key in frame_keys}
        sample["frame_ids"] = frame_ids
        sample["episode_row"] = np.int64(episode_row)
        if LABEL_KEY in self.keys:
            sample[LABEL_KEY] = [self.labels.label(int(f)) for f in frame_ids]
        if self.lang is not None:
            lang_row = int(self.index.lang_rows[idx])
            sample["ann"] = self.lang.ann[lang_row]
            sample["task"] = self.lang.task[lang_row]
            sample["lang_emb"] = self.lang.emb[lang_row]
        if self.goal_horizon is not None:
            goal_id = self._goal_frame_id(idx, int(frame_ids[-1]), int(self.episodes[episode_row, 1]))
            sample["goal_frame_id"] = np.int64(goal_id)
            sample.update({f"goal_{k}": v for k, v in self._read_frame(goal_id, self.goal_keys).items()})
        return sample

    def _goal_frame_id(self, idx: int, last_frame: int, episode_end: int) -> int:
        # Seeded per (seed, epoch, idx) so DataLoader workers and reruns agree regardless of access order.
        rng = np.random.default_rng((self.seed, self.epoch, idx))
        lo, hi = self.goal_horizon
        return min(last_frame + int(rng.integers(lo, hi + 1)), episode_end)

    # -- extras -------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh, still deterministic, set of goal frames."""
        self.epoch = int(epoch)

    def label(self, frame_id: int) -> dict:
        """The ECoT reasoning label of any frame id of this split (KeyError when the dataset has none)."""
        return self.labels.label(int(frame_id))

    def episode_bounds(self, frame_id: int) -> tuple[int, int]:
        """Inclusive ``(start, end)`` of the play episode containing ``frame_id``."""
        start, end = self.episodes[_episode_of(self.episodes, int(frame_id))]
        return int(start), int(end)

    @property
    def statistics(self) -> dict[str, object]:
        """This split's statistics.yaml (see ``calvin_format.read_statistics``)."""
        return read_statistics(self.split_dir)
