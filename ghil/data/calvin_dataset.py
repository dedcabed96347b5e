"""A map-style loader for CALVIN-format datasets: real CALVIN downloads and ghil's own (DatasetWriter output).

Samples are windows of consecutive frames that never cross a play-episode boundary (``ep_start_end_ids.npy``),
optionally restricted to annotated language windows, each with a goal frame sampled a few steps ahead in the same
episode. Only ``__len__``/``__getitem__`` are needed by a torch DataLoader, so nothing here imports torch.

Every frame returned is validated (finite vectors, rel_actions in [-1, 1], gripper +-1, uint8 (H, W, 3) images of one
size per camera), and every read or validation failure raises ``DatasetError`` naming the file, the frame and the
problem: a single bad frame must stop training with a message, not poison the normaliser or crash a collate.
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
    VECTOR_DIMS,
    DatasetError,
    FrameSpec,
    _array_problems,
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
from ghil.data.safe_pickle import PickledFileError, load_npy

__all__ = ["DEFAULT_KEYS", "LABEL_KEY", "CalvinDataset", "DatasetError", "EcotLabelReader", "IncompleteDatasetError",
           "LanguageAnnotations", "WindowIndex"]

LABEL_KEY = "ecot_labels"  # a pseudo-key: the window's reasoning labels, read from the ecot_labels/ sidecar
DEFAULT_KEYS = ("rgb_static", "rgb_gripper", "robot_obs", "scene_obs", "actions", "rel_actions")
# CALVIN clips rel_actions to [-1, 1]; the slack only absorbs float rounding in data produced by other tools.
REL_ACTION_TOLERANCE = 1e-5
CAMERA_KEYS = ("rgb_static", "rgb_gripper")  # RGB cameras: (H, W, 3) uint8 (tactile rgb has 6 channels)


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
    indexed = _read_index(index_path) if index_path.exists() else None
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
    episodes = _read_index(path)
    # Released CALVIN splits do not promise sorted rows; sorting lets frame -> episode be a binary search.
    episodes = episodes[np.argsort(episodes[:, 0], kind="stable")]
    if (episodes[:, 1] < episodes[:, 0]).any() or (episodes[1:, 0] <= episodes[:-1, 1]).any():
        raise DatasetError(f"{path}: episodes must be disjoint inclusive [start, end] rows with start <= end")
    return episodes


def _read_index(path: Path) -> np.ndarray:
    """ep_start_end_ids.npy as (n, 2) int64 rows; DatasetError naming the file when it is corrupt."""
    try:
        ids = np.load(path, allow_pickle=False)
        if ids.dtype.kind not in "iu" or (ids.size and ids.ndim != 2) or (ids.ndim == 2 and ids.shape[1] != 2):
            raise ValueError(f"expected (n, 2) integer rows, got {ids.dtype} of shape {ids.shape}")
        return ids.astype(np.int64).reshape(-1, 2)
    except Exception as err:  # truncated or foreign files raise ValueError, EOFError, OSError, ...
        raise DatasetError(f"{path} is not a readable episode index: {type(err).__name__}: {err}") from err


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
        # CALVIN's file is a pickled dict; an unrestricted unpickler would run any callable a crafted file names.
        try:
            data = load_npy(path).item()
        except (PickledFileError, ValueError) as err:  # .item() of a non-scalar array raises ValueError
            raise DatasetError(f"{path}: cannot read the language annotations: {err}") from err
        try:
            indx = np.asarray(data["info"]["indx"], dtype=np.int64)
            if indx.size and (indx.ndim != 2 or indx.shape[1] != 2):
                raise ValueError(f"info.indx must be (start, end) pairs, got shape {indx.shape}")
            indx = indx.reshape(-1, 2)
            ann, task = tuple(data["language"]["ann"]), tuple(data["language"]["task"])
            emb = np.asarray(data["language"]["emb"], dtype=np.float32)
            if not all(isinstance(text, str) for text in (*ann, *task)):
                raise ValueError("language.ann and language.task must hold strings")
            if not len(ann) == len(task) == len(indx) == len(emb):
                raise ValueError(f"info.indx has {len(indx)} windows but language.ann/task/emb have "
                                 f"{len(ann)}/{len(task)}/{len(emb)} entries")
            if not np.isfinite(emb).all():
                raise ValueError("language.emb contains NaN/inf")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise DatasetError(f"{path}: not CALVIN's language annotation layout ({type(err).__name__}: {err})") \
                from err
        emb = emb.reshape(len(emb), -1) if len(emb) else np.zeros((0, 0), np.float32)
        return cls(indx=indx, ann=ann, task=task, emb=emb)


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
        try:
            labels = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise DatasetError(f"{path}: corrupt ECoT label file ({err})") from err
        if len(labels) != end - start + 1:
            raise DatasetError(f"{path} has {len(labels)} labels for {end - start + 1} frames")
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


def _spec_layout(root: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-key (shape, dtype) promised by a ghil dataset's stored FrameSpec; empty for other data."""
    meta = read_dataset_meta(root)
    spec = meta.get("config", {}).get("spec") if isinstance(meta, dict) and isinstance(meta.get("config"), dict) \
        else None
    try:
        return FrameSpec(**spec).expected() if isinstance(spec, dict) else {}
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{root / DATASET_META_FILE}: unreadable frame spec {spec!r} ({err})") from err


