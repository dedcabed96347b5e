"""`ghil collect`: CALVIN-format demonstration data from scripted-expert play on the playtable (or calvin_env).

Each episode k is fully determined by (seed, k): its initial state (one of CALVIN's 192 symbolic states, or a
random block placement), its random chain of feasible tasks and its phrasings. Worker processes roll episodes out;
the main process commits them in order through ``DatasetWriter`` (crash-safe), so a killed collection resumes
exactly where it stopped and produces the same dataset as an uninterrupted one.

    ghil collect collect.out_dir=data/play_D collect.episodes=200 collect.workers=2
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ghil.data.calvin_format import DatasetWriter, FrameSpec
from sim_eval.world import layout
from sim_eval.demonstrations.expert import ScriptedExpert
from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs
from sim_eval.demonstrations.labels import ReasoningLabeller
from sim_eval.protocol.oracle import TaskOracle
from sim_eval.demonstrations.play import run_play_episode
from sim_eval.protocol.tasks import train_phrasings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectSettings:
    """What one episode needs to know (picklable, sent to workers)."""

    seed: int
    tasks_per_episode: int
    calvin_state_fraction: float  # share of episodes starting from CALVIN's 192 symbolic states
    validation_every: int  # every n-th episode goes to the validation split (0: none)
    labels: bool

    def __post_init__(self) -> None:
        if self.tasks_per_episode < 1:
            raise ValueError(f"tasks_per_episode must be >= 1, got {self.tasks_per_episode}")
        if not 0.0 <= self.calvin_state_fraction <= 1.0:
            raise ValueError(f"calvin_state_fraction must be in [0, 1], got {self.calvin_state_fraction}")
        if self.validation_every < 0:
            raise ValueError(f"validation_every must be >= 0, got {self.validation_every}")


def episode_key(k: int) -> str:
    return f"ep_{k:07d}"


def split_of(k: int, settings: CollectSettings) -> str:
    return "validation" if settings.validation_every and k % settings.validation_every == 0 else "training"


def random_scene(env, rng: np.random.Generator) -> np.ndarray:
    """A random start: blocks anywhere calvin's scene samples them, random doors and lights."""
    scene = env.sample_scene_obs(rng)
    scene[layout.SLIDER_IDX] = rng.choice([0.0, layout.SLIDER_LEFT_M, rng.uniform(*layout.SLIDER_RANGE_M)])
    scene[layout.DRAWER_IDX] = rng.choice([0.0, layout.DRAWER_OPEN_M, rng.uniform(*layout.DRAWER_RANGE_M)])
    scene[layout.LIGHTBULB_IDX] = float(rng.integers(2))
    scene[layout.SWITCH_IDX] = layout.SWITCH_ON_M * scene[layout.LIGHTBULB_IDX]
    scene[layout.LED_IDX] = float(rng.integers(2))
    return scene


def episode_start(env, states: list, rng: np.random.Generator, calvin_state_fraction: float):
    """(robot_obs, scene_obs) an episode starts from: one of CALVIN's symbolic ``states`` with probability
    ``calvin_state_fraction``, else the neutral pose in a random scene; drawn from ``rng``."""
    if rng.random() < calvin_state_fraction:
        return state_to_obs(states[int(rng.integers(len(states)))])
    return layout.NEUTRAL_ROBOT_OBS, random_scene(env, rng)


class EpisodeRoller:
    """Builds the env once per worker process and rolls out episodes by index."""

    def __init__(self, env_cfg: dict, settings: CollectSettings):
        self.env = instantiate(OmegaConf.create(env_cfg))
        if not hasattr(getattr(self.env, "robot", None), "ik") or "static" not in getattr(self.env, "cameras", {}):
            raise ValueError(f"ghil collect needs the playtable with its static camera (env=playtable): it records "
                             f"the commanded joint targets through the playtable's IK; got {env_cfg.get('_target_')}")
        self.settings = settings
        self.expert, self.oracle = ScriptedExpert(), TaskOracle()
        self.states = enumerate_symbolic_states()
        self.labeller = ReasoningLabeller(self.env.cameras["static"]) if settings.labels else None

    def roll(self, k: int) -> dict:
        s = self.settings
        rng = np.random.default_rng([s.seed, k])
        robot_obs, scene_obs = episode_start(self.env, self.states, rng, s.calvin_state_fraction)
        # Randomised looks (lighting, camera, colours) are drawn from the env's own rng: seed it per episode.
        self.env.rng = np.random.default_rng([s.seed, k, 1])
        frames, phases, tasks = [], [], []

        def on_step(obs, action, phase, task):
            rgb, depth = obs["rgb_obs"], obs["depth_obs"]
            frames.append({
                "rel_actions": np.asarray(action, dtype=np.float64),
                "robot_obs": obs["robot_obs"], "scene_obs": obs["scene_obs"],
                "rgb_static": rgb["rgb_static"], "rgb_gripper": rgb["rgb_gripper"],
                "depth_static": depth["depth_static"], "depth_gripper": depth["depth_gripper"],
            })
            phases.append(phase)
            tasks.append(task)

        start = time.time()
        attempts = run_play_episode(self.env, self.expert, self.oracle, rng, robot_obs, scene_obs,
                                    s.tasks_per_episode, on_step=_with_targets(on_step, self.env, frames))
        lang, task_text = [], [None] * len(frames)
        for a in attempts:
            if a.success:
                text = str(rng.choice(train_phrasings(a.task)))
                lang.append((a.start_step, a.success_step, a.task, text))
                for t in range(a.start_step, a.success_step + 1):
                    task_text[t] = text
        labels = None
        if self.labeller is not None and frames:
            plan = [x[3] for x in lang]
            labels = self.labeller.annotate(
                np.stack([f["robot_obs"] for f in frames]), np.stack([f["scene_obs"] for f in frames]),
                [f["depth_static"] for f in frames], np.stack([f["rel_actions"] for f in frames]), phases, tasks,
                plan, task_text)
        return {"k": k, "frames": frames, "lang": lang, "labels": labels,
                "n_attempts": len(attempts), "n_success": sum(a.success for a in attempts),
                "seconds": time.time() - start}


