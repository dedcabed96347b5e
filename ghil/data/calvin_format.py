"""CALVIN's on-disk dataset format, and a crash-safe, resumable writer that produces it.

A dataset root holds one folder per split (``training/``, ``validation/``), each laid out as CALVIN's loaders
expect, plus ghil's extras, which CALVIN's loaders never look at::

    <root>/ghil_dataset.json                    format version + writer config (checked on resume)
    <root>/<split>/episode_0000000.npz ...      one file per frame, global ids contiguous per play episode
    <root>/<split>/_journal.jsonl               one line per committed episode (the writer's source of truth)
    <root>/<split>/_journal_last.json           a copy of the newest journal line (restores a damaged last line)
    <root>/<split>/ecot_labels/ep_<start>_<end>.jsonl   one JSON reasoning label per frame of that episode
    <root>/<split>/ep_start_end_ids.npy         } written by DatasetWriter.finalize() from the journal;
    <root>/<split>/ep_lens.npy                  } ep_start_end_ids.npy last, so its presence (matching the
    <root>/<split>/lang_annotations/auto_lang_ann.npy   journal) means the whole split is finalized
    <root>/<split>/statistics.yaml              }

Frames carry CALVIN's keys (``actions``, ``rel_actions``, ``robot_obs``, ``scene_obs``, ``rgb_*``, ``depth_*``)
plus ghil's ``joint_actions`` (7 absolute arm joint targets in rad + gripper +-1). Tactile is never produced.

Usage::

    writer = DatasetWriter("data/playtable_D", spec=FrameSpec(static_size=200, gripper_size=84))
    writer.commit_episode("training", frames, lang=[(0, 63, "open_drawer", "open the drawer")], episode_key="ep_0")
    writer.finalize()
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ghil.config_diff import config_diff

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# File and folder names

FORMAT_VERSION = 1
DATASET_META_FILE = "ghil_dataset.json"
WRITER_LOCK_FILE = ".ghil_writer.lock"
JOURNAL_FILE = "_journal.jsonl"
# A copy of the newest journal line, written (atomically) just before that line is appended. The journal's last
# line is the only one a kill or a damaged disk block can tear; this copy lets a resume restore it instead of
# taking the episode, whose files are complete on disk by then, for an uncommitted one and deleting it.
LAST_COMMIT_FILE = "_journal_last.json"
EP_START_END_FILE = "ep_start_end_ids.npy"
EP_LENS_FILE = "ep_lens.npy"
LANG_FOLDER = "lang_annotations"
LANG_FILE = "auto_lang_ann.npy"
STATISTICS_FILE = "statistics.yaml"
LABELS_FOLDER = "ecot_labels"
DEFAULT_SPLITS = ("training", "validation")

SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a plain folder name: no "/", no "..", not absolute
FRAME_FILE_RE = re.compile(r"^episode_(\d+)\.npz$")
LABEL_FILE_RE = re.compile(r"^ep_(\d+)_(\d+)\.jsonl$")
# Temp files start with "." and end with ".tmp": CALVIN's naming-pattern lookup (first file whose suffix contains
# "npz") never mistakes them for frames, and recovery can find them by name alone.
TEMP_SUFFIX = ".tmp"


def frame_file_name(frame_id: int) -> str:
    """CALVIN's frame file name: ``episode_0000042.npz`` (7 digits, as in the released datasets)."""
    return f"episode_{frame_id:07d}.npz"


def label_file_name(start: int, end: int) -> str:
    """The ECoT label sidecar of the play episode with inclusive frame ids ``[start, end]``."""
    return f"ep_{start:07d}_{end:07d}.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Frame keys

LANG_EMB_DIM = 384  # CALVIN's default sentence encoder (paraphrase-MiniLM-L3-v2)
VECTOR_DIMS = {"actions": 7, "rel_actions": 7, "robot_obs": 15, "scene_obs": 24, "joint_actions": 8}
# Where each vector keeps its gripper command; CALVIN stores it as exactly -1 (close) or +1 (open).
GRIPPER_INDEX = {"actions": 6, "rel_actions": 6, "robot_obs": 14, "joint_actions": 7}
CALVIN_KEYS = ("actions", "rel_actions", "robot_obs", "scene_obs", "rgb_static", "rgb_gripper",
               "depth_static", "depth_gripper")
GHIL_EXTRA_KEYS = ("joint_actions",)
# DAgger relabelling (`ghil dagger`): per visited frame, the scripted expert's action chunk from that state and the
# static frame it reaches ``goal_steps`` later. Named apart from the loaders' in-episode goal draws (``goal_<key>``).
EXPERT_CHUNK_KEY = "expert_rel_actions"
EXPERT_GOAL_KEY = "expert_goal_rgb_static"
EXPERT_KEYS = (EXPERT_CHUNK_KEY, EXPERT_GOAL_KEY)
# statistics.yaml: mean/std for these (CALVIN normalises robot_obs and scene_obs with them) ...
MOMENT_KEYS = ("robot_obs", "scene_obs", "joint_actions")
# ... and per-dimension min/max bounds for these, under "<prefix>_min_bound" / "<prefix>_max_bound".
BOUND_PREFIXES = {"actions": "act", "rel_actions": "rel_act", "joint_actions": "joint_act"}
NORMALIZE_TARGET = "calvin_models.calvin_agent.utils.transforms.NormalizeVector"


class DatasetFormatError(ValueError):
    """Base class of the format layer's errors about data, config or folder contents."""


class DatasetError(DatasetFormatError):
    """A dataset file that cannot be read, or that holds invalid values; the message names the file (and frame)."""


class FrameValidationError(DatasetFormatError):
    """A frame (or an episode's language windows / labels) does not match the dataset's FrameSpec."""


class IncompatibleDatasetError(DatasetFormatError):
    """The root holds a dataset this writer must not append to (other format version, other config, foreign)."""


class UnknownSplitError(DatasetFormatError):
    """A split name that the dataset was not configured with."""


