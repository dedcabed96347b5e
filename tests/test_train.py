"""Trainer: a tiny run saves checkpoints, resumes exactly after a stop, overfits a handful of transitions; the
`ghil train` entry composes and runs end to end on a synthetic CALVIN-format dataset through its policy recipe;
short runs work with the default warm-up, the default sampler is shortcut, the end names the checkpoint and its
`ghil eval` command, frame sizes are checked before any folder exists, and a resume with other model or data
settings is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _policy_fixtures import tiny_config, write_synthetic_dataset
from hydra import compose, initialize_config_dir

from ghil.checkpoint import load_pretrained
from ghil.cli import CONFIG_DIR
from ghil.nn.augment import AugmentConfig
from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset, collate_policy, compute_policy_stats
from ghil.train import TrainConfig, Trainer, latest_checkpoint
from ghil.types import Observation
from policies.ddim import DDIMConfig
from policies.dit import DiTPolicy
from policies.shortcut import ShortcutConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic")


def make(data_root: Path, sampler, **overrides) -> tuple[DiTPolicy, PolicyDataset]:
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(**overrides), sampler)
    cfg = policy.config
    ds = PolicyDataset(PolicyDataConfig(root=str(data_root), lang_only=cfg.use_language), cfg.cameras,
                       cfg.goal_camera if cfg.use_goal else None, policy.space.dataset_key, cfg.chunk_len)
    stats = compute_policy_stats(ds, ("robot_obs", policy.space.dataset_key))
    policy.fit_normalizer(stats)
    return policy, ds


def train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), total_steps=4, batch_size=4, warmup_steps=1, ckpt_every=2, log_every=1,
                progress=False, tensorboard=False, lr=1e-3, num_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def test_dataset_samples_chunks_goals_and_masks(data_root):
    policy, ds = make(data_root, DDIMConfig())
    assert len(ds) == 24
    last = ds[11]  # final frame of episode 0: one real action, three padded
    assert last["actions"].shape == (4, 7) and last["action_mask"].tolist() == [True, False, False, False]
    assert last["goal"].shape == (32, 32, 3) and last["instruction"] is None
    batch = collate_policy([ds[i] for i in range(3)])
    assert batch.images["rgb_static"].dtype == torch.uint8 and batch.actions.shape == (3, 4, 7)


@pytest.mark.parametrize("sampler", [DDIMConfig(), ShortcutConfig()], ids=["ddim", "shortcut"])
def test_resume_after_stop_equals_straight_run(data_root, tmp_path, sampler):
    policy, ds = make(data_root, sampler)
    Trainer(policy, ds, train_cfg(tmp_path / "straight"), collate_policy).fit()
    straight = {k: v.clone() for k, v in policy.state_dict().items()}

    policy, ds = make(data_root, sampler)
    Trainer(policy, ds, train_cfg(tmp_path / "resumed"), collate_policy).fit(stop_at=2)  # "killed" after step 2
    ckpt = latest_checkpoint(tmp_path / "resumed")
    assert ckpt.name == "step_0000002" and (ckpt / "training_state" / "optimizer.safetensors").exists()
    fresh, ds = make(data_root, sampler)  # a new process: fresh weights, then resume
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # prove the checkpoint, not the constructor, provides the weights
    trainer = Trainer(fresh, ds, train_cfg(tmp_path / "resumed"), collate_policy)
    trainer.fit()
    assert trainer.step == 4
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, straight[k]), k
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(np.isfinite(x["train/loss"]) for x in lines)
    shipped = load_pretrained(latest_checkpoint(tmp_path / "resumed"))  # the EMA weights, loadable alone
    assert isinstance(shipped, DiTPolicy)


def test_overfits_a_handful_of_transitions(data_root, tmp_path):
    # x0-prediction DDIM memorises four (observation, goal) -> chunk pairs in a few hundred steps; epsilon
    # prediction gets there too, only more slowly than a unit test should take.
    policy, ds = make(data_root, DDIMConfig(n_inference_steps=4, prediction_type="sample"), dropout=0.0, token_dropout=0.0,
                      proprio_dropout=0.0, augment=AugmentConfig(enabled=False))
    subset = torch.utils.data.Subset(ds, [0, 3, 6, 9])
    trainer = Trainer(policy, subset, train_cfg(tmp_path / "overfit", total_steps=200, ckpt_every=200, log_every=50,
                                                lr=3e-3, warmup_steps=10, ema_decay=None), collate_policy)
    first = policy.loss(collate_policy([subset[i] for i in range(4)]))[0].item()
    trainer.fit()
    policy.eval()
    errors, grip_errors = [], []
    for i in range(4):
        s = subset[i]
        obs = Observation(images=s["images"], proprio=s["proprio"], t=0)
        pred = policy.predict_chunk(obs, s["goal"], generator=torch.Generator().manual_seed(0)).actions
        errors.append(float((pred[:, :6] - torch.as_tensor(s["actions"][:, :6])).abs().mean()))
        grip_errors.append(float((pred[:, 6] != torch.as_tensor(s["actions"][:, 6])).float().mean()))
    last = json.loads((tmp_path / "overfit" / "metrics.jsonl").read_text().splitlines()[-1])["train/loss"]
    assert last < 0.3 * first, (first, last)
    assert np.mean(errors) < 0.15, errors
    assert grip_errors == [0.0] * 4, grip_errors


def test_ghil_train_entry_point(data_root, tmp_path):
    from ghil.train import run

    overrides = ["policy=dit_tiny", "sampler=shortcut", "text_encoder=hash", f"data.root={data_root}",
                 f"train.out_dir={tmp_path / 'run'}", "train.total_steps=2", "train.batch_size=4",
                 "train.warmup_steps=1", "train.ckpt_every=2", "train.num_workers=0", "train.progress=false",
                 "threads=1"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    out = run(cfg)
    assert (out / "config.yaml").exists() and json.loads((out / "run.json").read_text())["git_commit"]
    assert list((out / "tensorboard").iterdir())
    policy = load_pretrained(out / "checkpoints" / "last")
    assert policy.normalizer.is_fitted and policy.sampler.config.n_inference_steps == 2


def test_validation_loss_is_fixed_and_leaves_training_unchanged(data_root, tmp_path):
    """val/loss: same weights -> same number (fixed samples and noise); training with validation on gives the same
    weights as without (the training RNG is forked)."""
    results = {}
    for name, val_every in (("plain", None), ("validated", 2)):
        policy, ds = make(data_root, ShortcutConfig())
        trainer = Trainer(policy, ds, train_cfg(tmp_path / name, val_every=val_every, val_batches=2),
                          collate_policy, val_dataset=ds if val_every else None)
        metrics = trainer.fit()
        results[name] = (policy.state_dict(), metrics, trainer)
    plain, validated = results["plain"][0], results["validated"][0]
    assert all(torch.equal(plain[k], validated[k]) for k in plain)
    trainer = results["validated"][2]
    first, again = trainer.validate(), trainer.validate()
    assert first == again and np.isfinite(first["val/loss"]) and "val/loss" in results["validated"][1]
    logged = [json.loads(line) for line in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "val/loss" in row] == [2, 4]
    with pytest.raises(ValueError, match="val_every"):
        train_cfg(tmp_path / "bad", val_every=0)


def test_init_from_copies_weights_and_statistics_and_refuses_other_configs(data_root, tmp_path):
    from ghil.checkpoint import CheckpointError
    from ghil.train import init_from_checkpoint, run

    source, _ = make(data_root, ShortcutConfig())
    source.save_pretrained(tmp_path / "source")
    torch.manual_seed(1)
    fresh = DiTPolicy(tiny_config(), ShortcutConfig())
    assert not fresh.normalizer.is_fitted
    init_from_checkpoint(fresh, tmp_path / "source")
    theirs = source.state_dict()
    assert fresh.normalizer.is_fitted and all(torch.equal(v, theirs[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(CheckpointError, match="configuration differs"):
        init_from_checkpoint(DiTPolicy(tiny_config(width=48, n_heads=2), ShortcutConfig()), tmp_path / "source")
    with pytest.raises(CheckpointError, match="configuration differs"):
        init_from_checkpoint(DiTPolicy(tiny_config(), DDIMConfig()), tmp_path / "source")

    # Through `ghil train`: a new run from the first run's weights; with a negligible learning rate its checkpoint
    # equals the first run's (a fresh initialisation would not come close).
    common = ["policy=dit_tiny", "sampler=shortcut", "text_encoder=hash", f"data.root={data_root}",
              "train.batch_size=4", "train.warmup_steps=0", "train.num_workers=0", "train.progress=false",
              "train.tensorboard=false", "threads=1"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        first = run(compose("train", overrides=[*common, f"train.out_dir={tmp_path / 'first'}",
                                                "train.total_steps=2", "train.ckpt_every=2"]))
        second = run(compose("train", overrides=[*common, f"train.out_dir={tmp_path / 'second'}",
                                                 "train.total_steps=1", "train.ckpt_every=1", "train.lr=1e-12",
                                                 f"init_from={first / 'checkpoints' / 'last'}"]))
    a = load_pretrained(first / "checkpoints" / "last").state_dict()
    b = load_pretrained(second / "checkpoints" / "last").state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


# -- `ghil train`: recipes, short runs, defaults, the final message, data checks, resume checks ---------------------

TINY = ["policy=dit_tiny", "text_encoder=hash", "train.batch_size=4", "train.num_workers=0", "train.progress=false",
        "train.tensorboard=false", "threads=1"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_resume_refuses_changed_model_or_data_settings(data_root, tmp_path, caplog):
    """Issue 10.7: re-running a run_name with another n_heads (same tensor shapes) or another data.root used to
    continue silently; now the resume is refused with the changed keys named, and train.resume=force continues."""
    from ghil.checkpoint import CheckpointError
    from ghil.train import run

    other_root = write_synthetic_dataset(tmp_path / "other_data", seed=1)
    common = [*TINY, f"data.root={data_root}", f"train.out_dir={tmp_path / 'run'}", "train.total_steps=4",
              "train.ckpt_every=2", "train.warmup_steps=0", "train.val_every=null"]
    run(compose_train([*common, "stop_at=2"]))  # "killed" after step 2
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    with pytest.raises(CheckpointError, match=r"n_heads: 2 -> 4") as err:
        run(compose_train([*common, "policy.config.n_heads=4"]))
    assert "train.resume=force" in str(err.value) and "data.root" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"data\.root: .*other_data"):
        run(compose_train([*common, f"data.root={other_root}"]))
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"  # nothing was trained by the refused runs
    run(compose_train(common))  # the same settings resume
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    caplog.set_level("WARNING")
    run(compose_train([*common, "train.total_steps=6", "policy.config.n_heads=4", "train.resume=force"]))
    assert latest_checkpoint(tmp_path / "run").name == "step_0000006"
    assert "n_heads: 2 -> 4" in caplog.text


def test_trainer_resume_checks_the_fingerprint_and_force_continues(data_root, tmp_path):
    from ghil.checkpoint import CheckpointError

    policy, ds = make(data_root, ShortcutConfig())
    Trainer(policy, ds, train_cfg(tmp_path / "r"), collate_policy, fingerprint={"data": {"root": "a"}}).fit(stop_at=2)
    with pytest.raises(CheckpointError, match=r"data\.root: 'a' -> 'b'"):
        Trainer(policy, ds, train_cfg(tmp_path / "r"), collate_policy, fingerprint={"data": {"root": "b"}}).fit()
    trainer = Trainer(policy, ds, train_cfg(tmp_path / "r", resume="force"), collate_policy,
                      fingerprint={"data": {"root": "b"}})
    trainer.fit()
    assert trainer.step == 4
    stored = json.loads((latest_checkpoint(tmp_path / "r") / "training_state" / "fingerprint.json").read_text())
    assert stored == {"data": {"root": "b"}}  # the forced run's settings are what later resumes must match
    with pytest.raises(ValueError, match="resume"):
        train_cfg(tmp_path / "bad", resume="yes")


def test_short_run_with_default_warmup_default_sampler_and_final_message(data_root, tmp_path, caplog):
    """A 3-step run with the default warm-up (500) trains (the warm-up is capped at total_steps // 10, noted in the
    log); the default sampler is shortcut; the end names the checkpoint and the command that evaluates it."""
    from ghil.train import run

    assert TrainConfig(out_dir="x", total_steps=3).effective_warmup_steps == 0
    assert TrainConfig(out_dir="x", total_steps=1000).effective_warmup_steps == 100
    assert TrainConfig(out_dir="x", total_steps=20000).effective_warmup_steps == 500
    cfg = compose_train([*TINY, f"data.root={data_root}", f"train.out_dir={tmp_path / 'short'}",
                         "train.total_steps=3", "train.val_every=null"])
    assert cfg.train.warmup_steps == 500 and cfg.sampler._target_ == "policies.shortcut.ShortcutConfig"
    caplog.set_level("INFO")
    out = run(cfg)
    last = out / "checkpoints" / "last"
    assert last.resolve().name == "step_0000003"
    assert isinstance(load_pretrained(last).sampler.config, ShortcutConfig)
    assert "warm-up capped" in caplog.text
    assert str(out / "checkpoints" / "step_0000003") in caplog.text
    assert f"ghil eval agent=oracle_subgoal_policy agent.policy.path={last}" in caplog.text
    assert "final checkpoint" in (out / "train.log").read_text()


def test_policy_recipe_builds_a_setup_and_names_the_agent_that_evaluates_it(data_root):
    from hydra.utils import instantiate

    from ghil.interfaces import TrainingRecipe
    from ghil.train import TrainingSetup
    from policies.recipe import PolicyRecipe

    cfg = compose_train([*TINY, f"data.root={data_root}", "policy.config.use_goal=false",
                         "policy.config.use_language=true", "data.lang_only=true"])
    recipe = instantiate(cfg.recipe, _convert_="all")
    assert isinstance(recipe, PolicyRecipe) and isinstance(recipe, TrainingRecipe)
    setup = recipe.build()
    assert isinstance(setup, TrainingSetup) and len(setup.dataset) > 0 and setup.val_dataset is None  # no split
    assert "agent=flat_policy" in setup.eval_command("runs/x/checkpoints/last")
    assert setup.fingerprint["data"]["root"] == str(Path(data_root).resolve())
    assert setup.fingerprint["model"]["init"]["config"]["use_language"] is True
    assert not setup.model.normalizer.is_fitted
    setup.fit_statistics()
    assert setup.model.normalizer.is_fitted


def test_frame_sizes_are_checked_before_the_run_folder_exists(data_root, tmp_path):
    """dit_small expects 200/84-px frames; on 32-px data `ghil train` stops before creating anything, naming the
    `ghil collect` settings that make matching data."""
    import subprocess
    import sys

    from ghil.train import run

    with pytest.raises(ValueError, match=r"ghil collect env\.static_size=200 env\.gripper_size=84"):
        run(compose_train(["policy=dit_small", f"data.root={data_root}", f"train.out_dir={tmp_path / 'a'}"]))
    assert not (tmp_path / "a").exists()
    # Through the CLI (Hydra creates its run folder before the app runs unless told otherwise).
    proc = subprocess.run([sys.executable, "-m", "ghil.cli", "train", "policy=dit_tiny", "policy.config.image_sizes=[64,64]",
                           "text_encoder=hash", f"data.root={data_root}", f"train.out_dir={tmp_path / 'b'}", "threads=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ghil collect env.static_size=64 env.gripper_size=64" in proc.stdout + proc.stderr
    assert not (tmp_path / "b").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


class _Recorder(torch.nn.Module):
    """The smallest Learnable: records what attach_ema received."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.attached = []

    def loss(self, batch):
        return ((self.w - batch) ** 2).mean(), {}

    def save_pretrained(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)

    def attach_ema(self, ema):
        self.attached.append(ema)


