"""A memory-mapped training cache of a CALVIN-format split, built once by ``ghil pack`` and read by PolicyDataset.

The CALVIN format (one compressed npz per frame) stays the interchange format; decompressing ~10 files per sample
is what training pays for it. ``build_pack`` repacks a split, frame by frame through ``CalvinDataset.read_frame``
(so every source frame is validated and a bad one fails the build naming its file), into one folder per split::

    <out>/<split>/manifest.json        source identity, keys, shapes, dtypes, ghil and pack versions (written first)
    <out>/<split>/progress.json        frames written so far (replaced atomically after each flushed block)
    <out>/<split>/rgb_static.npy       (n_frames, H, W, 3) uint8, one per camera
    <out>/<split>/robot_obs.npy ...    (n_frames, d) float32: robot_obs, scene_obs and every stored action key
    <out>/<split>/frame_ids.npy        (n_frames,) int64 global frame id of each row
    <out>/<split>/episodes.npy         (n_episodes, 2) int64 ep_start_end_ids, sorted (rows are in this order)
    <out>/<split>/lang_indx.npy, lang_emb.npy, lang.json    the language windows (JSON strings: no pickles)

Arrays are preallocated ``.npy`` files (``np.lib.format.open_memmap``) filled in blocks; a killed build resumes from
``progress.json`` and ends byte-identical to an uninterrupted one. ``PackedSplit.open`` maps them with
``np.load(mmap_mode="r")`` after checking the manifest against the source dataset as it is now (a hash over
ep_start_end_ids, every frame file's size and mtime, the language file, ghil_dataset.json and statistics.yaml): a
cache of another dataset, or of one whose frames were added or rewritten, is refused with the command that rebuilds
it, and a damaged cache file (truncated, wrong shape or dtype) raises ``DatasetError`` naming the file.

Usage::

    build_pack("data/play", "training")                      # -> data/play/packed/training (resumes if killed)
    split = PackedSplit.open("data/play", "training", "data/play/packed")
    split.arrays["rgb_static"][1234]                         # (200, 200, 3) uint8, read from the memory map
    PolicyDataset(PolicyDataConfig(root="data/play", cache="data/play/packed"), ...)   # same samples as the npz
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ghil
from ghil.data.calvin_dataset import CAMERA_KEYS, CalvinDataset, LanguageAnnotations, WindowIndex
from ghil.data.calvin_format import (
    DATASET_META_FILE,
    EP_START_END_FILE,
    LANG_FILE,
    LANG_FOLDER,
    STATISTICS_FILE,
    EXPERT_KEYS,
    DatasetError,
    frame_file_name,
)

__all__ = ["PACK_VERSION", "PackedFrames", "PackedSplit", "StalePackError", "build_pack", "default_pack_dir",
           "pack_command", "source_identity"]

log = logging.getLogger(__name__)

PACK_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
LANG_TEXT_FILE = "lang.json"
VECTOR_KEYS = ("robot_obs", "scene_obs", "actions", "rel_actions", "joint_actions")
BLOCK_FRAMES = 64  # frames written between two progress records


class StalePackError(DatasetError):
    """A cache that does not match its source dataset (or this ghil's pack format): rebuild it."""


def default_pack_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "packed"


def pack_command(root: str | os.PathLike, split: str, out: str | os.PathLike | None = None) -> str:
    """The command line that (re)builds the cache of ``split``."""
    extra = "" if out is None or Path(out) == default_pack_dir(root) else f" pack.out={out}"
    return f"ghil pack data.root={root} data.splits=[{split}]{extra}"


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def source_identity(root: str | os.PathLike, split: str) -> dict[str, object]:
    """What identifies a split's content without reading its frames: sha256 over ep_start_end_ids.npy and every
    listed frame file's name, size and mtime, plus the language file's and ghil_dataset.json / statistics.yaml."""
    root = Path(root)
    split_dir = root / split
    h = hashlib.sha256()
    episodes = np.load(split_dir / EP_START_END_FILE, allow_pickle=False)
    h.update(np.ascontiguousarray(episodes, dtype=np.int64).tobytes())
    n_frames = 0
    for start, end in np.asarray(episodes, dtype=np.int64).reshape(-1, 2):
        for frame in range(int(start), int(end) + 1):
            name = frame_file_name(frame)
            try:
                st = os.stat(split_dir / name)
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
            except FileNotFoundError:
                h.update(f"{name}:missing;".encode())
            n_frames += 1
    for path in (split_dir / LANG_FOLDER / LANG_FILE, split_dir / STATISTICS_FILE, root / DATASET_META_FILE):
        data = _read_bytes(path)
        h.update(f"{path.name}:".encode() + (hashlib.sha256(data).digest() if data is not None else b"missing"))
    return {"sha256": h.hexdigest(), "n_frames": n_frames, "n_episodes": int(len(episodes))}


def _atomic_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_npy(path: Path, value: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, value, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plan(ds: CalvinDataset, keys: Sequence[str] | None) -> dict[str, dict[str, object]]:
    """key -> {"shape", "dtype"} of one frame as it will be stored (cameras uint8, vectors float32)."""
    if keys is None:
        keys = [k for k in (*CAMERA_KEYS, *VECTOR_KEYS, *EXPERT_KEYS) if k in ds.stored_keys]
    first = ds.read_frame(int(ds.episodes[0, 0]), list(keys)) if len(ds.episodes) else {}
    plan = {}
    for key in keys:
        value = first[key]
        dtype = np.uint8 if value.dtype == np.uint8 else np.float32
        plan[key] = {"shape": list(value.shape), "dtype": np.dtype(dtype).str}
    return plan


def build_pack(root: str | os.PathLike, split: str = "training", out: str | os.PathLike | None = None,
               keys: Sequence[str] | None = None, block_frames: int = BLOCK_FRAMES) -> Path:
    """Build (or resume, or rebuild when stale) the cache of ``split`` under ``out``; returns its folder.

    ``keys`` defaults to every stored camera and vector key of ``CAMERA_KEYS`` + ``VECTOR_KEYS``, and a DAgger
    dataset's expert chunks and goal frames (``EXPERT_KEYS``).
    """
    root = Path(root)
    out = default_pack_dir(root) if out is None else Path(out)
    ds = CalvinDataset(root, split, keys=(), window_len=1, goal_horizon=None)
    folder = out / split
    plan = _plan(ds, keys)
    episodes = ds.episodes  # sorted by CalvinDataset
    frame_ids = np.concatenate([np.arange(s, e + 1) for s, e in episodes]).astype(np.int64) if len(episodes) \
        else np.zeros(0, np.int64)
    n = len(frame_ids)
    lang_path = ds.split_dir / LANG_FOLDER / LANG_FILE
    manifest = {"pack_version": PACK_VERSION, "ghil_version": ghil.__version__, "split": split,
                "source_root": str(root.resolve()), "source": source_identity(root, split), "n_frames": n,
                "keys": plan, "lang": lang_path.is_file()}

    def write_fixed(folder: Path) -> None:
        _atomic_npy(folder / "frame_ids.npy", frame_ids)
        _atomic_npy(folder / "episodes.npy", episodes.astype(np.int64))
        if manifest["lang"]:
            lang = LanguageAnnotations.load(ds.split_dir)
            _atomic_npy(folder / "lang_indx.npy", lang.indx.astype(np.int64))
            _atomic_npy(folder / "lang_emb.npy", lang.emb.astype(np.float32))
            _atomic_json(folder / LANG_TEXT_FILE, {"ann": list(lang.ann), "task": list(lang.task)})

    arrays = {key: ((n, *layout["shape"]), np.dtype(layout["dtype"]).str) for key, layout in plan.items()}
    done, maps = open_build(folder, manifest, arrays, "dataset state or configuration", write_fixed)
    if done == n:
        log.info("%s is complete and matches %s", folder, ds.split_dir)
        return folder
    if done:
        log.info("resuming %s at frame %d of %d", folder, done, n)
    names = list(plan)
    while done < n:
        stop = min(done + block_frames, n)
        for row in range(done, stop):
            frame = ds.read_frame(int(frame_ids[row]), names)  # validated: a bad frame raises naming its file
            for key in names:
                maps[key][row] = frame[key]
        for arr in maps.values():
            arr.flush()
        done = stop
        record_progress(folder, done, n)
    del maps
    return folder


def resume_point(folder: Path, manifest: dict, arrays: Mapping[str, tuple[tuple[int, ...], str]],
                 what: str) -> int | None:
    """Frames already written by a build of the same ``manifest``; None when the folder must be (re)built (another
    manifest, unreadable progress, or an array file that is missing or of another shape/dtype)."""
    try:
        old = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if old != manifest:
        if folder.exists():
            log.warning("%s was built from another %s: rebuilding it", folder, what)
        return None
    done = progress.get("frames_done")
    if not isinstance(done, int) or not 0 <= done <= manifest["n_frames"]:
        return None
    for key, (shape, dtype) in arrays.items():  # a damaged array file: rebuild rather than write into it
        try:
            arr = np.load(folder / f"{key}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if arr.shape != tuple(shape) or arr.dtype.str != dtype:
            return None
    return done


def open_build(folder: Path, manifest: dict, arrays: Mapping[str, tuple[tuple[int, ...], str]], what: str,
               write_fixed: Callable[[Path], None]) -> tuple[int, dict[str, np.ndarray]]:
    """Start or resume a block-wise build of preallocated ``.npy`` arrays (``key -> (shape, dtype)``) in ``folder``.

    A fresh (or stale) build removes the folder, writes the manifest, preallocates every array and calls
    ``write_fixed(folder)`` for the small files written once; returns the frames already done and the arrays opened
    for writing. The caller fills rows block by block and calls ``record_progress`` after each flushed block.
    """
    done = resume_point(folder, manifest, arrays, what)
    if done is None:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _atomic_json(folder / MANIFEST_FILE, manifest)
        for key, (shape, dtype) in arrays.items():  # header + zeros, filled block by block
            np.lib.format.open_memmap(folder / f"{key}.npy", mode="w+", dtype=np.dtype(dtype),
                                      shape=tuple(shape)).flush()
        write_fixed(folder)
        done = 0
        record_progress(folder, 0, manifest["n_frames"])
    return done, {key: np.load(folder / f"{key}.npy", mmap_mode="r+") for key in arrays}


def record_progress(folder: Path, done: int, n: int) -> None:
    """Atomically record that rows ``[0, done)`` of every array are written and flushed."""
    _atomic_json(folder / PROGRESS_FILE, {"frames_done": done, "complete": done == n})


class MemmapFolder:
    """Pickles as its folder and array names: DataLoader workers started by spawn re-open the memory maps
    (``folder / <key>.npy``) instead of receiving a pickled copy of every frame."""

    folder: Path
    arrays: dict[str, np.ndarray]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["arrays"] = {key: None for key in self.arrays}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.arrays = {key: np.load(self.folder / f"{key}.npy", mmap_mode="r", allow_pickle=False)
                       for key in state["arrays"]}


@dataclass
class PackedSplit(MemmapFolder):
    """One split's cache, checked and memory-mapped."""

    folder: Path
    manifest: dict
    arrays: dict[str, np.ndarray]  # key -> (n_frames, ...) memmap
    frame_ids: np.ndarray
    episodes: np.ndarray
    lang: LanguageAnnotations | None

    @classmethod
    def open(cls, root: str | os.PathLike, split: str, cache: str | os.PathLike | None = None,
             check_source: bool = True) -> PackedSplit:
        root = Path(root)
        out = default_pack_dir(root) if cache is None else Path(cache)
        folder = out / split
        rebuild = f"`{pack_command(root, split, cache)}`"
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} does not exist: no cache of {root / split} there; build it "
                                    f"with {rebuild}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
            n, keys = int(manifest["n_frames"]), dict(manifest["keys"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{folder}: unreadable cache manifest/progress ({type(err).__name__}: {err}); "
                               f"rebuild it with {rebuild}") from err
        if manifest.get("pack_version") != PACK_VERSION:
            raise StalePackError(f"{manifest_path} has pack_version {manifest.get('pack_version')!r}, this ghil "
                                 f"reads {PACK_VERSION}: rebuild it with {rebuild}")
        if not progress.get("complete"):
            raise StalePackError(f"{folder} is incomplete ({progress.get('frames_done')} of {n} frames written): "
                                 f"finish it with {rebuild} (it resumes)")
        if check_source:
            if not (root / split / EP_START_END_FILE).is_file():
                raise StalePackError(f"{folder} was built from {manifest.get('source_root')}/{split}, but "
                                     f"{root / split / EP_START_END_FILE} does not exist")
            now = source_identity(root, split)
            if now != manifest.get("source"):
                raise StalePackError(
                    f"{folder} does not match {root / split} any more (built from {manifest.get('source_root')} "
                    f"with {manifest['source'].get('n_frames')} frames in {manifest['source'].get('n_episodes')} "
                    f"episode(s); the dataset now has {now['n_frames']} in {now['n_episodes']}, or frames, "
                    f"annotations or metadata changed): rebuild it with {rebuild}")

        def load(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
            path = folder / name
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:  # missing, truncated (mmap beyond EOF), bad header
                raise DatasetError(f"{path}: unreadable cache file ({type(err).__name__}: {err}); rebuild it with "
                                   f"{rebuild}") from err
            if tuple(arr.shape) != tuple(shape) or arr.dtype.str != dtype:
                raise DatasetError(f"{path}: cache file holds {arr.dtype.str} {tuple(arr.shape)}, the manifest "
                                   f"promises {dtype} {tuple(shape)}; rebuild it with {rebuild}")
            return arr

        arrays = {key: load(f"{key}.npy", (n, *layout["shape"]), layout["dtype"]) for key, layout in keys.items()}
        frame_ids = np.asarray(load("frame_ids.npy", (n,), np.dtype(np.int64).str))
        episodes = np.asarray(load("episodes.npy", (manifest["source"]["n_episodes"], 2), np.dtype(np.int64).str))
        lengths = episodes[:, 1] - episodes[:, 0] + 1
        if int(lengths.sum()) != n or (len(episodes) and (frame_ids[np.r_[0, np.cumsum(lengths)[:-1]]]
                                                          != episodes[:, 0]).any()):
            raise DatasetError(f"{folder / 'frame_ids.npy'} does not follow {folder / 'episodes.npy'}; rebuild it "
                               f"with {rebuild}")
        lang = None
        if manifest.get("lang"):
            text_path = folder / LANG_TEXT_FILE
            try:
                text = json.loads(text_path.read_text(encoding="utf-8"))
                ann, task = tuple(text["ann"]), tuple(text["task"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DatasetError(f"{text_path}: unreadable ({type(err).__name__}: {err}); rebuild it with "
                                   f"{rebuild}") from err
            indx = np.load(folder / "lang_indx.npy", allow_pickle=False) if len(ann) else np.zeros((0, 2), np.int64)
            emb = np.load(folder / "lang_emb.npy", allow_pickle=False)
            if len(indx) != len(ann) or len(emb) != len(ann) or len(task) != len(ann):
                raise DatasetError(f"{folder}: language arrays disagree with {text_path}; rebuild it with {rebuild}")
            lang = LanguageAnnotations(indx=indx.reshape(-1, 2), ann=ann, task=task, emb=emb)
        return cls(folder=folder, manifest=manifest, arrays=arrays, frame_ids=frame_ids, episodes=episodes,
                   lang=lang)

    def row_of(self, frame_id: int, episode_row: int) -> int:
        """Row of the arrays holding global ``frame_id`` of episode ``episode_row``."""
        return int(self._offsets[episode_row] + frame_id - self.episodes[episode_row, 0])

    @property
    def _offsets(self) -> np.ndarray:
        if not hasattr(self, "_offsets_cache"):
            lengths = self.episodes[:, 1] - self.episodes[:, 0] + 1
            self._offsets_cache = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
        return self._offsets_cache


class PackedFrames:
    """``CalvinDataset``'s window_len=1 interface (what PolicyDataset uses) over a ``PackedSplit``: the same index,
    goal draws and sample dicts, read from the memory maps."""

    def __init__(self, root: str | os.PathLike, split: str, cache: str | os.PathLike | None, keys: Sequence[str],
                 lang_only: bool = False, goal_horizon: tuple[int, int] | None = (0, 24),
                 goal_keys: Sequence[str] = ("rgb_static",), seed: int = 0):
        self.packed = PackedSplit.open(root, split, cache)
        self.split_dir = self.packed.folder
        self.episodes = self.packed.episodes
        self.keys = tuple(keys)
        self.goal_horizon = None if goal_horizon is None else (int(goal_horizon[0]), int(goal_horizon[1]))
        self.goal_keys = tuple(goal_keys) if goal_horizon is not None else ()
        self.seed = seed
        self.epoch = 0
        self.stored_keys = frozenset(self.packed.arrays)
        missing = [k for k in dict.fromkeys([*self.keys, *self.goal_keys]) if k not in self.stored_keys]
        if missing:
            raise KeyError(f"{missing} not in the cache {self.split_dir} (it holds {sorted(self.stored_keys)}); "
                           f"rebuild it with those keys: build_pack(..., keys=...)")
        self.lang = None
        if lang_only:
            if self.packed.lang is None:
                raise FileNotFoundError(f"{root}/{split}/{LANG_FOLDER}/{LANG_FILE} was missing when {self.split_dir} "
                                        "was built; lang_only=True needs the split's language annotations")
            self.lang = self.packed.lang
        self.index = (WindowIndex.over_lang_windows(self.episodes, self.lang, 1) if lang_only
                      else WindowIndex.over_episodes(self.episodes, 1))
        if len(self.index) == 0:
            raise ValueError(f"{self.split_dir}: no {'annotated language window' if lang_only else 'episode'}")

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def episode_array(self, row: int, key: str) -> np.ndarray:
        start = self.packed.row_of(int(self.episodes[row, 0]), row)
        n = int(self.episodes[row, 1] - self.episodes[row, 0] + 1)
        return np.array(self.packed.arrays[key][start:start + n])

    def read_frame(self, frame_id: int, keys: Sequence[str], episode_row: int) -> dict[str, np.ndarray]:
        r = self.packed.row_of(frame_id, episode_row)
        return {key: np.array(self.packed.arrays[key][r]) for key in keys}

    def __getitem__(self, idx: int) -> dict[str, object]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx = int(idx) % len(self)
        start = int(self.index.starts[idx])
        episode_row = int(self.index.episode_rows[idx])
        frame = self.read_frame(start, self.keys, episode_row)
        sample: dict[str, object] = {key: value[None] for key, value in frame.items()}
        sample["frame_ids"] = np.array([start], dtype=np.int64)
        sample["episode_row"] = np.int64(episode_row)
        if self.lang is not None:
            lang_row = int(self.index.lang_rows[idx])
            sample["ann"] = self.lang.ann[lang_row]
            sample["task"] = self.lang.task[lang_row]
            sample["lang_emb"] = self.lang.emb[lang_row]
        if self.goal_horizon is not None:
            # CalvinDataset._goal_frame_id: seeded per (seed, epoch, idx); tests/test_packed.py checks they agree.
            rng = np.random.default_rng((self.seed, self.epoch, idx))
            lo, hi = self.goal_horizon
            goal_id = min(start + int(rng.integers(lo, hi + 1)), int(self.episodes[episode_row, 1]))
            sample["goal_frame_id"] = np.int64(goal_id)
            sample.update({f"goal_{k}": v for k, v in self.read_frame(goal_id, self.goal_keys, episode_row).items()})
        return sample


def run(cfg) -> list[Path]:
    """Hydra entry (``ghil pack``): build the cache of every listed split that exists."""
    root = Path(cfg.data.root)
    out = cfg.pack.get("out")
    keys = list(cfg.pack.keys) if cfg.pack.get("keys") else None
    folders = []
    for split in cfg.data.splits:
        if not (root / split).is_dir():
            log.info("%s has no %r split: skipped", root, split)
            continue
        folder = build_pack(root, split, out, keys=keys)
        log.info("packed %s -> %s", root / split, folder)
        print(f"packed {root / split} -> {folder}")
        folders.append(folder)
    if not folders:
        raise FileNotFoundError(f"{root} has none of the splits {list(cfg.data.splits)}")
    return folders
