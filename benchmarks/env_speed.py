"""Env step speed: physics only, and a full step with camera observations, for the playtable or the real calvin_env.

The env is built from its Hydra config in ``configs/env/`` (``--env playtable`` or ``--env calvin``), reset to CALVIN's
neutral robot pose in an official initial scene, and stepped with small random relative actions (gripper open).
Each step is timed on its own with ``time.perf_counter``; resets (every ``--reset-every`` steps, to keep the random
walk near the neutral pose) are not timed. Two measurements:

* **physics only**: no observation is rendered.
    - playtable: ``env.step(action)``; its observation is lazy and no image key is read, so nothing renders.
    - calvin: ``CalvinEnv.step_physics(action)``, i.e. calvin_env's ``step`` minus ``get_obs()``:
      ``robot.apply_action`` (IK), 8 x ``stepSimulation``, ``scene.step()``, ``get_info()`` (+ our action check).
* **full step**: ``env.step(action)`` and every rgb/depth image of the observation read (``--cameras``, default
  both, at the config's sizes: 200 static, 84 gripper).

By default the process is pinned to CPU core 0 (``--cpu N`` for another, ``--no-pin`` to disable), which gives
steadier numbers and reflects one evaluation worker per core.

    python benchmarks/env_speed.py --env playtable --steps 500
    <calvin venv>/bin/python benchmarks/env_speed.py --env calvin --steps 300 --json outputs/env_speed_calvin.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout, installed or not
    sys.path.insert(0, str(REPO))

from ghil.paths import CONFIG_DIR  # noqa: E402
from sim_eval.world import layout  # noqa: E402

CAMERAS = ("static", "gripper")


def parse_cameras(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CAMERAS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown camera(s) {unknown}; use a comma list of {list(CAMERAS)} or none")
    return names


def build_env(name: str, cameras: list[str], static_size: int | None, gripper_size: int | None):
    """Instantiate ``configs/env/<name>.yaml`` with the chosen cameras (and sizes, when given)."""
    import hydra.utils
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG_DIR / "env" / f"{name}.yaml")
    cfg.cameras = cameras
    if static_size is not None:
        cfg.static_size = static_size
    if gripper_size is not None:
        cfg.gripper_size = gripper_size
    return hydra.utils.instantiate(cfg), cfg


def neutral_start() -> tuple[np.ndarray, np.ndarray]:
    """CALVIN's neutral robot pose in the first official initial scene (slots and yaws as the evaluation sets them)."""
    try:
        from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs

        return state_to_obs(enumerate_symbolic_states()[0])
    except ImportError:  # fall back to a fixed scene from the layout constants
        scene = np.zeros(layout.SCENE_OBS_DIM)
        for name, slot in zip(layout.BLOCK_NAMES, ("table_0", "table_1", "slider_left")):
            scene[layout.BLOCK_OBS_SLICES[name]] = (*layout.SLOTS[slot], 0.0, 0.0, np.pi / 2)
        return layout.NEUTRAL_ROBOT_OBS.copy(), scene


def read_images(obs: dict) -> int:
    """Touch every image of an observation (forces lazy rendering); returns the number of pixels read."""
    n = 0
    for group in ("rgb_obs", "depth_obs"):
        frames = obs[group]
        for key in list(frames.keys()):
            n += int(np.asarray(frames[key]).shape[0])
    return n