def _with_targets(on_step, env, frames):
    """Also record what the robot was commanded: absolute tcp target pose and joint targets (after the action)."""
    def record(obs, action, phase, task):
        on_step(obs, action, phase, task)
        robot = env.robot
        # The env applies the action inside step(); reproduce calvin's target-pose arithmetic to store the
        # absolute action (what calvin's dataset calls `actions`) without reaching into a later state.
        pos = robot.target_pos + np.clip(action[:3], -1, 1) * layout.MAX_REL_POS_M
        orn = robot.target_orn + np.clip(action[3:6], -1, 1) * layout.MAX_REL_ORN_RAD
        joints = np.clip(robot.ik(pos, orn), layout.ARM_JOINT_LOWER_RAD, layout.ARM_JOINT_UPPER_RAD)
        frames[-1]["actions"] = np.concatenate([pos, orn, [action[6]]])
        frames[-1]["joint_actions"] = np.concatenate([joints, [action[6]]])
    return record


_ROLLER: EpisodeRoller | None = None


def _init_worker(env_cfg: dict, settings: CollectSettings) -> None:
    global _ROLLER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _ROLLER = EpisodeRoller(env_cfg, settings)


def _roll(k: int) -> dict:
    assert _ROLLER is not None
    return _ROLLER.roll(k)


def roll_episodes(todo: list[int], env_cfg: dict, settings: CollectSettings, workers: int) -> Iterator[dict]:
    """Episodes in index order, rolled out by ``workers`` processes (0 or 1: in this process)."""
    if workers <= 1:
        _init_worker(env_cfg, settings)
        for k in todo:
            yield _roll(k)
        return
    ctx = mp.get_context("spawn")  # pybullet clients do not survive fork safely
    with ctx.Pool(workers, initializer=_init_worker, initargs=(env_cfg, settings)) as pool:
        yield from pool.imap(_roll, todo)


def run(cfg: DictConfig) -> None:
    __import__("ghil.extras").extras.check_config(cfg)  # a missing optional dependency: one line, before any folder
    c = cfg.collect
    if int(c.episodes) < 1:
        raise ValueError(f"collect.episodes must be >= 1, got {c.episodes}")
    settings = CollectSettings(seed=int(c.seed), tasks_per_episode=int(c.tasks_per_episode),
                               calvin_state_fraction=float(c.calvin_state_fraction),
                               validation_every=int(c.validation_every), labels=bool(c.labels))
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    spec = FrameSpec(static_size=int(cfg.env.static_size), gripper_size=int(cfg.env.gripper_size))
    metadata = {"env": env_cfg, "seed": settings.seed, "tasks_per_episode": settings.tasks_per_episode,
                "calvin_state_fraction": settings.calvin_state_fraction,
                "validation_every": settings.validation_every}
    out = Path(c.out_dir)
    with DatasetWriter(out, spec=spec, metadata=metadata, overwrite=bool(c.overwrite)) as writer:
        done = writer.committed_episode_keys()
        todo = [k for k in range(int(c.episodes)) if episode_key(k) not in done]
        if done:
            log.info("resuming %s: %d episodes already committed, %d to go", out, len(done), len(todo))
        bar = tqdm(total=int(c.episodes), initial=int(c.episodes) - len(todo), desc="episodes", unit="ep")
        n_frames, n_ok, n_tried, t0 = 0, 0, 0, time.time()
        for ep in roll_episodes(todo, env_cfg, settings, int(c.workers)):
            if ep["frames"]:
                writer.commit_episode(split_of(ep["k"], settings), ep["frames"], ep["lang"], ep["labels"],
                                      episode_key=episode_key(ep["k"]))
            n_frames += len(ep["frames"])
            n_ok, n_tried = n_ok + ep["n_success"], n_tried + ep["n_attempts"]
            minutes = (time.time() - t0) / 60
            bar.set_postfix(frames=n_frames, fpm=f"{n_frames / max(minutes, 1e-9):.0f}",
                            task_success=f"{n_ok}/{n_tried}")
            bar.update(1)
        bar.close()
        counts = writer.finalize()
    log.info("dataset at %s: %s", out, counts)
    print(f"dataset at {out}: {counts}")
