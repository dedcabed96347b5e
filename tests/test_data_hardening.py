"""Untrusted datasets (issue 10, items 1, 2, 6 and the journal part of 9): reading one runs no code, overwriting
one deletes nothing outside its folder, every frame the loader returns is validated (else an error naming the
file, frame and problem), and a damaged journal line never costs a committed episode."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_calvin_format import SPEC, make_episode

from ghil.data import calvin_dataset
from ghil.data.calvin_dataset import CalvinDataset, DatasetError, IncompleteDatasetError, LanguageAnnotations
from ghil.data.calvin_format import (
    DATASET_META_FILE,
    JOURNAL_FILE,
    LANG_FILE,
    LANG_FOLDER,
    DatasetWriter,
    IncompatibleDatasetError,
    frame_file_name,
)
from ghil.data.safe_pickle import UnsafePickleError, load_npy

REPO = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, episodes: tuple[int, ...] = (6, 5)) -> Path:
    """A finalized ghil dataset whose training split holds ``episodes`` (lengths), each with one language window."""
    with DatasetWriter(root, spec=SPEC) as writer:
        for i, n in enumerate(episodes):
            writer.commit_episode("training", make_episode(i + 1, n), lang=[(0, n - 1, "lift", f"lift block {i}")],
                                  episode_key=f"ep_{i}")
        writer.finalize()
    return root


# ---------------------------------------------------------------------------------------------------------------
# 1. A crafted auto_lang_ann.npy runs no code


class _Payload:
    """Pickles as a call of ``func(*args)``: what a crafted dataset file does to np.load(allow_pickle=True)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "subprocess.call", "builtins.exec"])
def test_malicious_language_file_runs_no_code(tmp_path: Path, how: str) -> None:
    root = write_dataset(tmp_path / "ds")
    marker = tmp_path / "pwned"
    payload = {"os.system": _Payload(os.system, f"touch {marker}"),
               "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
               "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()")}[how]
    lang_file = root / "training" / LANG_FOLDER / LANG_FILE
    crafted = {"info": {"indx": [(0, 5)]}, "language": {"ann": [payload], "task": ["lift"], "emb": np.zeros((1, 4))}}
    np.save(lang_file, np.array(crafted, dtype=object), allow_pickle=True)

    with pytest.raises(DatasetError, match=rf"{re.escape(str(lang_file))}.*refusing to unpickle .*(system|call|exec)"):
        CalvinDataset(root, "training", keys=("robot_obs",), lang_only=True)
    assert not marker.exists(), "the crafted pickle ran its command"
    with pytest.raises(UnsafePickleError, match="may have been crafted to run code"):
        load_npy(lang_file)
    assert not marker.exists()


def _calvin_lang(n: int = 3) -> dict:
    """CALVIN's auto_lang_ann layout: numpy ints in indx tuples, (n, 1, 384) float32 embeddings."""
    return {"info": {"episodes": [], "indx": [(np.int64(10 * i), np.int64(10 * i + 7)) for i in range(n)]},
            "language": {"ann": [f"open the drawer {i}" for i in range(n)], "task": ["open_drawer"] * n,
                         "emb": np.arange(n * 384, dtype=np.float32).reshape(n, 1, 384)}}


@pytest.mark.parametrize("numpy_core", ["numpy._core", "numpy.core"])  # pickled by numpy 2.x / 1.x (a download)
def test_genuine_calvin_language_file_still_loads(tmp_path: Path, numpy_core: str) -> None:
    folder = tmp_path / "training" / LANG_FOLDER
    folder.mkdir(parents=True)
    if numpy_core == "numpy._core":
        np.save(folder / LANG_FILE, _calvin_lang(), allow_pickle=True)
    else:  # what numpy 1.x's np.save wrote: a protocol-3 pickle whose GLOBAL opcodes name numpy.core.multiarray
        array = np.array(_calvin_lang(), dtype=object)
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
        buffer.write(pickle.dumps(array, protocol=3).replace(b"numpy._core.", b"numpy.core."))
        (folder / LANG_FILE).write_bytes(buffer.getvalue())
        assert b"cnumpy.core.multiarray\n_reconstruct" in buffer.getvalue()
    lang = LanguageAnnotations.load(tmp_path / "training")
    assert lang.indx.tolist() == [[0, 7], [10, 17], [20, 27]]
    assert lang.ann[2] == "open the drawer 2" and lang.task == ("open_drawer",) * 3
    np.testing.assert_array_equal(lang.emb, _calvin_lang()["language"]["emb"][:, 0])


