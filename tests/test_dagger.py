"""`ghil dagger` (issue 11): expert labels at the visited states, the round's data in the trainer, resume, bad input.

Tiny policy and 32x32 frames only: every stored label is re-derived by teleporting a fresh env to the stored state
and letting a fresh scripted expert act, so the test fails if labels come from anywhere but the visited state.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ghil.cli import CONFIG_DIR
from ghil.data.calvin_dataset import CalvinDataset, LanguageAnnotations
from ghil.data.calvin_format import EXPERT_CHUNK_KEY, EXPERT_GOAL_KEY
from ghil.data.packed import build_pack
from ghil.data.policy_dataset import ConcatPolicyDataset, is_expert_labelled
from policies.dit import DiTPolicy
from policies.recipe import PolicyRecipe
from policies.shortcut import ShortcutConfig
from sim_eval.demonstrations import dagger as dagger_mod
from sim_eval.demonstrations.expert import ScriptedExpert
from tests._policy_fixtures import fake_stats, tiny_config, write_synthetic_dataset

CHUNK, GOAL_STEPS = 4, 3
SMALL = ["env.static_size=32", "env.gripper_size=32", "dagger.tasks_per_episode=2", "dagger.workers=0",
         "dagger.max_steps_per_task=10", f"dagger.chunk_len={CHUNK}", f"dagger.goal_steps={GOAL_STEPS}",
         "dagger.calvin_state_fraction=1.0"]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("dagger", overrides=[*SMALL, *overrides])


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    policy.fit_normalizer(fake_stats())
    return policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def _round(out: Path, policy_dir: Path, episodes: int = 2, *extra: str) -> None:
    dagger_mod.run(_cfg(f"dagger.policy={policy_dir}", f"dagger.out_dir={out}", f"dagger.episodes={episodes}",
                        *extra))


@pytest.fixture(scope="module")
def round_dir(tmp_path_factory, policy_dir) -> Path:
    out = tmp_path_factory.mktemp("dagger") / "round_1"
    _round(out, policy_dir)
    return out


def _frames(root: Path) -> list[dict]:
    return [dict(np.load(f)) for f in sorted((root / "training").glob("episode_*.npz"))]


def test_labels_are_the_experts_chunk_and_goal_from_each_visited_state(round_dir):
    assert is_expert_labelled(round_dir)
    cfg = _cfg()
    env = instantiate(OmegaConf.create(OmegaConf.to_container(cfg.env, resolve=True)))
    lang = LanguageAnnotations.load(round_dir / "training")
    frames = _frames(round_dir)
    assert len(frames) >= 4 and len(lang.task) >= 1
    task_of, starts = {}, set()
    for (start, end), task in zip(lang.indx, lang.task):
        task_of.update({f: task for f in range(int(start), int(end) + 1)})
        starts.add(int(start))

    def roll_copy(live, frame):
        """What the live expert would do from the stored state: a copy of it acting in a fresh env."""
        obs, expert, actions, goal = env.reset(robot_obs=frame["robot_obs"], scene_obs=frame["scene_obs"]), \
            copy.deepcopy(live), [], None
        for i in range(max(CHUNK, GOAL_STEPS)):
            action, phase = expert.act(obs["robot_obs"], obs["scene_obs"])
            if phase == "done":
                break
            if i < CHUNK:
                actions.append(action)
            obs, *_ = env.step(action)
            if i + 1 == GOAL_STEPS:
                goal = np.array(obs["rgb_obs"]["rgb_static"])
        return actions, np.array(obs["rgb_obs"]["rgb_static"]) if goal is None else goal

    checked, live = 0, ScriptedExpert()
    for f, frame in enumerate(frames):
        if f not in task_of:
            continue
        if f in starts:  # one live expert per attempt, stepped along the visited states
            live.reset(task_of[f])
        actions, goal = roll_copy(live, frame)
        if not actions:  # its plan ended without the oracle firing: planned afresh
            live.reset(task_of[f])
            actions, goal = roll_copy(live, frame)
        live.act(frame["robot_obs"], frame["scene_obs"])
        chunk = frame[EXPERT_CHUNK_KEY]
        assert chunk.shape == (CHUNK, 7)
        np.testing.assert_array_equal(chunk[:len(actions)], np.asarray(actions))
        assert (chunk[len(actions):, :6] == 0).all()  # a finished plan is padded with holds
        np.testing.assert_array_equal(frame["rel_actions"], chunk[0])
        np.testing.assert_array_equal(frame[EXPERT_GOAL_KEY], goal)
        checked += 1
    assert checked == len(frames)


def test_beta_one_is_the_expert_driving_and_beta_zero_the_policy(policy_dir):
    cfg = _cfg()
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    settings = dagger_mod._settings(cfg.dagger, beta=1.0)
    roller = dagger_mod.DaggerRoller(env_cfg, str(policy_dir), settings)
    ep = roller.roll(0)
    assert ep["expert_share"] == 1.0
    roller = dagger_mod.DaggerRoller(env_cfg, str(policy_dir), dagger_mod._settings(cfg.dagger, beta=0.0))
    assert roller.roll(0)["expert_share"] == 0.0


def test_expert_driven_labels_solve_tasks_like_the_expert(policy_dir):
    """With beta = 1 the labels alone drive the robot: they must solve tasks (a plan restarted at every state never
    gets past its departure move and solved none)."""
    cfg = _cfg("dagger.max_steps_per_task=300", "dagger.tasks_per_episode=3")
    roller = dagger_mod.DaggerRoller(OmegaConf.to_container(cfg.env, resolve=True), str(policy_dir),
                                     dagger_mod._settings(cfg.dagger, beta=1.0))
    ep = roller.roll(2)
    assert ep["n_attempts"] == 3 and ep["n_success"] >= 2


def test_the_round_trains_through_extra_roots_with_its_own_labels(round_dir, tmp_path, policy_dir):
    from ghil.train import TrainConfig, Trainer

    main = write_synthetic_dataset(tmp_path / "play", n_episodes=2, frames_per_episode=12)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    recipe = PolicyRecipe(policy, {"root": str(main), "val_split": None, "extra_roots": [str(round_dir)]})
    setup = recipe.build()
    assert isinstance(setup.dataset, ConcatPolicyDataset)
    n_main = len(setup.dataset.main)
    frames = _frames(round_dir)
    dagger_part = setup.dataset.parts[1]
    for j in (0, len(dagger_part) - 1):
        sample = setup.dataset[n_main + j]
        fid = int(dagger_part.frames[j]["frame_ids"][0])
        np.testing.assert_allclose(sample["actions"], frames[fid][EXPERT_CHUNK_KEY][:4], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(sample["goal"], frames[fid][EXPERT_GOAL_KEY])
        assert sample["action_mask"].all()
    # the packed cache gives the same samples
    build_pack(round_dir, "training")
    packed = PolicyRecipe(policy, {"root": str(main), "val_split": None, "cache": str(main / "packed"),
                                   "extra_roots": [str(round_dir)]})
    build_pack(main, "training")
    packed_ds = packed.build().dataset
    for j in (0, 3):
        a, b = setup.dataset[n_main + j], packed_ds[n_main + j]
        np.testing.assert_allclose(a["actions"], b["actions"], atol=1e-6)
        np.testing.assert_array_equal(a["goal"], b["goal"])
    setup.fit_statistics()
    trainer = Trainer.from_setup(setup, TrainConfig(out_dir=str(tmp_path / "run"), total_steps=2, batch_size=4,
                                                    num_workers=0, progress=False, tensorboard=False,
                                                    val_every=None, ckpt_every=2))
    trainer.fit()
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").is_file()
    # a policy whose chunks are longer than the stored labels is refused, naming the setting
    long = PolicyRecipe(DiTPolicy(tiny_config(chunk_len=8, exec_len=4), ShortcutConfig()),
                        {"root": str(main), "val_split": None, "extra_roots": [str(round_dir)]}).build()
    with pytest.raises(ValueError, match="dagger.chunk_len"):
        long.dataset[len(long.dataset) - 1]


def test_killed_round_resumes_to_the_same_data(round_dir, policy_dir, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real = dagger_mod.DaggerRoller.roll
    calls = []

    def dies_on_second(self, k):
        calls.append(k)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, k)

    monkeypatch.setattr(dagger_mod.DaggerRoller, "roll", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _round(out, policy_dir)
    assert len(_frames(out)) > 0
    monkeypatch.setattr(dagger_mod.DaggerRoller, "roll", real)
    _round(out, policy_dir)
    want, got = _frames(round_dir), _frames(out)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    ds = CalvinDataset(out, "training", keys=("rgb_static", EXPERT_CHUNK_KEY), window_len=1)
    assert len(ds) == len(got)


def test_a_checkpoint_of_another_action_space_stops_before_collecting(tmp_path):
    policy = DiTPolicy(tiny_config(action_space="joint_abs"), ShortcutConfig())
    policy.fit_normalizer(fake_stats(8, "joint_actions"))
    ckpt = policy.save_pretrained(tmp_path / "joint")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="relative end-effector"):
        _round(out, ckpt)
    assert not out.exists()


def test_bad_settings_are_refused(policy_dir, tmp_path):
    with pytest.raises(ValueError, match="dagger.beta"):
        _round(tmp_path / "a", policy_dir, 1, "dagger.beta=1.5")
    with pytest.raises(ValueError, match="chunk_len"):
        dagger_mod.DaggerRoller(OmegaConf.to_container(_cfg().env, resolve=True), str(policy_dir),
                                dagger_mod._settings(_cfg("dagger.chunk_len=2").dagger, beta=0.5))
    with pytest.raises(ValueError, match="dagger.episodes"):
        _round(tmp_path / "b", policy_dir, 0)