class RootNotWritableError(PermissionError):
    """The dataset root cannot be created or written."""


class DatasetLockedError(RuntimeError):
    """Another DatasetWriter (in this or another process) holds the root."""


@dataclass(frozen=True)
class FrameSpec:
    """Image sizes and optional modalities of every frame in one dataset (CALVIN's sizes by default).

    Usage::

        spec = FrameSpec(static_size=32, gripper_size=32)     # low-res collection / tests
        spec.expected()["rgb_static"]                         # ((32, 32, 3), dtype('uint8'))
        validate_frame(frame, spec)
    """

    static_size: int = 200
    gripper_size: int = 84
    depth: bool = True
    joint_actions: bool = True
    expert_chunk: int = 0  # > 0: DAgger frames also store the expert's chunk of this length and its goal frame

    def __post_init__(self) -> None:
        if not isinstance(self.expert_chunk, (int, np.integer)) or isinstance(self.expert_chunk, bool) \
                or self.expert_chunk < 0:
            raise DatasetFormatError(f"FrameSpec.expert_chunk must be an int >= 0, got {self.expert_chunk!r}")
        for name in ("static_size", "gripper_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise DatasetFormatError(f"FrameSpec.{name} must be a positive int, got {value!r}")

    def expected(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """key -> (shape, dtype stored on disk). Float keys accept any float dtype on input and are cast."""
        s, g = self.static_size, self.gripper_size
        keys: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            key: ((dim,), np.dtype(np.float64)) for key, dim in VECTOR_DIMS.items() if key != "joint_actions"
        }
        keys["rgb_static"] = ((s, s, 3), np.dtype(np.uint8))
        keys["rgb_gripper"] = ((g, g, 3), np.dtype(np.uint8))
        if self.depth:
            keys["depth_static"] = ((s, s), np.dtype(np.float32))
            keys["depth_gripper"] = ((g, g), np.dtype(np.float32))
        if self.joint_actions:
            keys["joint_actions"] = ((VECTOR_DIMS["joint_actions"],), np.dtype(np.float64))
        if self.expert_chunk:
            keys[EXPERT_CHUNK_KEY] = ((int(self.expert_chunk), VECTOR_DIMS["rel_actions"]), np.dtype(np.float64))
            keys[EXPERT_GOAL_KEY] = ((s, s, 3), np.dtype(np.uint8))
        return keys


CALVIN_SPEC = FrameSpec()


# ---------------------------------------------------------------------------------------------------------------
# Validation (pure functions: nothing here touches the disk)


def frame_problems(frame: Mapping[str, object], spec: FrameSpec = CALVIN_SPEC) -> list[str]:
    """Every way ``frame`` violates ``spec``, as human-readable sentences; empty when the frame is valid."""
    if not isinstance(frame, Mapping):
        return [f"a frame must be a dict of numpy arrays, got {type(frame).__name__}"]
    expected = spec.expected()
    problems = [f"missing key {key!r}" for key in expected if key not in frame]
    unknown = sorted(set(frame) - set(expected))
    if unknown:
        problems.append(f"unexpected keys {unknown} (this dataset stores exactly {sorted(expected)})")
    for key, (shape, dtype) in expected.items():
        if key in frame:
            problems += _array_problems(key, frame[key], shape, dtype)
    return problems


def _array_problems(key: str, value: object, shape: tuple[int, ...], dtype: np.dtype,
                    rel_tolerance: float = 0.0) -> list[str]:
    """Problems of one array against its expected shape and dtype, NaN/inf, gripper +-1 and rel_actions range.

    ``rel_tolerance`` widens [-1, 1] for ``rel_actions`` when reading data someone else clipped (float rounding).
    """
    if not isinstance(value, np.ndarray):
        return [f"{key!r} must be a numpy array, got {type(value).__name__}"]
    problems = []
    if value.shape != shape:
        problems.append(f"{key!r} has shape {value.shape}, expected {shape}")
    if dtype == np.uint8 and value.dtype != np.uint8:
        problems.append(f"{key!r} has dtype {value.dtype}, expected uint8")
    elif dtype.kind == "f" and value.dtype.kind != "f":
        problems.append(f"{key!r} has dtype {value.dtype}, expected a float dtype")
    if problems:
        return problems  # value checks below assume the right shape and kind
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = np.argwhere(~np.isfinite(value))[:3].tolist()
        problems.append(f"{key!r} contains NaN/inf (first at {bad})")
    elif key in GRIPPER_INDEX and value[GRIPPER_INDEX[key]] not in (-1.0, 1.0):
        problems.append(f"{key!r}[{GRIPPER_INDEX[key]}] (gripper) must be exactly -1 or +1, got "
                        f"{float(value[GRIPPER_INDEX[key]])!r}")
    if key == "rel_actions" and not problems and np.abs(value).max() > 1.0 + rel_tolerance:
        problems.append(f"'rel_actions' must lie in [-1, 1], got max |value| {np.abs(value).max():.4g}")
    if key == EXPERT_CHUNK_KEY and not problems:  # a chunk of rel_actions: the same range and gripper rules per row
        grip = value[:, GRIPPER_INDEX["rel_actions"]]
        if not np.isin(grip, (-1.0, 1.0)).all():
            problems.append(f"{key!r}[:, 6] (gripper) must be exactly -1 or +1, got {sorted(set(grip.tolist()))[:4]}")
        elif np.abs(value).max() > 1.0 + rel_tolerance:
            problems.append(f"{key!r} must lie in [-1, 1], got max |value| {np.abs(value).max():.4g}")
    return problems


def validate_frame(frame: Mapping[str, object], spec: FrameSpec = CALVIN_SPEC) -> None:
    """Raise FrameValidationError listing every problem of ``frame`` against ``spec``; return None if valid."""
    problems = frame_problems(frame, spec)
    if problems:
        raise FrameValidationError("invalid frame: " + "; ".join(problems))


def _canonical_frame(frame: Mapping[str, np.ndarray], spec: FrameSpec) -> dict[str, np.ndarray]:
    """The frame with CALVIN's on-disk dtypes (float64 vectors, float32 depth, uint8 rgb)."""
    return {key: np.ascontiguousarray(frame[key], dtype=dtype) for key, (_, dtype) in spec.expected().items()}


def global_lang_windows(lang: Iterable[Sequence], first_frame_id: int,
                        n_frames: int) -> list[tuple[int, int, str, str]]:
    """Check episode-local ``(start, end, task, text)`` windows and shift them to global frame ids."""
    windows = []
    for i, entry in enumerate(lang):
        if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 4:
            raise FrameValidationError(f"lang[{i}] must be (local_start, local_end, task, text), got {entry!r}")
        start, end, task, text = entry
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, end)):
            raise FrameValidationError(f"lang[{i}]: start/end must be ints, got {start!r}, {end!r}")
        if not 0 <= start <= end < n_frames:
            raise FrameValidationError(f"lang[{i}]: window [{start}, {end}] (inclusive) must satisfy "
                                       f"0 <= start <= end < {n_frames} (the episode length)")
        for name, value in (("task", task), ("text", text)):
            if not isinstance(value, str) or not value.strip():
                raise FrameValidationError(f"lang[{i}]: {name} must be a non-empty string, got {value!r}")
        windows.append((first_frame_id + int(start), first_frame_id + int(end), task, text))
    return windows


