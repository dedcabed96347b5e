"""Subgoal generators (planners/image_generator.py, planners/video_generator.py) and their data
(ghil/data/subgoal_dataset.py), on tiny configs: the dataset's pairs and clips, shapes, the dual-guidance
arithmetic, InstructPix2Pix's condition-dropout shares, K candidates from one batched call, an exact save/load round
trip, a few steps lowering the loss, every bad input, loading tiny random diffusers UNet/VAE/CLIP folders the way the
InstructPix2Pix preset loads its hub weights, the presets' sizes, and `ghil train recipe=generator` end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _policy_fixtures import SIZE, write_synthetic_dataset
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ghil.checkpoint import CheckpointError, load_pretrained
from ghil.data.subgoal_dataset import SubgoalBatch, SubgoalDataConfig, SubgoalDataset, collate_subgoal, resize_frames
from ghil.interfaces import Learnable, Seedable, SubgoalGenerator
from ghil.nn.encoders import HashTextConfig
from ghil.paths import CONFIG_DIR
from ghil.types import Observation
from planners.image_generator import (ClipTokensConfig, HubWeights, NonFiniteSubgoalError, SusieConfig,
                                      SusieGenerator, UNetConfig, condition_dropout, dual_guidance, guided_denoise)
from planners.video_generator import VideoConfig, VideoGenerator
from policies.ddim import DDIMConfig
from policies.shortcut import ShortcutConfig

torch.set_num_threads(1)

TINY_UNET = UNetConfig(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, n_heads=2,
                       norm_num_groups=4)
TEXT = HashTextConfig(16)


def susie(sampler=None, **overrides) -> SusieGenerator:
    torch.manual_seed(0)
    kw = dict(frame_size=SIZE, image_size=16, horizon=4, unet=TINY_UNET, text_encoder=TEXT)
    kw.update(overrides)
    return SusieGenerator(SusieConfig(**kw), sampler or ShortcutConfig())


def video(sampler=None, **overrides) -> VideoGenerator:
    torch.manual_seed(0)
    kw = dict(frame_size=SIZE, image_size=16, horizon=4, n_frames=2, unet=TINY_UNET, text_encoder=TEXT)
    kw.update(overrides)
    return VideoGenerator(VideoConfig(**kw), sampler or ShortcutConfig())


def obs(seed: int = 0, size: int = SIZE) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(images={"rgb_static": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)},
                       proprio=np.zeros(15, np.float32), t=0, instruction="open the drawer")


def fake_batch(b: int = 4, s: int = 16, n_frames: int = 1, seed: int = 0) -> SubgoalBatch:
    g = torch.Generator().manual_seed(seed)
    img = lambda *lead: torch.randint(0, 256, (*lead, s, s, 3), dtype=torch.uint8, generator=g)  # noqa: E731
    ids = torch.arange(b)
    return SubgoalBatch(image=img(b), goal=img(b), instructions=tuple(["open the drawer", "lift the red block"][i % 2]
                                                                       for i in range(b)),
                        tasks=("open_drawer",) * b, episode_rows=ids * 0, frame_ids=ids, goal_frame_ids=ids + 4,
                        clip=img(b, n_frames) if n_frames > 1 else None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic")


# -- the dataset ------------------------------------------------------------------------------------------------


def test_dataset_pairs_frames_with_the_future_frame_clipped_to_the_window(data_root):
    ds = SubgoalDataset(SubgoalDataConfig(root=str(data_root), horizon=4, image_size=16, n_frames=2))
    assert len(ds) == 24 and ds.frame_size == (SIZE, SIZE)
    s = ds[3]
    assert s["image"].shape == s["goal"].shape == (16, 16, 3) and s["image"].dtype == np.uint8
    assert s["clip"].shape == (2, 16, 16, 3) and np.array_equal(s["clip"][-1], s["goal"])
    assert (s["frame_id"], s["goal_frame_id"], s["instruction"], s["task"]) == (3, 7, "open the drawer", "open_drawer")
    full = SubgoalDataset(SubgoalDataConfig(root=str(data_root), horizon=4, image_size=SIZE))
    frames = full.frames
    assert np.array_equal(full[3]["goal"], frames.read_frame(7, ("rgb_static",))["rgb_static"])
    assert full[10]["goal_frame_id"] == 11  # 10 + 4 clipped to the window's (and episode's) last frame
    assert "clip" not in full[0]
    batch = collate_subgoal([ds[i] for i in range(3)])
    assert batch.image.shape == (3, 16, 16, 3) and batch.clip.shape == (3, 2, 16, 16, 3)
    assert batch.instructions == ("open the drawer",) * 3 and batch.goal_frame_ids.tolist() == [4, 5, 6]
    assert batch.to("cpu").batch_size == 3


def test_dataset_horizon_ranges_are_deterministic_per_epoch_and_the_pack_gives_the_same_samples(data_root):
    from ghil.data.packed import build_pack

    cfg = SubgoalDataConfig(root=str(data_root), horizon=(1, 6), image_size=16, seed=3)
    ds = SubgoalDataset(cfg)
    first = [ds.horizon_of(i) for i in range(len(ds))]
    assert first == [SubgoalDataset(cfg).horizon_of(i) for i in range(len(ds))] and 1 <= min(first) <= max(first) <= 6
    ds.set_epoch(1)
    assert [ds.horizon_of(i) for i in range(len(ds))] != first
    build_pack(str(data_root), "training")
    packed = SubgoalDataset(dataclasses.replace(cfg, cache=str(data_root / "packed")))
    packed.set_epoch(1)
    for i in (0, 5, 23):
        a, b = ds[i], packed[i]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, match", [
    (dict(horizon=0), "horizon must be >= 1"), (dict(horizon=(5, 2)), "1 <= lo <= hi"),
    (dict(horizon="20"), "horizon must be an int"), (dict(camera="depth_static"), "RGB camera"),
    (dict(image_size=4), "image_size"), (dict(n_frames=5, horizon=4), "n_frames"), (dict(root=""), "root")])
def test_dataset_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubgoalDataConfig(**{"root": "data", **kwargs})


def test_resize_frames_keeps_kind_and_dtype():
    x = np.full((2, 32, 32, 3), 200, np.uint8)
    assert resize_frames(x, 16).shape == (2, 16, 16, 3) and (resize_frames(x, 16) == 200).all()
    t = resize_frames(torch.from_numpy(x[0]), 48)
    assert t.dtype == torch.uint8 and t.shape == (48, 48, 3)
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(x.astype(np.float32), 16)


# -- shapes and the stage contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["susie_tiny", "video_tiny"])
def test_tiny_config_builds_a_learnable_seedable_generator(option, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=generator", f"generator={option}", "text_encoder=hash"])
    gen = instantiate(cfg.generator, _convert_="all")
    assert isinstance(gen, SubgoalGenerator) and isinstance(gen, Learnable) and isinstance(gen, Seedable)
    o = obs()
    before = np.array(o.images["rgb_static"])
    gen.seed(1)
    out = gen.propose(o, "open the drawer", 3)
    want = (3, SIZE, SIZE, 3) if option == "susie_tiny" else (3, gen.n_frames, SIZE, SIZE, 3)
    assert out.shape == want and out.dtype == np.uint8
    assert np.array_equal(before, o.images["rgb_static"])  # inputs untouched
    gen.seed(1)
    assert np.array_equal(gen.propose(o, "open the drawer", 3), out)  # seeded: reproducible


def test_video_generator_returns_clips_and_their_last_frames():
    gen = video()
    clips = gen.propose(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0))
    assert clips.shape == (2, 2, SIZE, SIZE, 3) and gen.horizon == 4
    last = gen.propose_last_frames(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(last, clips[:, -1])
    gen.train()
    loss, metrics = gen.loss(fake_batch(n_frames=2))
    loss.backward()
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="batch.clip"):
        gen.loss(fake_batch(n_frames=1))


# -- guidance, dropout, batching ------------------------------------------------------------------------------


def test_dual_guidance_is_instruct_pix2pix_formula_from_one_batched_call():
    calls = []

    def eps(x, t, k, context, text):  # a stub network: each branch's output is a known function of its inputs
        calls.append(x.shape[0])
        return x * 0 + context.mean(dim=(1, 2, 3))[:, None, None] * 10 + text.mean(dim=(1, 2))[:, None, None]

    k, c = 3, 2
    x = torch.randn(k, c, 5)
    context = torch.rand(k, 3, 4, 4) + 0.5
    text, null = torch.rand(k, 1, 8) + 1.0, torch.full((k, 1, 8), -0.25)
    s_img, s_txt = 1.5, 7.5
    out = guided_denoise(eps, context, text, null, s_img, s_txt)(x, torch.zeros(k), None)
    assert calls == [3 * k]  # one call carries all three branches of every candidate
    e_full = eps(x, None, None, context, text)
    e_img = eps(x, None, None, context, null)
    e_none = eps(x, None, None, torch.zeros_like(context), null)
    expected = e_none + s_img * (e_img - e_none) + s_txt * (e_full - e_img)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(dual_guidance(e_full, e_img, e_none, s_img, s_txt), expected)
    calls.clear()
    plain = guided_denoise(eps, context, text, null, 1.0, 1.0)(x, torch.zeros(k), None)
    assert calls == [k] and torch.equal(plain, e_full)  # no guidance: the conditional branch alone


def test_condition_dropout_has_instruct_pix2pix_shares():
    drop_text, drop_image = condition_dropout(200_000, 0.05, generator=torch.Generator().manual_seed(0))
    shares = {"text only": (drop_text & ~drop_image), "both": (drop_text & drop_image),
              "image only": (~drop_text & drop_image), "neither": (~drop_text & ~drop_image)}
    got = {name: float(mask.float().mean()) for name, mask in shares.items()}
    want = {"text only": 0.05, "both": 0.05, "image only": 0.05, "neither": 0.85}
    assert all(abs(got[n] - want[n]) < 0.004 for n in want), got


def test_training_loss_drops_the_conditions_and_evaluation_does_not():
    gen = susie(cond_drop_prob=1 / 3)  # every row drops its text, its image or both
    seen = []
    real = gen._denoise
    gen._denoise = lambda unet, x, t, k, context, text: (seen.append((context, text)), real(unet, x, t, k, context,
                                                                                           text))[1]
    batch = fake_batch(b=8)
    null = gen.text_tokens([""])[0]
    gen.train()
    gen.loss(batch)
    context, text = seen[-1]
    no_image = context.flatten(1).abs().sum(1) == 0
    no_text = (text == null).flatten(1).all(1)
    assert (no_image | no_text).all() and len(context) == 8
    gen.eval()
    gen.loss(batch)
    context, text = seen[-1]
    assert (context.flatten(1).abs().sum(1) > 0).all() and not (text == null).flatten(1).all(1).any()


@pytest.mark.parametrize("sampler, n_steps", [(ShortcutConfig(), 2), (DDIMConfig(n_inference_steps=3), 3)],
                         ids=["shortcut", "ddim"])
def test_k_candidates_come_from_one_batched_call_per_sampler_step(sampler, n_steps):
    gen = susie(sampler)
    batches = []
    handle = gen.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    out = gen.propose(obs(), "open the drawer", 4, n_steps=n_steps)
    handle.remove()
    assert out.shape == (4, SIZE, SIZE, 3)
    assert batches == [3 * 4] * n_steps  # 4 candidates x 3 guidance branches, one UNet call per step


# -- checkpoints and training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [susie, video], ids=["susie", "video"])
def test_save_load_round_trip_is_exact(make, tmp_path):
    gen = make()
    gen.eval()
    gen.save_pretrained(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(gen) and loaded.init_kwargs() == gen.init_kwargs()
    ours, theirs = gen.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a = gen.propose(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0))
    b = loaded.propose(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(a, b)
    other = VideoGenerator if isinstance(gen, SusieGenerator) else SusieGenerator
    with pytest.raises(CheckpointError, match="not"):
        other.from_pretrained(tmp_path / "ckpt")  # a checkpoint of another kind


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    gen = susie(DDIMConfig(prediction_type="sample"), cond_drop_prob=0.0)
    batch = fake_batch(b=4)

    def fixed_loss() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same timesteps and noise every time
            return float(gen.loss(batch)[0].detach())

    gen.eval()
    before = fixed_loss()
    gen.train()
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    for _ in range(25):
        loss, _ = gen.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_errors_naming_the_problem():
    gen = susie()
    good = obs()
    cases = [
        (good, "", 2, "empty"), (good, "   ", 2, "empty"), (good, None, 2, "string"),
        (good, "open the drawer " * 40, 2, "too long"),
        (obs(size=SIZE + 8), "open the drawer", 2, f"uint8 \\({SIZE}, {SIZE}, 3\\)"),
        (Observation(images={"rgb_static": good.images["rgb_static"].astype(np.float32)}, proprio=np.zeros(15)),
         "open the drawer", 2, "uint8"),
        (Observation(images={"rgb_gripper": good.images["rgb_static"]}, proprio=np.zeros(15)), "open the drawer", 2,
         "no 'rgb_static'"),
        (good, "open the drawer", 0, "n_candidates"), (good, "open the drawer", -1, "n_candidates"),
        (good, "open the drawer", 1.5, "n_candidates"), (good, "open the drawer", True, "n_candidates"),
    ]
    for o, text, k, match in cases:
        with pytest.raises(ValueError, match=match):
            gen.propose(o, text, k)
    with pytest.raises(ValueError, match="power of two"):
        gen.propose(good, "open the drawer", 2, n_steps=3)
    with pytest.raises(ValueError, match="batch.image must be uint8"):
        gen.loss(fake_batch(s=8))
    with torch.no_grad():
        gen.unet.conv_out.bias.fill_(float("nan"))  # corrupted weights
    with pytest.raises(NonFiniteSubgoalError, match="NaN/inf"):
        gen.propose(good, "open the drawer", 2)
    assert issubclass(NonFiniteSubgoalError, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cond_drop_prob=0.5), "cond_drop_prob"), (dict(image_size=17), "multiple"),
    (dict(text_guidance=float("nan")), "text_guidance"), (dict(camera="depth"), "RGB"),
    (dict(frame_size=4), "frame_size")])
def test_generator_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SusieConfig(**{"unet": TINY_UNET, **kwargs})
    with pytest.raises(TypeError, match="text_encoder"):
        SusieConfig(text_encoder="minilm")
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        dataclasses.replace(TINY_UNET, block_out_channels=(6, 12))


# -- pretrained diffusers weights (the InstructPix2Pix preset's loading code, on tiny random folders) -------------


def _tiny_pipeline(folder: Path, unet_in_channels: int) -> Path:
    """A diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/) of tiny random models."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, sample_size=16).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=8, in_channels=unet_in_channels, out_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                         cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).save_pretrained(folder / "unet")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(folder / "text_encoder")
    return folder


