"""The GHIL-Glue subgoal filter (planners/ghil_glue_filter.py) and its recipe: in-batch negatives in the paper's
fractions, exactly and reproducibly; scoring (argmax semantics, clips scored on their last frame, the no-filter
ablation); save/load exactness; a few steps lower the loss; bad inputs are clear errors; the small preset matches
its YAML and fits 10 MB; `ghil train recipe=filter` runs end to end on a tiny CALVIN-format dataset and checks the
frame size before any folder exists."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ghil.checkpoint import load_pretrained
from ghil.data.calvin_format import DatasetWriter, FrameSpec
from ghil.data.subgoal_dataset import SubgoalBatch, SubgoalDataConfig, SubgoalDataset, collate_subgoal
from ghil.interfaces import Learnable, SubgoalFilter
from ghil.nn.encoders import HashTextConfig, ResNetGNConfig
from ghil.paths import CONFIG_DIR
from ghil.types import Observation
from planners.filter_recipe import FilterRecipe
from planners.ghil_glue_filter import (
    KINDS,
    POSITIVE,
    REVERSED,
    WRONG_GOAL,
    WRONG_INSTRUCTION,
    FirstCandidate,
    GhilGlueFilter,
    GhilGlueFilterConfig,
    NegativeFractions,
    build_negatives,
    negative_counts,
)

torch.set_num_threads(1)
SIZE = 32
TASKS = {"open_drawer": ("open the drawer", (200, 40, 40)), "push_blue_block_left": ("push the blue block left",
                                                                                      (40, 40, 200))}


def tiny_config(**overrides) -> GhilGlueFilterConfig:
    base = dict(image_size=SIZE, encoder_size=SIZE, width=16, hidden=(32,), text_encoder=HashTextConfig(16),
                image_encoder=ResNetGNConfig(channels=(8, 16), blocks=(1, 1), stem_pool=False, groups=4))
    base.update(overrides)
    return GhilGlueFilterConfig(**base)


def tiny_filter(**overrides) -> GhilGlueFilter:
    torch.manual_seed(0)
    return GhilGlueFilter(tiny_config(**overrides)).eval()


def frame(t: int, colour) -> np.ndarray:
    """A frame whose bar grows with time t, in the task's colour (so progress and task are learnable)."""
    image = np.full((SIZE, SIZE, 3), 30, np.uint8)
    image[8:24, : 2 + t] = colour
    return image


def write_two_task_dataset(root: Path, frames_per_episode: int = 24) -> Path:
    """Two splits, each with one episode per task, every frame annotated (a CALVIN-format root)."""
    spec = FrameSpec(static_size=SIZE, gripper_size=SIZE, depth=False)
    rng = np.random.default_rng(0)
    with DatasetWriter(root, splits=("training", "validation"), spec=spec) as writer:
        for split in ("training", "validation"):
            for task, (text, colour) in TASKS.items():
                frames = [{"actions": np.r_[rng.normal(size=6), 1.0], "rel_actions": np.r_[np.zeros(6), 1.0],
                           "robot_obs": np.r_[rng.normal(size=14), 1.0], "scene_obs": np.zeros(24),
                           "rgb_static": frame(i, colour), "rgb_gripper": np.zeros((SIZE, SIZE, 3), np.uint8),
                           "joint_actions": np.r_[np.zeros(7), 1.0]} for i in range(frames_per_episode)]
                writer.commit_episode(split, frames, lang=[(0, frames_per_episode - 1, task, text)],
                                      episode_key=f"{split}_{task}")
        writer.finalize()
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_two_task_dataset(tmp_path_factory.mktemp("filter_data") / "two_tasks")


def obs_with(image: np.ndarray, instruction: str = "open the drawer") -> Observation:
    return Observation(images={"rgb_static": image}, proprio=np.zeros(15, np.float32), t=0, instruction=instruction)


