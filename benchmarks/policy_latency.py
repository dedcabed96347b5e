"""Inference latency of a trained chunk policy: one ``predict_chunk`` call (encoder + every sampler step) per chunk.

The observation is a real playtable frame pair (CALVIN's first official initial scene, both cameras) and the goal
the static frame of the same scene; the policy is loaded from a checkpoint folder exactly as ``ghil eval`` loads
it. Each call is timed on its own with ``time.perf_counter`` after ``--warmup`` untimed calls; the figure is the
median (and p10/p90) over ``--calls`` calls, for every requested step count. Torch uses ``--threads`` threads (2:
the whole 2-core development machine; CALVIN's 30 Hz control leaves 33 ms per step, 267 ms per 8-step chunk).

    python benchmarks/policy_latency.py --checkpoint checkpoints/dit_small --steps 1 2 4 --calls 200
    python benchmarks/policy_latency.py --checkpoint runs/dit_small_ddim/checkpoints/last --steps 10 \
        --json outputs/latency_ddim.json
    python benchmarks/policy_latency.py --preset dit_base --sampler shortcut --steps 1 2 4 --calls 50

``--preset`` times an *untrained* policy built from ``ghil/configs/policy/<preset>.yaml`` (for sizes with no trained
checkpoint, such as ``dit_base``): the weights do not change the arithmetic, so the latency is the trained model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout, installed or not
    sys.path.insert(0, str(REPO))


def real_observation():
    """Both camera frames and robot_obs of the playtable reset to the first official chain's initial scene."""
    from sim_eval.protocol.chains import load_official_chains
    from sim_eval.protocol.initial_states import state_to_obs
    from sim_eval.world.playtable.env import PlayTableEnv

    state, _ = load_official_chains()[0]
    robot_obs, scene_obs = state_to_obs(state)
    env = PlayTableEnv()
    obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    frames = {k: np.asarray(v) for k, v in obs["rgb_obs"].items()}
    return frames, np.asarray(obs["robot_obs"], dtype=np.float32)


def time_ms(call, calls: int, warmup: int) -> np.ndarray:
    """Each of ``calls`` calls timed on its own (ms), after ``warmup`` untimed ones."""
    out = []
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return np.asarray(out) * 1000.0


def encoder_call(policy, observation, goal):
    """The observation encoder alone (image resize, ResNets, transformer encoder): the part every step count
    shares, so the sampler's own cost is the chunk latency minus this."""
    import torch

    cfg = policy.config
    images = {cam: torch.as_tensor(observation.images[cam])[None] for cam in cfg.cameras}
    goal_t = torch.as_tensor(goal)[None] if goal is not None else None
    proprio = torch.as_tensor(observation.proprio)[None]
    instructions = [observation.instruction] if cfg.use_language else None
    return lambda: policy.encode_observation(images, goal_t, proprio, instructions)


def untrained_policy(preset: str, sampler: str):
    """A freshly initialised policy of a Hydra preset, its normaliser fitted to unit statistics (timing only)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ghil.cli import CONFIG_DIR
    from ghil.normalizer import VectorStats

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"policy={preset}", f"sampler={sampler}"])
    policy = instantiate(cfg.policy, _convert_="all")
    unit = lambda d: VectorStats(np.zeros(d), np.ones(d), -np.ones(d), np.ones(d), 1)  # noqa: E731
    policy.fit_normalizer({"robot_obs": unit(policy.config.proprio_dim),
                           policy.space.dataset_key: unit(policy.config.action_dim)})
    return policy


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/dit_small", help="checkpoint folder (config.json + "
                        "model.safetensors)")
    parser.add_argument("--preset", default=None, help="time an untrained policy of this preset instead "
                        "(ghil/configs/policy/<preset>.yaml, e.g. dit_base)")
    parser.add_argument("--sampler", default="shortcut", help="sampler config for --preset (shortcut | ddim)")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="sampler step counts (default: 1 2 4 for shortcut models, 10 for DDIM)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--calls and --threads must be >= 1, --warmup >= 0")

    import torch

    from ghil.checkpoint import load_pretrained
    from ghil.types import Observation

    torch.set_num_threads(args.threads)
    if args.preset:
        policy = untrained_policy(args.preset, args.sampler).eval()
        source = f"untrained policy={args.preset} sampler={args.sampler}"
    else:
        policy = load_pretrained(args.checkpoint).eval()
        source = str(args.checkpoint)
    cfg = policy.config
    steps = args.steps or ([1, 2, 4] if policy.sampler.conditions_on_step_size else [10])
    for n in steps:
        policy.sampler.check_steps(n)  # clear error before anything is timed
    frames, robot_obs = real_observation()
    observation = Observation(images={cam: frames[cam] for cam in cfg.cameras}, proprio=robot_obs, t=0,
                              instruction="push the sliding door to the left")
    goal = frames[cfg.goal_camera] if cfg.use_goal else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {"checkpoint": source, "sampler": type(policy.sampler).__name__, "threads": args.threads,
              "calls": args.calls, "warmup": args.warmup, "commit": commit, "machine": platform.processor()
              or platform.machine(), "torch": torch.__version__, "results": []}
    n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    report["trainable_params"] = n_params
    print(f"{source} ({n_params / 1e6:.2f} M trainable parameters): {type(policy.sampler).__name__}, "
          f"{args.threads} thread(s), N={args.calls} calls each")
    for n in steps:
        generator = torch.Generator().manual_seed(args.seed)
        ms = time_ms(lambda: policy.predict_chunk(observation, goal, n_steps=n, generator=generator), args.calls,
                     args.warmup)
        row = {"n_steps": n, "median_ms": round(float(np.median(ms)), 2),
               "p10_ms": round(float(np.percentile(ms, 10)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2)}
        report["results"].append(row)
        print(f"  {n:>3} step(s): median {row['median_ms']:7.2f} ms  (p10 {row['p10_ms']:.2f}, p90 "
              f"{row['p90_ms']:.2f})")
    enc = time_ms(encoder_call(policy, observation, goal), args.calls, args.warmup)
    report["encoder_median_ms"] = round(float(np.median(enc)), 2)
    print(f"  encoder alone: median {report['encoder_median_ms']:7.2f} ms (shared by every step count; the rest of a "
          f"call is the sampler)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