def test_trainer_always_attaches_ema_or_none_and_holds_no_policy_code(tmp_path):
    data = [torch.ones(3) for _ in range(8)]
    with_ema = Trainer(_Recorder(), data, train_cfg(tmp_path / "a"), torch.stack)
    assert with_ema.model.attached == [with_ema.ema.model]
    without = Trainer(_Recorder(), data, train_cfg(tmp_path / "b", ema_decay=None), torch.stack)
    assert without.model.attached == [None]
    source = (Path(__file__).resolve().parents[1] / "ghil" / "train.py").read_text()
    for name in ("PolicyDataset", "collate_policy", "compute_policy_stats", "from policies", "import policies",
                 "hasattr(model"):
        assert name not in source, name


@pytest.mark.parametrize("damaged", ["training_state/model.safetensors", "training_state/optimizer.safetensors",
                                     "training_state/rng_0.safetensors", "model.safetensors"])
def test_resume_refuses_a_damaged_state_file(data_root, tmp_path, damaged):
    """Every file a resume reads is hash-checked: one flipped byte stops the resume, naming the file."""
    from ghil.checkpoint import CheckpointError

    policy, ds = make(data_root, ShortcutConfig())
    Trainer(policy, ds, train_cfg(tmp_path / "run"), collate_policy).fit(stop_at=2)
    file = latest_checkpoint(tmp_path / "run") / damaged
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # in the tensor data, past the safetensors header
    file.write_bytes(bytes(data))
    fresh, ds = make(data_root, ShortcutConfig())
    with pytest.raises(CheckpointError, match=r"modified or corrupted"):
        Trainer(fresh, ds, train_cfg(tmp_path / "run"), collate_policy).fit()
