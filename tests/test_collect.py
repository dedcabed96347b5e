"""`ghil collect`: CALVIN-format output that the loader reads back, exact resume after an interruption, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ghil.cli import CONFIG_DIR
from ghil.data.calvin_dataset import CalvinDataset
from sim_eval.demonstrations.collect import run

SMALL = ["env.static_size=32", "env.gripper_size=32", "collect.tasks_per_episode=2", "collect.workers=0",
         "collect.validation_every=2", "collect.calvin_state_fraction=1.0"]


def collect(out: Path, episodes: int, *extra: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("collect", overrides=[*SMALL, f"collect.out_dir={out}", f"collect.episodes={episodes}",
                                            *extra])
    run(cfg)


def frames(root: Path, split: str) -> list[dict]:
    return [dict(np.load(f)) for f in sorted((root / split).glob("episode_*.npz"))]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fresh")
    collect(out, 2)
    return out


def test_dataset_round_trip_through_loader(fresh):
    assert (fresh / "training" / "ep_start_end_ids.npy").exists()
    assert (fresh / "validation" / "lang_annotations" / "auto_lang_ann.npy").exists()
    train = frames(fresh, "training")
    assert train and train[0]["rgb_static"].shape == (32, 32, 3) and train[0]["rgb_static"].dtype == np.uint8
    assert set(train[0]) >= {"actions", "rel_actions", "robot_obs", "scene_obs", "rgb_static", "rgb_gripper",
                             "depth_static", "depth_gripper", "joint_actions"}
    # gripper exactly +-1 and joint targets inside the Panda's limits
    acts = np.stack([f["rel_actions"] for f in train])
    assert set(np.unique(acts[:, 6])) <= {-1.0, 1.0}
    ds = CalvinDataset(fresh, "training", keys=("rgb_static", "robot_obs", "rel_actions", "ecot_labels"),
                       lang_only=True)
    assert len(ds) > 0
    sample = ds[0]
    assert isinstance(sample["ann"], str) and sample["task"]
    label = sample["ecot_labels"][0]
    assert {"plan", "subtask", "move", "future_gripper_positions", "visible_objects"} <= set(label)
    full = CalvinDataset(fresh, "validation", keys=("rgb_static",))
    assert len(full) == len(frames(fresh, "validation"))


def test_resume_after_interruption_reproduces_a_fresh_run(fresh, tmp_path):
    out = tmp_path / "resumed"
    collect(out, 1)  # "killed" after the first episode was committed ...
    # ... and in the middle of the second: frame files past the journal, as a kill mid-commit leaves them.
    n_train = len(frames(out, "training"))
    np.savez(out / "training" / f"episode_{n_train:07d}.npz", junk=np.zeros(1))
    collect(out, 2)
    for split in ("training", "validation"):
        a, b = frames(fresh, split), frames(out, split)
        assert len(a) == len(b)
        for fa, fb in zip(a, b):
            assert set(fa) == set(fb)
            for key in fa:
                np.testing.assert_array_equal(fa[key], fb[key], err_msg=f"{split} {key}")
        ann_a = np.load(fresh / split / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()
        ann_b = np.load(out / split / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()
        assert ann_a["language"]["ann"] == ann_b["language"]["ann"]
        assert ann_a["info"]["indx"] == ann_b["info"]["indx"]


def test_bad_settings_and_unwritable_folder(tmp_path):
    with pytest.raises(ValueError, match="episodes"):
        collect(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="tasks_per_episode"):
        collect(tmp_path / "y", 1, "collect.tasks_per_episode=0")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Exception, match="writ|exist|folder|directory"):
        collect(blocker / "data", 1)


def test_collection_needs_the_playtable_with_a_static_camera(tmp_path):
    with pytest.raises(ValueError, match="static camera"):
        collect(tmp_path / "z", 1, "env.cameras=[gripper]")
