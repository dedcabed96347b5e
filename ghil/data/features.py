"""Perception computed once: a frozen policy checkpoint's image encoders run over a packed split, cached beside it.

``ghil featurize`` (``build_features``) reads a ``ghil pack`` split and, for every frame, runs the checkpoint's
frozen camera encoders (and its goal encoder on the goal camera) on ``n_views`` views: view 0 is the plain
resize the policy sees at run time, views 1..K-1 go through the checkpoint's ``ImageAugment`` with a generator
seeded per (seed, stream, frame id, view), one stream per camera and one for the goal encoder, so every view of
every frame is reproducible on its own and the augmentations of the current and the goal image stay
de-synchronised (GHIL-Glue). Training with ``data.features=<dir>`` then reads tokens, not pixels (PolicyDataset
draws a view per sample and source; ``DiTPolicy.loss`` uses ``PolicyBatch.features``)::

    <out>/<split>/manifest.json       encoder checkpoint (path, weights_sha256, encoder settings), source dataset
                                      identity, pack folder, n_views, seed, array layout (written first)
    <out>/<split>/progress.json       frames written so far (replaced atomically after each block)
    <out>/<split>/<camera>.npy        (n_frames, K, n_tokens, width) float16, one per camera
    <out>/<split>/goal.npy            (n_frames, K, n_tokens, width) float16: the goal encoder on the goal camera
    <out>/<split>/frame_ids.npy, episodes.npy    copies of the pack's (rows are in this order)

A killed build resumes from ``progress.json`` (preallocated ``open_memmap`` files, like ``ghil/data/packed.py``).
``FeatureSplit.open`` refuses a cache of another dataset state, encoder checkpoint or image/encoder size with the
``ghil featurize`` command that rebuilds it, and a truncated or misshapen file raises ``DatasetError`` naming it.

Usage::

    build_features("data/play", "training", cache="data/play/packed", encoder_path="checkpoints/dit_small",
                   n_views=4)                                   # -> data/play/features/training
    feats = FeatureSplit.open("data/play", "training", "data/play/features")
    feats.arrays["rgb_static"][row, view]                       # (n_tokens, width) float16
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ghil.data.calvin_format import EXPERT_GOAL_KEY, DatasetError
from ghil.data.packed import (
    MANIFEST_FILE,
    MemmapFolder,
    PROGRESS_FILE,
    PackedSplit,
    _atomic_npy,
    default_pack_dir,
    open_build,
    record_progress,
    source_identity,
)

__all__ = ["FEATURES_VERSION", "FeatureSplit", "StaleFeaturesError", "build_features", "default_features_dir",
           "encoder_identity", "featurize_command"]

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
GOAL_KEY = "goal"
BLOCK_FRAMES = 32  # frames encoded between two progress records
ENCODE_BATCH = 64  # images per encoder call


class StaleFeaturesError(DatasetError):
    """A feature cache that does not match its dataset, its encoder checkpoint or the policy: rebuild it."""


def default_features_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "features"


def featurize_command(root: str | os.PathLike, split: str, encoder_path: str | os.PathLike | None = None,
                      n_views: int | None = None, cache: str | os.PathLike | None = None,
                      out: str | os.PathLike | None = None) -> str:
    """The command line that (re)builds the feature cache of ``split``."""
    parts = [f"ghil featurize data.root={root}"]
    if cache is not None and Path(cache) != default_pack_dir(root):
        parts.append(f"data.cache={cache}")
    parts.append(f"data.splits=[{split}]")
    parts.append(f"encoder.path={encoder_path if encoder_path is not None else '<checkpoint>'}")
    if n_views is not None:
        parts.append(f"featurize.n_views={n_views}")
    if out is not None and Path(out) != default_features_dir(root):
        parts.append(f"featurize.out={out}")
    return " ".join(parts)


def encoder_identity(policy: Any, path: str | os.PathLike, weights_sha256: str | None) -> dict[str, Any]:
    """What a feature cache depends on in its encoder checkpoint: the weights' hash and the encoder settings."""
    from ghil.checkpoint import config_to_dict

    c = policy.config
    return {"path": str(Path(path).resolve()), "weights_sha256": weights_sha256,
            "settings": {"cameras": list(c.cameras), "image_sizes": list(c.image_sizes),
                         "encoder_sizes": list(c.encoder_sizes), "image_encoder": config_to_dict(c.image_encoder),
                         "width": c.width, "use_goal": c.use_goal,
                         "goal_camera": c.goal_camera if c.use_goal else None}}


