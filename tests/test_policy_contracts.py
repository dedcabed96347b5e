"""Contract tests for the DiT policy on tiny configs: shapes, finite loss + backward, adaLN-Zero identity, sampler
step counts, save -> load equality (atol=0, fixed noise), unmutated inputs, and clear errors on bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _policy_fixtures import fake_batch, fake_goal, fake_obs, fake_stats, tiny_config

from ghil.checkpoint import CheckpointError, load_pretrained
from ghil.interfaces import ChunkPolicy, Learnable
from ghil.types import Observation
from policies.ddim import DDIMConfig
from policies.dit import AdaLNZeroBlock, DiTConfig, DiTPolicy
from policies.shortcut import ShortcutConfig

torch.set_num_threads(1)

SAMPLERS = {"ddim": DDIMConfig(n_inference_steps=4), "shortcut": ShortcutConfig(n_inference_steps=2)}
VARIANTS = {
    "goal": {},
    "language_only": {"use_goal": False, "use_language": True},
    "goal_language_joint": {"use_language": True, "action_space": "joint_abs"},
    "one_camera_no_proprio": {"cameras": ("rgb_static",), "image_sizes": (32,), "encoder_sizes": (32,),
                              "use_proprio": False},
}


def make(variant: str = "goal", sampler: str = "ddim", seed: int = 0) -> DiTPolicy:
    torch.manual_seed(seed)
    config = tiny_config(**VARIANTS[variant])
    policy = DiTPolicy(config, SAMPLERS[sampler])
    policy.fit_normalizer(fake_stats(config.action_dim, policy.space.dataset_key))
    return policy


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_backward_and_chunk_shapes(variant, sampler):
    policy = make(variant, sampler)
    assert isinstance(policy, ChunkPolicy) and isinstance(policy, Learnable)
    batch = fake_batch(policy.config, b=4)
    before = {k: v.clone() for k, v in batch.images.items()}
    loss, metrics = policy.loss(batch)
    assert torch.isfinite(loss) and loss.ndim == 0 and metrics["loss"] == pytest.approx(float(loss.detach()))
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(before[k], batch.images[k]) for k in before)  # inputs untouched
    policy.eval()
    chunk = policy.predict_chunk(fake_obs(policy.config, t=7), fake_goal(policy.config))
    space = policy.space
    assert chunk.actions.shape == (policy.config.chunk_len, space.dim) and chunk.t0 == 7 and chunk.space == space.name
    assert torch.isfinite(chunk.actions).all()
    assert set(chunk.actions[:, space.gripper_index].tolist()) <= {-1.0, 1.0}
    if space.low is not None:
        assert chunk.actions.abs().max() <= 1.0


def test_adaln_zero_blocks_are_identity_at_init():
    block = AdaLNZeroBlock(width=32, n_heads=2, ffn_mult=2, dropout=0.0)
    x, c = torch.randn(3, 5, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c), x)
    policy = make()
    for blk in policy.net.blocks:
        assert torch.equal(blk(x, c), x)


@pytest.mark.parametrize("sampler, n_steps", [("ddim", 1), ("ddim", 3), ("ddim", 8), ("shortcut", 1),
                                              ("shortcut", 2), ("shortcut", 4), ("shortcut", 16)])
def test_sampler_uses_exactly_n_network_calls(sampler, n_steps):
    policy = make(sampler=sampler).eval()
    calls = []
    original = policy.net.forward
    policy.net.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    policy.predict_chunk(fake_obs(policy.config), fake_goal(policy.config), n_steps=n_steps)
    assert len(calls) == n_steps


@pytest.mark.parametrize("spacing, first", [("leading", 90), ("trailing", 99)])
def test_ddim_timestep_spacing_sets_where_sampling_starts(spacing, first):
    from policies.ddim import DDIMSampler

    sampler = DDIMSampler(DDIMConfig(timestep_spacing=spacing))
    seen = []
    sampler.sample(lambda x, t, k: seen.append(round(float(t[0]) * 100)) or torch.zeros_like(x),
                   torch.randn(2, 4, 7), n_steps=10)
    assert seen[0] == first and len(seen) == 10
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMConfig(timestep_spacing="random")


def test_invalid_step_counts_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        make(sampler="shortcut").predict_chunk(fake_obs(tiny_config()), fake_goal(tiny_config()), n_steps=3)
    with pytest.raises(ValueError, match="1..100"):
        make(sampler="ddim").predict_chunk(fake_obs(tiny_config()), fake_goal(tiny_config()), n_steps=0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_save_load_round_trip_is_exact(tmp_path, sampler):
    policy = make("goal_language_joint", sampler).eval()
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, DiTPolicy) and loaded.config == policy.config
    assert loaded.sampler.config == policy.sampler.config
    for k, v in policy.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    obs, goal = fake_obs(policy.config), fake_goal(policy.config)
    a = policy.predict_chunk(obs, goal, generator=torch.Generator().manual_seed(3)).actions
    b = loaded.predict_chunk(obs, goal, generator=torch.Generator().manual_seed(3)).actions
    assert torch.equal(a, b)


def test_bad_images_cameras_proprio_and_goal_give_clear_errors():
    policy = make().eval()
    cfg, goal = policy.config, fake_goal(policy.config)
    obs = fake_obs(cfg)
    with pytest.raises(KeyError, match="missing camera.*rgb_gripper"):
        policy.predict_chunk(Observation(images={"rgb_static": obs.images["rgb_static"]}, proprio=obs.proprio), goal)
    wrong_size = dict(obs.images, rgb_static=np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="rgb_static.*shape"):
        policy.predict_chunk(dataclasses.replace(obs, images=wrong_size), goal)
    wrong_dtype = dict(obs.images, rgb_gripper=np.zeros((32, 32, 3), np.float32))
    with pytest.raises(TypeError, match="rgb_gripper.*uint8"):
        policy.predict_chunk(dataclasses.replace(obs, images=wrong_dtype), goal)
    nan = obs.proprio.copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_chunk(dataclasses.replace(obs, proprio=nan), goal)
    with pytest.raises(ValueError, match="shape"):
        policy.predict_chunk(dataclasses.replace(obs, proprio=np.zeros(14)), goal)
    with pytest.raises(ValueError, match="no goal image"):
        policy.predict_chunk(obs, None)
    with pytest.raises(ValueError, match="goal.*shape"):
        policy.predict_chunk(obs, np.zeros((16, 16, 3), np.uint8))
    lang = make("language_only")
    with pytest.raises(ValueError, match="instruction"):
        lang.predict_chunk(dataclasses.replace(fake_obs(lang.config), instruction=None), None)
    with pytest.raises(ValueError, match="takes no goal"):
        lang.predict_chunk(fake_obs(lang.config), goal)


def test_corrupted_weights_never_yield_nan_actions():
    policy = make().eval()
    with torch.no_grad():
        policy.net.action_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        policy.predict_chunk(fake_obs(policy.config), fake_goal(policy.config))
    with pytest.raises(RuntimeError, match="never fitted"):
        DiTPolicy(tiny_config(), DDIMConfig()).predict_chunk(fake_obs(tiny_config()), fake_goal(tiny_config()))


def test_config_invariants():
    with pytest.raises(ValueError, match="exec_len"):
        tiny_config(exec_len=5, chunk_len=4)
    with pytest.raises(ValueError, match="goal_camera"):
        tiny_config(goal_camera="rgb_side")
    with pytest.raises(ValueError, match="unknown action space"):
        tiny_config(action_space="torque")
    with pytest.raises(ValueError, match="one entry per camera"):
        tiny_config(image_sizes=(32,))
    with pytest.raises(ValueError, match="power of two"):
        ShortcutConfig(n_inference_steps=3)
    assert DiTConfig().exec_len <= DiTConfig().chunk_len


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    make().save_pretrained(tmp_path / "a")
    other = DiTPolicy(tiny_config(width=48, n_heads=2), DDIMConfig())
    from ghil.checkpoint import load_state_strict, read_weights
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_strict(other, read_weights(tmp_path / "a" / "model.safetensors"), "a")
    lang = make("language_only")
    with pytest.raises(CheckpointError, match="missing keys.*goal_encoder|unexpected keys.*goal_encoder"):
        load_state_strict(lang, read_weights(tmp_path / "a" / "model.safetensors"), "a")
