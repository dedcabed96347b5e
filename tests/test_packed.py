"""The packed training cache (ghil/data/packed.py, `ghil pack`): same samples as the npz frames, resumable
byte-identical builds, refusal of stale caches with the rebuild command, damaged files named."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from _policy_fixtures import write_synthetic_dataset
from ghil.cli import CONFIG_DIR
from ghil.data.calvin_format import DatasetError, frame_file_name
from ghil.data.packed import PackedSplit, StalePackError, build_pack, pack_command, run
from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset, compute_policy_stats

CAMERAS = ("rgb_static", "rgb_gripper")


def _dataset(root: Path, cache: Path | None, **data) -> PolicyDataset:
    config = PolicyDataConfig(root=str(root), cache=None if cache is None else str(cache), **data)
    return PolicyDataset(config, cameras=CAMERAS, goal_camera="rgb_static", action_key="rel_actions", chunk_len=5)


def _assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "images":
            assert a[key].keys() == b[key].keys()
            for cam in a[key]:
                assert a[key][cam].dtype == b[key][cam].dtype and np.array_equal(a[key][cam], b[key][cam]), cam
        elif a[key] is None or isinstance(a[key], str):
            assert a[key] == b[key], key
        else:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def root(tmp_path):
    return write_synthetic_dataset(tmp_path / "ds", n_episodes=3, frames_per_episode=14)


@pytest.mark.parametrize("lang_only", [False, True])
def test_cache_gives_the_npz_samples(root, lang_only):
    build_pack(root, "training")
    npz, packed = _dataset(root, None, lang_only=lang_only), _dataset(root, root / "packed", lang_only=lang_only)
    assert len(npz) == len(packed) > 0
    for epoch in (0, 3):  # goals are redrawn per epoch: the same draws
        npz.set_epoch(epoch)
        packed.set_epoch(epoch)
        for i in range(len(npz)):
            _assert_same_sample(npz[i], packed[i])
    assert not packed[len(packed) - 1]["action_mask"].all()  # the padded chunk at an episode's end is masked
    stats_a = compute_policy_stats(npz, ("robot_obs", "rel_actions"))
    stats_b = compute_policy_stats(packed, ("robot_obs", "rel_actions"))
    for key in stats_a:
        assert np.array_equal(stats_a[key].mean, stats_b[key].mean) and np.array_equal(stats_a[key].std,
                                                                                       stats_b[key].std)
    clone = pickle.loads(pickle.dumps(packed))  # spawn-started DataLoader workers re-open the memory maps
    assert isinstance(clone.frames.packed.arrays["rgb_static"], np.memmap)
    _assert_same_sample(clone[1], packed[1])


def test_cache_layout_is_plain_npy_memmaps(root):
    folder = build_pack(root, "training")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["n_frames"] == 42 and manifest["split"] == "training"
    assert set(manifest["keys"]) == {"rgb_static", "rgb_gripper", "robot_obs", "scene_obs", "actions", "rel_actions",
                                     "joint_actions"}
    split = PackedSplit.open(root, "training")
    assert split.arrays["rgb_static"].shape == (42, 32, 32, 3) and split.arrays["rgb_static"].dtype == np.uint8
    assert split.arrays["rel_actions"].dtype == np.float32 and isinstance(split.arrays["rel_actions"], np.memmap)
    for path in folder.glob("*.npy"):
        np.load(path, allow_pickle=False)  # nothing pickled


def _kill_mid_build(root: Path, out: Path) -> int:
    """Start a build in a subprocess (slowed per frame), SIGKILL it once some but not all frames are recorded."""
    script = ("import sys, time\n"
              "from ghil.data.calvin_dataset import CalvinDataset\n"
              "read = CalvinDataset.read_frame\n"
              "def slow(self, *a, **k):\n    time.sleep(0.02)\n    return read(self, *a, **k)\n"
              "CalvinDataset.read_frame = slow\n"
              "from ghil.data.packed import build_pack\n"
              f"build_pack({str(root)!r}, 'training', {str(out)!r}, block_frames=3)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    progress = out / "training" / "progress.json"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if progress.exists():
                done = json.loads(progress.read_text())["frames_done"]
                if done >= 9:
                    break
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return json.loads(progress.read_text())["frames_done"]


def test_killed_build_resumes_byte_identical(root, tmp_path):
    reference = build_pack(root, "training", tmp_path / "reference")
    done = _kill_mid_build(root, tmp_path / "killed")
    assert 9 <= done < 42
    with pytest.raises(StalePackError, match="incomplete") as err:
        PackedSplit.open(root, "training", tmp_path / "killed")
    assert pack_command(root, "training", tmp_path / "killed") in str(err.value)
    resumed = build_pack(root, "training", tmp_path / "killed")
    assert _files(resumed) == _files(reference)
    PackedSplit.open(root, "training", tmp_path / "killed")


def test_stale_cache_is_refused_with_the_rebuild_command(root, tmp_path):
    build_pack(root, "training")
    command = f"`ghil pack data.root={root} data.splits=[training]`"
    frame = root / "training" / frame_file_name(5)
    with np.load(frame) as npz:
        arrays = dict(npz)
    arrays["robot_obs"] = arrays["robot_obs"].copy()
    arrays["robot_obs"][0] += 0.5
    np.savez_compressed(frame, **arrays)  # a frame rewritten
    with pytest.raises(StalePackError, match="does not match") as err:
        _dataset(root, root / "packed")
    assert command in str(err.value)
    build_pack(root, "training")  # the command rebuilds it
    assert _dataset(root, root / "packed")[5]["proprio"][0] == np.float32(arrays["robot_obs"][0])

    other = write_synthetic_dataset(tmp_path / "other", n_episodes=4, frames_per_episode=14, seed=1)  # frames added
    with pytest.raises(StalePackError, match="has 56 in 4") as err:
        PackedSplit.open(other, "training", root / "packed")
    assert f"ghil pack data.root={other} data.splits=[training] pack.out={root / 'packed'}" in str(err.value)

    os.utime(frame, ns=(1, 1))  # even a touched frame file: the identity is sizes and mtimes, not contents
    with pytest.raises(StalePackError):
        PackedSplit.open(root, "training")


def test_damaged_cache_file_is_named(root):
    folder = build_pack(root, "training")
    image = folder / "rgb_static.npy"
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size // 2)
    with pytest.raises(DatasetError, match="rgb_static.npy"):
        PackedSplit.open(root, "training")
    build_pack(root, "training")  # a damaged array is rebuilt, not written into
    PackedSplit.open(root, "training")

    np.save(folder / "robot_obs.npy", np.zeros((42, 14), np.float32))  # wrong shape
    with pytest.raises(DatasetError, match=r"robot_obs.npy: cache file holds <f4 \(42, 14\)"):
        PackedSplit.open(root, "training")
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="ghil pack data.root="):
        PackedSplit.open(root, "training")


def test_bad_source_frame_fails_the_build_naming_it(root):
    bad = root / "training" / frame_file_name(20)
    bad.write_bytes(b"not an npz")
    with pytest.raises(DatasetError, match=frame_file_name(20)):
        build_pack(root, "training")


def test_ghil_pack_command(root):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="pack", overrides=[f"data.root={root}"])
    folders = run(cfg)  # the validation split does not exist: skipped
    assert folders == [root / "packed" / "training"]
    assert _files(folders[0])  # and a second run finds it complete
    before = _files(folders[0])
    run(cfg)
    assert _files(folders[0]) == before
    shutil.rmtree(root / "packed")
