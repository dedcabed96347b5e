"""The CALVIN-format writer and loader (ghil.data): round trip, crash recovery, validation and error messages."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from ghil.data.calvin_dataset import CalvinDataset, IncompleteDatasetError
from ghil.data.calvin_format import (
    DATASET_META_FILE,
    EP_START_END_FILE,
    JOURNAL_FILE,
    LABELS_FOLDER,
    LANG_FILE,
    LANG_FOLDER,
    NORMALIZE_TARGET,
    STATISTICS_FILE,
    DatasetLockedError,
    DatasetWriter,
    FrameSpec,
    FrameValidationError,
    IncompatibleDatasetError,
    RootNotWritableError,
    UnknownSplitError,
    frame_file_name,
    read_statistics,
    validate_frame,
)

SPEC = FrameSpec(static_size=32, gripper_size=16)
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_frame(rng: np.random.Generator, marker: float, spec: FrameSpec = SPEC) -> dict[str, np.ndarray]:
    """A valid frame whose scene_obs[0] is ``marker`` so a loaded frame can be traced back to what was written."""
    gripper = float(rng.choice([-1.0, 1.0]))
    s, g = spec.static_size, spec.gripper_size
    frame = {
        "actions": np.r_[rng.normal(size=6), gripper],
        "rel_actions": np.r_[rng.uniform(-1, 1, size=6), gripper],
        "robot_obs": np.r_[rng.normal(size=14), gripper],
        "scene_obs": np.r_[marker, rng.normal(size=23)],
        "rgb_static": rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
        "rgb_gripper": rng.integers(0, 256, (g, g, 3), dtype=np.uint8),
        "depth_static": rng.random((s, s), dtype=np.float32),
        "depth_gripper": rng.random((g, g), dtype=np.float32),
        "joint_actions": np.r_[rng.normal(size=7), gripper],
    }
    return frame


def make_episode(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_frame(rng, marker=seed * 1000 + t) for t in range(n)]


def make_labels(episode_name: str, n: int) -> list[dict]:
    return [{"plan": f"{episode_name} plan", "subtask": "reach", "move": "move forward", "step": t,
             "gripper_px": np.array([[10 + t, 20], [11 + t, 21]]),  # numpy values are accepted and stored as lists
             "objects": [{"name": "red block", "box": [1, 2, 5, 6]}]} for t in range(n)]


def fake_encode(texts: list[str]) -> np.ndarray:
    return np.array([[len(t), t.count(" ")] + [0.0] * 382 for t in texts], dtype=np.float32)


def frame_files(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.glob("episode_*.npz"))


# ---------------------------------------------------------------------------------------------------------------
# Round trip


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict]:
    """Two episodes in training, two in validation, with language windows and labels; finalized."""
    root = tmp_path / "ds"
    written = {}
    with DatasetWriter(root, spec=SPEC, metadata={"env": "playtable"}) as writer:
        plan = [("training", "ep_a", 1, 12, [(0, 5, "open_drawer", "open the drawer"), (4, 11, "lift", "pick it up")]),
                ("validation", "ep_b", 2, 7, [(1, 6, "push", "push the block")]),
                ("training", "ep_c", 3, 9, [(2, 8, "open_drawer", "open the drawer")]),
                ("validation", "ep_d", 4, 5, [])]
        for split, key, seed, n, lang in plan:
            frames = make_episode(seed, n)
            record = writer.commit_episode(split, frames, lang, make_labels(key, n), episode_key=key)
            written[key] = (record, frames)
        summary = writer.finalize(encode=fake_encode)
    assert summary["training"] == {"episodes": 2, "frames": 21, "lang_windows": 3}
    return root, written


def test_round_trip_layout_and_index_files(dataset: tuple[Path, dict]) -> None:
    root, written = dataset
    train, val = root / "training", root / "validation"
    assert frame_files(train) == [frame_file_name(i) for i in range(21)]
    assert frame_files(val) == [frame_file_name(i) for i in range(12)]  # numbering is per split
    assert np.load(train / EP_START_END_FILE).tolist() == [[0, 11], [12, 20]]
    assert np.load(val / EP_START_END_FILE).tolist() == [[0, 6], [7, 11]]
    assert written["ep_c"][0].start == 12 and written["ep_d"][0].start == 7

    lang = np.load(train / LANG_FOLDER / LANG_FILE, allow_pickle=True).item()
    assert lang["info"]["indx"] == [(0, 5), (4, 11), (14, 20)]  # ep_c's local (2, 8) shifted by its start 12
    assert lang["language"]["ann"] == ["open the drawer", "pick it up", "open the drawer"]
    assert lang["language"]["task"] == ["open_drawer", "lift", "open_drawer"]
    assert lang["language"]["emb"].shape == (3, 1, 384)
    assert lang["language"]["emb"][1, 0, 0] == len("pick it up")

    meta = json.loads((root / DATASET_META_FILE).read_text())
    assert meta["config"]["spec"]["static_size"] == 32 and meta["config"]["metadata"] == {"env": "playtable"}
    stored = np.load(train / frame_file_name(3))
    assert "rgb_tactile" not in stored.files and stored["robot_obs"].dtype == np.float64
    assert stored["depth_static"].dtype == np.float32


def test_statistics_yaml_matches_numpy_over_all_frames(dataset: tuple[Path, dict]) -> None:
    root, written = dataset
    frames = written["ep_a"][1] + written["ep_c"][1]
    raw = yaml.safe_load((root / "training" / STATISTICS_FILE).read_text())
    assert raw["robot_obs"][0]["_target_"] == NORMALIZE_TARGET
    stats = read_statistics(root / "training")
    for key in ("robot_obs", "scene_obs", "joint_actions"):
        values = np.stack([f[key] for f in frames])
        np.testing.assert_allclose(stats[key]["mean"], values.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], values.std(0), rtol=1e-9, atol=1e-12)
    actions = np.stack([f["actions"] for f in frames])
    np.testing.assert_array_equal(stats["act_min_bound"], actions.min(0))
    np.testing.assert_array_equal(stats["act_max_bound"], actions.max(0))
    assert len(stats["rel_act_min_bound"]) == 7 and len(stats["joint_act_max_bound"]) == 8
    assert raw["ghil"]["n_frames"] == 21


def test_finalize_is_idempotent(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    names = (EP_START_END_FILE, STATISTICS_FILE, f"{LANG_FOLDER}/{LANG_FILE}")
    before = {name: (root / "training" / name).read_bytes() for name in names}
    DatasetWriter.resume(root).finalize(encode=fake_encode)
    assert {name: (root / "training" / name).read_bytes() for name in names} == before


def test_loader_windows_stay_inside_episodes_and_return_written_frames(dataset: tuple[Path, dict]) -> None:
    root, written = dataset
    ds = CalvinDataset(root, "training", keys=("rgb_static", "robot_obs", "joint_actions", "ecot_labels"),
                       window_len=4, goal_horizon=(2, 5), seed=7)
    assert len(ds) == (12 - 3) + (9 - 3)
    for i in range(len(ds)):
        sample = ds[i]
        ids = sample["frame_ids"]
        start, end = ds.episode_bounds(ids[0])
        assert start <= ids[0] and ids[-1] <= end, "a window crossed an episode boundary"
        assert sample["rgb_static"].shape == (4, 32, 32, 3) and sample["joint_actions"].shape == (4, 8)
        assert min(ids[-1] + 2, end) <= sample["goal_frame_id"] <= min(ids[-1] + 5, end)
        assert len(sample["ecot_labels"]) == 4
        assert sample["ecot_labels"][0]["gripper_px"][0] == [10 + ids[0] - start, 20]
    sample = ds[5]
    np.testing.assert_array_equal(sample["frame_ids"], [5, 6, 7, 8])
    original = written["ep_a"][1][5]
    np.testing.assert_array_equal(sample["rgb_static"][0], original["rgb_static"])
    np.testing.assert_array_equal(sample["joint_actions"][0], original["joint_actions"])
    goal_frame = [f for key in ("ep_a", "ep_c") for f in written[key][1]][int(sample["goal_frame_id"])]
    np.testing.assert_array_equal(sample["goal_rgb_static"], goal_frame["rgb_static"])
    assert ds.label(15)["plan"] == "ep_c plan" and ds.label(15)["step"] == 3


def test_loader_goals_are_deterministic_per_seed_and_epoch(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset

    def goals(seed: int, epoch: int = 0) -> list[int]:
        ds = CalvinDataset(root, "training", keys=("robot_obs",), goal_horizon=(0, 8), goal_keys=(), seed=seed)
        ds.set_epoch(epoch)
        return [int(ds[i]["goal_frame_id"]) for i in range(len(ds))]

    assert goals(1) == goals(1)
    ds = CalvinDataset(root, "training", keys=("robot_obs",), seed=3)
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a pickled copy
    assert clone[4]["goal_frame_id"] == ds[4]["goal_frame_id"]
    assert goals(1) != goals(2) and goals(1) != goals(1, epoch=1)


def test_loader_lang_only_samples_lie_inside_language_windows(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    ds = CalvinDataset(root, "training", keys=("rel_actions",), window_len=3, lang_only=True, goal_horizon=None)
    assert len(ds) == (6 - 2) + (8 - 2) + (7 - 2)
    windows = {"open the drawer": [(0, 5), (14, 20)], "pick it up": [(4, 11)]}
    for i in range(len(ds)):
        sample = ds[i]
        ids = sample["frame_ids"]
        assert any(s <= ids[0] and ids[-1] <= e for s, e in windows[sample["ann"]])
        assert sample["task"] in ("open_drawer", "lift") and sample["lang_emb"].shape == (384,)
        assert "goal_frame_id" not in sample
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---------------------------------------------------------------------------------------------------------------
# Crash recovery

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests_dir!r})
    from test_calvin_format import SPEC, make_episode
    from ghil.data import calvin_format
    writer = calvin_format.DatasetWriter({root!r}, spec=SPEC)
    writer.commit_episode("training", make_episode(1, 6), [(0, 5, "lift", "lift it")], episode_key="ep_0")
    real_write, count = calvin_format._atomic_write, [0]
    def write_then_die(path, payload):
        real_write(path, payload)
        count[0] += 1
        if count[0] == 4:                  # 4 frames of the second episode are on disk, its journal line is not
            os.kill(os.getpid(), signal.SIGKILL)
    calvin_format._atomic_write = write_then_die
    writer.commit_episode("training", make_episode(2, 10), episode_key="ep_1")
""")