def _checkpoint_sha(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path / 'config.json'}: not a policy checkpoint ({type(err).__name__}: {err})")


def load_encoder_checkpoint(path: str | os.PathLike):
    """(DiTPolicy, weights_sha256) of a checkpoint folder, weights verified against its config.json."""
    from ghil.checkpoint import load_pretrained
    from ghil.paths import resolve_checkpoint

    path = resolve_checkpoint(path)  # `checkpoints/dit_small` also finds the shipped one
    sha = _checkpoint_sha(path)
    policy = load_pretrained(path).eval().requires_grad_(False)  # the core names no model room: by registry
    if not all(hasattr(policy, a) for a in ("camera_encoders", "goal_encoder", "augment", "config")):
        raise TypeError(f"{path} holds a {type(policy).__name__}, not a policy with per-camera image encoders "
                        "(a DiTPolicy checkpoint)")
    return policy, sha


def _stream_seed(seed: int, stream: int, frame_id: int, view: int) -> int:
    return int(np.random.SeedSequence((int(seed), int(stream), int(frame_id), int(view))).generate_state(1,
                                                                                                  np.uint64)[0] >> 1)


def _views(images: np.ndarray, frame_ids: np.ndarray, size: int, n_views: int, augment, seed: int, stream: int):
    """uint8 (n, H, W, 3) -> float (n * K, 3, size, size): view 0 resized, views >= 1 augmented per frame."""
    import torch

    from ghil.nn.augment import resize

    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    out = torch.empty(len(x), n_views, 3, size, size)
    out[:, 0] = resize(x, size)
    for i, fid in enumerate(frame_ids):
        for v in range(1, n_views):
            g = torch.Generator().manual_seed(_stream_seed(seed, stream, int(fid), v))
            out[i, v] = augment(x[i:i + 1], size, g)[0]
    return out.reshape(-1, 3, size, size)


def _encode(encoder, views, n: int, n_views: int) -> np.ndarray:
    """Encoder over (n * K, 3, s, s) in batches -> (n, K, n_tokens, width) float16."""
    import torch

    with torch.no_grad():
        tokens = torch.cat([encoder(views[i:i + ENCODE_BATCH]) for i in range(0, len(views), ENCODE_BATCH)])
    return tokens.reshape(n, n_views, *tokens.shape[1:]).to(torch.float16).numpy()


def _encoded_block(policy, pack: PackedSplit, rows: slice, n_views: int, seed: int) -> dict[str, np.ndarray]:
    """Every source's (rows, K, n_tokens, width) tokens for the pack rows ``rows`` (module-level: tests kill here)."""
    c = policy.config
    fids = pack.frame_ids[rows]
    out = {}
    for stream, cam in enumerate(c.cameras):
        images = np.asarray(pack.arrays[cam][rows])
        views = _views(images, fids, c.encoder_size[cam], n_views, policy.augment, seed, stream)
        out[cam] = _encode(policy.camera_encoders[cam], views, len(fids), n_views)
    if c.use_goal:
        images = np.asarray(pack.arrays[goal_source(pack, c.goal_camera)][rows])
        views = _views(images, fids, c.encoder_size[c.goal_camera], n_views, policy.augment, seed, len(c.cameras))
        out[GOAL_KEY] = _encode(policy.goal_encoder, views, len(fids), n_views)
    return out


def goal_source(pack: PackedSplit, goal_camera: str) -> str:
    """The pack array the goal encoder reads: a DAgger pack's stored expert goal frames (row r is frame r's goal),
    otherwise the goal camera itself (the dataset then draws goal rows from the same episode)."""
    return EXPERT_GOAL_KEY if goal_camera == "rgb_static" and EXPERT_GOAL_KEY in pack.arrays else goal_camera