def test_writer_output_loads_through_the_restricted_reader(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    ds = CalvinDataset(root, "training", keys=("robot_obs",), lang_only=True)
    assert sorted({ds[i]["ann"] for i in range(len(ds))}) == ["lift block 0", "lift block 1"]


def test_truncated_language_file_names_the_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    lang_file = root / "training" / LANG_FOLDER / LANG_FILE
    lang_file.write_bytes(lang_file.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=rf"{re.escape(str(lang_file))}.*corrupt pickle"):
        CalvinDataset(root, "training", keys=("robot_obs",), lang_only=True)


def test_no_unrestricted_unpickling_anywhere() -> None:
    """Every pickle read outside tests goes through ghil.data.safe_pickle (the allow-list unpickler)."""
    pattern = re.compile(r"np\.load\([^)]*allow_pickle\s*=\s*True|\bpickle\.loads?\(|\bpickle\.Unpickler\b"
                         r"|\bnp\.lib\.format\.read_array\([^)]*allow_pickle\s*=\s*True")
    offenders = [str(p.relative_to(REPO)) for folder in ("ghil", "policies", "planners", "sim_eval", "ros_nodes")
                 for p in (REPO / folder).rglob("*.py")
                 if p.name != "safe_pickle.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# 2. overwrite=True deletes nothing outside the dataset folder


def _victim(folder: Path) -> list[Path]:
    """Files named like a writer's own, in a folder that is not part of the dataset."""
    (folder / "ecot_labels").mkdir(parents=True)
    files = [folder / frame_file_name(0), folder / JOURNAL_FILE, folder / "ecot_labels" / "ep_0000000_0000003.jsonl"]
    for path in files:
        path.write_bytes(b"precious")
    return files


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "not_a_list"])
def test_overwrite_refuses_split_names_pointing_outside_the_dataset(tmp_path: Path, kind: str) -> None:
    root = write_dataset(tmp_path / "ds")
    victim = _victim(tmp_path / "victim")
    meta = json.loads((root / DATASET_META_FILE).read_text())
    if kind == "symlink":  # a plain name whose folder is a link out of the dataset
        (root / "extra").symlink_to(tmp_path / "victim", target_is_directory=True)
    meta["config"]["splits"] = {"dotdot": ["training", "../victim"], "absolute": ["training", str(tmp_path / "victim")],
                                "symlink": ["training", "extra"], "not_a_list": "../victim"}[kind]
    (root / DATASET_META_FILE).write_text(json.dumps(meta))
    ours = sorted(p for p in (root / "training").rglob("*") if p.is_file())

    with pytest.raises(IncompatibleDatasetError, match="nothing was deleted"):
        DatasetWriter(root, spec=SPEC, overwrite=True)
    assert all(path.read_bytes() == b"precious" for path in victim)
    assert sorted(p for p in (root / "training").rglob("*") if p.is_file()) == ours  # and nothing inside either