def time_steps(step_fn, env, actions: np.ndarray, warmup: int, reset_every: int, start) -> list[float]:
    """Per-step wall times in ms over ``len(actions)`` steps, after ``warmup`` untimed ones."""
    robot_obs, scene_obs = start
    env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    for a in actions[:warmup]:
        step_fn(a)
    times = []
    for i, a in enumerate(actions[warmup:]):
        if i and reset_every and i % reset_every == 0:
            env.reset(robot_obs=robot_obs, scene_obs=scene_obs)  # untimed
        t0 = time.perf_counter()
        step_fn(a)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarise(times_ms: list[float]) -> dict:
    arr = np.asarray(times_ms)
    return {
        "n": int(arr.size),
        "median_ms": float(np.median(arr)),
        "mean_ms": float(arr.mean()),
        "p95_ms": float(np.percentile(arr, 95)),
        "steps_per_s_mean": float(1e3 / arr.mean()),  # throughput
        "steps_per_s_median": float(1e3 / np.median(arr)),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", choices=["playtable", "calvin"], default="playtable",
                    help="which configs/env/<name>.yaml to build")
    ap.add_argument("--cameras", type=parse_cameras, default=list(CAMERAS),
                    help="cameras for the full step: 'static,gripper' (default), 'static', 'gripper' or 'none'")
    ap.add_argument("--static-size", type=int, default=None, help="override the config's static image size")
    ap.add_argument("--gripper-size", type=int, default=None, help="override the config's gripper image size")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per measurement (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps before each measurement (default 20)")
    ap.add_argument("--reset-every", type=int, default=200,
                    help="untimed reset to the start every N timed steps (0: never)")
    ap.add_argument("--action-scale", type=float, default=0.3, help="std of the random relative actions")
    ap.add_argument("--only", choices=["physics", "full"], default=None, help="run one measurement only")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU core")
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin to (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    pinned = None
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # one core: steadier timings, and what one evaluation worker gets
        pinned = sorted(os.sched_getaffinity(0))

    t0 = time.perf_counter()
    env, cfg = build_env(args.env, args.cameras, args.static_size, args.gripper_size)
    build_s = time.perf_counter() - t0
    start = neutral_start()
    rng = np.random.default_rng(args.seed)
    n = args.warmup + args.steps
    # Small random relative actions, gripper open: a policy-like load on IK and contacts, not a stress test.
    actions = np.concatenate([np.clip(rng.normal(0, args.action_scale, (n, 6)), -1, 1), np.ones((n, 1))], axis=1)

    is_calvin = args.env == "calvin"
    physics_what = (
        "calvin_env step minus get_obs: robot.apply_action + 8 stepSimulation + scene.step + get_info (+ action check)"
        if is_calvin else "env.step with the lazy observation's images never read (no rendering)"
    )
    if is_calvin:
        physics_fn = env.step_physics
    else:
        def physics_fn(a):
            return env.step(a)

    def full_fn(a):
        obs, _, _, _ = env.step(a)
        read_images(obs)

    sizes = {c: (cfg.static_size if c == "static" else cfg.gripper_size) for c in args.cameras}
    full_what = "env.step + read " + (", ".join(f"{c} rgb+depth {s}x{s}" for c, s in sizes.items()) or "no images")

    results = {}
    try:
        if args.only in (None, "physics"):
            results["physics"] = summarise(time_steps(physics_fn, env, actions, args.warmup, args.reset_every, start))
            results["physics"]["what"] = physics_what
        if args.only in (None, "full"):
            results["full"] = summarise(time_steps(full_fn, env, actions, args.warmup, args.reset_every, start))
            results["full"]["what"] = full_what
    finally:
        close = getattr(env, "close", None)
        if close:
            close()

    meta = {
        "env": args.env,
        "config": f"configs/env/{args.env}.yaml",
        "cameras": args.cameras,
        "image_sizes": sizes,
        "use_egl": bool(cfg.use_egl) if "use_egl" in cfg else None,
        "steps": args.steps,
        "warmup": args.warmup,
        "pinned_cpus": pinned,
        "cpu": cpu_model(),
        "cpus_online": os.cpu_count(),
        "python": platform.python_version(),
        "build_s": round(build_s, 3),
    }
    try:
        import pybullet

        meta["pybullet"] = getattr(pybullet, "__version__", None) or _dist_version("pybullet")
    except ImportError:
        pass
    if is_calvin:
        meta["calvin_env_commit"] = getattr(env, "calvin_commit", None)

    print(f"env={args.env} ({meta['config']}), cameras={args.cameras or 'none'}, sizes={sizes}, "
          f"use_egl={meta['use_egl'] if meta['use_egl'] is not None else 'n/a'}, build {build_s:.2f} s")
    print(f"cpu: {meta['cpu']} ({meta['cpus_online']} online), pinned to {pinned if pinned else 'no pinning'}; "
          f"python {meta['python']}, pybullet {meta.get('pybullet')}"
          + (f", calvin_env {str(meta.get('calvin_env_commit'))[:7]}" if is_calvin else ""))
    print(f"{args.steps} timed steps per measurement after {args.warmup} warm-up steps")
    print(f"{'measurement':<14}{'steps/s':>9}{'median ms':>11}{'mean ms':>9}{'p95 ms':>8}  what")
    for name, r in results.items():
        print(f"{name:<14}{r['steps_per_s_mean']:>9.1f}{r['median_ms']:>11.2f}{r['mean_ms']:>9.2f}{r['p95_ms']:>8.2f}"
              f"  {r['what']}")
    print("(steps/s = 1000 / mean ms)")

    out = {"meta": meta, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
