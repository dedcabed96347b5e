"""Data-loading throughput of PolicyDataset (+ collate_policy, batch 32): npz frames vs the `ghil pack` cache.

    python benchmarks/data_loading.py --episodes 2 --frames 300 [--root /tmp/bench_ds]

Writes a synthetic CALVIN-size dataset (rgb_static 200x200, rgb_gripper 84x84, random pixels: compress like noise,
so the npz figure is a lower bound on decompression cost), packs it, then times random batches from each path.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ghil.data.calvin_format import DatasetWriter, FrameSpec
from ghil.data.packed import build_pack
from ghil.data.policy_dataset import PolicyDataConfig, PolicyDataset, collate_policy


def write(root: Path, episodes: int, frames: int) -> None:
    rng = np.random.default_rng(0)
    spec = FrameSpec(static_size=200, gripper_size=84, depth=False)
    with DatasetWriter(root, splits=("training",), spec=spec) as writer:
        for e in range(episodes):
            rows = []
            for i in range(frames):
                rel = np.clip(rng.normal(0, 0.3, 7), -1, 1)
                rel[6] = 1.0 if (i // 20) % 2 == 0 else -1.0
                robot = rng.normal(size=15)
                robot[14] = rel[6]
                static = np.full((200, 200, 3), 90, np.uint8)
                static[50:150, : 40 + i % 160] = rng.integers(0, 256, (100, 40 + i % 160, 3), dtype=np.uint8)
                rows.append({"actions": np.r_[rng.normal(size=6), rel[6]], "rel_actions": rel, "robot_obs": robot,
                             "scene_obs": rng.normal(size=24), "rgb_static": static,
                             "rgb_gripper": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8),
                             "joint_actions": np.r_[rng.normal(size=7), rel[6]]})
            writer.commit_episode("training", rows, lang=[(0, frames - 1, "open_drawer", "open the drawer")],
                                  episode_key=f"ep{e}")
        writer.finalize()


def throughput(ds: PolicyDataset, n_batches: int, batch: int = 32) -> float:
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(ds), batch):  # warm the per-episode vector cache (both paths have it)
        ds[int(i)]
    t0 = time.perf_counter()
    for _ in range(n_batches):
        collate_policy([ds[int(i)] for i in rng.integers(0, len(ds), batch)])
    return n_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp()) / "ds"
    if not (root / "training").is_dir():
        write(root, args.episodes, args.frames)
    shutil.rmtree(root / "packed", ignore_errors=True)  # time a full build
    t0 = time.perf_counter()
    folder = build_pack(root, "training")
    build_s = time.perf_counter() - t0
    n = args.episodes * args.frames
    npz_bytes = sum(p.stat().st_size for p in (root / "training").glob("episode_*.npz"))
    pack_bytes = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{n} frames; npz {npz_bytes / n * 1e4 / 2**30:.2f} GiB per 10k frames, cache "
          f"{pack_bytes / n * 1e4 / 2**30:.2f} GiB per 10k frames; build {build_s:.1f} s ({n / build_s:.0f} frames/s)")
    make = lambda cache: PolicyDataset(PolicyDataConfig(root=str(root), cache=cache),  # noqa: E731
                                       cameras=("rgb_static", "rgb_gripper"), goal_camera="rgb_static",
                                       action_key="rel_actions", chunk_len=16)
    npz = throughput(make(None), args.batches)
    packed = throughput(make(str(root / "packed")), args.batches * 10)
    print(f"batch 32, 1 process: npz {npz:.0f} samples/s, cache {packed:.0f} samples/s ({packed / npz:.1f}x)")
    if args.root is None:
        shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