def _json_default(value: object) -> object:
    # Labels are built from numpy pixel coordinates and boxes; accept those rather than make every caller convert.
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def label_lines(labels: Sequence[Mapping], n_frames: int) -> list[str]:
    """One compact JSON line per frame's reasoning label; raises FrameValidationError for anything unstorable."""
    if len(labels) != n_frames:
        raise FrameValidationError(f"labels has {len(labels)} entries, expected one per frame ({n_frames})")
    lines = []
    for i, label in enumerate(labels):
        if not isinstance(label, Mapping):
            raise FrameValidationError(f"labels[{i}] must be a dict, got {type(label).__name__}")
        try:
            lines.append(json.dumps(label, default=_json_default, allow_nan=False, ensure_ascii=False,
                                    separators=(",", ":")))
        except (TypeError, ValueError) as err:
            raise FrameValidationError(f"labels[{i}] is not JSON-serialisable: {err}") from err
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Per-episode statistics, merged exactly at finalize time so statistics.yaml never needs a pass over the frames


@dataclass
class SplitStatistics:
    """Mergeable mean/variance (Chan et al.'s parallel update) and min/max of the normalised frame vectors.

    Usage::

        stats = SplitStatistics.from_frames(frames)       # one episode
        stats.merge(SplitStatistics.from_json(journal_line["stats"]))
        yaml_dict = stats.to_statistics_yaml()
    """

    n: int = 0
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    m2: dict[str, np.ndarray] = field(default_factory=dict)  # sum of squared deviations from the mean
    low: dict[str, np.ndarray] = field(default_factory=dict)
    high: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_frames(cls, frames: Sequence[Mapping[str, np.ndarray]]) -> SplitStatistics:
        stats = cls(n=len(frames))
        for key in MOMENT_KEYS:
            if key in frames[0]:
                values = np.stack([f[key] for f in frames]).astype(np.float64)
                stats.mean[key] = values.mean(axis=0)
                stats.m2[key] = ((values - stats.mean[key]) ** 2).sum(axis=0)
        for key in BOUND_PREFIXES:
            if key in frames[0]:
                values = np.stack([f[key] for f in frames]).astype(np.float64)
                stats.low[key], stats.high[key] = values.min(axis=0), values.max(axis=0)
        return stats

    def merge(self, other: SplitStatistics) -> None:
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, dict(other.mean), dict(other.m2)
            self.low, self.high = dict(other.low), dict(other.high)
            return
        n = self.n + other.n
        for key in self.mean.keys() & other.mean.keys():
            delta = other.mean[key] - self.mean[key]
            self.mean[key] = self.mean[key] + delta * (other.n / n)
            self.m2[key] = self.m2[key] + other.m2[key] + delta**2 * (self.n * other.n / n)
        for key in self.low.keys() & other.low.keys():
            self.low[key] = np.minimum(self.low[key], other.low[key])
            self.high[key] = np.maximum(self.high[key], other.high[key])
        self.n = n

    def std(self, key: str) -> np.ndarray:
        return np.sqrt(self.m2[key] / self.n)  # population std, as CALVIN's statistics script computes it

    def to_json(self) -> dict:
        def lists(d: dict[str, np.ndarray]) -> dict[str, list[float]]:
            return {k: v.tolist() for k, v in d.items()}  # float repr round-trips exactly through JSON

        return {"n": self.n, "mean": lists(self.mean), "m2": lists(self.m2), "low": lists(self.low),
                "high": lists(self.high)}

    @classmethod
    def from_json(cls, data: Mapping) -> SplitStatistics:
        def arrays(d: Mapping[str, list]) -> dict[str, np.ndarray]:
            return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}

        return cls(n=int(data["n"]), mean=arrays(data["mean"]), m2=arrays(data["m2"]), low=arrays(data["low"]),
                   high=arrays(data["high"]))

    def to_statistics_yaml(self) -> dict:
        """CALVIN's statistics.yaml: NormalizeVector transforms per observation key plus action bounds."""
        out: dict[str, object] = {}
        for key in MOMENT_KEYS:
            if key in self.mean:
                out[key] = [{"_target_": NORMALIZE_TARGET, "mean": self.mean[key].tolist(),
                             "std": self.std(key).tolist()}]
        for key, prefix in BOUND_PREFIXES.items():
            if key in self.low:
                out[f"{prefix}_min_bound"] = self.low[key].tolist()
                out[f"{prefix}_max_bound"] = self.high[key].tolist()
        return out


