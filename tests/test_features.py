"""Perception computed once (issue 11, option a): `ghil featurize`'s frozen-encoder token cache and training on it.

Tiny configs only: the cache build (views, determinism, layout), resume after a kill, invalidation (another
dataset state, encoder checkpoint or encoder setting; a corrupted file), the cached and the pixel path giving the
same loss on the same batch, and run-time prediction from pixels after frozen-encoder training.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from ghil.data import features as features_mod
from ghil.data.calvin_format import DatasetError
from ghil.data.features import FeatureSplit, StaleFeaturesError, build_features
from ghil.data.packed import build_pack
from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset, collate_policy
from ghil.nn.augment import AugmentConfig, resize
from policies.dit import DiTPolicy
from policies.recipe import PolicyRecipe
from policies.shortcut import ShortcutConfig
from tests._policy_fixtures import fake_stats, tiny_config, write_synthetic_dataset

K = 3
# float16 storage: a token differs from the float32 encoder output by at most half an ulp, 2**-11 relative.
TOKEN_RTOL = 2.0**-11


@pytest.fixture()
def setup(tmp_path):
    root = write_synthetic_dataset(tmp_path / "data", n_episodes=2, frames_per_episode=12)
    build_pack(root, "training")
    torch.manual_seed(0)
    encoder = DiTPolicy(tiny_config(), ShortcutConfig())
    encoder.fit_normalizer(fake_stats())
    ckpt = encoder.save_pretrained(tmp_path / "enc")
    return root, ckpt, encoder.eval()


def _build(root, ckpt, **kw):
    return build_features(root, "training", root / "packed", ckpt, n_views=K, **kw)


def _dataset(root, policy, view=None, features=True):
    cfg = PolicyDataConfig(root=str(root), cache=str(root / "packed"),
                           features=str(root / "features") if features else None)
    pc = policy.config
    return PolicyDataset(cfg, pc.cameras, pc.goal_camera, "rel_actions", pc.chunk_len, feature_view=view,
                         policy=policy if features else None)


def test_cache_holds_the_frozen_encoder_tokens_of_k_views(setup):
    root, ckpt, encoder = setup
    folder = _build(root, ckpt)
    feats = FeatureSplit.open(root, "training", root / "features", policy=encoder)
    assert feats.folder == folder and feats.n_views == K
    assert feats.manifest["encoder"]["weights_sha256"] == features_mod._checkpoint_sha(ckpt)
    pack = np.load(root / "packed" / "training" / "rgb_static.npy")
    n = len(pack)
    for cam in ("rgb_static", "rgb_gripper", "goal"):
        assert feats.arrays[cam].shape == (n, K, 1, 32) and feats.arrays[cam].dtype == np.float16
    # view 0 is the run-time (un-augmented) encoding, to float16 rounding
    x = torch.from_numpy(pack).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = encoder.camera_encoders["rgb_static"](resize(x, 32))
        want_goal = encoder.goal_encoder(resize(x, 32))
    torch.testing.assert_close(torch.from_numpy(np.array(feats.arrays["rgb_static"][:, 0])).float(), want,
                               rtol=TOKEN_RTOL, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(np.array(feats.arrays["goal"][:, 0])).float(), want_goal,
                               rtol=TOKEN_RTOL, atol=1e-6)
    # augmented views differ from view 0 and from each other, independently per camera and for the goal encoder
    a = feats.arrays["rgb_static"].astype(np.float32)
    assert not np.allclose(a[:, 1], a[:, 0]) and not np.allclose(a[:, 1], a[:, 2])
    # per-frame deterministic: a rebuild elsewhere, with another block size, is byte-identical
    other = build_features(root, "training", root / "packed", ckpt, root / "features2", n_views=K, block_frames=5)
    for key in ("rgb_static", "rgb_gripper", "goal"):
        assert np.array_equal(np.load(other / f"{key}.npy"), np.load(folder / f"{key}.npy"))


def test_cached_and_pixel_paths_give_the_same_loss(setup):
    root, ckpt, encoder = setup
    _build(root, ckpt)
    torch.manual_seed(1)
    policy = DiTPolicy(tiny_config(augment=AugmentConfig(enabled=False)), ShortcutConfig())
    policy.fit_normalizer(fake_stats())
    policy.load_image_encoders(encoder)
    policy.freeze_image_encoders()
    policy.train()
    pixels, cached = _dataset(root, policy, features=False), _dataset(root, policy, view=0)
    idx = [0, 3, 7, 11, 12, 20, 23]
    pb, cb = collate_policy([pixels[i] for i in idx]), collate_policy([cached[i] for i in idx])
    assert cb.images == {} and cb.goal is None and cb.features["rgb_static"].dtype == torch.float16
    assert torch.equal(pb.actions, cb.actions) and torch.equal(pb.proprio, cb.proprio)
    losses = []
    for batch in (pb, cb):
        torch.manual_seed(5)  # same noise, times and dropout masks
        losses.append(policy.loss(batch)[0])
    # Only the float16 storage of the tokens separates the two: measured |diff| 2.6e-6 on a loss of 1.178.
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    # with the pixel path's tokens rounded to float16 as well, the two are the same computation
    with torch.no_grad():
        tok = policy.image_tokens(policy._prepare(pb.images, pb.goal, train=False))
    for cam in policy.config.cameras:
        torch.testing.assert_close(cb.features[cam].float(), tok[cam], rtol=TOKEN_RTOL, atol=1e-6)
    torch.testing.assert_close(cb.goal_features.float(), tok["__goal__"], rtol=TOKEN_RTOL, atol=1e-6)
    # gradients reach the transformer, never the frozen encoders
    losses[1].backward()
    assert all(p.grad is None for p in policy.camera_encoders.parameters())
    assert policy.net.action_out.weight.grad is not None


def test_views_are_drawn_per_sample_seeded_by_epoch(setup):
    root, ckpt, encoder = setup
    _build(root, ckpt)
    ds = _dataset(root, encoder)
    first = [ds[i]["features"]["rgb_static"] for i in range(len(ds))]
    again = [ds[i]["features"]["rgb_static"] for i in range(len(ds))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    arr = ds.features.arrays["rgb_static"]
    used = {int(np.flatnonzero([np.array_equal(arr[i, v], first[i]) for v in range(K)])[0]) for i in range(len(ds))}
    assert used == set(range(K))  # every view is served
    ds.set_epoch(1)
    assert not all(np.array_equal(ds[i]["features"]["rgb_static"], first[i]) for i in range(len(ds)))


def test_killed_build_resumes_to_the_same_cache(setup, monkeypatch, tmp_path):
    root, ckpt, _ = setup
    whole = build_features(root, "training", root / "packed", ckpt, tmp_path / "whole", n_views=K, block_frames=4)
    real, calls = features_mod._encoded_block, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # probe, two blocks, then killed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "_encoded_block", dies)
    with pytest.raises(KeyboardInterrupt):
        _build(root, ckpt, block_frames=4)
    folder = root / "features" / "training"
    assert (folder / "progress.json").read_text().count('"frames_done": 8')
    with pytest.raises(StaleFeaturesError, match="incomplete.*ghil featurize .*encoder.path="):
        FeatureSplit.open(root, "training", root / "features")
    monkeypatch.setattr(features_mod, "_encoded_block", real)
    _build(root, ckpt, block_frames=4)
    for key in ("rgb_static", "rgb_gripper", "goal"):
        assert np.array_equal(np.load(folder / f"{key}.npy"), np.load(whole / f"{key}.npy"))
    FeatureSplit.open(root, "training", root / "features")


def test_stale_or_damaged_cache_is_refused(setup):
    root, ckpt, encoder = setup
    _build(root, ckpt)
    feats_dir = root / "features"
    # another encoder setting (image/encoder size) than the policy being trained
    other = DiTPolicy(tiny_config(encoder_sizes=(24, 24)), ShortcutConfig())
    with pytest.raises(StaleFeaturesError, match="encoder_sizes.*ghil featurize"):
        FeatureSplit.open(root, "training", feats_dir, policy=other)
    # another encoder checkpoint (retrained weights at the same path)
    feats = FeatureSplit.open(root, "training", feats_dir)
    retrained = DiTPolicy(tiny_config(), ShortcutConfig())
    retrained.fit_normalizer(fake_stats())
    retrained.save_pretrained(ckpt)
    with pytest.raises(StaleFeaturesError, match="weights .*ghil featurize .*encoder.path="):
        feats.check_encoder()
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    with pytest.raises(StaleFeaturesError):
        PolicyRecipe(policy, {"root": str(root), "cache": str(root / "packed"), "features": str(feats_dir),
                              "val_split": None}).build()
    _build(root, ckpt)  # rebuilds for the new weights
    FeatureSplit.open(root, "training", feats_dir).check_encoder()
    # a corrupted (truncated) file names the file
    path = feats_dir / "training" / "rgb_gripper.npy"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DatasetError, match="rgb_gripper.npy"):
        FeatureSplit.open(root, "training", feats_dir)
    # another dataset state (a frame rewritten or touched)
    _build(root, ckpt)
    frame = sorted((root / "training").glob("episode_*.npz"))[3]
    st = os.stat(frame)
    os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleFeaturesError, match="another state.*ghil featurize data.root="):
        FeatureSplit.open(root, "training", feats_dir)


def test_frozen_encoder_training_then_pixels_at_run_time(setup):
    root, ckpt, encoder = setup
    _build(root, ckpt)
    torch.manual_seed(2)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    setup_ = PolicyRecipe(policy, {"root": str(root), "cache": str(root / "packed"),
                                   "features": str(root / "features"), "val_split": None}).build()
    setup_.fit_statistics()
    enc_before = {k: v.clone() for k, v in policy.camera_encoders.state_dict().items()}
    for k, v in encoder.camera_encoders.state_dict().items():
        assert torch.equal(enc_before[k], v)  # the checkpoint's encoders
    assert not any(p.requires_grad for p in policy.camera_encoders.parameters())
    assert not any(p.requires_grad for p in policy.goal_encoder.parameters())
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    policy.train()
    ds = setup_.dataset
    for step in range(3):
        batch = collate_policy([ds[i] for i in range(step, len(ds), 3)])
        loss, _ = policy.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in policy.camera_encoders.state_dict().items():
        assert torch.equal(enc_before[k], v)  # stayed frozen
    # run time: pixels in, encoded once per step by the same frozen encoders as the cache's view 0
    policy.eval()
    view0 = _dataset(root, policy, view=0)
    pix = _dataset(root, policy, features=False)
    s, p = view0[5], pix[5]
    images = {c: torch.from_numpy(p["images"][c])[None] for c in policy.config.cameras}
    goal = torch.from_numpy(p["goal"])[None]
    proprio = torch.from_numpy(p["proprio"])[None]
    from_pixels = policy.encode_observation(images, goal, proprio)
    tokens = {c: torch.from_numpy(s["features"][c])[None].float() for c in policy.config.cameras}
    tokens["__goal__"] = torch.from_numpy(s["goal_features"])[None].float()
    with torch.no_grad():
        from_cache = policy._condition_from_tokens(tokens, proprio, None)
    torch.testing.assert_close(from_cache, from_pixels, rtol=1e-3, atol=1e-3)
    from ghil.types import Observation

    chunk = policy.predict_chunk(Observation(images={c: p["images"][c] for c in policy.config.cameras},
                                             proprio=p["proprio"], t=0), goal=p["goal"], n_steps=1)
    assert chunk.actions.shape == (policy.config.chunk_len, 7)
    assert dataclasses.is_dataclass(chunk)


def test_init_from_keeps_the_encoders_the_cache_was_made_with(setup, tmp_path, caplog):
    """`ghil train init_from=<other checkpoint> data.features=...`: the cached tokens were made by the featurize
    encoders, so those stay (frozen, with a warning); the rest of the model comes from init_from."""
    from ghil.train import init_from_checkpoint

    root, ckpt, encoder = setup
    _build(root, ckpt)
    torch.manual_seed(5)
    other = DiTPolicy(tiny_config(), ShortcutConfig())  # same settings, other weights
    other.fit_normalizer(fake_stats())
    other_path = other.save_pretrained(tmp_path / "other")
    torch.manual_seed(2)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    setup_ = PolicyRecipe(policy, {"root": str(root), "cache": str(root / "packed"),
                                   "features": str(root / "features"), "val_split": None}).build()
    init_from_checkpoint(setup_.model, other_path)
    with caplog.at_level("WARNING"):
        setup_.after_init_from()
    assert "differ from the ones the feature cache" in caplog.text
    for k, v in encoder.camera_encoders.state_dict().items():
        assert torch.equal(policy.camera_encoders.state_dict()[k], v)
    for k, v in other.net.state_dict().items():  # the transformer comes from init_from
        assert torch.equal(policy.net.state_dict()[k], v)
    assert policy.image_encoders_frozen