# -- negatives --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [10, 20, 40, 100])
def test_negative_counts_are_the_papers_fractions_exactly(b):
    assert negative_counts(b, NegativeFractions()) == (b // 2, b // 5, b // 5, b // 10)


def test_negative_counts_always_fill_the_batch_within_one_row():
    fractions = NegativeFractions()
    shares = (0.5, 0.2, 0.2, 0.1)
    for b in range(1, 70):
        counts = negative_counts(b, fractions)
        assert sum(counts) == b
        assert all(abs(c - s * b) < 1 for c, s in zip(counts, shares)), (b, counts)
    assert negative_counts(32, fractions) == (16, 7, 6, 3)
    assert negative_counts(8, NegativeFractions(0.0, 0.0, 0.0)) == (8, 0, 0, 0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        NegativeFractions(0.5, 0.4, 0.2)


def _batch_labels(b: int):
    instructions = [f"phrase {i % 4}" for i in range(b)]
    tasks = [f"task_{i % 4}" for i in range(b)]
    episodes = [i % 3 for i in range(b)]
    return instructions, tasks, episodes


def test_build_negatives_kinds_are_what_they_say_and_seeded():
    b = 40
    instructions, tasks, episodes = _batch_labels(b)
    plan = build_negatives(instructions, episodes, NegativeFractions(), tasks=tasks,
                           generator=torch.Generator().manual_seed(3))
    assert [int((plan.kind == k).sum()) for k in range(len(KINDS))] == [20, 8, 8, 4]
    assert torch.equal(plan.labels, (plan.kind == POSITIVE).float()) and bool(plan.clean.all())
    for i in range(b):
        kind, cur, goal, text = (int(plan.kind[i]), int(plan.current[i]), int(plan.goal[i]), int(plan.text[i]))
        if kind == POSITIVE:
            assert (cur, goal, text) == (i, b + i, i)
        elif kind == REVERSED:  # the goal shown as the current frame, and the current frame as the goal
            assert (cur, goal, text) == (b + i, i, i)
        elif kind == WRONG_INSTRUCTION:  # another task's instruction
            assert (cur, goal) == (i, b + i) and tasks[text] != tasks[i]
        else:
            assert kind == WRONG_GOAL and (cur, text) == (i, i)
            assert goal >= b and episodes[goal - b] != episodes[i]  # a goal of another episode
    again = build_negatives(instructions, episodes, NegativeFractions(), tasks=tasks,
                            generator=torch.Generator().manual_seed(3))
    other = build_negatives(instructions, episodes, NegativeFractions(), tasks=tasks,
                            generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(getattr(plan, f), getattr(again, f)) for f in ("kind", "current", "goal", "text"))
    assert not torch.equal(plan.kind, other.kind)  # the rows chosen as negatives move with the seed


def test_build_negatives_compares_tasks_not_phrasings_and_flags_noisy_donors():
    b = 10
    # Two phrasings of one task: a swapped instruction would still be right, so it is no clean negative.
    same_task = build_negatives([f"phrasing {i % 2}" for i in range(b)], [0] * b, NegativeFractions(),
                                tasks=["open_drawer"] * b, generator=torch.Generator().manual_seed(0))
    wrong = same_task.kind == WRONG_INSTRUCTION
    assert int(wrong.sum()) == 2 and not bool(same_task.clean[wrong].any())
    assert all(int(same_task.text[i]) != i for i in torch.nonzero(wrong).flatten().tolist())  # never itself
    # Without tasks the instruction text decides; one episode of two tasks still gives clean wrong goals.
    texts = ["open the drawer"] * 5 + ["lift the red block"] * 5
    plan = build_negatives(texts, [0] * b, NegativeFractions(), generator=torch.Generator().manual_seed(0))
    assert bool(plan.clean.all())
    for i in torch.nonzero(plan.kind == WRONG_GOAL).flatten().tolist():
        assert texts[int(plan.goal[i]) - b] != texts[i]
    with pytest.raises(ValueError, match="one instruction, episode"):
        build_negatives(["a", "b"], [0], NegativeFractions())


# -- scoring ----------------------------------------------------------------------------------------------------


def test_filter_satisfies_its_protocols_and_scores_each_candidate():
    filt = tiny_filter()
    assert isinstance(filt, SubgoalFilter) and isinstance(filt, Learnable)
    rng = np.random.default_rng(0)
    current = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    candidates = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    before = candidates.copy()
    scores = filt.score(obs_with(current), candidates, "open the drawer")
    assert scores.shape == (5,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert np.array_equal(candidates, before)  # inputs untouched
    # Each candidate is scored on its own: a permutation of the candidates permutes the scores (so the argmax
    # follows the candidate, whatever its position), and the batched pairwise logits agree.
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(filt.score(obs_with(current), candidates[perm], "open the drawer"), scores[perm],
                               rtol=1e-5, atol=1e-6)
    pairwise = filt.logits(torch.from_numpy(np.stack([current] * 5)), torch.from_numpy(candidates),
                           ["open the drawer"] * 5)
    np.testing.assert_allclose(pairwise.numpy(), scores, rtol=1e-5, atol=1e-6)


def test_clips_are_scored_on_their_last_frame():
    filt = tiny_filter()
    rng = np.random.default_rng(1)
    current = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    clips = rng.integers(0, 256, (3, 6, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(filt.score(obs_with(current), clips, "open the drawer"),
                                  filt.score(obs_with(current), np.ascontiguousarray(clips[:, -1]), "open the drawer"))


def test_the_none_filter_keeps_the_first_candidate():
    candidates = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    scores = FirstCandidate().score(obs_with(candidates[0]), candidates, "open the drawer")
    assert isinstance(FirstCandidate(), SubgoalFilter)
    assert np.isfinite(scores).all() and int(np.argmax(scores)) == 0 and scores.shape == (4,)
    assert int(np.argmax(FirstCandidate().score(obs_with(candidates[0]), candidates[:1], "x"))) == 0
    with pytest.raises(ValueError, match="at least one candidate"):
        FirstCandidate().score(obs_with(candidates[0]), candidates[:0], "open the drawer")


def test_save_load_round_trip_is_exact(tmp_path):
    filt = tiny_filter()
    with torch.no_grad():  # FiLM starts at zero; move it so the round trip covers the language path too
        for p in filt.parameters():
            p.add_(0.01 * torch.randn_like(p))
    filt.save_pretrained(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is GhilGlueFilter and loaded.config == filt.config
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["type"] == "ghil_glue"
    assert all(torch.equal(a, b) for a, b in zip(filt.state_dict().values(), loaded.state_dict().values()))
    rng = np.random.default_rng(2)
    current = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    candidates = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(filt.score(obs_with(current), candidates, "open the drawer"),
                                  loaded.score(obs_with(current), candidates, "open the drawer"))


def test_a_few_training_steps_lower_the_loss(data_root):
    ds = SubgoalDataset(SubgoalDataConfig(root=str(data_root), horizon=(4, 8), image_size=SIZE))
    batch = collate_subgoal([ds[i] for i in range(0, len(ds), 2)])  # 24 samples, both tasks
    filt = tiny_filter()

    def eval_loss() -> float:
        filt.eval()
        torch.manual_seed(0)  # the same negatives every time
        with torch.no_grad():
            return float(filt.loss(batch)[0])

    before = eval_loss()
    optimizer = torch.optim.Adam(filt.parameters(), lr=3e-3)
    filt.train()
    for _ in range(80):
        loss, metrics = filt.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(metrics) >= {"loss", "acc", *(f"acc_{k}" for k in KINDS), "noisy_negatives"}
    after = eval_loss()
    assert after < 0.6 * before, (before, after)  # 0.74 -> 0.20 at seed 0


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_value_errors():
    filt = tiny_filter()
    good = np.zeros((SIZE, SIZE, 3), np.uint8)
    cands = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    cases = [
        (obs_with(good), cands[:0], "open the drawer", "at least one candidate"),
        (obs_with(good), np.zeros((2, 0, SIZE, SIZE, 3), np.uint8), "open the drawer", "at least one candidate"),
        (obs_with(good), np.zeros((2, 16, 16, 3), np.uint8), "open the drawer", "expected 32x32"),
        (obs_with(good), np.zeros((SIZE, SIZE, 3), np.uint8), "open the drawer", r"\(K, H, W, 3\)"),
        (obs_with(good), cands.astype(np.float32), "open the drawer", "uint8"),
        (obs_with(good), [[1, 2]], "open the drawer", "uint8 array"),
        (obs_with(np.zeros((64, 64, 3), np.uint8)), cands, "open the drawer", "image_size=32"),
        (Observation(images={"rgb_gripper": good}, proprio=np.zeros(15)), cands, "open the drawer", "lacks"),
        (obs_with(good), cands, "", "non-empty string"),
        (obs_with(good), cands, "   ", "non-empty string"),
        (obs_with(good), cands, None, "non-empty string"),
        (obs_with(good), cands, "open the drawer " * 40, "max_text_len=256"),
    ]
    for obs, candidates, text, match in cases:
        with pytest.raises(ValueError, match=match):
            filt.score(obs, candidates, text)
    batch = SubgoalBatch(image=torch.zeros(2, 16, 16, 3, dtype=torch.uint8),
                         goal=torch.zeros(2, 16, 16, 3, dtype=torch.uint8), instructions=("a", "b"),
                         tasks=("a", "b"), episode_rows=torch.zeros(2, dtype=torch.long),
                         frame_ids=torch.zeros(2, dtype=torch.long), goal_frame_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch images must be uint8"):
        filt.loss(batch)
    with pytest.raises(ValueError, match="encoder_size"):
        tiny_config(encoder_size=4)
    with pytest.raises(TypeError, match="text_encoder"):
        tiny_config(text_encoder="minilm")


# -- presets and the recipe -------------------------------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["recipe=filter", *overrides])


def test_small_preset_is_the_config_default_and_fits_10_mb():
    cfg = _compose("filter=ghil_glue_small")
    assert instantiate(cfg.filter.config, _convert_="all") == GhilGlueFilterConfig()
    filt = GhilGlueFilter(GhilGlueFilterConfig())  # MiniLM-sized FiLM layers (384-d); the encoder loads lazily
    n_bytes = sum(t.numel() * t.element_size() for t in filt.state_dict().values())
    assert n_bytes <= 10e6, n_bytes
    tiny = instantiate(_compose("filter=ghil_glue_tiny", "text_encoder=hash").filter, _convert_="all")
    assert isinstance(tiny, GhilGlueFilter) and tiny.config.image_size == 32


def test_recipe_builds_a_setup_from_the_filters_settings(data_root):
    filt = tiny_filter()
    setup = FilterRecipe(filt, {"root": str(data_root), "camera": "rgb_gripper", "image_size": 99}).build()
    assert setup.model is filt and setup.val_dataset is not None and setup.fit_statistics is None
    assert setup.dataset.config.camera == "rgb_static" and setup.dataset.config.image_size == SIZE  # the filter's
    assert setup.fingerprint["model"]["type"] == "ghil_glue"
    assert setup.fingerprint["data"]["root"] == str(data_root.resolve())
    batch = setup.collate_fn([setup.dataset[i] for i in range(4)])
    loss, _ = filt.loss(batch)
    assert torch.isfinite(loss)
    assert "agent=ghil_glue" in setup.eval_command("runs/f/checkpoints/last")


def test_ghil_train_recipe_filter_end_to_end(data_root, tmp_path):
    from ghil.train import run

    out_dir = tmp_path / "run"
    common = ["text_encoder=hash", f"data.root={data_root}", "train.total_steps=2", "train.batch_size=8",
              "train.warmup_steps=1", "train.ckpt_every=2", "train.num_workers=0", "train.progress=false",
              "train.tensorboard=false", "train.val_every=2", "train.val_batches=1", "threads=1"]
    # The frame size is checked before anything is written.
    with pytest.raises(ValueError, match="filter.config.image_size=32"):
        run(_compose("filter=ghil_glue_tiny", "filter.config.image_size=64", f"train.out_dir={out_dir}", *common))
    assert not out_dir.exists()
    out = run(_compose("filter=ghil_glue_tiny", f"train.out_dir={out_dir}", *common))
    filt = load_pretrained(out / "checkpoints" / "last")
    assert isinstance(filt, GhilGlueFilter) and filt.config == dataclasses.replace(filt.config, image_size=SIZE)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/acc_reversed" in m for m in metrics) and any("val/loss" in m for m in metrics)
    scores = filt.score(obs_with(frame(3, TASKS["open_drawer"][1])),
                        np.stack([frame(9, TASKS["open_drawer"][1]), frame(1, TASKS["open_drawer"][1])]),
                        "open the drawer")
    assert scores.shape == (2,) and np.isfinite(scores).all()