def test_overwrite_still_discards_its_own_dataset(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    (root / "training" / "notes.txt").write_text("mine")  # a foreign file stays
    with DatasetWriter(root, spec=SPEC, overwrite=True) as writer:
        assert writer.n_committed("training") == 0
    assert sorted(p.name for p in (root / "training").iterdir() if p.is_file()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------------------
# 6. Every frame the loader returns is validated; read errors name the file and frame


def _tamper(path: Path, kind: str) -> str:
    """Damage one frame file; return a fragment the loader's error must contain."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "unreadable"
    if kind == "corrupt_bytes":  # zeros inside the compressed rgb_static member: zlib.error or a CRC failure
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("rgb_static.npy")
        raw = bytearray(path.read_bytes())
        data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        raw[data_start + 8:data_start + 72] = bytes(64)
        path.write_bytes(bytes(raw))
        return "unreadable"
    if kind == "not_npz":
        path.write_bytes(b"half a frame")
        return "unreadable"
    with np.load(path) as npz:
        frame = dict(npz)
    fragment = {
        "rel_actions_1e6": "'rel_actions' must lie in [-1, 1], got max |value| 1e+06",
        "nan_robot_obs": "'robot_obs' contains NaN/inf",
        "inf_scene_obs": "'scene_obs' contains NaN/inf",
        "image_100x100": "'rgb_static' has shape (100, 100, 3), expected (32, 32, 3)",
        "image_float32": "'rgb_static' has dtype float32, expected uint8",
        "gripper_half": "'rel_actions'[6] (gripper) must be exactly -1 or +1, got 0.5",
        "missing_key": "key 'rgb_static' is not stored",
        "short_vector": "'robot_obs' has shape (14,), expected (15,)",
    }[kind]
    if kind == "rel_actions_1e6":
        frame["rel_actions"][0] = 1e6
    elif kind == "nan_robot_obs":
        frame["robot_obs"][2] = np.nan
    elif kind == "inf_scene_obs":
        frame["scene_obs"][5] = -np.inf
    elif kind == "image_100x100":
        frame["rgb_static"] = np.zeros((100, 100, 3), np.uint8)
    elif kind == "image_float32":
        frame["rgb_static"] = frame["rgb_static"].astype(np.float32)
    elif kind == "gripper_half":
        frame["rel_actions"][6] = 0.5
    elif kind == "missing_key":
        del frame["rgb_static"]
    elif kind == "short_vector":
        frame["robot_obs"] = frame["robot_obs"][:14]
    with open(path, "wb") as f:
        np.savez_compressed(f, **frame)
    return fragment


KINDS = ["truncated", "corrupt_bytes", "not_npz", "rel_actions_1e6", "nan_robot_obs", "inf_scene_obs",
         "image_100x100", "image_float32", "gripper_half", "missing_key", "short_vector"]


@pytest.mark.parametrize("kind", KINDS)
def test_loader_refuses_a_bad_frame_naming_file_frame_and_problem(tmp_path: Path, kind: str) -> None:
    root = write_dataset(tmp_path / "ds")
    fragment = _tamper(root / "training" / frame_file_name(8), kind)
    ds = CalvinDataset(root, "training", keys=("rgb_static", "robot_obs", "scene_obs", "rel_actions"),
                       goal_horizon=None)
    good = [i for i in range(len(ds)) if int(ds.index.starts[i]) != 8]
    for i in good:
        ds[i]  # the other frames still load
    bad = next(i for i in range(len(ds)) if int(ds.index.starts[i]) == 8)
    with pytest.raises(DatasetError) as info:
        ds[bad]
    message = str(info.value)
    assert str(root / "training" / frame_file_name(8)) in message and "(frame 8)" in message
    assert fragment in message


@pytest.mark.parametrize("kind", ["rel_actions_1e6", "truncated", "image_100x100"])
def test_bad_goal_frame_and_bad_first_frame_are_refused(tmp_path: Path, kind: str) -> None:
    root = write_dataset(tmp_path / "ds")
    _tamper(root / "training" / frame_file_name(0), kind)
    with pytest.raises(DatasetError, match=re.escape(frame_file_name(0)) + r" \(frame 0\)"):
        CalvinDataset(root, "training", keys=("rgb_static", "rel_actions"))  # fails at construction, not in a worker
    root2 = write_dataset(tmp_path / "ds2", episodes=(4,))
    _tamper(root2 / "training" / frame_file_name(3), kind)  # only ever read as the goal of frame 0..2
    ds = CalvinDataset(root2, "training", keys=("robot_obs",), goal_horizon=(3, 3), goal_keys=("rgb_static",))
    if kind == "rel_actions_1e6":
        ds[0]  # the goal reads only rgb_static, which is intact
    else:
        with pytest.raises(DatasetError, match=r"\(frame 3\)"):
            ds[0]


def test_real_calvin_folder_image_sizes_are_fixed_by_the_first_frame(tmp_path: Path) -> None:
    """Without ghil metadata, the first frame fixes each camera's size; a later frame of another size is refused."""
    split = tmp_path / "calvin" / "training"
    split.mkdir(parents=True)
    for frame_id, frame in zip(range(100, 106), make_episode(1, 6)):
        del frame["joint_actions"]
        if frame_id == 104:
            frame["rgb_gripper"] = np.zeros((100, 100, 3), np.uint8)
        np.savez(split / frame_file_name(frame_id), **frame)
    np.save(split / "ep_start_end_ids.npy", np.array([[100, 105]]))
    ds = CalvinDataset(split.parent, "training", keys=("rgb_gripper", "actions"), goal_horizon=None)
    assert ds[0]["rgb_gripper"].shape == (1, 16, 16, 3)
    with pytest.raises(DatasetError, match=r"episode_0000104\.npz \(frame 104\).*'rgb_gripper' has shape "
                                           r"\(100, 100, 3\), expected \(16, 16, 3\)"):
        ds[4]
    np.savez(split / frame_file_name(100), **{**dict(np.load(split / frame_file_name(101))),
                                              "rgb_gripper": np.zeros((16, 16), np.uint8)})
    with pytest.raises(DatasetError, match=r"'rgb_gripper' must be a uint8 \(H, W, 3\) image"):
        CalvinDataset(split.parent, "training", keys=("rgb_gripper",), goal_horizon=None)


def test_corrupt_index_files_name_the_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    index = root / "training" / "ep_start_end_ids.npy"
    index.write_bytes(index.read_bytes()[:20])
    with pytest.raises(DatasetError, match=re.escape(str(index))):
        CalvinDataset(root, "training", keys=("robot_obs",))
    stats = root / "training" / "statistics.yaml"
    stats.write_text("robot_obs: [unclosed")
    with pytest.raises(DatasetError, match=re.escape(str(stats))):
        calvin_dataset.read_statistics(root / "training")


def test_frames_are_read_once_per_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation reuses the arrays it returns: one np.load per window frame plus one for the goal."""
    root = write_dataset(tmp_path / "ds")
    ds = CalvinDataset(root, "training", keys=("rgb_static", "rel_actions"), window_len=3)
    calls = []
    real_load = np.load
    monkeypatch.setattr(calvin_dataset.np, "load", lambda *a, **k: calls.append(a[0]) or real_load(*a, **k))
    ds[0]
    assert len(calls) == 3 + 1


def test_policy_dataset_surfaces_the_loader_error_unchanged(tmp_path: Path) -> None:
    from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset

    root = write_dataset(tmp_path / "ds")
    _tamper(root / "training" / frame_file_name(7), "image_float32")
    ds = PolicyDataset(PolicyDataConfig(root=str(root), val_split=None), cameras=("rgb_static",),
                       goal_camera="rgb_static", action_key="rel_actions", chunk_len=4)
    with pytest.raises(DatasetError, match=r"episode_0000007\.npz \(frame 7\).*expected uint8"):
        for i in range(len(ds)):
            ds[i]


def test_episode_array_validates_every_frame(tmp_path: Path) -> None:
    """The per-episode reader that normaliser statistics should use refuses the poisoning frame."""
    root = write_dataset(tmp_path / "ds")
    ds = CalvinDataset(root, "training", keys=("robot_obs",), goal_horizon=None)
    assert ds.episode_array(1, "rel_actions").shape == (5, 7)
    _tamper(root / "training" / frame_file_name(9), "rel_actions_1e6")
    with pytest.raises(DatasetError, match=r"\(frame 9\): 'rel_actions' must lie in \[-1, 1\]"):
        ds.episode_array(1, "rel_actions")


def test_one_poisoned_frame_never_reaches_the_normaliser(tmp_path: Path) -> None:
    """The issue's probe: one frame with rel_actions = 1e6 trained silently into a normaliser of scale 5e5."""
    from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset, compute_policy_stats

    root = write_dataset(tmp_path / "ds")
    _tamper(root / "training" / frame_file_name(9), "rel_actions_1e6")
    ds = PolicyDataset(PolicyDataConfig(root=str(root), val_split=None), cameras=("rgb_static",),
                       goal_camera="rgb_static", action_key="rel_actions", chunk_len=4)
    with pytest.raises(DatasetError, match=r"\(frame 9\): 'rel_actions' must lie in \[-1, 1\]"):
        compute_policy_stats(ds, keys=("robot_obs", "rel_actions"))


# ---------------------------------------------------------------------------------------------------------------
# 9 (journal). A damaged last journal line never costs a committed episode


def _damage(journal: Path, kind: str) -> None:
    raw = journal.read_bytes()
    last_start = raw.rstrip(b"\n").rfind(b"\n") + 1
    if kind == "torn":  # the newline and the tail of the last line gone
        journal.write_bytes(raw[:-30])
    elif kind == "no_newline":
        journal.write_bytes(raw[:-1])
    elif kind == "flipped_byte":  # still a complete line, no longer JSON
        damaged = bytearray(raw)
        damaged[last_start] = ord("#")
        journal.write_bytes(bytes(damaged))
    elif kind == "zeroed_block":  # a disk block of zeros over the end of the file
        journal.write_bytes(raw[:last_start + 10] + bytes(len(raw) - last_start - 10))
    elif kind == "line_lost":
        journal.write_bytes(raw[:last_start])
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["torn", "no_newline", "flipped_byte", "zeroed_block", "line_lost"])
def test_damaged_last_journal_line_keeps_the_committed_episode(tmp_path: Path, kind: str) -> None:
    root = write_dataset(tmp_path / "ds")  # episodes [0, 5] and [6, 10], finalized
    train = root / "training"
    journal = train / JOURNAL_FILE
    intact = journal.read_bytes()
    frames = {p.name: p.read_bytes() for p in train.glob("episode_*.npz")}
    _damage(journal, kind)

    # The finalized dataset stays readable before any repair (the loader reads the journal without writing).
    assert len(CalvinDataset(root, "training", keys=("robot_obs",), goal_horizon=None)) == 11
    with DatasetWriter.resume(root) as writer:
        assert writer.committed_episode_keys() == {"ep_0", "ep_1"} and writer.n_frames("training") == 11
    assert journal.read_bytes() == intact  # restored byte for byte
    assert {p.name: p.read_bytes() for p in train.glob("episode_*.npz")} == frames
    assert len(CalvinDataset(root, "training", keys=("robot_obs",), goal_horizon=None)) == 11


KILL_MID_APPEND = textwrap.dedent("""
    import builtins, os, signal, sys
    sys.path.insert(0, {tests_dir!r})
    from test_calvin_format import SPEC, make_episode
    from ghil.data import calvin_format
    writer = calvin_format.DatasetWriter({root!r}, spec=SPEC)
    writer.commit_episode("training", make_episode(1, 6), [(0, 5, "lift", "lift it")], episode_key="ep_0")

    class TornWrite:  # the journal append of ep_1 gets half its line onto the disk, then the process dies
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()
        def write(self, text):
            self.f.write(text[: len(text) // 2]); self.f.flush(); os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    def open_(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return TornWrite(f) if str(path).endswith(calvin_format.JOURNAL_FILE) and mode == "a" else f
    calvin_format.open = open_
    writer.commit_episode("training", make_episode(2, 5), [(1, 3, "push", "push it")], episode_key="ep_1")
""")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".ghil_writer.lock"}


