"""SuSIE's generator and GHIL-Glue's filter in the policy's frozen encoder token space (planners/token_subgoals.py,
ghil/data/token_subgoal_dataset.py, planners/token_recipe.py), on a tiny synthetic dataset, a tiny DiT encoder
checkpoint and its `ghil featurize` cache: the dataset's pairs and views, the cache/encoder check and the recorded
encoder hash, the generator (loss, one batched guided call, guidance arithmetic, seeding, bad inputs), the filter
(negatives, scoring tokens and images alike), binding to the policy's token space (refused for other encoders; each
frame encoded once per step), the agent end to end (and a NaN generator output), exact save/load, `ghil train
recipe=token_generator|token_filter` through the CLI, the presets (== the dataclass defaults, <= 10 MB) and
``predict_chunk(goal_tokens=...)``.

The text encoder is the real MiniLM (the only one these configs take), loaded once for the module and shared.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _policy_fixtures import SIZE, fake_stats, tiny_config, write_synthetic_dataset
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import planners.token_subgoals as ts
from ghil.checkpoint import MODELS, load_pretrained
from ghil.data.calvin_format import EXPERT_CHUNK_KEY, EXPERT_GOAL_KEY, DatasetError, DatasetWriter, FrameSpec
from ghil.data.features import StaleFeaturesError, build_features, load_encoder_checkpoint
from ghil.data.packed import build_pack
from ghil.data.subgoal_dataset import SubgoalDataConfig, SubgoalDataset, resize_frames
from ghil.data.token_subgoal_dataset import (TokenSubgoalBatch, TokenSubgoalDataConfig, TokenSubgoalDataset,
                                             collate_token_subgoal)
from ghil.nn.augment import resize
from ghil.nn.encoders import MiniLMConfig
from ghil.normalizer import VectorStats
from ghil.paths import CONFIG_DIR
from ghil.runtime.policy_agent import PolicyAgent
from ghil.types import Observation
from planners.ghil_glue_filter import KINDS, FirstCandidate, negative_counts
from planners.image_generator import NonFiniteSubgoalError, dual_guidance
from planners.subgoals import GeneratedSubgoals
from planners.token_recipe import TOLERANCE, TokenFilterRecipe, TokenGeneratorRecipe, check_cache_encoder
from planners.token_subgoals import (TokenFilterConfig, TokenGeneratorConfig, TokenProgressFilter, TokenSpaceMismatch,
                                     TokenSubgoalGenerator, check_instruction)
from policies.ddim import DDIMConfig
from policies.dit import DiTPolicy
from policies.shortcut import ShortcutConfig

torch.set_num_threads(1)

TEXT = "open the drawer"
N_VIEWS = 3
W = 32  # the tiny policy's width: one (1, 32) token per frame and source
SOURCES = ("rgb_static", "rgb_gripper", "__goal__")


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def minilm():
    """One MiniLM for the whole module (it caches embeddings per string): every stage built here gets it."""
    real = ts.build_text_encoder
    encoder = real(MiniLMConfig())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ts, "build_text_encoder", lambda cfg: encoder if cfg == MiniLMConfig() else real(cfg))
        yield encoder


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A synthetic dataset (2 episodes x 12 frames, one annotated window each), its pack, a tiny DiT encoder
    checkpoint and its 3-view feature cache."""
    tmp = tmp_path_factory.mktemp("tokens")
    root = write_synthetic_dataset(tmp / "data")
    build_pack(root, "training")
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    policy.fit_normalizer(fake_stats())
    ckpt = policy.save_pretrained(tmp / "enc")
    build_features(root, "training", root / "packed", ckpt, n_views=N_VIEWS)
    torch.manual_seed(1)
    other = DiTPolicy(tiny_config(), ShortcutConfig())  # same settings, re-initialised encoders
    other.fit_normalizer(fake_stats())
    other_ckpt = other.save_pretrained(tmp / "other_enc")
    return SimpleNamespace(root=root, ckpt=ckpt, policy=policy.eval(), other=other.eval(), other_ckpt=other_ckpt,
                           tmp=tmp)


def data_config(space, **kw) -> TokenSubgoalDataConfig:
    base = dict(root=str(space.root), val_split=None, horizon=2, preview_size=16, augment=False)
    base.update(kw)
    return TokenSubgoalDataConfig(**base)


def gen_config(space, **kw) -> TokenGeneratorConfig:
    base = dict(encoder=str(space.ckpt), n_tokens=1, token_dim=W, frame_size=SIZE, horizon=2, width=32, depth=1,
                n_heads=2, time_dim=16, preview_size=16, preview_channels=(8, 8), preview_rows=4)
    base.update(kw)
    return TokenGeneratorConfig(**base)


def filter_config(space, **kw) -> TokenFilterConfig:
    base = dict(encoder=str(space.ckpt), n_tokens=1, token_dim=W, frame_size=SIZE, hidden=(32,), dropout=0.0)
    base.update(kw)
    return TokenFilterConfig(**base)


def make_generator(space, fit: bool = True, scramble: bool = True, sampler=None, **kw) -> TokenSubgoalGenerator:
    torch.manual_seed(0)
    gen = TokenSubgoalGenerator(gen_config(space, **kw), sampler or ShortcutConfig())
    if fit:
        ds = TokenSubgoalDataset(data_config(space, preview_size=0))
        arr = ds.arrays["__goal__"]
        gen.fit_normalizer({"goal_tokens": VectorStats.of(np.asarray(arr, np.float32).reshape(-1, W))})
    if scramble:  # adaLN-Zero blocks start as the identity: open their gates so the conditions matter
        with torch.no_grad():
            for block in gen.blocks:
                nn.init.normal_(block.gates[1].weight, std=0.3)
                nn.init.normal_(block.gates[1].bias, std=0.3)
    return gen.eval()