def build_features(root: str | os.PathLike, split: str = "training", cache: str | os.PathLike | None = None,
                   encoder_path: str | os.PathLike = "checkpoints/dit_small", out: str | os.PathLike | None = None,
                   n_views: int = 4, seed: int = 0, block_frames: int = BLOCK_FRAMES) -> Path:
    """Build (or resume, or rebuild when stale) the feature cache of ``split``; returns its folder."""
    import torch

    if n_views < 1:
        raise ValueError(f"featurize.n_views must be >= 1, got {n_views}")
    root = Path(root)
    out = default_features_dir(root) if out is None else Path(out)
    encoder_path = Path(encoder_path)
    pack = PackedSplit.open(root, split, cache)  # refuses a stale or damaged pack with the `ghil pack` command
    policy, sha = load_encoder_checkpoint(encoder_path)
    from ghil.paths import resolve_checkpoint

    encoder_path = resolve_checkpoint(encoder_path)
    c = policy.config
    for cam in c.cameras:
        if cam not in pack.arrays:
            raise KeyError(f"the encoder checkpoint {encoder_path} needs camera {cam!r}; the pack {pack.folder} holds "
                           f"{sorted(pack.arrays)}")
        got = tuple(pack.arrays[cam].shape[1:3])
        if got != (c.image_size[cam],) * 2:
            raise ValueError(f"{pack.folder / (cam + '.npy')} holds {got[0]}x{got[1]} frames, the encoder checkpoint "
                             f"{encoder_path} expects {c.image_size[cam]}x{c.image_size[cam]} for {cam}")
    n = len(pack.frame_ids)
    sources = [*c.cameras, *([GOAL_KEY] if c.use_goal else [])]
    probe = _encoded_block(policy, pack, slice(0, 1), 1, seed) if n else {}
    layout = {key: {"shape": [n, n_views, *probe[key].shape[2:]], "dtype": np.dtype(np.float16).str}
              for key in sources}
    manifest = {"features_version": FEATURES_VERSION, "split": split, "source_root": str(root.resolve()),
                "source": pack.manifest["source"], "pack": str(pack.folder.resolve()), "n_frames": n,
                "n_views": int(n_views), "seed": int(seed), "encoder": encoder_identity(policy, encoder_path, sha),
                "arrays": layout}
    if c.use_goal and goal_source(pack, c.goal_camera) == EXPERT_GOAL_KEY:  # (absent otherwise: older caches stay valid)
        manifest["goal_source"] = EXPERT_GOAL_KEY
    folder = out / split
    def write_fixed(folder: Path) -> None:
        _atomic_npy(folder / "frame_ids.npy", np.asarray(pack.frame_ids, np.int64))
        _atomic_npy(folder / "episodes.npy", np.asarray(pack.episodes, np.int64))

    arrays = {key: (tuple(lay["shape"]), lay["dtype"]) for key, lay in layout.items()}
    done, maps = open_build(folder, manifest, arrays, "dataset, encoder or setting", write_fixed)
    if done == n:
        log.info("%s is complete and matches %s and %s", folder, pack.folder, encoder_path)
        return folder
    if done:
        log.info("resuming %s at frame %d of %d", folder, done, n)
    with torch.inference_mode():
        while done < n:
            stop = min(done + block_frames, n)
            block = _encoded_block(policy, pack, slice(done, stop), n_views, seed)
            for key in sources:
                maps[key][done:stop] = block[key]
                maps[key].flush()
            done = stop
            record_progress(folder, done, n)
    del maps
    return folder


