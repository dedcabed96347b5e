"""``ghil train recipe=reasoner``: the samples (segments, composite instructions, SUBTASK after a success), train /
run-time consistency of the text and pixels, the tokenizer, a few steps lowering the loss, the saved folder loading
through the transformers path, and the CLI with resume, on a tiny synthetic labelled dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ghil.data.calvin_format import DatasetWriter, FrameSpec  # noqa: E402
from ghil.types import COMPOSITE_SEPARATOR, Observation  # noqa: E402
from planners.ecot_format import parse_reasoning  # noqa: E402

SPEC = FrameSpec(static_size=32, gripper_size=16)
TINY_MODEL = {"image_size": 16, "patch_size": 8, "vision_width": 16, "vision_layers": 1, "text_width": 32,
              "text_layers": 1, "heads": 2, "max_positions": 1024}
PHRASES = {"open_drawer": ["open the drawer", "pull the drawer open"], "lift_red": ["lift the red block"],
           "push_button": ["push the button", "press the button"]}
# One episode: open_drawer annotated 0-3 and done 4-5, a failed lift_red attempt 6-7 (never annotated),
# push_button annotated 8-10 and done 11, then lift_red annotated 12-13.
EPISODE = ([("open_drawer", True)] * 4 + [("open_drawer", False)] * 2 + [("lift_red", False)] * 2
           + [("push_button", True)] * 3 + [("push_button", False)] + [("lift_red", True)] * 2)


def _frame(rng, t):
    gripper = 1.0
    return {"actions": np.r_[rng.normal(size=6), gripper], "rel_actions": np.r_[rng.uniform(-1, 1, 6), gripper],
            "robot_obs": np.r_[rng.normal(size=14), gripper], "scene_obs": np.r_[float(t), rng.normal(size=23)],
            "rgb_static": np.full((32, 32, 3), 8 * t, np.uint8), "rgb_gripper": np.zeros((16, 16, 3), np.uint8),
            "depth_static": np.zeros((32, 32), np.float32), "depth_gripper": np.zeros((16, 16), np.float32),
            "joint_actions": np.r_[rng.normal(size=7), gripper]}


def _labels(seed):
    rng = np.random.default_rng(seed)
    out = []
    for t, (name, annotated) in enumerate(EPISODE):
        text = str(rng.choice(PHRASES[name])) if annotated else None
        out.append({"task": text, "task_name": name, "plan": [], "subtask": f"phase {t % 3}", "move": "move left",
                    "gripper": "open", "gripper_position": [float(t), 5.0],
                    "future_gripper_positions": [[float(t), 5.0], [float(t) + 1, 40.0]],  # 40: below the frame
                    "visible_objects": {"red block": [1, 2, 5 + t, 6], "button": [10, 10, 20, 20]}})
    return out


def _lang(labels):
    spans, start = [], None
    for t, label in enumerate(labels + [{"task": None}]):
        if label["task"] is not None and start is None:
            start = t
        if label["task"] is None and start is not None:
            spans.append((start, t - 1, labels[start]["task_name"], labels[start]["task"]))
            start = None
    return spans


def fake_encode(texts):
    return np.zeros((len(texts), 384), np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reasoner") / "ds"
    with DatasetWriter(root, spec=SPEC, metadata={"env": "playtable"}) as writer:
        for k, split in enumerate(("training", "training", "validation")):
            labels = _labels(k)
            frames = [_frame(np.random.default_rng([k, t]), t) for t in range(len(EPISODE))]
            writer.commit_episode(split, frames, _lang(labels), labels, episode_key=f"ep{k}")
        writer.finalize(encode=fake_encode)
    return root


def _recipe(root, **data):
    from planners.reasoner_recipe import ReasonerRecipe

    return ReasonerRecipe(TINY_MODEL, {"root": str(root), "vocab_size": 400, "tokenizer_samples": 200, **data})


@pytest.fixture(scope="module")
def setup(dataset):
    return _recipe(dataset).build()


def test_label_index_keeps_successful_attempts_and_marks_frames_after_the_success(dataset):
    from planners.reasoner_recipe import LabelIndex

    index = LabelIndex(dataset, "training")
    assert index.episode_segments == [["open_drawer", "push_button", "lift_red"]] * 2
    first = index.frame_ids < len(EPISODE)  # the first episode's frames
    assert index.frame_ids[first].tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]  # the failed attempt is out
    assert index.done[first].tolist() == [False] * 4 + [True] * 2 + [False] * 3 + [True] + [False] * 2
    assert index.canonical()["open_drawer"] in PHRASES["open_drawer"]


def test_samples_name_the_first_unfinished_part_and_parse_strictly(setup):
    ds = setup.dataset
    canonical = setup.model.info["subtasks"]
    seen_after_success = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ex = ds.example(i)
            reasoning = parse_reasoning(ex["text"], (32, 32), subtasks=canonical.values())
            parts = ex["instruction"].split(COMPOSITE_SEPARATOR)
            names = [next(n for n, ps in PHRASES.items() if p in ps) for p in parts]  # every part a dataset phrasing
            assert reasoning.task == ex["instruction"] and reasoning.plan == tuple(canonical[n] for n in names)
            assert ex["text"] == ex["head"] + ex["target"]
            assert ex["head"].startswith(f"TASK: {ex['instruction']}.")
            row = ex["row"]
            frame_task = ds.index.episode_segments[0][ds.index.segment_episode[ds.index.segments[row]][1]]
            position = names.index(frame_task) if frame_task in names else None
            assert position is not None
            if ds.index.done[row] and position + 1 < len(names):  # done: the next part is asked for
                assert reasoning.subtask == canonical[names[position + 1]]
                assert reasoning.subtask_reasoning.startswith(f"{position + 1} of {len(names)} done")
                seen_after_success += 1
            else:
                assert reasoning.subtask == canonical[frame_task]
            assert all(0 <= v < 32 for point in reasoning.gripper_position for v in point)  # clamped into the frame
    assert seen_after_success > 0


def test_samples_are_seeded_per_epoch_and_index(setup):
    ds = setup.dataset
    ds.set_epoch(3)
    first = [ds.example(i)["text"] for i in range(len(ds))]
    ds.set_epoch(0)
    ds.set_epoch(3)
    assert [ds.example(i)["text"] for i in range(len(ds))] == first
    ds.set_epoch(4)
    assert [ds.example(i)["text"] for i in range(len(ds))] != first


def test_the_pixel_cache_is_built_once_resumes_and_is_rebuilt_when_stale(setup, dataset):
    from planners.reasoner_recipe import pixel_cache

    ds = setup.dataset
    build = lambda: pixel_cache(ds.config, "training", ds.index, setup.model.processor, 16)  # noqa: E731
    path = ds.config.cache_dir / "training_rgb_static_16.npy"
    meta = path.with_suffix(".json")
    expected, stored = np.array(ds.pixels), json.loads(meta.read_text())
    before = path.stat().st_mtime_ns
    assert np.array_equal(build(), expected) and path.stat().st_mtime_ns == before  # kept, not rebuilt

    def scribble():
        array = np.load(path, mmap_mode="r+")
        array[:] = 0
        array.flush()
        del array

    scribble()
    meta.write_text(json.dumps({**stored, "done": 3}))  # a build killed after 3 frames resumes from there
    resumed = np.array(build())
    assert (resumed[:3] == 0).all() and np.array_equal(resumed[3:], expected[3:])
    assert json.loads(meta.read_text())["done"] == stored["n"]
    scribble()
    meta.write_text(json.dumps({**stored, "image_size": 99}))  # stale: rebuilt from the first frame
    assert np.array_equal(build(), expected)


def test_training_context_and_pixels_are_what_the_backend_feeds_the_model_at_run_time(setup, dataset):
    from ghil.data.calvin_dataset import CalvinDataset
    from planners.reasoner import ecot_prompt
    from planners.vlm_backend import prompt_text

    ds, processor = setup.dataset, setup.model.processor
    frames = CalvinDataset(dataset, "training", keys=())
    for i in (0, 5, 11):
        ex, sample = ds.example(i), ds[i]
        frame = frames.read_frame(ex["frame_id"], ("rgb_static",))["rgb_static"]
        text = prompt_text(processor, "chat", ecot_prompt(ex["instruction"]), ex["head"])
        inputs = processor(images=[[frame]], text=[text], return_tensors="np")
        assert sample["input_ids"][:sample["n_context"]] == inputs["input_ids"][0].tolist()
        np.testing.assert_allclose(sample["pixel_values"], inputs["pixel_values"][0], atol=2e-3)  # float16 cache
        answer = processor.tokenizer.decode(sample["input_ids"][sample["n_context"]:], skip_special_tokens=True)
        assert answer == ex["target"]


def test_the_tokenizer_round_trips_and_spends_one_token_per_frequent_coordinate(setup):
    tok = setup.model.processor.tokenizer
    ds = setup.dataset
    for i in range(len(ds)):
        text = ds.example(i)["text"]
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok(" [10,", add_special_tokens=False)["input_ids"]) == 1
    text = ds.example(0)["text"]
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text) / 3  # words and coordinates, not bytes


def test_collate_masks_everything_but_the_answer(setup):
    from planners.reasoner_recipe import IGNORE

    samples = [setup.dataset[i] for i in range(3)]
    batch = setup.collate_fn(samples)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert (batch["labels"][b, :s["n_context"]] == IGNORE).all() and (batch["labels"][b, n:] == IGNORE).all()
        assert batch["labels"][b, s["n_context"]:n].tolist() == s["input_ids"][s["n_context"]:]
        assert batch["attention_mask"][b].sum() == n
    assert batch["pixel_values"].shape == (3, 3, 16, 16)


def test_a_few_steps_lower_the_loss_and_the_saved_folder_loads_through_transformers(setup, tmp_path):
    from planners.reasoner import VLMReasoner
    from planners.vlm_backend import TransformersVLM

    model = setup.model
    torch.manual_seed(0)
    batch = setup.collate_fn([setup.dataset[i] for i in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, metrics = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0] and 0 <= metrics["token_accuracy"] <= 1
    folder = model.save_pretrained(tmp_path / "reasoner")
    assert json.loads((folder / "ghil_reasoner.json").read_text())["force_task"] is True
    backend = TransformersVLM(str(folder), max_new_tokens=60, local_files_only=True)
    assert backend.force_task and set(backend.subtasks) == set(model.info["subtasks"].values())
    reasoner = VLMReasoner(backend)
    assert reasoner.force_task and reasoner.subtasks == backend.subtasks
    image = np.zeros((32, 32, 3), np.uint8)
    reasoning = reasoner.reason(Observation(images={"rgb_static": image}, proprio=np.zeros(15, np.float32), t=0,
                                            instruction="press the button"))
    # Barely trained: a parsed reasoning or the counted fallback, never an exception.
    assert reasoning.subtask in set(backend.subtasks) | {"press the button"}
    assert reasoner.n_full + reasoner.n_failures == 1


def test_the_recipe_refuses_a_dataset_without_labels(tmp_path):
    from ghil.data.calvin_format import DatasetError

    root = tmp_path / "nolabels"
    with DatasetWriter(root, spec=SPEC) as writer:
        frames = [_frame(np.random.default_rng(t), t) for t in range(4)]
        writer.commit_episode("training", frames, [(0, 3, "open_drawer", "open the drawer")], None, episode_key="e")
        writer.finalize(encode=fake_encode)
    with pytest.raises(DatasetError, match="ecot_labels"):
        _recipe(root).build()
    with pytest.raises(ValueError, match="max_parts"):
        _recipe(root, max_parts=0)


@pytest.mark.slow
def test_ghil_train_recipe_reasoner_trains_saves_and_resumes(dataset, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "ghil.cli", "train", "recipe=reasoner", f"data.root={dataset}",
            *[f"reasoner_model.{k}={v}" for k, v in TINY_MODEL.items()], "data.vocab_size=400",
            "data.tokenizer_samples=200", f"train.out_dir={out}", "train.batch_size=4", "train.ckpt_every=2",
            "train.val_every=2", "train.val_batches=1", "train.log_every=1", "train.tensorboard=false",
            "train.progress=false", "threads=1"]
    first = subprocess.run([*base, "train.total_steps=4", "stop_at=2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([*base, "train.total_steps=4"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resum" in (second.stdout + second.stderr).lower()
    last = out / "checkpoints" / "last"
    assert (last / "ghil_reasoner.json").exists() and (last / "config.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and 3 in steps
    from planners.vlm_backend import TransformersVLM

    assert TransformersVLM(str(last), local_files_only=True).subtasks