def test_kill_mid_journal_append_resumes_byte_identical(tmp_path: Path) -> None:
    """A real SIGKILL inside the journal append: the resume restores the episode (its frames were complete) and
    the finished dataset equals an uninterrupted run's, file for file and byte for byte."""
    killed = tmp_path / "killed"
    script = KILL_MID_APPEND.format(tests_dir=str(Path(__file__).parent), root=str(killed))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (killed / "training" / JOURNAL_FILE).read_bytes().endswith(b"\n")  # the line really is torn
    with DatasetWriter.resume(killed) as writer:
        assert writer.committed_episode_keys() == {"ep_0", "ep_1"}
        writer.commit_episode("training", make_episode(3, 4), episode_key="ep_2")
        writer.finalize()

    straight = tmp_path / "straight"
    with DatasetWriter(straight, spec=SPEC) as writer:
        writer.commit_episode("training", make_episode(1, 6), [(0, 5, "lift", "lift it")], episode_key="ep_0")
        writer.commit_episode("training", make_episode(2, 5), [(1, 3, "push", "push it")], episode_key="ep_1")
        writer.commit_episode("training", make_episode(3, 4), episode_key="ep_2")
        writer.finalize()
    assert _tree(killed) == _tree(straight)


def test_kill_between_saving_and_appending_the_line_keeps_the_episode(tmp_path: Path) -> None:
    """All files durable and the line saved, but the process died before the append: the episode is restored."""
    root = write_dataset(tmp_path / "ds")
    journal = root / "training" / JOURNAL_FILE
    intact = journal.read_bytes()
    _damage(journal, "line_lost")
    with DatasetWriter.resume(root) as writer:
        writer.finalize()
    assert journal.read_bytes() == intact