def read_statistics(split_dir: str | os.PathLike) -> dict[str, object]:
    """statistics.yaml of a split (ours or CALVIN's) as ``{key: {"mean", "std"}}`` and ``{bound: array}``."""
    path = Path(split_dir) / STATISTICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; for a ghil dataset run DatasetWriter.resume(root).finalize()")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"the top level is a {type(raw).__name__}, not a mapping")
        stats: dict[str, object] = {}
        for key, value in raw.items():
            if isinstance(value, list) and value and isinstance(value[0], Mapping):
                normalizer = next((t for t in value if "mean" in t and "std" in t), None)
                if normalizer is not None:
                    stats[key] = {"mean": np.asarray(normalizer["mean"], dtype=np.float64),
                                  "std": np.asarray(normalizer["std"], dtype=np.float64)}
            elif isinstance(value, list):
                stats[key] = np.asarray(value, dtype=np.float64)
            else:
                stats[key] = value
    except (yaml.YAMLError, ValueError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f"{path} is not a readable statistics file: {err}") from err
    return stats


# ---------------------------------------------------------------------------------------------------------------
# The journal: an episode exists once (and only once) its line is in <split>/_journal.jsonl


@dataclass(frozen=True)
class EpisodeRecord:
    """One committed play episode: its inclusive global frame ids, language windows and statistics."""

    split: str
    episode_key: str
    start: int
    end: int
    lang: tuple[tuple[int, int, str, str], ...]  # global inclusive frame ids
    has_labels: bool
    stats: dict = field(repr=False, compare=False)

    @property
    def n_frames(self) -> int:
        return self.end - self.start + 1

    def to_json_line(self) -> str:
        data = asdict(self)
        data["lang"] = [list(w) for w in self.lang]
        return json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, data: Mapping) -> EpisodeRecord:
        return cls(split=data["split"], episode_key=data["episode_key"], start=int(data["start"]),
                   end=int(data["end"]), lang=tuple((int(s), int(e), t, x) for s, e, t, x in data["lang"]),
                   has_labels=bool(data["has_labels"]), stats=data["stats"])


@dataclass(frozen=True)
class _ParsedJournal:
    records: list[EpisodeRecord]
    good_bytes: int  # byte length of the intact lines; anything after it is a damaged last line
    damage: str | None  # what is wrong with the last line, or None when the journal is intact


def _parse_record(line: bytes, expected_start: int) -> EpisodeRecord:
    record = EpisodeRecord.from_json(json.loads(line.decode("utf-8")))
    if record.start != expected_start or record.end < record.start:
        raise ValueError(f"it covers frames [{record.start}, {record.end}] but the next free frame id is "
                         f"{expected_start}")
    return record


def _parse_journal(raw: bytes, path: Path) -> _ParsedJournal:
    """The records of a journal's intact lines. Only the last line may be damaged (torn by a kill mid-append, or
    a damaged disk block at the end of the file): that is reported, not raised; a damaged earlier line raises."""
    records: list[EpisodeRecord] = []
    good_bytes = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines[:-1]):  # lines[-1] has no newline: empty, or torn
        expected_start = records[-1].end + 1 if records else 0
        try:
            record = _parse_record(line, expected_start)
        except (ValueError, KeyError, TypeError) as err:
            if i == len(lines) - 2 and not lines[-1]:  # the last line, complete but damaged
                return _ParsedJournal(records, good_bytes, f"its last line is damaged ({err})")
            raise IncompatibleDatasetError(f"{path}: line {i + 1} is corrupt ({err}); the journal was edited "
                                           "outside DatasetWriter") from err
        records.append(record)
        good_bytes += len(line) + 1
    damage = f"its last line is torn ({len(lines[-1])} bytes without a newline)" if lines[-1] else None
    return _ParsedJournal(records, good_bytes, damage)


def _last_commit_line(journal_path: Path) -> bytes | None:
    """The raw journal line saved by the newest ``Journal.append`` (None when absent or unreadable)."""
    try:
        line = (journal_path.parent / LAST_COMMIT_FILE).read_bytes()
    except OSError:
        return None
    return line if line.endswith(b"\n") and line.count(b"\n") == 1 else None


def _episode_on_disk(split_dir: Path, record: EpisodeRecord) -> bool:
    """Every file of ``record`` exists. Each is written atomically (temp + rename), so existing means complete."""
    if record.has_labels and not (split_dir / LABELS_FOLDER / label_file_name(record.start, record.end)).is_file():
        return False
    return all((split_dir / frame_file_name(i)).is_file() for i in range(record.start, record.end + 1))


def _recoverable_last_commit(journal_path: Path, records: list[EpisodeRecord]) -> tuple[EpisodeRecord, bytes] | None:
    """The newest commit when the journal lacks it although its files are all on disk, with its raw line.

    ``Journal.append`` saves the line to LAST_COMMIT_FILE before appending it, and the episode's files are durable
    before either, so a saved line that continues the journal and whose files all exist is a committed episode
    whose journal line was torn, damaged or lost. Restoring it (rather than deleting its frames as an interrupted
    write) keeps a resume from destroying complete data.
    """
    line = _last_commit_line(journal_path)
    if line is None:
        return None
    expected_start = records[-1].end + 1 if records else 0
    try:
        record = _parse_record(line[:-1], expected_start)
    except (ValueError, KeyError, TypeError):
        return None  # the copy is older (it names a journalled episode) or itself damaged: nothing to restore
    if any(r.episode_key == record.episode_key for r in records) or not _episode_on_disk(journal_path.parent, record):
        return None
    return record, line


def _frames_from(split_dir: Path, first_id: int) -> list[str]:
    if not split_dir.is_dir():
        return []
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if (m := FRAME_FILE_RE.match(e.name)) and int(m[1]) >= first_id)