def test_resume_after_kill_mid_episode_drops_partial_frames_and_continues_numbering(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    script = KILL_SCRIPT.format(tests_dir=str(Path(__file__).parent), root=str(root))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    train = root / "training"
    assert frame_files(train) == [frame_file_name(i) for i in range(10)]  # 6 committed + 4 orphans
    (train / ".episode_0000010.npz.123.tmp").write_bytes(b"half a frame")  # a kill inside _atomic_write

    writer = DatasetWriter.resume(root)
    assert frame_files(train) == [frame_file_name(i) for i in range(6)]
    assert not list(train.glob("*.tmp"))
    assert writer.n_committed("training") == 1 and writer.committed_episode_keys() == {"ep_0"}
    record = writer.commit_episode("training", make_episode(3, 5), episode_key="ep_1")
    assert (record.start, record.end) == (6, 10)
    writer.finalize()
    writer.close()
    assert np.load(train / EP_START_END_FILE).tolist() == [[0, 5], [6, 10]]
    ds = CalvinDataset(root, "training", keys=("scene_obs",), goal_horizon=None)
    assert [float(ds[i]["scene_obs"][0, 0]) for i in range(len(ds))] == [1000 + t for t in range(6)] + \
        [3000 + t for t in range(5)]


def test_resume_repairs_a_torn_journal_line(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, spec=SPEC) as writer:
        writer.commit_episode("training", make_episode(1, 4), episode_key="ep_0")
    journal = root / "training" / JOURNAL_FILE
    good = journal.read_bytes()
    journal.write_bytes(good + b'{"split":"training","episode_key":"ep_1","sta')  # killed mid-append
    (root / "training" / frame_file_name(4)).write_bytes(b"orphan")
    with DatasetWriter.resume(root) as writer:
        assert journal.read_bytes() == good
        assert writer.n_frames("training") == 4 and not (root / "training" / frame_file_name(4)).exists()


def test_second_writer_on_same_root_is_refused(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", spec=SPEC):
        with pytest.raises(DatasetLockedError, match="another DatasetWriter"):
            DatasetWriter(tmp_path / "ds", spec=SPEC)
    DatasetWriter(tmp_path / "ds", spec=SPEC).close()  # released on close


# ---------------------------------------------------------------------------------------------------------------
# Validation: a bad frame writes nothing


def _corrupt(kind: str, frame: dict) -> str:
    """Apply one defect to ``frame``; return a fragment the error message must contain."""
    if kind == "nan":
        frame["robot_obs"][3] = np.nan
        return "'robot_obs' contains NaN/inf"
    if kind == "inf":
        frame["depth_static"][0, 0] = np.inf
        return "'depth_static' contains NaN/inf"
    if kind == "shape":
        frame["rgb_static"] = np.zeros((200, 200, 3), np.uint8)
        return "'rgb_static' has shape (200, 200, 3), expected (32, 32, 3)"
    if kind == "dtype":
        frame["rgb_gripper"] = frame["rgb_gripper"].astype(np.float32)
        return "'rgb_gripper' has dtype float32, expected uint8"
    if kind == "gripper":
        frame["actions"][6] = 0.5
        return "'actions'[6] (gripper) must be exactly -1 or +1, got 0.5"
    if kind == "missing":
        del frame["joint_actions"]
        return "missing key 'joint_actions'"
    if kind == "unknown":
        frame["rgb_tactile"] = np.zeros((160, 120, 6), np.uint8)
        return "unexpected keys ['rgb_tactile']"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "dtype", "gripper", "missing", "unknown"])