def test_unrecoverable_journal_damage_deletes_nothing(tmp_path: Path) -> None:
    """Damage with no saved copy of the line (e.g. a dataset written before the copy existed): frames past the
    journal may be a committed episode, so the resume refuses instead of deleting them."""
    root = write_dataset(tmp_path / "ds")
    train = root / "training"
    (train / "_journal_last.json").unlink()
    _damage(train / JOURNAL_FILE, "torn")
    damaged = (train / JOURNAL_FILE).read_bytes()
    before = sorted(p.name for p in train.rglob("*"))
    with pytest.raises(IncompatibleDatasetError, match="nothing was deleted"):
        DatasetWriter.resume(root)
    assert sorted(p.name for p in train.rglob("*")) == before
    assert (train / JOURNAL_FILE).read_bytes() == damaged
    with pytest.raises(IncompleteDatasetError):  # the loader does not pretend the dataset is whole either
        CalvinDataset(root, "training", keys=("robot_obs",))


def test_damaged_earlier_journal_line_is_refused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", episodes=(3, 3, 3))
    journal = root / "training" / JOURNAL_FILE
    raw = bytearray(journal.read_bytes())
    raw[0] = ord("#")
    journal.write_bytes(bytes(raw))
    with pytest.raises(IncompatibleDatasetError, match="line 1 is corrupt"):
        DatasetWriter.resume(root)
