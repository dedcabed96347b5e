"""Env step speed: physics only, and a full step with camera observations, for the playtable or the real calvin_env.

The env is built from its Hydra config in ``ghil/configs/env/`` (``--env playtable`` or ``--env calvin``), reset to CALVIN's
neutral robot pose in an official initial scene, and stepped with small random relative actions (gripper open;
``--actions expert``: the scripted expert solving drawer, slider, button, switch and block tasks instead).
Each step is timed on its own with ``time.perf_counter``; resets (every ``--reset-every`` steps, to keep the random
walk near the neutral pose) are not timed. Two measurements:

* **physics only**: no observation is rendered.
    - playtable: ``env.step(action)``; its observation is lazy and no image key is read, so nothing renders.
    - calvin: ``CalvinEnv.step_physics(action)``, i.e. calvin_env's ``step`` minus ``get_obs()``:
      ``robot.apply_action`` (IK), 8 x ``stepSimulation``, ``scene.step()``, ``get_info()`` (+ our action check).
* **full step**: ``env.step(action)`` and every rgb/depth image of the observation read (``--cameras``, default
  both, at the config's sizes: 200 static, 84 gripper). For the playtable, once per visual mode (``--visuals``,
  default ``default,layered,fast``: ``env.visuals``; ``default`` is the look the shipped policies were trained on,
  ``layered`` the same models with the static camera drawn from cached layers, ``fast`` layered and cheaper models).

Measurements are interleaved: ``--rounds`` rounds, each running every measurement for ``steps / rounds`` timed
steps (after a reset and ``--warmup`` untimed steps), so a change in the machine's load hits all of them alike.
Each step's wall time (``time.perf_counter``) and its thread CPU time (``time.thread_time``: unaffected by waiting
for a core on a busy machine) are reported; the load average is printed with the results.

By default the process is pinned to CPU core 0 (``--cpu N`` for another, ``--no-pin`` to disable), which gives
steadier numbers and reflects one evaluation worker per core.

    python benchmarks/env_speed.py --env playtable --steps 500
    python benchmarks/env_speed.py --env playtable --steps 1000 --rounds 5 --actions expert
    <calvin venv>/bin/python benchmarks/env_speed.py --env calvin --steps 300 --json outputs/env_speed_calvin.json
    python benchmarks/env_speed.py --env playtable --with-calvin --steps 500 --rounds 5   # both in one run + ratios
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


def parse_visuals(text: str) -> list[str]:
    from sim_eval.world.playtable.models import VISUALS

    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VISUALS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown visuals {unknown or text!r}; use a comma list of {list(VISUALS)}")
    return names


def build_env(name: str, cameras: list[str], static_size: int | None, gripper_size: int | None,
              visuals: str | None = None):
    """Instantiate ``ghil/configs/env/<name>.yaml`` with the chosen cameras (and sizes, visuals, when given)."""
    import hydra.utils
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG_DIR / "env" / f"{name}.yaml")
    cfg.cameras = cameras
    if visuals is not None:
        cfg.visuals = visuals
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


class RandomActions:
    """Small random relative actions, gripper open: a policy-like load on IK and contacts, not a stress test. Every
    reset replays the same sequence, so every measurement sees the same states."""

    def __init__(self, actions: np.ndarray):
        self.actions, self.i = actions, 0

    def reset(self) -> None:
        self.i = 0

    def __call__(self, obs) -> np.ndarray:
        a = self.actions[self.i % len(self.actions)]
        self.i += 1
        return a


class ExpertActions:
    """The scripted expert solving EXPERT_TASKS one after the other (the next one when a task is done or after
    ``max_steps``): doors, drawer, button, switch and blocks move, as in data collection. Physics is the same in
    every visual mode, so every measurement sees the same states."""

    def __init__(self, max_steps: int = 120):
        self.max_steps = max_steps
        self.reset()

    def reset(self) -> None:
        from sim_eval.demonstrations.expert.agent import ScriptedExpert

        self.expert, self.k, self.t = ScriptedExpert(), 0, 0
        self.expert.reset(EXPERT_TASKS[0])

    def __call__(self, obs) -> np.ndarray:
        if self.expert.finished or self.t >= self.max_steps:
            self.k, self.t = self.k + 1, 0
            self.expert.reset(EXPERT_TASKS[self.k % len(EXPERT_TASKS)])
        self.t += 1
        return self.expert.act(obs["robot_obs"], obs["scene_obs"])[0]


EXPERT_TASKS = ("open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "turn_on_lightbulb",
                "push_blue_block_right", "close_drawer", "rotate_pink_block_left")


def time_steps(step_fn, env, driver, n_steps: int, warmup: int, reset_every: int, start) -> tuple[list, list]:
    """Per-step (wall, thread CPU) times in ms over ``n_steps`` steps, after ``warmup`` untimed ones.
    ``step_fn(action)`` returns the observation; ``driver(obs)`` gives the next action."""
    robot_obs, scene_obs = start

    def reset():
        driver.reset()
        return env.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    obs = reset()
    for _ in range(warmup):
        obs = step_fn(driver(obs))
    wall, cpu = [], []
    for i in range(n_steps):
        if i and reset_every and i % reset_every == 0:
            obs = reset()  # untimed
        a = driver(obs)
        t0, c0 = time.perf_counter(), time.thread_time()
        obs = step_fn(a)
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return wall, cpu


def summarise(times_ms: list[float], cpu_ms: list[float] | None = None) -> dict:
    arr = np.asarray(times_ms)
    out = {
        "n": int(arr.size),
        "median_ms": float(np.median(arr)),
        "mean_ms": float(arr.mean()),
        "p95_ms": float(np.percentile(arr, 95)),
        "steps_per_s_mean": float(1e3 / arr.mean()),  # throughput
        "steps_per_s_median": float(1e3 / np.median(arr)),
    }
    if cpu_ms is not None:
        out["cpu_median_ms"] = float(np.median(cpu_ms))
        out["cpu_mean_ms"] = float(np.mean(cpu_ms))
    return out


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
                    help="which ghil/configs/env/<name>.yaml to build")
    ap.add_argument("--cameras", type=parse_cameras, default=list(CAMERAS),
                    help="cameras for the full step: 'static,gripper' (default), 'static', 'gripper' or 'none'")
    ap.add_argument("--static-size", type=int, default=None, help="override the config's static image size")
    ap.add_argument("--gripper-size", type=int, default=None, help="override the config's gripper image size")
    ap.add_argument("--visuals", type=parse_visuals, default=None,
                    help="playtable: full step once per visual mode, comma list (default 'default,layered,fast')")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per measurement (default 300)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleave the measurements in this many rounds of steps/rounds steps (default 3)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps before each round (default 20)")
    ap.add_argument("--reset-every", type=int, default=200,
                    help="untimed reset to the start every N timed steps (0: never)")
    ap.add_argument("--action-scale", type=float, default=0.3, help="std of the random relative actions")
    ap.add_argument("--actions", choices=["random", "expert"], default="random",
                    help="random: small random relative actions near the neutral pose (default); expert: the "
                         "scripted expert solving drawer, slider, button, switch and block tasks (playtable)")
    ap.add_argument("--with-calvin", action="store_true",
                    help="playtable: also time calvin_env's full step in the same run, interleaved, and print the "
                         "ratios (needs calvin_env installed)")
    ap.add_argument("--only", choices=["physics", "full"], default=None, help="run one measurement only")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU core")
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin to (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.steps:
        ap.error("--steps must be >= 1, --warmup >= 0 and 1 <= --rounds <= --steps")
    is_calvin = args.env == "calvin"
    if is_calvin and args.visuals:
        ap.error("--visuals is for the playtable (calvin_env has its own renderer)")
    if is_calvin and args.actions == "expert":
        ap.error("--actions expert is for the playtable")
    if args.with_calvin and (is_calvin or args.actions == "expert" or args.only == "physics"):
        ap.error("--with-calvin compares the playtable's full step with calvin_env's (random actions)")
    visuals = [None] if is_calvin else (args.visuals or ["default", "layered", "fast"])

    pinned = None
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # one core: steadier timings, and what one evaluation worker gets
        pinned = sorted(os.sched_getaffinity(0))

    t0 = time.perf_counter()
    envs = {}
    try:
        for v in visuals:  # one env per visual mode (physics is the same in all: it is timed on the first)
            envs[v], cfg = build_env(args.env, args.cameras, args.static_size, args.gripper_size, v)
        calvin = None
        if args.with_calvin:  # the same cameras and sizes, timed in the same rounds as the playtable's modes
            calvin, _ = build_env("calvin", args.cameras, args.static_size, args.gripper_size, None)
        build_s = time.perf_counter() - t0
        start = neutral_start()
        rng = np.random.default_rng(args.seed)
        per_round = -(-args.steps // args.rounds)
        n = args.warmup + per_round
        if args.actions == "expert":
            driver = ExpertActions()
        else:
            driver = RandomActions(np.concatenate([np.clip(rng.normal(0, args.action_scale, (n, 6)), -1, 1),
                                                   np.ones((n, 1))], axis=1))

        physics_what = (
            "calvin_env step minus get_obs: robot.apply_action + 8 stepSimulation + scene.step + get_info "
            "(+ action check)" if is_calvin else "env.step with the lazy observation's images never read (no rendering)"
        )
        sizes = {c: (cfg.static_size if c == "static" else cfg.gripper_size) for c in args.cameras}
        full_what = "env.step + read " + (", ".join(f"{c} rgb+depth {s}x{s}" for c, s in sizes.items())
                                          or "no images")
        first = envs[visuals[0]]
        plans = []  # (result name, env, step function, what)
        if args.only in (None, "physics"):
            if is_calvin:
                def physics_fn(a, env=first):
                    env.step_physics(a)
            else:
                def physics_fn(a, env=first):
                    return env.step(a)[0]
            plans.append(("physics", first, physics_fn, physics_what))
        if args.only in (None, "full"):
            for v, env in envs.items():
                def full_fn(a, env=env):
                    obs, _, _, _ = env.step(a)
                    read_images(obs)
                    return obs
                name = "full" if v is None else f"full:{v}"
                plans.append((name, env, full_fn, full_what + ("" if v is None else f", visuals={v}")))
            if calvin is not None:
                def calvin_fn(a, env=calvin):
                    obs, _, _, _ = env.step(a)
                    read_images(obs)
                    return obs
                plans.append(("full:calvin", calvin, calvin_fn, full_what + ", real calvin_env"))
        times = {name: ([], []) for name, *_ in plans}
        for r in range(args.rounds):
            steps = min(per_round, args.steps - r * per_round)
            for name, env, fn, _ in plans:
                wall, cpu = time_steps(fn, env, driver, steps, args.warmup, args.reset_every, start)
                times[name][0].extend(wall)
                times[name][1].extend(cpu)
        results = {}
        for name, _, _, what in plans:
            results[name] = summarise(*times[name])
            results[name]["what"] = what
    finally:
        for env in [*envs.values(), *([calvin] if args.with_calvin and calvin is not None else [])]:
            close = getattr(env, "close", None)
            if close:
                close()

    meta = {
        "env": args.env,
        "config": f"ghil/configs/env/{args.env}.yaml",
        "cameras": args.cameras,
        "image_sizes": sizes,
        "use_egl": bool(cfg.use_egl) if "use_egl" in cfg else None,
        "visuals": visuals if not is_calvin else None,
        "actions": args.actions,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "pinned_cpus": pinned,
        "cpu": cpu_model(),
        "cpus_online": os.cpu_count(),
        "python": platform.python_version(),
        "build_s": round(build_s, 3),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
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
    print(f"{args.steps} timed steps ({args.actions} actions) per measurement in {args.rounds} interleaved rounds, "
          f"each after a reset and {args.warmup} warm-up steps; load average {meta['loadavg_1_5_15']}")
    print(f"{'measurement':<14}{'steps/s':>9}{'median ms':>11}{'mean ms':>9}{'p95 ms':>8}{'cpu med':>9}  what")
    for name, r in results.items():
        print(f"{name:<14}{r['steps_per_s_mean']:>9.1f}{r['median_ms']:>11.2f}{r['mean_ms']:>9.2f}{r['p95_ms']:>8.2f}"
              f"{r['cpu_median_ms']:>9.2f}  {r['what']}")
    print("(steps/s = 1000 / mean wall ms; cpu med = median thread CPU time per step)")
    if "full:calvin" in results:
        c = results["full:calvin"]
        for name, r in results.items():
            if name.startswith("full:") and name != "full:calvin":
                ratios = {"wall_median": c["median_ms"] / r["median_ms"], "cpu_median": c["cpu_median_ms"] /
                          r["cpu_median_ms"]}
                r["calvin_over_this"] = {k: round(v, 2) for k, v in ratios.items()}
                print(f"calvin_env / playtable {name[5:]}: {ratios['wall_median']:.2f}x wall median, "
                      f"{ratios['cpu_median']:.2f}x cpu median (same run)")

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