def _latent_config(folder: Path) -> SusieConfig:
    return SusieConfig(frame_size=SIZE, image_size=16, horizon=4, init_unet=HubWeights(str(folder), "unet"),
                       vae=HubWeights(str(folder), "vae"), noise_schedule=HubWeights(str(folder), "scheduler"),
                       text_encoder=ClipTokensConfig(path=str(folder), dim=16, max_length=24))


def test_latent_generator_loads_pretrained_unet_vae_and_clip_from_a_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = _tiny_pipeline(tmp_path / "ip2p", unet_in_channels=8)  # InstructPix2Pix layout: 4 noisy + 4 context
    sampler = DDIMConfig(n_train_steps=1000, n_inference_steps=2, beta_schedule="scaled_linear", clip_sample=False)
    gen = SusieGenerator(_latent_config(folder), sampler)
    source = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict()
    assert all(torch.equal(v, source[k]) for k, v in gen.unet.state_dict().items())
    assert (gen.latent_channels, gen.latent_size) == (4, 8)
    sd_betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # Stable Diffusion's scaled_linear schedule
    assert torch.allclose(gen.sampler.scheduler.betas, sd_betas)  # the pipeline's noise levels, not diffusers' default
    assert not any(k.startswith(("vae", "_frozen")) for k in gen.state_dict())  # frozen parts are not saved
    out = gen.propose(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, SIZE, SIZE, 3) and out.dtype == np.uint8
    gen.train()
    loss, _ = gen.loss(fake_batch(b=2))
    loss.backward()
    assert torch.isfinite(loss)
    gen.eval()
    gen.save_pretrained(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")  # the UNet rebuilt from the stored config, the VAE from its folder
    again = loaded.propose(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(gen.propose(obs(), "open the drawer", 2, generator=torch.Generator().manual_seed(0)), again)
    with pytest.raises(ValueError, match="too long"):
        gen.propose(obs(), "open the drawer and then the other drawer", 1)  # > 24 CLIP tokens: refused, not cut
    with pytest.raises(ValueError, match="clip_sample=false"):
        SusieGenerator(_latent_config(folder), ShortcutConfig())


def test_a_stable_diffusion_unet_is_widened_with_zero_context_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = _tiny_pipeline(tmp_path / "sd", unet_in_channels=4)  # text-to-image: 4 noisy latent channels only
    with pytest.raises(ValueError, match="scaled_linear steps, the DDIM sampler is configured for 1000 squaredcos"):
        SusieGenerator(_latent_config(folder), DDIMConfig(n_train_steps=1000, clip_sample=False))
    gen = SusieGenerator(_latent_config(folder), DDIMConfig(n_train_steps=1000, beta_schedule="scaled_linear",
                                                            clip_sample=False))
    original = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").conv_in.weight
    weight = gen.unet.conv_in.weight
    assert weight.shape[1] == 8 and gen.unet.config.in_channels == 8
    assert torch.equal(weight[:, :4], original) and (weight[:, 4:] == 0).all()


# -- presets and `ghil train recipe=generator` ------------------------------------------------------------------


def _node(option: str) -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "generator" / f"{option}.yaml"), resolve=False)
    return raw["config"]