def _first_frame_problems(key: str, value: np.ndarray) -> list[str]:
    """What makes ``value`` unfit to fix the layout of ``key`` for a whole split (CALVIN's conventions)."""
    if key in CAMERA_KEYS and not (value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] == 3):
        return [f"{key!r} must be a uint8 (H, W, 3) image, got {value.dtype} of shape {value.shape}"]
    if key.startswith("rgb_") and not (value.dtype == np.uint8 and value.ndim == 3):
        return [f"{key!r} must be a uint8 (H, W, C) image, got {value.dtype} of shape {value.shape}"]
    if key.startswith("depth_") and not (value.dtype.kind == "f" and value.ndim in (2, 3)):
        return [f"{key!r} must be a float depth map, got {value.dtype} of shape {value.shape}"]
    return []


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
        self._spec_layout = _spec_layout(self.root)
        self._layouts: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.stored_keys: frozenset[str] = frozenset()
        self._check_keys_available()
        self.index = (WindowIndex.over_lang_windows(self.episodes, self.lang, self.window_len) if lang_only
                      else WindowIndex.over_episodes(self.episodes, self.window_len))
        if len(self.index) == 0:
            what = "annotated language window" if lang_only else "episode"
            raise ValueError(f"{self.split_dir}: no {what} is at least window_len={self.window_len} frames long "
                             f"({len(self.episodes)} episode(s))")

    def _check_keys_available(self) -> None:
        """Fail at construction, not in a DataLoader worker, when a requested key is not stored or malformed."""
        frame_keys = [k for k in self.keys if k != LABEL_KEY]
        if LABEL_KEY in self.keys and not self.labels.available:
            raise KeyError(f"{LABEL_KEY!r} requested but {self.split_dir} has no {LABELS_FOLDER}/ folder "
                           "(real CALVIN data has no ECoT labels)")
        if not len(self.episodes):
            return
        first_id = int(self.episodes[0, 0])
        path = self._frame_path(first_id)
        try:
            with np.load(path) as first:
                stored = frozenset(first.files)
        except Exception as err:
            raise DatasetError(f"{path} (frame {first_id}): unreadable ({type(err).__name__}: {err}); the file is "
                               "truncated or corrupt") from err
        self.stored_keys = stored
        missing = [k for k in dict.fromkeys([*frame_keys, *self.goal_keys]) if k not in stored]
        promised = [k for k in missing if k in self._spec_layout]
        if promised:  # the dataset's stored FrameSpec says every frame has them: this file is damaged
            raise DatasetError(f"{path} (frame {first_id}): key {promised[0]!r} is not stored although "
                               f"{DATASET_META_FILE}'s frame spec promises it (this frame has {sorted(stored)})")
        if missing:
            hint = [k for k in missing if k in GHIL_EXTRA_KEYS]
            raise KeyError(f"{missing} not stored in {self.split_dir} (frames have {sorted(stored)})"
                           + (f"; {hint} exist only in ghil-collected data, not in real CALVIN" if hint else ""))
        # Fix every requested key's layout now (and validate the first frame): a bad dataset fails here, in the
        # main process, and every DataLoader worker gets a pickled copy that checks frames against the same sizes.
        keys = list(dict.fromkeys([*frame_keys, *self.goal_keys]))
        arrays = self._load_arrays(first_id, keys)
        for key in keys:
            self._layout(key, first=arrays[key])
        self._validate(first_id, arrays)

    def _frame_path(self, frame_id: int) -> Path:
        path = self.split_dir / frame_file_name(frame_id)
        if not path.exists():
            raise DatasetError(f"{path} (frame {frame_id}) is missing although {EP_START_END_FILE} lists it")
        return path

    def _layout(self, key: str, first: np.ndarray | None = None) -> tuple[tuple[int, ...], np.dtype]:
        """The (shape, dtype) every frame's ``key`` must have: the ghil writer's FrameSpec, CALVIN's vector sizes,
        or else the split's first frame (deterministic, so every DataLoader worker checks against the same)."""
        if key not in self._layouts:
            if key in self._spec_layout:
                layout = self._spec_layout[key]
            elif key in VECTOR_DIMS:
                layout = ((VECTOR_DIMS[key],), np.dtype(np.float64))
            else:
                first_id = int(self.episodes[0, 0])
                value = first if first is not None else self._load_arrays(first_id, (key,))[key]
                problems = _first_frame_problems(key, value)
                if problems:
                    raise DatasetError(f"{self.split_dir / frame_file_name(first_id)} (frame {first_id}): "
                                       + "; ".join(problems))
                layout = (value.shape, value.dtype)
            self._layouts[key] = layout
        return self._layouts[key]

    def _load_arrays(self, frame_id: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        path = self._frame_path(frame_id)
        try:
            with np.load(path) as npz:  # NpzFile reads (and decompresses) only the keys asked
                absent = [key for key in keys if key not in npz.files]
                if absent:
                    raise DatasetError(f"{path} (frame {frame_id}): key {absent[0]!r} is not stored (this frame has "
                                       f"{sorted(npz.files)}, the split's first frame {sorted(self.stored_keys)})")
                return {key: npz[key] for key in keys}
        except DatasetError:
            raise
        except Exception as err:  # BadZipFile, zlib.error, EOFError, ValueError (object arrays), OSError, ...
            raise DatasetError(f"{path} (frame {frame_id}): unreadable ({type(err).__name__}: {err}); the file is "
                               "truncated or corrupt") from err

    def read_frame(self, frame_id: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """``keys`` of one frame, validated; DatasetError naming the file, frame and problem otherwise."""
        return self._validate(frame_id, self._load_arrays(frame_id, keys))

    def _validate(self, frame_id: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        problems = []
        for key, value in arrays.items():
            shape, dtype = self._layout(key)
            # The writer's own checks: shape, dtype, NaN/inf, gripper exactly +-1, rel_actions within [-1, 1].
            problems += _array_problems(key, value, shape, dtype, rel_tolerance=REL_ACTION_TOLERANCE)
            if dtype != np.uint8 and dtype.kind != "f" and value.dtype != dtype:  # what _array_problems skips
                problems.append(f"{key!r} has dtype {value.dtype}, expected {dtype}")
        if problems:
            raise DatasetError(f"{self.split_dir / frame_file_name(frame_id)} (frame {frame_id}): "
                               + "; ".join(problems))
        return arrays

    def episode_array(self, row: int, key: str) -> np.ndarray:
        """``key`` of every frame of episode ``row`` stacked (n_frames, ...), each frame validated as read_frame."""
        start, end = (int(v) for v in self.episodes[row])
        return np.stack([self.read_frame(frame, (key,))[key] for frame in range(start, end + 1)])

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
        frames = [self.read_frame(int(f), frame_keys) for f in frame_ids]
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
            sample.update({f"goal_{k}": v for k, v in self.read_frame(goal_id, self.goal_keys).items()})
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