@dataclass
class FeatureSplit(MemmapFolder):
    """One split's feature cache, checked and memory-mapped."""

    folder: Path
    manifest: dict
    arrays: dict[str, np.ndarray]  # source (camera or "goal") -> (n_frames, K, n_tokens, width) float16 memmap
    frame_ids: np.ndarray
    episodes: np.ndarray

    @property
    def n_views(self) -> int:
        return int(self.manifest["n_views"])

    @classmethod
    def open(cls, root: str | os.PathLike, split: str, features: str | os.PathLike,
             policy: Any = None) -> FeatureSplit:
        """Open ``<features>/<split>``; with ``policy`` also refuse a cache of other encoder settings."""
        root, folder = Path(root), Path(features) / split
        manifest_path = folder / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            enc = manifest["encoder"]
            rebuild = "`" + featurize_command(root, split, _rel(enc["path"]), manifest["n_views"],
                                              str(Path(manifest["pack"]).parent), features) + "`"
        except FileNotFoundError:
            raise FileNotFoundError(f"{manifest_path} does not exist: no feature cache of {root / split} there; "
                                    f"build it with `{featurize_command(root, split, out=features)}`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{manifest_path}: unreadable feature manifest ({type(err).__name__}: {err}); "
                               f"rebuild it with `{featurize_command(root, split, out=features)}`") from err
        try:
            progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DatasetError(f"{folder / PROGRESS_FILE}: unreadable ({type(err).__name__}: {err}); rebuild it "
                               f"with {rebuild}") from err
        if manifest.get("features_version") != FEATURES_VERSION:
            raise StaleFeaturesError(f"{manifest_path} has features_version {manifest.get('features_version')!r}, "
                                     f"this ghil reads {FEATURES_VERSION}: rebuild it with {rebuild}")
        if not progress.get("complete"):
            raise StaleFeaturesError(f"{folder} is incomplete ({progress.get('frames_done')} of "
                                     f"{manifest['n_frames']} frames): finish it with {rebuild} (it resumes)")
        now = source_identity(root, split) if (root / split).is_dir() else None
        if now != manifest["source"]:
            raise StaleFeaturesError(f"{folder} was built from {manifest['source_root']}/{split} in another state "
                                     f"(or another dataset) than {root / split} now: rebuild it with {rebuild}")
        if policy is not None:
            mine = encoder_identity(policy, ".", None)["settings"]
            if mine != enc["settings"]:
                diff = sorted(k for k in mine if mine[k] != enc["settings"].get(k))
                raise StaleFeaturesError(f"{folder} holds tokens of an encoder with other settings ({diff}: cache "
                                         f"{[enc['settings'].get(k) for k in diff]}, this policy "
                                         f"{[mine[k] for k in diff]}): rebuild it with {rebuild} from a checkpoint "
                                         "of this policy's configuration")
        n = int(manifest["n_frames"])

        def load(name: str, shape, dtype: str) -> np.ndarray:
            path = folder / name
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise DatasetError(f"{path}: unreadable feature cache file ({type(err).__name__}: {err}); rebuild "
                                   f"it with {rebuild}") from err
            if list(arr.shape) != list(shape) or arr.dtype.str != dtype:
                raise DatasetError(f"{path}: feature cache file holds {arr.dtype.str} {tuple(arr.shape)}, the "
                                   f"manifest promises {dtype} {tuple(shape)}; rebuild it with {rebuild}")
            return arr

        arrays = {key: load(f"{key}.npy", lay["shape"], lay["dtype"]) for key, lay in manifest["arrays"].items()}
        frame_ids = np.asarray(load("frame_ids.npy", [n], np.dtype(np.int64).str))
        episodes = np.asarray(load("episodes.npy", [manifest["source"]["n_episodes"], 2], np.dtype(np.int64).str))
        out = cls(folder=folder, manifest=manifest, arrays=arrays, frame_ids=frame_ids, episodes=episodes)
        out.rebuild = rebuild
        return out

    def check_encoder(self, path: str | os.PathLike | None = None) -> Path:
        """The encoder checkpoint folder, refused when its weights are not the ones the cache was built with."""
        enc = self.manifest["encoder"]
        path = Path(path if path is not None else enc["path"])
        sha = _checkpoint_sha(path) if (path / "config.json").is_file() else None
        if sha is None or sha != enc["weights_sha256"]:
            raise StaleFeaturesError(f"{self.folder} was built with the encoder checkpoint {enc['path']} (weights "
                                     f"{str(enc['weights_sha256'])[:12]}), but {path} now holds "
                                     f"{'no checkpoint' if sha is None else 'weights ' + sha[:12]}: rebuild it with "
                                     f"{self.rebuild}")
        return path


def _rel(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def run(cfg) -> list[Path]:
    """Hydra entry (``ghil featurize``): build the feature cache of every listed split that exists."""
    import torch

    if cfg.featurize.get("threads"):
        torch.set_num_threads(int(cfg.featurize.threads))
    cache = cfg.data.get("cache")
    root = cfg.data.get("root")
    if not root:  # the pack knows where it came from
        if not cache:
            raise ValueError("ghil featurize needs data.root=<dataset> or data.cache=<ghil pack folder>")
        split0 = next((s for s in cfg.data.splits if (Path(cache) / s / MANIFEST_FILE).is_file()), None)
        if split0 is None:
            raise FileNotFoundError(f"{cache} holds no `ghil pack` split of {list(cfg.data.splits)}; build it with "
                                    "`ghil pack data.root=<dataset>`")
        root = json.loads((Path(cache) / split0 / MANIFEST_FILE).read_text(encoding="utf-8"))["source_root"]
    root = Path(root)
    out = cfg.featurize.get("out") or default_features_dir(root)
    folders = []
    for split in cfg.data.splits:
        if not (root / split).is_dir():
            log.info("%s has no %r split: skipped", root, split)
            continue
        folder = build_features(root, split, cache, cfg.encoder.path, out, n_views=int(cfg.featurize.n_views),
                                seed=int(cfg.featurize.seed))
        print(f"featurized {root / split} with {cfg.encoder.path} -> {folder}")
        folders.append(folder)
    if not folders:
        raise FileNotFoundError(f"{root} has none of the splits {list(cfg.data.splits)}")
    return folders