def make_filter(space, **kw) -> TokenProgressFilter:
    torch.manual_seed(0)
    filt = TokenProgressFilter(filter_config(space, **kw))
    with torch.no_grad():  # FiLM starts at zero: give the instruction a say
        for film in filt.films:
            nn.init.normal_(film.weight, std=0.1)
    return filt.eval()


def obs_at(t: int = 0, instruction: str | None = TEXT) -> Observation:
    rng = np.random.default_rng(100 + t)
    static = np.zeros((SIZE, SIZE, 3), np.uint8)
    static[:, : 2 + 2 * (t % 12)] = 200
    return Observation(images={"rgb_static": static,
                               "rgb_gripper": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)},
                       proprio=rng.normal(size=15).astype(np.float32), t=t, instruction=instruction)


def goal_tokens_of(policy: DiTPolicy, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return policy.goal_encoder(resize(x, policy.config.encoder_size[policy.config.goal_camera]))


def view_of(array: np.ndarray, row: int, value: np.ndarray) -> int:
    """Which cached view of ``array[row]`` equals ``value`` (float16 -> float32 exactly)."""
    hits = [v for v in range(array.shape[1]) if np.array_equal(np.asarray(array[row, v], np.float32), value)]
    assert hits, f"no cached view of row {row} equals the sample"
    return hits[0]


# -- 1. the dataset -----------------------------------------------------------------------------------------------


def test_dataset_pairs_are_subgoal_datasets_read_as_cached_tokens(space):
    for horizon in (2, (1, 5)):
        cfg = data_config(space, horizon=horizon)
        ds = TokenSubgoalDataset(cfg)
        pairs = SubgoalDataset(SubgoalDataConfig(root=str(space.root), horizon=horizon, image_size=16))
        assert len(ds) == len(pairs) == 24 and ds.sources == SOURCES and ds.token_shape == (1, W)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            pairs.set_epoch(epoch)
            for i in range(len(ds)):
                s, p = ds[i], pairs[i]
                assert (s["frame_id"], s["goal_frame_id"], s["instruction"], s["task"], s["episode_row"]) == \
                    (p["frame_id"], p["goal_frame_id"], p["instruction"], p["task"], p["episode_row"])
                row, goal_row = ds.row_of(s["frame_id"]), ds.row_of(s["goal_frame_id"])
                assert s["context"].shape == (3, 1, W) and s["context"].dtype == np.float32
                for j, source in enumerate(SOURCES):  # augment=False: view 0, the run-time encoding
                    assert np.array_equal(s["context"][j], np.asarray(ds.arrays[source][row, 0], np.float32))
                assert np.array_equal(s["goal"], np.asarray(ds.arrays["__goal__"][goal_row, 0], np.float32))
                assert s["preview"].dtype == np.uint8 and np.array_equal(s["preview"], p["goal"])
    assert ds[23]["goal_frame_id"] == 23  # clipped to the window's (the episode's) last frame
    packed = TokenSubgoalDataset(dataclasses.replace(cfg, cache=str(space.root / "packed")))  # `ghil pack` frames
    packed.set_epoch(1)
    for i in (0, 7, 23):
        a, b = ds[i], packed[i]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    batch = collate_token_subgoal([ds[i] for i in range(5)])
    assert isinstance(batch, TokenSubgoalBatch) and batch.batch_size == 5
    assert batch.context.shape == (5, 3, 1, W) and batch.goal.shape == (5, 1, W)
    assert batch.preview.shape == (5, 16, 16, 3) and batch.instructions == (TEXT,) * 5
    assert batch.frame_ids.tolist() == [0, 1, 2, 3, 4] and batch.to("cpu").batch_size == 5
    no_preview = TokenSubgoalDataset(data_config(space, preview_size=0))
    assert "preview" not in no_preview[0] and collate_token_subgoal([no_preview[0]]).preview is None
    with pytest.raises(ValueError, match="preview_size"):
        data_config(space, preview_size=-1)


def test_augmented_views_are_drawn_per_sample_and_source_deterministically(space):
    cfg = data_config(space, augment=True, seed=3)
    ds, again = TokenSubgoalDataset(cfg), TokenSubgoalDataset(cfg)

    def views(d):
        out = []
        for i in range(len(d)):
            s = d[i]
            row, goal_row = d.row_of(s["frame_id"]), d.row_of(s["goal_frame_id"])
            out.append(tuple(view_of(d.arrays[src], row, s["context"][j]) for j, src in enumerate(SOURCES))
                       + (view_of(d.arrays["__goal__"], goal_row, s["goal"]),))
        return out

    first = views(ds)
    assert first == views(again)  # a pure function of (seed, epoch, index)
    assert {v for vs in first for v in vs} == set(range(N_VIEWS))  # every view is served
    assert any(len(set(vs[:3])) > 1 for vs in first)  # the sources draw independently (de-synchronised)
    assert any(vs[2] != vs[3] for vs in first)  # the current frame and the goal too
    ds.set_epoch(1)
    assert views(ds) != first
    assert views(TokenSubgoalDataset(dataclasses.replace(cfg, seed=4))) != first


# -- 2. the cache belongs to the encoder; the recipe records its hash ------------------------------------------


def test_check_cache_encoder_and_the_recorded_encoder_hash(space):
    ds = TokenSubgoalDataset(data_config(space, preview_size=0))
    right, _ = load_encoder_checkpoint(space.ckpt)
    assert check_cache_encoder(ds, right) <= 2.0 ** -10  # float16 storage only
    wrong, _ = load_encoder_checkpoint(space.other_ckpt)
    with pytest.raises(StaleFeaturesError, match="other encoders.*ghil featurize"):
        check_cache_encoder(ds, wrong)
    assert TOLERANCE < 0.1

    gen = make_generator(space, fit=False, scramble=False)
    assert gen.config.encoder_sha256 is None
    setup = TokenGeneratorRecipe(gen, {"root": str(space.root), "val_split": None, "horizon": 7,
                                       "preview_size": 99}).build()
    sha = space.policy.encoder_sha256()
    assert len(sha) == 64 and sha != space.other.encoder_sha256()
    assert gen.config.encoder_sha256 == sha and gen.space.encoder_sha256 == sha
    assert setup.fingerprint["model"]["type"] == "susie_tokens"
    assert setup.fingerprint["model"]["init"]["config"]["encoder_sha256"] == sha  # a resume must match it
    assert setup.dataset.config.horizon == 2 and setup.dataset.config.preview_size == 16  # the generator's
    assert not gen.normalizer.is_fitted
    setup.fit_statistics()
    assert gen.normalizer.is_fitted
    batch = setup.collate_fn([setup.dataset[i] for i in range(4)])
    assert torch.isfinite(gen.loss(batch)[0])
    assert "agent.goals.generator.path=runs/x" in setup.eval_command("runs/x")

    filt = make_filter(space)
    fsetup = TokenFilterRecipe(filt, {"root": str(space.root), "val_split": None, "horizon": [1, 4]}).build()
    assert filt.config.encoder_sha256 == sha and fsetup.fit_statistics is None
    assert fsetup.dataset.config.preview_size == 0 and "preview" not in fsetup.dataset[0]

    # a model of another encoder checkpoint is refused before anything runs: the cache holds other tokens
    with pytest.raises(StaleFeaturesError, match="ghil featurize"):
        TokenGeneratorRecipe(make_generator(space, fit=False, encoder=str(space.other_ckpt)),
                             {"root": str(space.root), "val_split": None}).build()
    # ... one whose previews would not be the observations' frames
    with pytest.raises(ValueError, match=f"generator.config.frame_size={SIZE}"):
        TokenGeneratorRecipe(make_generator(space, fit=False, frame_size=64),
                             {"root": str(space.root), "val_split": None}).build()
    # ... and a config naming another hash than its checkpoint's
    stale = make_filter(space, encoder_sha256="0" * 64)
    with pytest.raises(StaleFeaturesError, match="sha256"):
        TokenFilterRecipe(stale, {"root": str(space.root), "val_split": None}).build()


def test_a_dagger_cache_of_expert_goal_tokens_is_refused(space):
    """A `ghil dagger` pack stores each frame's expert goal frame, and `ghil featurize` then encodes those as the
    goal tokens: row r is not frame r's goal-space token, so the token stages must not read it as one."""
    root = space.tmp / "dagger"
    spec = FrameSpec(static_size=SIZE, gripper_size=SIZE, depth=False, expert_chunk=2)
    rng = np.random.default_rng(0)
    with DatasetWriter(root, splits=("training",), spec=spec) as writer:
        frames = []
        for i in range(6):
            static = np.zeros((SIZE, SIZE, 3), np.uint8)
            static[:, : 2 + 2 * i] = 200
            frames.append({"actions": np.r_[rng.normal(size=6), 1.0], "rel_actions": np.r_[np.zeros(6), 1.0],
                           "robot_obs": np.r_[rng.normal(size=14), 1.0], "scene_obs": np.zeros(24),
                           "rgb_static": static, "rgb_gripper": np.zeros((SIZE, SIZE, 3), np.uint8),
                           "joint_actions": np.r_[np.zeros(7), 1.0],
                           EXPERT_CHUNK_KEY: np.tile(np.r_[np.zeros(6), 1.0], (2, 1)),
                           EXPERT_GOAL_KEY: np.full((SIZE, SIZE, 3), 250 - 30 * i, np.uint8)})
        writer.commit_episode("training", frames, lang=[(0, 5, "open_drawer", TEXT)], episode_key="ep0")
        writer.finalize()
    build_pack(root, "training")
    build_features(root, "training", root / "packed", space.ckpt, n_views=1)
    with pytest.raises(DatasetError, match="expert goal frames"):
        TokenSubgoalDataset(TokenSubgoalDataConfig(root=str(root), val_split=None, horizon=2, preview_size=0))


# -- 3. the generator -----------------------------------------------------------------------------------------


def _batch(space, n: int = 8, **kw) -> TokenSubgoalBatch:
    ds = TokenSubgoalDataset(data_config(space, **kw))
    return collate_token_subgoal([ds[i] for i in np.linspace(0, len(ds) - 1, n).astype(int)])


def test_generator_loss_is_finite_and_a_few_steps_lower_it(space):
    gen = make_generator(space, scramble=False, cond_drop_prob=0.0)
    batch = _batch(space)

    def fixed_loss() -> tuple[float, dict]:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same times, noise and bootstrap rows every time
            loss, metrics = gen.loss(batch)
            return float(loss.detach()), metrics

    gen.eval()
    before, metrics = fixed_loss()
    assert np.isfinite(before) and {"loss", "diffusion", "preview_mse", "flow_mse"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    gen.train()
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    for _ in range(30):
        loss, _ = gen.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    after, _ = fixed_loss()
    assert after < 0.7 * before, (before, after)
    no_preview = dataclasses.replace(batch, preview=None)
    assert "preview_mse" not in gen.loss(no_preview)[1]
    # the shortcut's self-consistency targets come from the attached EMA copy (the trainer's)
    ema = make_generator(space, scramble=False, cond_drop_prob=0.0)
    ema.load_state_dict(gen.state_dict())
    gen.attach_ema(ema)
    assert fixed_loss()[0] == after
    with torch.no_grad():
        ema.out.weight.mul_(3.0)
    assert fixed_loss()[0] != after
    gen.attach_ema(None)
    assert fixed_loss()[0] == after


def test_a_ddim_generator_trains_and_samples_in_one_batched_call_per_step(space, monkeypatch):
    gen = make_generator(space, sampler=DDIMConfig(n_inference_steps=3))
    assert gen.step_size is None
    gen.train()
    loss, metrics = gen.loss(_batch(space, n=4))
    loss.backward()
    assert torch.isfinite(loss) and "diffusion_mse" in metrics and gen.out.weight.grad is not None
    gen.eval()
    rows = []
    real = gen._denoise
    monkeypatch.setattr(gen, "_denoise", lambda x, t, k, context, text: (rows.append((len(x), k)),
                                                                          real(x, t, k, context, text))[1])
    tokens = gen.sample_tokens(_context(space), TEXT, 2, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 1, W) and torch.isfinite(tokens).all()
    assert rows == [(6, None)] * 3


def test_condition_dropout_zeroes_the_context_or_uses_the_empty_instruction(space, monkeypatch):
    gen = make_generator(space, cond_drop_prob=1 / 3)
    seen = []
    real = gen._denoise
    monkeypatch.setattr(gen, "_denoise", lambda x, t, k, context, text: (seen.append((context, text)),
                                                                          real(x, t, k, context, text))[1])
    batch = _batch(space)
    null = gen._text_embedding([""])[0]
    gen.train()
    gen.loss(batch)
    context, text = seen[-1]
    no_image = context.flatten(1).abs().sum(1) == 0
    no_text = (text == null).all(1)
    assert len(context) == 8 and (no_image | no_text).all()
    gen.eval()
    gen.loss(batch)
    context, text = seen[-1]
    assert (context.flatten(1).abs().sum(1) > 0).all() and not (text == null).all(1).any()


def _context(space, obs=None) -> torch.Tensor:
    tokens = space.policy.frame_tokens(obs or obs_at(3))
    return torch.stack([tokens[s][0] for s in SOURCES])[None]


def test_k_candidates_from_one_batched_call_per_step_with_dual_guidance(space, monkeypatch):
    gen = make_generator(space)
    ctx = _context(space)
    rows = []
    real = gen._denoise
    monkeypatch.setattr(gen, "_denoise", lambda x, t, k, context, text: (rows.append(len(x)),
                                                                          real(x, t, k, context, text))[1])
    tokens = gen.sample_tokens(ctx, TEXT, 4, n_steps=2)
    assert tokens.shape == (4, 1, W) and tokens.dtype == torch.float32
    assert rows == [3 * 4] * 2  # 4 candidates x 3 guidance branches, one network call per sampler step
    rows.clear()
    gen.sample_tokens(ctx, TEXT, 4, n_steps=4, image_guidance=1.0, text_guidance=1.0)
    assert rows == [4] * 4  # no guidance: the conditional branch alone
    monkeypatch.setattr(gen, "_denoise", real)

    # the guided prediction is InstructPix2Pix's formula over the three branches
    captured = {}
    real_sample = gen.sampler.sample
    monkeypatch.setattr(gen.sampler, "sample", lambda denoise, noise, n_steps=None: (
        captured.setdefault("denoise", denoise), real_sample(denoise, noise, n_steps))[1])
    gen.sample_tokens(ctx, TEXT, 3, image_guidance=2.0, text_guidance=3.5)
    g = torch.Generator().manual_seed(5)
    x, t, k = torch.randn(3, 1, W, generator=g), torch.full((3,), 0.25), torch.full((3,), 1)
    with torch.no_grad():
        out = captured["denoise"](x, t, k)
        text, null = gen._text_embedding([TEXT]).expand(3, -1), gen._text_embedding([""]).expand(3, -1)
        c3 = ctx.expand(3, -1, -1, -1)
        e_full = gen._denoise(x, t, k, c3, text)
        e_image = gen._denoise(x, t, k, c3, null)
        e_none = gen._denoise(x, t, k, torch.zeros_like(c3), null)
    assert not torch.allclose(e_full, e_image) and not torch.allclose(e_image, e_none)  # the conditions matter
    torch.testing.assert_close(out, dual_guidance(e_full, e_image, e_none, 2.0, 3.5), rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_propose_tokens_gives_tokens_and_previews(space):
    gen = make_generator(space)
    ctx = _context(space)
    gen.seed(7)
    a = gen.sample_tokens(ctx, TEXT, 3)
    gen.seed(7)
    assert torch.equal(gen.sample_tokens(ctx, TEXT, 3), a)
    gen.seed(8)
    assert not torch.equal(gen.sample_tokens(ctx, TEXT, 3), a)
    b = gen.sample_tokens(ctx, TEXT, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(b, a)  # an explicit generator is the seeded stream's equal
    assert not torch.allclose(a[0], a[1])  # the candidates differ
    o = obs_at(3)
    before = {k: np.array(v) for k, v in o.images.items()}
    gen.bind_policy(space.policy)
    tokens, previews = gen.propose_tokens(o, TEXT, 3, generator=torch.Generator().manual_seed(7))
    assert tokens.dtype == np.float32 and tokens.shape == (3, 1, W) and np.array_equal(tokens, a.numpy())
    assert previews.dtype == np.uint8 and previews.shape == (3, SIZE, SIZE, 3)
    with torch.no_grad():
        small = ((gen.preview(a).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(previews, resize_frames(small, SIZE).numpy())
    assert all(np.array_equal(before[k], o.images[k]) for k in before)  # inputs untouched
    assert gen.propose(o, TEXT, 2).shape == (2, SIZE, SIZE, 3)
    # unbound, the stage loads its encoder checkpoint itself: the same tokens
    unbound = make_generator(space)
    same, _ = unbound.propose_tokens(o, TEXT, 3, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(same, tokens, rtol=1e-5, atol=1e-6)
    # without a preview decoder the candidates show the current frame
    plain = make_generator(space, preview_size=0)
    plain.bind_policy(space.policy)
    _, frames = plain.propose_tokens(o, TEXT, 2)
    assert all(np.array_equal(f, o.images["rgb_static"]) for f in frames)


def test_generator_bad_inputs_raise_naming_the_problem(space):
    gen = make_generator(space)
    gen.bind_policy(space.policy)
    o, ctx = obs_at(3), _context(space)
    for text, match in [("", "empty"), ("   ", "empty"), (None, "string"), ("x" * 257, "too long")]:
        with pytest.raises(ValueError, match=match):
            gen.propose_tokens(o, text, 2)
        with pytest.raises(ValueError, match=match):
            gen.sample_tokens(ctx, text, 2)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_candidates"):
            gen.sample_tokens(ctx, TEXT, k)
        with pytest.raises(ValueError, match="n_candidates"):
            gen.propose_tokens(o, TEXT, k)
    for bad in (ctx[:, :2], ctx[..., :16], ctx[0], ctx.to(torch.int64)):
        with pytest.raises(ValueError, match="context must be float"):
            gen.sample_tokens(bad, TEXT, 2)
    nan = ctx.clone()
    nan[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gen.sample_tokens(nan, TEXT, 2)
    with pytest.raises(ValueError, match="power of two"):
        gen.sample_tokens(ctx, TEXT, 2, n_steps=3)
    with pytest.raises(ValueError, match="finite"):
        gen.sample_tokens(ctx, TEXT, 2, text_guidance=float("inf"))
    with pytest.raises(ValueError, match="Observation"):
        gen.propose_tokens({"rgb_static": o.images["rgb_static"]}, TEXT, 2)
    assert check_instruction(TEXT, 20) == TEXT
    unfitted = make_generator(space, fit=False)
    with pytest.raises(RuntimeError, match="normaliser"):
        unfitted.sample_tokens(ctx, TEXT, 2)
    with pytest.raises(RuntimeError, match="normaliser"):
        unfitted.loss(_batch(space, n=2))
    with torch.no_grad():
        gen.out.bias.fill_(float("nan"))  # corrupted weights
    with pytest.raises(NonFiniteSubgoalError, match="NaN/inf"):
        gen.propose_tokens(o, TEXT, 2)
    for kwargs, match in [(dict(width=30, n_heads=4), "divide"), (dict(sources=("rgb_static",)), "__goal__"),
                          (dict(cond_drop_prob=0.5), "cond_drop_prob"), (dict(preview_size=32), "preview_size"),
                          (dict(horizon=0), "horizon"), (dict(image_guidance=float("nan")), "image_guidance")]:
        with pytest.raises(ValueError, match=match):
            gen_config(space, **kwargs)


# -- 4. the filter ----------------------------------------------------------------------------------------------


def test_filter_loss_uses_the_papers_negatives_and_a_few_steps_lower_it(space, monkeypatch):
    filt = make_filter(space)
    batch = _batch(space, n=10, preview_size=0, horizon=(1, 4))
    plans = []
    real = ts.build_negatives
    monkeypatch.setattr(ts, "build_negatives", lambda *a, **kw: (plans.append(real(*a, **kw)), plans[-1])[1])
    loss, metrics = filt.loss(batch)
    plan = plans[-1]
    counts = negative_counts(10, filt.config.negatives)
    assert [int((plan.kind == k).sum()) for k in range(len(KINDS))] == [counts[k] for k in range(len(KINDS))]
    assert {"loss", "acc", *(f"acc_{name}" for name in KINDS)} <= set(metrics)
    # the loss is BCE over exactly that plan: current/goal rows of [current; goal], the donors' instructions
    stack = torch.cat([batch.context[:, -1], batch.goal])
    with torch.no_grad():
        text = filt.text_encoder()([batch.instructions[i] for i in plan.text.tolist()])
        logits = filt._logits(stack[plan.current], stack[plan.goal], text)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, plan.labels)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert (plan.current[plan.kind == 2] >= 10).all()  # reversed: the goal as the current frame

    def fixed_loss() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same negatives every time
            return float(filt.loss(batch)[0].detach())

    before = fixed_loss()
    filt.train()
    opt = torch.optim.AdamW(filt.parameters(), lr=3e-3)
    for _ in range(30):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            loss, _ = filt.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    filt.eval()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


class FixedTokens:
    """A token generator stub: fixed candidate tokens and their (distinct) previews."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.calls = 0

    def propose(self, obs, subtask, n_candidates):
        return self.propose_tokens(obs, subtask, n_candidates)[1]

    def propose_tokens(self, obs, subtask, n_candidates):
        self.calls += 1
        previews = np.stack([np.full((SIZE, SIZE, 3), 40 * (i + 1), np.uint8) for i in range(n_candidates)])
        return self.tokens[:n_candidates], previews


def test_filter_scores_token_candidates_and_the_argmax_is_kept(space, monkeypatch):
    filt = make_filter(space)
    filt.bind_policy(space.policy)
    o = obs_at(4)
    g = torch.Generator().manual_seed(0)
    tokens = (torch.randn(4, 1, W, generator=g) * 0.5).numpy()
    scores = filt.score_tokens(o, tokens, TEXT)
    assert scores.shape == (4,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert len(set(np.round(scores, 6))) == 4
    current = space.policy.frame_tokens(o)["__goal__"].expand(4, -1, -1)
    np.testing.assert_allclose(scores, filt.logits(current, torch.from_numpy(tokens), [TEXT] * 4).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(filt.score_tokens(o, tokens, "push the blue block left"), scores)  # the instruction counts
    # through GeneratedSubgoals: scored as tokens (never as previews), the argmax kept with its tokens
    monkeypatch.setattr(filt, "score", lambda *a: pytest.fail("a token filter scores token candidates as tokens"))
    goals = GeneratedSubgoals(FixedTokens(tokens), filt, n_candidates=4, replan_every=4)
    sub = goals.goal(o)
    assert sub.chosen == int(np.argmax(scores)) and np.allclose(sub.scores, scores)
    assert np.array_equal(sub.tokens, tokens[sub.chosen]) and sub.tokens.dtype == np.float32
    assert np.array_equal(sub.image, np.full((SIZE, SIZE, 3), 40 * (sub.chosen + 1), np.uint8))
    assert sub.candidates.shape == (4, SIZE, SIZE, 3)
    for bad, match in [(tokens[:, :, :16], "candidates must be float"), (tokens[0], "candidates must be float"),
                       (np.full_like(tokens, np.nan), "NaN")]:
        with pytest.raises(ValueError, match=match):
            filt.score_tokens(o, bad, TEXT)
    with pytest.raises(ValueError, match="empty"):
        filt.score_tokens(o, tokens, "")


def test_image_candidates_are_scored_as_their_goal_encoder_tokens(space):
    filt = make_filter(space)
    filt.bind_policy(space.policy)
    o = obs_at(5)
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    scores = filt.score(o, images, TEXT)
    want = filt.score_tokens(o, goal_tokens_of(space.policy, images).numpy(), TEXT)
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    clips = np.stack([images[[2, 1, 0]], images], axis=1)  # (3, 2, H, W, 3): scored on their last frames
    np.testing.assert_allclose(filt.score(o, clips, TEXT), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        filt.score(o, images[:, :16, :16], TEXT)  # not the camera's frame size


# -- 5. the token space ---------------------------------------------------------------------------------------


def test_binding_refuses_another_token_space_and_shares_each_frames_tokens(space):
    sha = space.policy.encoder_sha256()
    assert sha == DiTPolicy.from_pretrained(space.ckpt).encoder_sha256()  # a property of the weights
    gen = make_generator(space, encoder_sha256=sha)
    filt = make_filter(space, encoder_sha256=sha)
    for stage in (gen, filt):
        with pytest.raises(TokenSpaceMismatch, match="encoder"):
            stage.bind_policy(space.other)
        with pytest.raises(TokenSpaceMismatch, match="frame_tokens"):
            stage.bind_policy(object())
    goals = GeneratedSubgoals(gen, filt, n_candidates=3, replan_every=4)
    with pytest.raises(TokenSpaceMismatch):
        PolicyAgent(space.other, goals, exec_len=2)
    assert issubclass(TokenSpaceMismatch, ValueError)

    policy = DiTPolicy.from_pretrained(space.ckpt).eval()  # the right encoders, its own memo
    PolicyAgent(policy, goals, exec_len=2)  # binds both stages
    assert gen.space.policy is policy and filt.space.policy is policy
    calls = {"goal": 0, "rgb_static": 0, "rgb_gripper": 0}
    hooks = [policy.goal_encoder.register_forward_hook(lambda *a: calls.__setitem__("goal", calls["goal"] + 1))]
    for cam in ("rgb_static", "rgb_gripper"):
        hooks.append(policy.camera_encoders[cam].register_forward_hook(
            lambda *a, cam=cam: calls.__setitem__(cam, calls[cam] + 1)))
    try:
        o = obs_at(6)
        tokens, _ = gen.propose_tokens(o, TEXT, 3)
        scores = filt.score_tokens(o, tokens, TEXT)
        chunk = policy.predict_chunk(o, goal_tokens=tokens[int(np.argmax(scores))], n_steps=1)
        assert calls == {"goal": 1, "rgb_static": 1, "rgb_gripper": 1}  # each frame encoded once for all three
        assert chunk.actions.shape == (4, 7) and torch.isfinite(chunk.actions).all()
        gen.propose_tokens(obs_at(7), TEXT, 3)  # a new observation: encoded afresh
        assert calls == {"goal": 2, "rgb_static": 2, "rgb_gripper": 2}
    finally:
        for h in hooks:
            h.remove()


# -- 6. the agent end to end ----------------------------------------------------------------------------------


def _run(agent, steps, start=0):
    return [agent.act(obs_at(t)) for t in range(start, start + steps)]


def test_policy_agent_acts_on_token_subgoals_and_keeps_the_last_good_one(space, monkeypatch):
    policy = DiTPolicy.from_pretrained(space.ckpt).eval()
    gen, filt = make_generator(space), make_filter(space)
    sent = []
    real_predict = policy.predict_chunk
    monkeypatch.setattr(policy, "predict_chunk", lambda obs, goal=None, **kw: (
        sent.append(kw.get("goal_tokens")), real_predict(obs, goal, **kw))[1])
    goal_calls = []
    hook = policy.goal_encoder.register_forward_hook(lambda *a: goal_calls.append(1))
    goals = GeneratedSubgoals(gen, filt, n_candidates=3, replan_every=4)
    agent = PolicyAgent(policy, goals, exec_len=2, seed=0)
    agent.reset()
    actions = np.stack(_run(agent, 8))
    hook.remove()
    assert actions.shape == (8, 7) and np.isfinite(actions).all()
    assert (np.abs(actions) <= 1.0).all() and set(actions[:, 6].tolist()) <= {-1.0, 1.0}
    sub = agent.describe().subgoal
    assert goals.n_replans == 2 and sub.tokens is not None and sub.tokens.shape == (1, W)
    assert sub.candidates.shape == (3, SIZE, SIZE, 3) and sub.chosen == int(np.argmax(sub.scores))
    assert sub.source == "susie_tokens"
    assert len(sent) == 4 and all(s is not None for s in sent)  # the policy steers by the tokens
    assert np.array_equal(sent[-1], sub.tokens)
    assert len(goal_calls) == 4  # one goal-encoder pass per planned chunk: frame_tokens shared by all stages
    # the same seed, the same rollout
    again = PolicyAgent(DiTPolicy.from_pretrained(space.ckpt).eval(), GeneratedSubgoals(
        make_generator(space), make_filter(space), n_candidates=3, replan_every=4), exec_len=2, seed=0)
    again.reset()
    np.testing.assert_array_equal(np.stack(_run(again, 8)), actions)

    # a generator whose output turns NaN after the first replan: the previous subgoal is kept
    real_propose = gen.propose_tokens

    def nan_after_first(obs, subtask, n_candidates, **kw):
        tokens, previews = real_propose(obs, subtask, n_candidates, **kw)
        if goals.n_replans >= 1:
            tokens = np.full_like(tokens, np.nan)
        return tokens, previews

    monkeypatch.setattr(gen, "propose_tokens", nan_after_first)
    agent.reset()
    _run(agent, 4)  # t=0 replans (a good batch), t=2 holds
    kept = agent.describe().subgoal
    assert goals.n_replans == 1 and goals.n_rejected == 0 and np.isfinite(kept.tokens).all()
    later = np.stack(_run(agent, 4, start=4))  # t=4: NaN tokens, rejected; t=6: retried, rejected again
    assert goals.n_replans == 1 and goals.n_rejected == 2 and np.isfinite(later).all()
    assert agent.describe().subgoal is kept and np.array_equal(sent[-1], kept.tokens)
    # ... likewise when the generator itself reports NaN tokens (corrupted weights)
    monkeypatch.setattr(gen, "propose_tokens", real_propose)
    agent.reset()
    _run(agent, 2)
    with torch.no_grad():
        gen.out.bias.fill_(float("nan"))
    _run(agent, 4, start=2)  # t=4: NonFiniteSubgoalError inside the generator, the t=0 subgoal kept
    assert goals.n_replans == 1 and goals.n_rejected == 1 and np.isfinite(agent.describe().subgoal.tokens).all()


@pytest.mark.parametrize("name, filter_type, n_candidates", [("ghil_glue_tokens", TokenProgressFilter, 4),
                                                              ("susie_tokens", FirstCandidate, 1)])
def test_agent_configs_compose_the_token_hierarchy_from_checkpoints(space, tmp_path, name, filter_type, n_candidates):
    sha = space.policy.encoder_sha256()
    make_generator(space, encoder_sha256=sha).save_pretrained(tmp_path / "gen")
    make_filter(space, encoder_sha256=sha).save_pretrained(tmp_path / "filt")
    overrides = [f"agent={name}", f"agent.policy.path={space.ckpt}", f"agent.goals.generator.path={tmp_path / 'gen'}"]
    if filter_type is TokenProgressFilter:
        overrides.append(f"agent.goals.filter.path={tmp_path / 'filt'}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    agent = instantiate(cfg.agent, _convert_="all")
    goals = agent.goals
    assert isinstance(agent, PolicyAgent) and isinstance(goals.generator, TokenSubgoalGenerator)
    assert type(goals.filter) is filter_type and goals.n_candidates == n_candidates and agent.exec_len == 4
    assert goals.generator.space.policy is agent.policy  # bound when the agent was built
    actions = np.stack(_run(agent, 4))
    assert np.isfinite(actions).all() and (np.abs(actions) <= 1.0).all()
    sub = agent.describe().subgoal
    assert sub.tokens is not None and sub.candidates.shape[0] == n_candidates


# -- 7. checkpoints -------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact_and_found_by_type_name(space, tmp_path):
    sha = space.policy.encoder_sha256()
    gen = make_generator(space, encoder_sha256=sha)
    filt = make_filter(space, encoder_sha256=sha)
    o = obs_at(2)
    for stage, name in ((gen, "susie_tokens"), (filt, "ghil_glue_tokens")):
        path = stage.save_pretrained(tmp_path / name)
        assert json.loads((Path(path) / "config.json").read_text())["type"] == name
        loaded = load_pretrained(path)
        assert type(loaded) is type(stage) and loaded.init_kwargs() == stage.init_kwargs()
        assert loaded.config.encoder_sha256 == sha and MODELS[name] is type(stage)
        ours, theirs = stage.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        if name == "susie_tokens":
            assert loaded.normalizer.is_fitted
            a = gen.propose_tokens(o, TEXT, 3, generator=torch.Generator().manual_seed(1))
            b = loaded.propose_tokens(o, TEXT, 3, generator=torch.Generator().manual_seed(1))  # unbound: loads
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        else:
            tokens = np.random.default_rng(0).normal(size=(3, 1, W)).astype(np.float32)
            assert np.array_equal(filt.score_tokens(o, tokens, TEXT), loaded.score_tokens(o, tokens, TEXT))
        with pytest.raises(TokenSpaceMismatch):
            loaded.bind_policy(space.other)  # the hash travels with the checkpoint
    # a fresh interpreter finds both by their type names (the ghil.models entry points)
    code = ("import sys; from ghil.checkpoint import load_pretrained; "
            "print(*[type(load_pretrained(p)).__name__ for p in sys.argv[1:]])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "susie_tokens"),
                          str(tmp_path / "ghil_glue_tokens")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TokenSubgoalGenerator", "TokenProgressFilter"]


# -- 8. `ghil train recipe=token_generator|token_filter` ------------------------------------------------------


def _cli_train(space, out: Path, recipe: str, *extra: str) -> Path:
    from ghil.cli import main

    argv = ["train", f"recipe={recipe}", f"data.root={space.root}", "data.val_split=null",
            f"train.out_dir={out}", "train.total_steps=2", "train.batch_size=8", "train.warmup_steps=1",
            "train.ckpt_every=2", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
            "train.val_every=null", "threads=1", *extra]
    saved = list(sys.argv)
    try:
        main(argv)
    finally:
        sys.argv[:] = saved
    return out


def test_ghil_train_recipe_token_generator_and_filter_end_to_end(space, tmp_path):
    sha = space.policy.encoder_sha256()
    tiny = [f"config.encoder={space.ckpt}", f"config.token_dim={W}", f"config.frame_size={SIZE}"]
    out = _cli_train(space, tmp_path / "gen", "token_generator", *(f"generator.{x}" for x in tiny),
                     "generator.config.width=32", "generator.config.depth=1", "generator.config.n_heads=2",
                     "generator.config.time_dim=16", "generator.config.horizon=2", "generator.config.preview_size=16",
                     "generator.config.preview_channels=[8,8]", "generator.config.preview_rows=4")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)
    gen = load_pretrained(out / "checkpoints" / "last")
    assert isinstance(gen, TokenSubgoalGenerator) and gen.config.encoder_sha256 == sha
    assert gen.config.horizon == 2 and gen.normalizer.is_fitted
    tokens, previews = gen.propose_tokens(obs_at(1), TEXT, 2)
    assert tokens.shape == (2, 1, W) and previews.shape == (2, SIZE, SIZE, 3)

    out = _cli_train(space, tmp_path / "filt", "token_filter", *(f"filter.{x}" for x in tiny),
                     "filter.config.hidden=[32]", "data.horizon=[1,4]")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/acc_reversed" in x for x in lines)
    filt = load_pretrained(out / "checkpoints" / "last")
    assert isinstance(filt, TokenProgressFilter) and filt.config.encoder_sha256 == sha
    assert filt.config.hidden == (32,)
    filt.bind_policy(space.policy)
    assert np.isfinite(filt.score_tokens(obs_at(1), tokens, TEXT)).all()
    # the two checkpoints compose into the agent
    agent = PolicyAgent(space.policy, GeneratedSubgoals(gen, filt, n_candidates=2, replan_every=4), exec_len=2)
    assert np.isfinite(np.stack(_run(agent, 2))).all()


# -- 9. the presets -------------------------------------------------------------------------------------------


def _as_yaml(value):
    if dataclasses.is_dataclass(value):
        return {k: _as_yaml(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_as_yaml(v) for v in value]
    return value


@pytest.mark.parametrize("group, option, cls, model", [
    ("generator", "susie_tokens", TokenGeneratorConfig, TokenSubgoalGenerator),
    ("filter", "ghil_glue_tokens", TokenFilterConfig, TokenProgressFilter)])
def test_preset_yaml_equals_the_config_defaults_and_fits_10_mb(group, option, cls, model):
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"), resolve=False)["config"]
    default = cls()
    assert node["_target_"] == f"planners.token_subgoals.{cls.__name__}"
    assert set(node) - {"_target_"} == {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name == "text_encoder":
            assert node[f.name] == "${text_encoder}"
        else:
            assert node[f.name] == _as_yaml(getattr(default, f.name)), f.name
    recipe = "token_generator" if group == "generator" else "token_filter"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"recipe={recipe}"])
    assert instantiate(cfg[group].config, _convert_="all") == default  # text_encoder: minilm, the default
    built = instantiate(cfg[group], _convert_="all")
    assert type(built) is model and built.config == default
    # the defaults name the shipped policy's token space: its cameras (+ the goal encoder), width, tokens, frames
    shipped = json.loads((CONFIG_DIR.parent / "checkpoints" / "dit_small" / "config.json").read_text())
    pc = shipped["init"]["config"]
    assert default.encoder == "checkpoints/dit_small" and default.camera == pc["goal_camera"]
    assert default.token_dim == pc["width"] and default.n_tokens == pc["image_encoder"]["tokens_side"] ** 2
    assert default.frame_size == dict(zip(pc["cameras"], pc["image_sizes"]))[default.camera]
    if group == "generator":
        assert default.sources == (*pc["cameras"], "__goal__")
    n_bytes = 4 * sum(p.numel() for p in built.parameters())
    assert n_bytes <= 10e6, f"{option}: {n_bytes / 1e6:.1f} MB of float32 weights"


# -- 10. predict_chunk(goal_tokens=...) ----------------------------------------------------------------------


def test_predict_chunk_with_goal_tokens_is_the_image_path_and_validates_them(space):
    policy = DiTPolicy.from_pretrained(space.ckpt).eval()
    o = obs_at(3)
    goal = obs_at(9).images["rgb_static"]
    tokens = goal_tokens_of(policy, goal[None])[0]
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    from_image = policy.predict_chunk(o, goal, generator=gen()).actions
    from_tokens = policy.predict_chunk(o, goal_tokens=tokens.numpy(), generator=gen()).actions
    torch.testing.assert_close(from_tokens, from_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(policy.predict_chunk(o, goal_tokens=tokens, generator=gen()).actions, from_image,
                               rtol=1e-5, atol=1e-6)  # a tensor works too
    other = policy.predict_chunk(o, goal_tokens=(tokens * 0 + 3.0).numpy(), generator=gen()).actions
    assert not torch.equal(other, from_image)  # the tokens steer
    for bad in (np.zeros((2, W), np.float32), np.zeros((1, W - 1), np.float32), np.zeros(W, np.float32),
                np.zeros((1, W), np.int64)):
        with pytest.raises(ValueError, match="goal_tokens must be float"):
            policy.predict_chunk(o, goal_tokens=bad)
    nan = tokens.numpy().copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_chunk(o, goal_tokens=nan)
    with pytest.raises(ValueError, match="power of two"):
        policy.predict_chunk(o, goal_tokens=tokens, n_steps=3)
    no_goal = DiTPolicy(tiny_config(use_goal=False), ShortcutConfig())
    no_goal.fit_normalizer(fake_stats())
    with pytest.raises(ValueError, match="use_goal=False"):
        no_goal.predict_chunk(o, goal_tokens=tokens)
    with pytest.raises(RuntimeError, match="normaliser"):
        DiTPolicy(tiny_config(), ShortcutConfig()).predict_chunk(o, goal_tokens=tokens)


def test_the_token_hierarchy_runs_with_asynchronous_subgoals(space):
    from ghil.runtime.async_goals import AsyncGoals

    policy = DiTPolicy.from_pretrained(space.ckpt).eval()
    inner = GeneratedSubgoals(make_generator(space), make_filter(space), n_candidates=3, replan_every=4)
    with AsyncGoals(inner) as goals:
        agent = PolicyAgent(policy, goals, exec_len=2, seed=0)  # binds the token stages through the wrapper
        assert inner.generator.space._policy is policy and inner.filter.space._policy is policy
        agent.reset()
        actions = np.stack(_run(agent, 12))
        assert goals.wait_idle(10)
        assert actions.shape == (12, 7) and np.isfinite(actions).all() and (np.abs(actions) <= 1.0).all()
        assert inner.n_replans >= 2 and goals.errors == 0  # replans ran on the worker beside the loop
        assert agent.describe().subgoal.tokens is not None
