"""Training throughput of the DiT policy (loss + backward + AdamW step): pixels end to end, pixels with frozen image
encoders, and the cached frozen-encoder features of `ghil featurize`.

    python benchmarks/feature_training.py --episodes 2 --frames 64 --pixel-steps 10 --cached-steps 100

Writes a synthetic CALVIN-size dataset (the writer of benchmarks/data_loading.py), packs it, featurizes it with the
shipped checkpoint's encoders (``--encoder``), then times random batches of each path with the dit_small preset.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's dataset writer

from data_loading import write  # noqa: E402

from ghil.checkpoint import load_pretrained  # noqa: E402
from ghil.data.features import build_features  # noqa: E402
from ghil.data.packed import build_pack  # noqa: E402
from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset, collate_policy, compute_policy_stats  # noqa: E402
from policies.dit import DiTConfig, DiTPolicy  # noqa: E402
from policies.shortcut import ShortcutConfig  # noqa: E402


def samples_per_s(root: Path, source: DiTPolicy, n_steps: int, batch: int, features: bool, frozen: bool) -> tuple:
    torch.manual_seed(0)
    policy = DiTPolicy(DiTConfig(), ShortcutConfig())
    ds = PolicyDataset(PolicyDataConfig(root=str(root), cache=str(root / "packed"),
                                        features=str(root / "features") if features else None),
                       policy.config.cameras, policy.config.goal_camera, "rel_actions", policy.config.chunk_len,
                       policy=policy if features else None)
    policy.fit_normalizer(compute_policy_stats(ds, ("robot_obs", "rel_actions")))
    policy.load_image_encoders(source)
    if frozen:
        policy.freeze_image_encoders()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-4)
    policy.train()
    order = np.random.default_rng(0).integers(0, len(ds), size=(n_steps + 2, batch))
    t_load = t_step = 0.0
    for step, rows in enumerate(order):
        t0 = time.perf_counter()
        data = collate_policy([ds[int(i)] for i in rows])
        t1 = time.perf_counter()
        loss, _ = policy.loss(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:  # two warm-up steps
            t_load += t1 - t0
            t_step += time.perf_counter() - t1
    return n_steps * batch / t_step, n_steps * batch / (t_step + t_load)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--views", type=int, default=2, help="augmented views per frame in the feature cache")
    parser.add_argument("--pixel-steps", type=int, default=10)
    parser.add_argument("--cached-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", default="checkpoints/dit_small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ghil_feature_bench_"))
    try:
        root = tmp / "data"
        write(root, args.episodes, args.frames)
        build_pack(root, "training")
        t0 = time.perf_counter()
        build_features(root, "training", root / "packed", args.encoder, n_views=args.views)
        n_frames = args.episodes * args.frames
        print(f"featurize: {n_frames * args.views / (time.perf_counter() - t0):.0f} frame-views/s")
        source = load_pretrained(args.encoder)
        for name, n, features, frozen in (("pixels, encoders trained", args.pixel_steps, False, False),
                                          ("pixels, encoders frozen", args.pixel_steps, False, True),
                                          ("cached features", args.cached_steps, True, True)):
            step, with_loading = samples_per_s(root, source, n, args.batch, features, frozen)
            print(f"{name:26s} N={n} steps x {args.batch}: {step:6.0f} samples/s ({with_loading:6.0f} with loading)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
