"""Trainer: a tiny run saves checkpoints, resumes exactly after a stop, overfits a handful of transitions; the
`ghil train` entry composes and runs end to end on a synthetic CALVIN-format dataset."""

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
                progress=False, tensorboard=False, lr=1e-3)
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