def test_bad_frame_writes_nothing(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, spec=SPEC) as writer:
        frames = make_episode(1, 8)
        fragment = _corrupt(kind, frames[5])
        with pytest.raises(FrameValidationError) as err:
            writer.commit_episode("training", frames, [(0, 7, "lift", "lift it")], make_labels("x", 8), episode_key="x")
        assert fragment in str(err.value) and "frame 5 of 8" in str(err.value)
        assert frame_files(root / "training") == [] and not list((root / "training" / LABELS_FOLDER).iterdir())
        assert writer.n_committed("training") == 0 and writer.committed_episode_keys() == set()
        assert writer.commit_episode("training", make_episode(2, 3), episode_key="x").start == 0  # still usable


@pytest.mark.parametrize("lang, labels, fragment", [
    ([(0, 8, "lift", "lift it")], None, "0 <= start <= end < 8"),
    ([(3, 2, "lift", "lift it")], None, "0 <= start <= end < 8"),
    ([(0, 2, "lift", "")], None, "text must be a non-empty string"),
    ([], [{"a": 1}] * 7, "one per frame (8)"),
    ([], [{"a": object()}] * 8, "labels[0] is not JSON-serialisable"),
    ([], [{"a": float("nan")}] * 8, "labels[0] is not JSON-serialisable"),
])
def test_bad_lang_or_labels_write_nothing(tmp_path: Path, lang: list, labels: list | None, fragment: str) -> None:
    with DatasetWriter(tmp_path / "ds", spec=SPEC) as writer:
        with pytest.raises(FrameValidationError) as err:
            writer.commit_episode("training", make_episode(1, 8), lang, labels)
        assert fragment in str(err.value)
        assert frame_files(tmp_path / "ds" / "training") == []