@pytest.mark.parametrize("option, cls", [("susie_small", SusieConfig), ("video_small", VideoConfig)])
def test_preset_yaml_equals_the_config_defaults_and_fits_10_mb(option, cls):
    node = _node(option)
    default = cls()
    assert set(node) - {"_target_"} == {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if f.name == "text_encoder":
            assert node[f.name] == "${text_encoder}"
        elif dataclasses.is_dataclass(value):
            assert {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()} \
                == node[f.name], f.name
        else:
            assert node[f.name] == value, f.name
    gen = (SusieGenerator if cls is SusieConfig else VideoGenerator)(default, ShortcutConfig())
    n_bytes = 4 * sum(p.numel() for p in gen.parameters())
    assert n_bytes <= 10e6, f"{option}: {n_bytes / 1e6:.1f} MB of float32 weights"


def test_recipe_data_node_equals_the_data_config_defaults():
    from planners.generator_recipe import GeneratorDataConfig

    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "recipe" / "generator.yaml"), resolve=False)["data"]
    fields = {f.name: f.default for f in dataclasses.fields(GeneratorDataConfig)}
    assert set(raw) == set(fields)
    assert all(raw[k] == v for k, v in fields.items() if k != "root")  # root is required in code


def test_instruct_pix2pix_preset_points_every_part_at_one_hub_id():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=generator", "generator=instruct_pix2pix",
                                          "generator.config.init_unet.path=/models/ip2p"])
    node = OmegaConf.to_container(cfg.generator, resolve=True)
    c = node["config"]
    assert c["init_unet"] == {"path": "/models/ip2p", "subfolder": "unet"}
    assert c["vae"] == {"path": "/models/ip2p", "subfolder": "vae"} and c["text_encoder"]["path"] == "/models/ip2p"
    assert c["noise_schedule"] == {"path": "/models/ip2p", "subfolder": "scheduler"}
    assert c["image_size"] == 256 and node["sampler"]["clip_sample"] is False
    assert node["sampler"]["n_train_steps"] == 1000 and node["sampler"]["n_inference_steps"] == 50