def read_journal(path: str | os.PathLike) -> list[EpisodeRecord]:
    """The committed episodes of a journal, without modifying it: what ``Journal(path)`` would resume with (a
    damaged last line is ignored, or restored from LAST_COMMIT_FILE when that episode is complete on disk)."""
    path = Path(path)
    if not path.exists():
        return []
    records = _parse_journal(path.read_bytes(), path).records
    recovered = _recoverable_last_commit(path, records)
    return records + [recovered[0]] if recovered else records


class Journal:
    """The append-only list of committed episodes of one split; repairs a damaged last line when opened.

    Usage::

        journal = Journal(Path(root) / "training" / JOURNAL_FILE)
        journal.next_frame_id                      # where the next episode starts
        journal.append(record)                     # the commit point of an episode
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: list[EpisodeRecord] = []
        if path.exists():
            raw = path.read_bytes()
            parsed = _parse_journal(raw, path)
            self.records = parsed.records
            recovered = _recoverable_last_commit(path, self.records)
            if parsed.damage and not recovered:
                self._check_damage_is_an_interrupted_append(parsed)
            if recovered or parsed.damage:
                self._repair(parsed, recovered)

    def _check_damage_is_an_interrupted_append(self, parsed: _ParsedJournal) -> None:
        """Refuse (deleting nothing) unless the damaged last line provably belongs to an uncommitted write.

        The resume deletes frames past the journal as leftovers of an interrupted episode. That is only safe when
        LAST_COMMIT_FILE holds the journal's last intact line: then the damaged bytes were never preceded by their
        saved copy, i.e. never a finished commit. Otherwise (copy absent, unreadable, or naming a later episode
        whose files are incomplete) frames past the journal may be a committed episode, and must not be deleted.
        """
        orphans = _frames_from(self.path.parent, self.next_frame_id)
        if not orphans or self._last_commit_is_journalled():
            return
        raise IncompatibleDatasetError(
            f"{self.path}: {parsed.damage} and it cannot be restored from {LAST_COMMIT_FILE}, but frames from "
            f"{orphans[0]} on ({len(orphans)} file(s)) lie past the journal's last intact episode; they may belong "
            "to a committed episode, so nothing was deleted. Restore the journal from a backup, or delete those "
            "frames by hand to discard them")

    def _last_commit_is_journalled(self) -> bool:
        line = _last_commit_line(self.path)
        if line is None or not self.records:
            return False
        last = self.records[-1]
        try:
            saved = _parse_record(line[:-1], last.start)
        except (ValueError, KeyError, TypeError):
            return False
        return (saved.episode_key, saved.end) == (last.episode_key, last.end)

    def _repair(self, parsed: _ParsedJournal, recovered: tuple[EpisodeRecord, bytes] | None) -> None:
        if parsed.damage:
            logger.warning("%s: %s; dropping it", self.path, parsed.damage)
        with open(self.path, "r+b") as f:
            f.truncate(parsed.good_bytes)
            if recovered:
                record, line = recovered
                logger.warning("%s: restored the journal line of committed episode %r (frames [%d, %d]) from %s",
                               self.path, record.episode_key, record.start, record.end, LAST_COMMIT_FILE)
                f.seek(parsed.good_bytes)
                f.write(line)
                self.records.append(record)
            os.fsync(f.fileno())

    @property
    def next_frame_id(self) -> int:
        return self.records[-1].end + 1 if self.records else 0

    def append(self, record: EpisodeRecord) -> None:
        line = record.to_json_line()
        # Saved first: if the append below is torn (or its bytes later damaged), a resume restores the line from
        # this copy instead of deleting the episode's frames, which are already complete on disk.
        _atomic_write(self.path.parent / LAST_COMMIT_FILE, line.encode("utf-8"))
        _fsync_dir(self.path.parent)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


# ---------------------------------------------------------------------------------------------------------------
# Atomic file writes


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` so that ``path`` is either absent/old or complete, never partial."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())  # data must be durable before the rename makes it visible
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the renames inside durable before the journal line that refers to them
    finally:
        os.close(fd)


def _npz_bytes(arrays: Mapping[str, np.ndarray], compress: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _npy_bytes(value: object) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Root checks


def _ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RootNotWritableError(f"cannot create dataset root {root}: {err.strerror or err}") from err
    if not root.is_dir():
        raise RootNotWritableError(f"dataset root {root} exists and is not a directory")
    probe = root / f".ghil_write_probe.{os.getpid()}{TEMP_SUFFIX}"
    try:  # os.access lies for root and on some network mounts; only a real write tells
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RootNotWritableError(f"dataset root {root} is not writable: {err.strerror or err}") from err


def _looks_like_calvin_split(folder: Path) -> bool:
    if (folder / EP_START_END_FILE).exists():
        return True
    with os.scandir(folder) as entries:
        return any(FRAME_FILE_RE.match(entry.name) for entry in entries)


class _WriterLock:
    """An exclusive flock on <root>/.ghil_writer.lock; the kernel drops it when the holder dies, so resume works."""

    def __init__(self, root: Path):
        self._file = open(root / WRITER_LOCK_FILE, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise DatasetLockedError(f"another DatasetWriter is writing to {root}; use one writer per dataset "
                                     "(collect in worker processes, commit from one)") from None

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def read_dataset_meta(root: str | os.PathLike) -> dict | None:
    """The parsed ``ghil_dataset.json`` of ``root``, or None when the root has none (e.g. a CALVIN download)."""
    path = Path(root) / DATASET_META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise IncompatibleDatasetError(f"{path} is not valid JSON: {err}") from err


# ---------------------------------------------------------------------------------------------------------------
# The writer


class DatasetWriter:
    """Crash-safe, resumable writer of a CALVIN-format dataset (plus ghil's joint_actions and ECoT labels).

    Each ``commit_episode`` validates every frame first, writes frames atomically, then appends the episode's
    journal line: the episode exists exactly when that line does. Constructing a writer on an existing root
    resumes it: frames past the last committed one (an episode cut short by a kill) are deleted and numbering
    continues. ``finalize`` derives CALVIN's index files from the journals and may be re-run at any time.

    Usage::

        with DatasetWriter(root, spec=FrameSpec(static_size=32, gripper_size=32)) as writer:
            if "ep_000123" not in writer.committed_episode_keys():
                writer.commit_episode("training", frames, lang, labels, episode_key="ep_000123")
            writer.finalize()
    """

    def __init__(self, root: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS,
                 spec: FrameSpec | None = None, metadata: Mapping | None = None, overwrite: bool = False,
                 compress: bool = True):
        """Open (resume) or create the dataset at ``root``.

        ``metadata``: JSON-serialisable facts about the collection (e.g. the env config); stored and, like
        ``splits`` and ``spec``, required to match on resume so episodes of different setups never mix.
        ``overwrite``: discard this writer's files of an existing ghil dataset at ``root`` and start empty.
        ``compress``: np.savez_compressed frames (readers need not know; np.load handles both).
        """
        self.root = Path(root)
        self.spec = spec or CALVIN_SPEC
        self.splits = _checked_splits(splits)
        self.compress = compress
        self.config = self._config_dict(metadata)
        _ensure_writable(self.root)
        self._lock = _WriterLock(self.root)
        try:
            self._open_root(overwrite)
            self._journals = {split: self._open_split(split) for split in self.splits}
        except BaseException:
            self._lock.release()
            raise
        self._key_to_split = {r.episode_key: split for split, j in self._journals.items() for r in j.records}

    @classmethod
    def resume(cls, root: str | os.PathLike, compress: bool = True) -> DatasetWriter:
        """Reopen an existing ghil dataset with the config stored in its ``ghil_dataset.json``."""
        meta = read_dataset_meta(root)
        if meta is None:
            raise FileNotFoundError(f"{Path(root) / DATASET_META_FILE} not found: {root} is not a ghil dataset")
        _check_format_version(meta, Path(root))
        config = meta["config"]
        return cls(root, splits=config["splits"], spec=FrameSpec(**config["spec"]), metadata=config["metadata"],
                   compress=compress)

    # -- context manager / lock ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the root for another writer (also happens when the process dies)."""
        self._lock.release()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------------------------------

    def _config_dict(self, metadata: Mapping | None) -> dict:
        config = {"splits": list(self.splits), "spec": asdict(self.spec), "metadata": dict(metadata or {})}
        try:  # round-trip so comparisons against the stored JSON see lists, not tuples
            return json.loads(json.dumps(config, allow_nan=False, default=_json_default))
        except (TypeError, ValueError) as err:
            raise DatasetFormatError(f"metadata must be JSON-serialisable: {err}") from err

    def _open_root(self, overwrite: bool) -> None:
        meta = read_dataset_meta(self.root)
        if meta is None:
            foreign = [p.name for p in [self.root, *self._subdirs()] if _looks_like_calvin_split(p)]
            if foreign:
                # Never delete data this writer did not create (a CALVIN download is 166 GB), overwrite or not.
                raise IncompatibleDatasetError(
                    f"{self.root} already holds CALVIN-style frames ({', '.join(foreign)}) but no {DATASET_META_FILE}:"
                    " it was not written by DatasetWriter; choose an empty folder")
        elif overwrite:
            self._discard_dataset(meta)
        else:
            _check_format_version(meta, self.root)
            diffs = config_diff(meta.get("config", {}), self.config,
                                template="{key}: stored {old!r}, requested {new!r}")
            if diffs:
                raise IncompatibleDatasetError(
                    f"{self.root} was written with a different config ({'; '.join(diffs)}); resume with the stored "
                    "config (DatasetWriter.resume(root)), choose another root, or pass overwrite=True to discard it")
            return
        meta = {"format_version": FORMAT_VERSION, "writer": f"{__name__}.DatasetWriter", "config": self.config}
        _atomic_write(self.root / DATASET_META_FILE, (json.dumps(meta, indent=2) + "\n").encode())

    def _subdirs(self) -> list[Path]:
        return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def _discard_dataset(self, meta: Mapping) -> None:
        """Delete every file an earlier DatasetWriter created here (only those: foreign files stay)."""
        # The stored split names come from a file anyone can edit: "../x" or "/home" would point the deletion
        # outside the dataset. Every folder is checked before the first file goes, so a refusal deletes nothing.
        folders = [self.root / split for split in dict.fromkeys([*_stored_split_names(meta, self.root),
                                                                *self.splits])]
        folders = [folder for folder in folders if folder.is_dir()]
        for folder in folders:
            _check_inside_root(folder, self.root)
        doomed = [path for folder in folders for path in _writer_files(folder)]
        for path in doomed:
            path.unlink()
        (self.root / DATASET_META_FILE).unlink(missing_ok=True)
        logger.warning("overwrite=True: discarded the existing dataset in %s", self.root)

    def _open_split(self, split: str) -> Journal:
        split_dir = self.root / split
        (split_dir / LABELS_FOLDER).mkdir(parents=True, exist_ok=True)
        journal = Journal(split_dir / JOURNAL_FILE)
        removed = _remove_uncommitted(split_dir, journal.records)
        if removed:
            logger.warning("%s: removed %d file(s) of an episode that was never committed; frame ids continue at %d",
                           split_dir, removed, journal.next_frame_id)
        if journal.records:
            last = split_dir / frame_file_name(journal.records[-1].end)
            if not last.exists():
                raise IncompatibleDatasetError(f"{split_dir}: the journal lists frame {journal.records[-1].end} as "
                                               f"committed but {last.name} is missing; the folder was modified "
                                               "outside DatasetWriter")
        return journal

    # -- queries ------------------------------------------------------------------------------------------------

    def _journal(self, split: str) -> Journal:
        if split not in self._journals:
            raise UnknownSplitError(f"unknown split {split!r}; this dataset has splits {list(self.splits)}")
        return self._journals[split]

    def n_committed(self, split: str) -> int:
        """Number of committed episodes in ``split``."""
        return len(self._journal(split).records)

    def n_frames(self, split: str) -> int:
        """Number of committed frames in ``split`` (also the id the next episode's first frame gets)."""
        return self._journal(split).next_frame_id

    def committed_episodes(self, split: str) -> list[EpisodeRecord]:
        return list(self._journal(split).records)

    def committed_episode_keys(self) -> frozenset[str]:
        """The ``episode_key`` of every committed episode, over all splits (skip these when resuming)."""
        return frozenset(self._key_to_split)

    # -- writing ------------------------------------------------------------------------------------------------

    def commit_episode(self, split: str, frames: Sequence[Mapping[str, np.ndarray]],
                       lang: Iterable[Sequence] = (), labels: Sequence[Mapping] | None = None,
                       episode_key: str | None = None) -> EpisodeRecord:
        """Validate, write and commit one continuous play episode; nothing is written unless all of it is valid.

        ``lang``: ``(local_start, local_end, task, text)`` windows, inclusive, relative to the first frame.
        ``labels``: one JSON-serialisable ECoT label dict per frame (numpy values allowed), or None.
        ``episode_key``: the caller's opaque id of this episode (unique across splits), returned later by
        ``committed_episode_keys()``; defaults to ``"<split>/<first frame id>"``.
        """
        journal = self._journal(split)
        start = journal.next_frame_id
        key = episode_key if episode_key is not None else f"{split}/{start:07d}"
        if not isinstance(key, str) or not key:
            raise DatasetFormatError(f"episode_key must be a non-empty string, got {key!r}")
        if key in self._key_to_split:
            raise DatasetFormatError(f"episode_key {key!r} is already committed (in {self._key_to_split[key]!r})")
        arrays = self._checked_frames(frames, key)
        windows = global_lang_windows(lang, start, len(arrays))
        lines = label_lines(labels, len(arrays)) if labels is not None else None
        end = start + len(arrays) - 1
        record = EpisodeRecord(split=split, episode_key=key, start=start, end=end, lang=tuple(windows),
                               has_labels=lines is not None, stats=SplitStatistics.from_frames(arrays).to_json())
        self._write_episode_files(self.root / split, start, arrays, lines)
        journal.append(record)  # the commit point
        self._key_to_split[key] = split
        return record

    def _checked_frames(self, frames: Sequence[Mapping[str, np.ndarray]], key: str) -> list[dict[str, np.ndarray]]:
        if isinstance(frames, Mapping) or not isinstance(frames, Sequence) or len(frames) == 0:
            raise FrameValidationError(f"episode {key!r}: frames must be a non-empty list of frame dicts")
        for i, frame in enumerate(frames):
            problems = frame_problems(frame, self.spec)
            if problems:
                raise FrameValidationError(f"episode {key!r}, frame {i} of {len(frames)}: " + "; ".join(problems)
                                           + " (nothing of this episode was written)")
        return [_canonical_frame(frame, self.spec) for frame in frames]

    def _write_episode_files(self, split_dir: Path, start: int, arrays: list[dict[str, np.ndarray]],
                             lines: list[str] | None) -> None:
        written: list[Path] = []
        try:
            for offset, arrays_of_frame in enumerate(arrays):
                path = split_dir / frame_file_name(start + offset)
                _atomic_write(path, _npz_bytes(arrays_of_frame, self.compress))
                written.append(path)
            if lines is not None:
                path = split_dir / LABELS_FOLDER / label_file_name(start, start + len(arrays) - 1)
                _atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
                written.append(path)
                _fsync_dir(path.parent)
            _fsync_dir(split_dir)
        except BaseException:
            # An exception (disk full, Ctrl-C) leaves no orphans for a later, shorter episode to sit beside.
            for path in written:
                path.unlink(missing_ok=True)
            raise

    # -- finalize -----------------------------------------------------------------------------------------------

    def finalize(self, encode: Callable[[list[str]], np.ndarray] | None = None,
                 check_frames: bool = True) -> dict[str, dict[str, int]]:
        """Write ep_start_end_ids.npy, ep_lens.npy, lang_annotations/auto_lang_ann.npy and statistics.yaml per split.

        ``encode(list[str]) -> (n, d)`` embeds the annotations (CALVIN: d=384); without it ``emb`` is zeros.
        ``check_frames`` stats every committed frame file first. Idempotent; returns per-split counts.
        """
        summary = {}
        for split, journal in self._journals.items():
            split_dir = self.root / split
            records = journal.records
            if check_frames:
                _check_frames_exist(split_dir, records)
            lang = _lang_annotations([w for r in records for w in r.lang], encode)
            (split_dir / LANG_FOLDER).mkdir(exist_ok=True)
            _atomic_write(split_dir / LANG_FOLDER / LANG_FILE, _npy_bytes(lang))
            self._write_statistics(split_dir, records)
            _atomic_write(split_dir / EP_LENS_FILE, _npy_bytes(np.array([r.n_frames for r in records], np.int64)))
            # Last: a loader takes a matching ep_start_end_ids.npy as proof that the split is fully finalized.
            ids = np.array([[r.start, r.end] for r in records], dtype=np.int64).reshape(-1, 2)
            _atomic_write(split_dir / EP_START_END_FILE, _npy_bytes(ids))
            summary[split] = {"episodes": len(records), "frames": journal.next_frame_id,
                              "lang_windows": len(lang["info"]["indx"])}
        return summary

    def _write_statistics(self, split_dir: Path, records: list[EpisodeRecord]) -> None:
        path = split_dir / STATISTICS_FILE
        if not records:
            path.unlink(missing_ok=True)  # no frames, no statistics; a stale file would lie
            return
        stats = SplitStatistics()
        for record in records:
            stats.merge(SplitStatistics.from_json(record.stats))
        content = stats.to_statistics_yaml()
        content["ghil"] = {"format_version": FORMAT_VERSION, "n_episodes": len(records), "n_frames": stats.n}
        _atomic_write(path, yaml.safe_dump(content, sort_keys=False, default_flow_style=None, width=10**6).encode())


def _checked_splits(splits: Sequence[str]) -> tuple[str, ...]:
    if isinstance(splits, str) or not splits:
        raise DatasetFormatError(f"splits must be a non-empty list of folder names, got {splits!r}")
    for split in splits:
        if not isinstance(split, str) or not SPLIT_NAME_RE.fullmatch(split):
            raise DatasetFormatError(f"split name {split!r} must be a plain folder name (letters, digits, _ . -)")
    if len(set(splits)) != len(splits):
        raise DatasetFormatError(f"split names must be unique, got {list(splits)}")
    return tuple(splits)


def _stored_split_names(meta: Mapping, root: Path) -> list[str]:
    """The split names of a stored ghil_dataset.json, refused unless each is a plain folder name."""
    config = meta.get("config", {}) if isinstance(meta, Mapping) else None
    splits = config.get("splits", []) if isinstance(config, Mapping) else None
    bad = ([s for s in splits if not isinstance(s, str) or not SPLIT_NAME_RE.fullmatch(s)]
           if isinstance(splits, list) else [splits])
    if bad:
        raise IncompatibleDatasetError(
            f"{root / DATASET_META_FILE} lists split names {bad!r} that are not plain folder names (letters, digits, "
            "_ . -); overwrite=True refuses to delete anything outside the dataset folder, so nothing was deleted. "
            "Fix or remove that file by hand")
    return splits


def _check_inside_root(folder: Path, root: Path) -> None:
    """Refuse a folder (or its writer subfolders) that resolves, e.g. through a symlink, outside ``root``."""
    real_root = root.resolve()
    for path in (folder, folder / LABELS_FOLDER, folder / LANG_FOLDER):
        if path.exists() and real_root not in path.resolve().parents:
            raise IncompatibleDatasetError(
                f"{path} resolves to {path.resolve()}, outside the dataset folder {real_root}; overwrite=True "
                "deletes only inside the dataset, so nothing was deleted")


def _check_format_version(meta: Mapping, root: Path) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise IncompatibleDatasetError(
            f"{root / DATASET_META_FILE} has format_version {version!r}, this code writes {FORMAT_VERSION}; "
            "choose another root or pass overwrite=True to discard the old dataset")


def _writer_files(split_dir: Path) -> Iterable[Path]:
    """Every file a DatasetWriter may have created in ``split_dir``."""
    named = [JOURNAL_FILE, LAST_COMMIT_FILE, EP_START_END_FILE, EP_LENS_FILE, STATISTICS_FILE]
    yield from (split_dir / name for name in named if (split_dir / name).exists())
    for folder in (split_dir, split_dir / LABELS_FOLDER, split_dir / LANG_FOLDER):
        if folder.is_dir():
            for entry in os.scandir(folder):
                if (entry.is_file() and (FRAME_FILE_RE.match(entry.name) or LABEL_FILE_RE.match(entry.name)
                                         or entry.name == LANG_FILE or entry.name.endswith(TEMP_SUFFIX))):
                    yield Path(entry.path)


def _remove_uncommitted(split_dir: Path, records: list[EpisodeRecord]) -> int:
    """Delete frames past the last committed id, label files of uncommitted episodes and temp files."""
    next_id = records[-1].end + 1 if records else 0
    committed_labels = {label_file_name(r.start, r.end) for r in records if r.has_labels}
    doomed = []
    for folder in (split_dir, split_dir / LABELS_FOLDER, split_dir / LANG_FOLDER):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            frame = FRAME_FILE_RE.match(entry.name)
            if (entry.name.endswith(TEMP_SUFFIX) or (frame and folder == split_dir and int(frame[1]) >= next_id)
                    or (LABEL_FILE_RE.match(entry.name) and entry.name not in committed_labels)):
                doomed.append(Path(entry.path))
    for path in doomed:
        path.unlink()
    return len(doomed)


def _check_frames_exist(split_dir: Path, records: list[EpisodeRecord]) -> None:
    missing = [frame_id for r in records for frame_id in range(r.start, r.end + 1)
               if not (split_dir / frame_file_name(frame_id)).exists()]
    if missing:
        raise IncompatibleDatasetError(f"{split_dir}: {len(missing)} committed frame file(s) are missing, e.g. "
                                       f"{[frame_file_name(i) for i in missing[:3]]}")


def _lang_annotations(windows: list[tuple[int, int, str, str]],
                      encode: Callable[[list[str]], np.ndarray] | None) -> dict:
    """CALVIN's auto_lang_ann dict for the given global windows."""
    # Interned so that equal strings are one object: pickle then memoises them the same way on every run,
    # which keeps finalize's output byte-identical whether the journal was just written or re-read from disk.
    texts = [sys.intern(text) for _, _, _, text in windows]
    return {
        "info": {"episodes": [], "indx": [(start, end) for start, end, _, _ in windows]},
        "language": {"ann": texts, "task": [sys.intern(task) for _, _, task, _ in windows],
                     "emb": _embed(texts, encode)},
    }


def _embed(texts: list[str], encode: Callable[[list[str]], np.ndarray] | None) -> np.ndarray:
    if encode is None or not texts:
        return np.zeros((len(texts), 1, LANG_EMB_DIM), dtype=np.float32)
    unique = list(dict.fromkeys(texts))  # CALVIN repeats each phrasing many times; encode each once
    emb = np.asarray(encode(unique), dtype=np.float32)
    if emb.ndim == 3 and emb.shape[1] == 1:
        emb = emb[:, 0]
    if emb.ndim != 2 or emb.shape[0] != len(unique):
        raise DatasetFormatError(f"encode(list of {len(unique)} str) must return an array of shape "
                                 f"({len(unique)}, d), got {emb.shape}")
    if not np.isfinite(emb).all():
        raise DatasetFormatError("encode returned NaN/inf embeddings")
    row = {text: i for i, text in enumerate(unique)}
    return emb[[row[text] for text in texts]][:, None, :]