def test_validate_frame_defaults_to_calvin_sizes() -> None:
    calvin_frame = make_frame(np.random.default_rng(0), 0.0, FrameSpec())
    validate_frame(calvin_frame)
    with pytest.raises(FrameValidationError, match=r"'rgb_static' has shape \(32, 32, 3\), expected \(200, 200, 3\)"):
        validate_frame(make_frame(np.random.default_rng(0), 0.0))
    calvin_frame["rel_actions"][0] = 1.5
    with pytest.raises(FrameValidationError, match=r"must lie in \[-1, 1\]"):
        validate_frame(calvin_frame)


# ---------------------------------------------------------------------------------------------------------------
# Root and config errors


def test_unwritable_root_is_reported_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RootNotWritableError, match="cannot create dataset root"):
        DatasetWriter(blocker / "ds", spec=SPEC)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_root_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(RootNotWritableError, match="is not writable"):
            DatasetWriter(root, spec=SPEC)
    finally:
        root.chmod(0o700)


def test_mismatched_config_on_resume_is_refused_unless_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, spec=SPEC, metadata={"seed": 0}) as writer:
        writer.commit_episode("training", make_episode(1, 4), episode_key="ep_0")
    with pytest.raises(IncompatibleDatasetError, match=r"spec\.static_size: stored 32, requested 200"):
        DatasetWriter(root)
    with pytest.raises(IncompatibleDatasetError, match=r"metadata\.seed: stored 0, requested 1"):
        DatasetWriter(root, spec=SPEC, metadata={"seed": 1})
    with DatasetWriter(root, spec=SPEC, metadata={"seed": 0}) as writer:  # same config: a plain resume
        assert writer.committed_episode_keys() == {"ep_0"}
    big = FrameSpec(static_size=40, gripper_size=16)
    with DatasetWriter(root, spec=big, overwrite=True) as writer:
        assert writer.n_committed("training") == 0 and frame_files(root / "training") == []
        writer.commit_episode("training", [make_frame(np.random.default_rng(2), 0.0, big)])
    assert json.loads((root / DATASET_META_FILE).read_text())["config"]["spec"]["static_size"] == 40


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    DatasetWriter(root, spec=SPEC).close()
    meta = json.loads((root / DATASET_META_FILE).read_text())
    (root / DATASET_META_FILE).write_text(json.dumps({**meta, "format_version": 999}))
    with pytest.raises(IncompatibleDatasetError, match="format_version 999"):
        DatasetWriter(root, spec=SPEC)