def _train_overrides(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["recipe=generator", "generator=susie_tiny", "text_encoder=hash", f"data.root={data_root}",
            f"train.out_dir={out}", "train.total_steps=2", "train.batch_size=4", "train.warmup_steps=1",
            "train.ckpt_every=2", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
            "train.val_every=null", "threads=1", *extra]


def test_ghil_train_recipe_generator_end_to_end(data_root, tmp_path, caplog):
    from ghil.train import run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=_train_overrides(data_root, tmp_path / "run"))
    with caplog.at_level("INFO"):
        out = run(cfg)
    assert "agent.goals.generator.path=" in caplog.text and "ghil run" in caplog.text
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(np.isfinite(x["train/loss"]) for x in lines)
    fingerprint = json.loads((out / "checkpoints" / "last" / "training_state" / "fingerprint.json").read_text())
    assert fingerprint["model"]["type"] == "susie" and fingerprint["data"]["root"] == str(data_root.resolve())
    gen = load_pretrained(out / "checkpoints" / "last")
    assert isinstance(gen, SusieGenerator) and gen.config.horizon == 4
    assert gen.propose(obs(), "open the drawer", 2).shape == (2, SIZE, SIZE, 3)


def test_frame_size_is_checked_before_the_run_folder_exists(data_root, tmp_path):
    from ghil.train import run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=_train_overrides(data_root, tmp_path / "wrong",
                                                          "generator.config.frame_size=64"))
    with pytest.raises(ValueError, match="env.static_size=64"):
        run(cfg)
    assert not (tmp_path / "wrong").exists()
