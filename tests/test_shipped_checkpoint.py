"""The checkpoints shipped in the repository: each exists, stays under 10 MB, matches its preset, loads through the
agent config a fresh machine uses, and acts sensibly on a real playtable frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ghil.checkpoint import load_pretrained
from ghil.cli import CONFIG_DIR
from ghil.types import Observation
from sim_eval.protocol.chains import load_official_chains
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.world.playtable.env import PlayTableEnv

REPO = Path(__file__).resolve().parents[1]
# checkpoint folder (named after the `ghil train` preset it was trained with) -> the agent config that loads it
SHIPPED = {"dit_small": "oracle_subgoal_policy", "dit_lang": "flat_policy"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_is_small_documented_and_matches_the_preset(name):
    folder = REPO / "ghil" / "checkpoints" / name
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= set(files), files
    assert sum(files.values()) <= 10 * 1024 * 1024, files
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"policy={name}", "sampler=shortcut"])
    preset = instantiate(cfg.policy, _convert_="all")
    shipped = load_pretrained(folder)
    assert shipped.config == preset.config and shipped.sampler.config == preset.sampler.config
    assert shipped.normalizer.is_fitted
    card = (folder / "README.md").read_text()
    for needed in ("ghil collect", "ghil train", "ghil eval", "avg len"):
        assert needed in card, needed
    assert json.loads((folder / "config.json").read_text())["type"] == "dit"


@pytest.fixture(scope="module")
def first_chain_frame():
    """Both cameras and robot_obs of the playtable reset to the first official chain's initial scene."""
    state, _ = load_official_chains()[0]
    robot_obs, scene_obs = state_to_obs(state)
    env = PlayTableEnv()
    try:
        obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        images = {k: np.asarray(v) for k, v in obs["rgb_obs"].items()}
    finally:
        env.close()
    return images, np.asarray(robot_obs, np.float32)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_policy_acts_in_range_through_the_agent_config(name, first_chain_frame, monkeypatch):
    monkeypatch.chdir(REPO)  # the agent configs name their checkpoints relative to the repository root
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"agent={SHIPPED[name]}"])
    assert Path(cfg.agent.policy.path) == Path("checkpoints") / name
    policy = instantiate(cfg.agent.policy)
    images, robot_obs = first_chain_frame
    observation = Observation(images=images, proprio=robot_obs, t=0, instruction="open the drawer")
    goal = images["rgb_static"] if policy.config.use_goal else None
    for n_steps in (1, 2, 4):
        chunk = policy.predict_chunk(observation, goal, n_steps=n_steps,
                                     generator=torch.Generator().manual_seed(0)).actions
        assert chunk.shape == (16, 7) and torch.isfinite(chunk).all()
        assert chunk[:, :6].abs().max() <= 1.0 and set(chunk[:, 6].tolist()) <= {-1.0, 1.0}
    if policy.config.use_goal:
        # The goal is the current frame: the robot is where it should be, so the policy should barely move.
        still = policy.predict_chunk(observation, goal, n_steps=2, generator=torch.Generator().manual_seed(0)).actions
        assert float(still[:8, :3].abs().mean()) < 0.5


def test_shipped_reasoner_is_small_documented_and_reasons_on_a_real_frame(first_chain_frame, tmp_path, monkeypatch):
    """reasoner_small: a transformers folder under 10 MB with its card, found from any folder through the
    `reasoner=small` config, naming the 34 tasks' subtasks; on the first official chain's scene, asked for that
    chain's first subtask in a training phrasing, it answers a parsed reasoning whose SUBTASK is that task."""
    folder = REPO / "ghil" / "checkpoints" / "reasoner_small"
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "ghil_reasoner.json", "tokenizer.json", "README.md"} <= set(files)
    assert sum(files.values()) <= 10 * 1024 * 1024, files
    card = (folder / "README.md").read_text()
    for needed in ("ghil collect", "ghil train recipe=reasoner", "reasoner_quality.py", "ghil eval", "avg len"):
        assert needed in card, needed
    monkeypatch.chdir(tmp_path)  # `checkpoints/reasoner_small` resolves inside the installed package
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["agent=ghil_glue_reasoner"])
    reasoner = instantiate(cfg.agent.reasoner)
    info = reasoner.backend.info
    assert len(info["subtasks"]) == 34 and reasoner.force_task and set(reasoner.subtasks) == set(info["subtasks"].values())
    images, robot_obs = first_chain_frame
    task = load_official_chains()[0][1][0]  # the first chain's first subtask: feasible in this scene
    instruction = info["phrasings"][task][0]
    reasoning = reasoner.reason(Observation(images=images, proprio=robot_obs, t=0, instruction=instruction))
    assert reasoner.n_failures == 0 and not reasoner.fallback, reasoner.last_error
    assert reasoning.task == instruction and reasoning.subtask == info["subtasks"][task]
    assert reasoning.plan == (info["subtasks"][task],) and len(reasoning.gripper_position) == 5