def test_unknown_split_and_duplicate_key(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", spec=SPEC) as writer:
        with pytest.raises(UnknownSplitError, match=r"unknown split 'test'.*\['training', 'validation'\]"):
            writer.commit_episode("test", make_episode(1, 3))
        writer.commit_episode("training", make_episode(1, 3), episode_key="ep_0")
        with pytest.raises(ValueError, match="already committed"):
            writer.commit_episode("validation", make_episode(1, 3), episode_key="ep_0")


# ---------------------------------------------------------------------------------------------------------------
# Real CALVIN data (no joint_actions, no labels, no journal)


@pytest.fixture
def calvin_folder(tmp_path: Path) -> Path:
    """A hand-built CALVIN-style split: ids start at 100, a gap between episodes, tactile keys, no ghil extras."""
    root = tmp_path / "task_D_D"
    split = root / "training"
    (split / "lang_annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)
    episodes = [(100, 111), (140, 147)]
    for start, end in episodes:
        for frame_id in range(start, end + 1):
            frame = make_frame(rng, marker=float(frame_id))
            del frame["joint_actions"]
            frame["rgb_tactile"] = np.zeros((160, 120, 6), np.uint8)
            frame["depth_tactile"] = np.zeros((160, 120, 2), np.float32)
            np.savez(split / f"episode_{frame_id:07d}.npz", **frame)
    np.save(split / "ep_start_end_ids.npy", np.array(episodes[::-1]))  # real CALVIN rows need not be sorted
    lang = {"info": {"episodes": [], "indx": [(102, 109), (140, 147)]},
            "language": {"ann": ["slide the door", "turn on the led"], "task": ["move_slider_left", "turn_on_led"],
                         "emb": np.ones((2, 1, 384), np.float32)}}
    np.save(split / "lang_annotations" / "auto_lang_ann.npy", lang, allow_pickle=True)
    stats = {"robot_obs": [{"_target_": NORMALIZE_TARGET, "mean": [0.0] * 15, "std": [1.0] * 15}],
             "act_min_bound": [-1.0] * 7, "act_max_bound": [1.0] * 7}
    (split / "statistics.yaml").write_text(yaml.safe_dump(stats))
    return root


def test_loader_reads_calvin_folder_without_extras(calvin_folder: Path) -> None:
    ds = CalvinDataset(calvin_folder, "training", keys=("rgb_static", "rel_actions", "robot_obs"), window_len=5)
    assert len(ds) == (12 - 4) + (8 - 4)
    for i in range(len(ds)):
        ids = ds[i]["frame_ids"]
        assert ids[-1] - ids[0] == 4 and (ids[-1] <= 111 or ids[0] >= 140)
        assert ds[i]["goal_frame_id"] <= (111 if ids[0] < 140 else 147)
    assert ds[0]["rgb_static"].shape == (5, 32, 32, 3)
    lang_ds = CalvinDataset(calvin_folder, "training", keys=("scene_obs",), window_len=8, lang_only=True)
    assert [(int(s["frame_ids"][0]), s["task"]) for s in (lang_ds[i] for i in range(len(lang_ds)))] == \
        [(102, "move_slider_left"), (140, "turn_on_led")]
    np.testing.assert_array_equal(ds.statistics["act_max_bound"], [1.0] * 7)
    with pytest.raises(KeyError, match="joint_actions.*only in ghil-collected data"):
        CalvinDataset(calvin_folder, "training", keys=("rgb_static", "joint_actions"))
    with pytest.raises(KeyError, match="no ECoT labels"):
        CalvinDataset(calvin_folder, "training", keys=("ecot_labels",))
    with pytest.raises(KeyError, match="no ECoT labels"):
        ds.label(100)


def test_writer_refuses_to_touch_a_calvin_download(calvin_folder: Path) -> None:
    with pytest.raises(IncompatibleDatasetError, match="not written by DatasetWriter"):
        DatasetWriter(calvin_folder, spec=SPEC, overwrite=True)
    assert len(frame_files(calvin_folder / "training")) == 20


def test_loader_errors_name_the_problem(tmp_path: Path, calvin_folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CalvinDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"validation.*has \['training'\]"):
        CalvinDataset(calvin_folder, "validation")
    (calvin_folder / "training" / EP_START_END_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="ep_start_end_ids.npy is missing"):
        CalvinDataset(calvin_folder)


def test_loader_refuses_unfinalized_ghil_dataset(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    writer = DatasetWriter(root, spec=SPEC)
    writer.commit_episode("training", make_episode(1, 4))
    with pytest.raises(IncompleteDatasetError, match=r"half-written.*1 committed.*is missing.*finalize\(\)"):
        CalvinDataset(root, "training")
    writer.finalize()
    assert len(CalvinDataset(root, "training", keys=("robot_obs",))) == 4
    writer.commit_episode("training", make_episode(2, 4))  # committed after finalize: the index is stale
    with pytest.raises(IncompleteDatasetError, match="2 committed episode.*lists 1 episode"):
        CalvinDataset(root, "training")
    writer.close()
