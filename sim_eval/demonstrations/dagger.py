"""`ghil dagger`: on-policy data labelled by the scripted expert (DAgger), and rounds that aggregate and retrain.

A round rolls a policy checkpoint out in the playtable over chains of random feasible tasks, as play collection
does (``tasks_per_episode`` per episode, ``calvin_state_fraction`` of them from CALVIN's 192 initial states). At
every visited state a private copy of the env (the same env config, so the same renderer) is teleported there and
a copy of the attempt's scripted expert acts from it (the live expert is stepped on every visited state, so its
plan keeps its progress; a plan that ends without the oracle firing is started afresh, at most 3 times): its first ``chunk_len`` actions are the frame's label (``expert_rel_actions``;
``rel_actions`` is their first) and the static frame it reaches ``goal_steps`` later is the frame's goal
(``expert_goal_rgb_static``), exactly what re-rolled oracle goals show the policy at evaluation. Only that one goal
frame is rendered: the expert's intermediate steps are physics alone (~1.2 ms each).

Control is mixed per executed chunk: with probability ``beta`` the expert's label drives the next ``exec_len``
steps, otherwise the policy does (with the label's goal image, or the task's phrasing for a language policy). Each
attempt is a language window whether or not it succeeded: its labels point at the task either way.

A round is a CALVIN-format dataset (frame spec ``expert_chunk > 0``), committed episode by episode through
``DatasetWriter``, so a killed round resumes where it stopped and gives the same data; the trainer reads it unchanged
through ``data.extra_roots``. ``dagger.rounds=R`` chains R rounds: collect round r with the previous round's
checkpoint (``beta`` multiplied by ``beta_decay`` each round), ``ghil pack`` (and ``ghil featurize`` with the
training run's encoder) it, and ``ghil train`` from the previous checkpoint on the base data plus every round so far.
Each step resumes on its own, so re-running the command after a kill continues where it stopped.

    ghil dagger dagger.policy=checkpoints/dit_small dagger.out_dir=data/dagger dagger.episodes=30
    ghil dagger dagger.rounds=3 dagger.train='[data.root=data/playtable_play,train.total_steps=4000]' \
        dagger.eval='[agent=oracle_subgoal_policy,eval.n_chains=50]'      # + one ghil eval per round
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ghil.data.calvin_format import EXPERT_CHUNK_KEY, EXPERT_GOAL_KEY, DatasetWriter, FrameSpec
from ghil.types import Subgoal
from sim_eval.demonstrations.collect import episode_key, episode_start
from sim_eval.demonstrations.expert import ScriptedExpert
from sim_eval.demonstrations.play import choose_task
from sim_eval.evaluation.adapter import observation_from_calvin
from sim_eval.protocol.initial_states import enumerate_symbolic_states
from sim_eval.protocol.oracle import TaskOracle
from sim_eval.protocol.tasks import train_phrasings
from sim_eval.world import layout

log = logging.getLogger(__name__)

STATE_FILE = "dagger_rounds.json"  # the rounds' checkpoints and settings, beside the rounds' datasets
MAX_REPLANS = 3  # an attempt whose plan ends without the oracle firing this often more is given up


@dataclass(frozen=True)
class DaggerSettings:
    """What one round's episode needs to know (picklable, sent to workers)."""

    seed: int
    tasks_per_episode: int
    calvin_state_fraction: float
    beta: float  # probability that the expert drives a chunk
    chunk_len: int  # expert actions stored per frame (>= the policy's chunk_len)
    goal_steps: int  # the goal is the expert's frame this many steps after the labelled state
    max_steps_per_task: int
    n_steps: int | None  # policy sampler steps (None: the checkpoint's default)

    def __post_init__(self) -> None:
        if self.tasks_per_episode < 1:
            raise ValueError(f"dagger.tasks_per_episode must be >= 1, got {self.tasks_per_episode}")
        if not 0.0 <= self.calvin_state_fraction <= 1.0:
            raise ValueError(f"dagger.calvin_state_fraction must be in [0, 1], got {self.calvin_state_fraction}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"dagger.beta must be in [0, 1], got {self.beta}")
        for name in ("chunk_len", "goal_steps", "max_steps_per_task"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"dagger.{name} must be >= 1, got {getattr(self, name)}")


class _LabelGoal:
    """The goal provider of the rolled-out policy: the goal frame of the current state's expert label."""

    def __init__(self) -> None:
        self.image: np.ndarray | None = None

    def reset(self) -> None:
        pass

    def goal(self, obs) -> Subgoal:
        assert self.image is not None, "DaggerRoller sets the label's goal before the policy acts"
        return Subgoal(image=self.image, source="expert")


def load_rollout_policy(path: str):
    """The checkpoint to roll out, refused (before anything is collected) unless it acts in CALVIN's relative space:
    the expert labels relative end-effector actions."""
    from ghil.checkpoint import load_pretrained
    from ghil.types import REL_EE

    policy = load_pretrained(path)
    space = getattr(policy, "space", None)
    if space != REL_EE:
        raise ValueError(f"ghil dagger labels states with the scripted expert's relative end-effector actions "
                         f"({REL_EE.name}); the checkpoint {path} acts in {getattr(space, 'name', space)!r}. Roll out "
                         "a policy trained on rel_actions (policy.config.action_space=rel_ee)")
    return policy


class DaggerRoller:
    """Builds the env, its private labelling copy and the policy once per worker; rolls episodes out by index."""

    def __init__(self, env_cfg: dict, policy_path: str, settings: DaggerSettings):
        import torch

        from ghil.runtime.policy_agent import NoGoal, PolicyAgent

        torch.set_num_threads(1)
        self.env = instantiate(OmegaConf.create(env_cfg))
        self.sim = instantiate(OmegaConf.create(env_cfg))  # teleported to each visited state for the expert's label
        if "static" not in getattr(self.env, "cameras", {}):
            raise ValueError("ghil dagger needs the playtable with its static camera (env=playtable)")
        self.settings = settings
        policy = load_rollout_policy(policy_path)
        if settings.chunk_len < policy.config.chunk_len:
            raise ValueError(f"dagger.chunk_len={settings.chunk_len} is shorter than the policy's chunk_len "
                             f"{policy.config.chunk_len}: the labels must cover a whole chunk")
        self.goals = _LabelGoal()
        self.agent = PolicyAgent(policy, goals=self.goals if policy.uses_goal else NoGoal(), n_steps=settings.n_steps)
        self.expert, self.oracle = ScriptedExpert(), TaskOracle()
        self.states = enumerate_symbolic_states()

    def label(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """(chunk_len, 7) actions of a copy of the attempt's expert from this state (a finished plan padded with
        holds), the static frame it reaches ``goal_steps`` later (or where its plan ends), and whether its plan had
        anything left to do. The live expert is not advanced here (``roll`` does that, one step per env step)."""
        s = self.settings
        sim_obs = self.sim.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        expert = copy.deepcopy(self.expert)  # its plan's progress so far, continued from the visited state
        actions, goal = [], None
        for i in range(max(s.chunk_len, s.goal_steps)):
            action, phase = expert.act(sim_obs["robot_obs"], sim_obs["scene_obs"])
            if phase == "done":
                break
            if i < s.chunk_len:
                actions.append(np.asarray(action, dtype=np.float64))
            sim_obs, *_ = self.sim.step(action)
            if i + 1 == s.goal_steps:
                goal = np.array(sim_obs["rgb_obs"]["rgb_static"])  # the one frame rendered
        if goal is None:  # the plan ended first: its last state is the goal
            goal = np.array(sim_obs["rgb_obs"]["rgb_static"])
        active = bool(actions)
        gripper = actions[-1][6] if actions else (1.0 if robot_obs[14] >= 0 else -1.0)
        hold = np.r_[np.zeros(6), gripper]
        chunk = np.stack(actions + [hold] * (s.chunk_len - len(actions)))
        return chunk, goal, active

    def roll(self, k: int) -> dict:
        from ghil.runtime.policy_agent import derive_seed

        s = self.settings
        rng = np.random.default_rng([s.seed, k])
        robot_obs, scene_obs = episode_start(self.env, self.states, rng, s.calvin_state_fraction)
        self.env.rng = np.random.default_rng([s.seed, k, 1])
        self.sim.rng = np.random.default_rng([s.seed, k, 1])
        obs = self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        frames, lang, counts = [], [], Counter()
        n_success = n_attempts = n_expert = 0
        start_time = time.time()
        for task_i in range(s.tasks_per_episode):
            task = choose_task(obs["robot_obs"], obs["scene_obs"], rng, counts)
            if task is None:
                break
            counts[task] += 1
            text = str(rng.choice(train_phrasings(task)))
            self.agent.seed(derive_seed(s.seed, k, task_i))
            self.agent.reset()
            # One live expert per attempt, stepped on every visited state: a plan restarted at every state would
            # begin with its departure move each time and never progress (measured: 0 of 16 tasks solved).
            self.expert.reset(task)
            start_info, first, replans, expert_drives = self.env.get_info(), len(frames), 0, False
            for t in range(s.max_steps_per_task):
                chunk, goal, active = self.label(obs["robot_obs"], obs["scene_obs"])
                if not active:  # the plan thinks it is done but the oracle does not: plan afresh from here
                    replans += 1
                    if replans > MAX_REPLANS:
                        break
                    self.expert.reset(task)
                    chunk, goal, active = self.label(obs["robot_obs"], obs["scene_obs"])
                    if not active:
                        break
                self.expert.act(obs["robot_obs"], obs["scene_obs"])  # advance the live plan by this state
                if t % self.agent.exec_len == 0:  # who drives the next chunk
                    expert_drives = bool(rng.random() < s.beta)
                    self.agent.queue.clear()
                if expert_drives:
                    action = chunk[0]
                    n_expert += 1
                else:
                    self.goals.image = goal
                    action = self.agent.act(observation_from_calvin(obs, t, text))
                frames.append(self._frame(obs, chunk, goal))
                obs, _, _, info = self.env.step(action)
                if self.oracle.get_task_info_for_set(start_info, info, {task}):
                    n_success += 1
                    break
            n_attempts += 1
            if len(frames) - first >= 2:
                lang.append((first, len(frames) - 1, task, text))
        return {"k": k, "frames": frames, "lang": lang, "n_success": n_success, "n_attempts": n_attempts,
                "expert_share": n_expert / max(len(frames), 1), "seconds": time.time() - start_time}

    def _frame(self, obs: dict, chunk: np.ndarray, goal: np.ndarray) -> dict:
        rgb, robot = obs["rgb_obs"], self.env.robot
        label = chunk[0]
        # calvin's absolute action for the label: the target pose the env would command (as in ghil collect)
        pos = robot.target_pos + np.clip(label[:3], -1, 1) * layout.MAX_REL_POS_M
        orn = robot.target_orn + np.clip(label[3:6], -1, 1) * layout.MAX_REL_ORN_RAD
        return {"rel_actions": label, "actions": np.concatenate([pos, orn, [label[6]]]),
                "robot_obs": obs["robot_obs"], "scene_obs": obs["scene_obs"],
                "rgb_static": np.array(rgb["rgb_static"]), "rgb_gripper": np.array(rgb["rgb_gripper"]),
                EXPERT_CHUNK_KEY: chunk, EXPERT_GOAL_KEY: goal}


_ROLLER: DaggerRoller | None = None


def _init_worker(env_cfg: dict, policy_path: str, settings: DaggerSettings) -> None:
    global _ROLLER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _ROLLER = DaggerRoller(env_cfg, policy_path, settings)


def _roll(k: int) -> dict:
    assert _ROLLER is not None
    return _ROLLER.roll(k)


def roll_episodes(todo: list[int], env_cfg: dict, policy_path: str, settings: DaggerSettings,
                  workers: int) -> Iterator[dict]:
    """Episodes in index order, rolled out by ``workers`` spawned processes (0 or 1: in this process)."""
    if workers <= 1:
        _init_worker(env_cfg, policy_path, settings)
        for k in todo:
            yield _roll(k)
        return
    ctx = mp.get_context("spawn")  # pybullet clients do not survive fork safely
    with ctx.Pool(workers, initializer=_init_worker, initargs=(env_cfg, policy_path, settings)) as pool:
        yield from pool.imap(_roll, todo)


def collect_round(env_cfg: dict, policy_path: str, settings: DaggerSettings, out: Path, episodes: int,
                  workers: int, overwrite: bool = False) -> dict:
    """One round into ``out`` (resumed when it holds the same round's episodes); returns the split counts."""
    from ghil.paths import resolve_checkpoint

    if episodes < 1:
        raise ValueError(f"dagger.episodes must be >= 1, got {episodes}")
    policy_dir = resolve_checkpoint(policy_path)
    load_rollout_policy(str(policy_dir))  # refused before any folder is made
    weights = json.loads((policy_dir / "config.json").read_text()).get("weights_sha256")
    spec = FrameSpec(static_size=int(env_cfg["static_size"]), gripper_size=int(env_cfg["gripper_size"]),
                     depth=False, joint_actions=False, expert_chunk=settings.chunk_len)
    metadata = {"env": env_cfg, "dagger": asdict(settings), "policy": str(policy_dir), "policy_sha256": weights}
    with DatasetWriter(out, splits=("training",), spec=spec, metadata=metadata, overwrite=overwrite) as writer:
        done = writer.committed_episode_keys()
        todo = [k for k in range(episodes) if episode_key(k) not in done]
        if done:
            log.info("resuming %s: %d episodes already committed, %d to go", out, len(done), len(todo))
        bar = tqdm(total=episodes, initial=episodes - len(todo), desc=f"dagger {out.name}", unit="ep")
        n_frames = n_ok = n_tried = 0
        for ep in roll_episodes(todo, env_cfg, str(policy_dir), settings, workers):
            if ep["frames"]:
                writer.commit_episode("training", ep["frames"], ep["lang"], episode_key=episode_key(ep["k"]))
            n_frames += len(ep["frames"])
            n_ok, n_tried = n_ok + ep["n_success"], n_tried + ep["n_attempts"]
            bar.set_postfix(frames=n_frames, task_success=f"{n_ok}/{n_tried}", expert=f"{ep['expert_share']:.2f}")
            bar.update(1)
        bar.close()
        return writer.finalize()


def _settings(d: DictConfig, beta: float) -> DaggerSettings:
    return DaggerSettings(seed=int(d.seed), tasks_per_episode=int(d.tasks_per_episode),
                          calvin_state_fraction=float(d.calvin_state_fraction), beta=float(beta),
                          chunk_len=int(d.chunk_len), goal_steps=int(d.goal_steps),
                          max_steps_per_task=int(d.max_steps_per_task),
                          n_steps=None if d.n_steps is None else int(d.n_steps))


def _ghil(*args: str) -> None:
    """Run one resumable ghil command in a child process (its own Hydra app), failing loudly."""
    cmd = [sys.executable, "-m", "ghil.cli", *args]
    log.info("$ ghil %s", " ".join(shlex.quote(a) for a in args))
    subprocess.run(cmd, check=True)


def run(cfg: DictConfig) -> None:
    __import__("ghil.extras").extras.check_config(cfg)
    d = cfg.dagger
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
    out_dir = Path(d.out_dir)
    rounds = int(d.rounds)
    if rounds < 1:
        raise ValueError(f"dagger.rounds must be >= 1, got {rounds}")
    if rounds == 1 and not d.train:
        counts = collect_round(env_cfg, str(d.policy), _settings(d, float(d.beta)), out_dir, int(d.episodes),
                               int(d.workers), bool(d.overwrite))
        print(f"DAgger round at {out_dir}: {counts}; train on it with data.extra_roots=[{out_dir}]")
        return
    train = [str(o) for o in (d.train or [])]
    use_features = any(o.startswith("data.features=") and not o.endswith("=null") for o in train)
    state_path = out_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"rounds": []}
    policy = str(d.policy)
    evaluate = [str(o) for o in (d.eval or [])]

    def record(r: int, **entry) -> None:
        state["rounds"] = sorted([x for x in state["rounds"] if x["round"] != r] + [{"round": r, **entry}],
                                 key=lambda x: x["round"])
        out_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1))

    def evaluated(r: int, checkpoint: str) -> dict:
        """``ghil eval`` of a round's checkpoint (dagger.eval overrides): the learning curve, one point per round."""
        if not evaluate:
            return {}
        folder = out_dir / f"eval_r{r}"
        _ghil("eval", *evaluate, f"agent.policy.path={checkpoint}", f"eval.out_dir={folder}")
        results = json.loads((folder / "results.json").read_text())
        return {"eval": str(folder), "avg_len": results["metrics"]["avg_len"], "sr": results["metrics"]["sr"]}

    if evaluate:
        record(0, checkpoint=policy, **evaluated(0, policy))
    roots: list[str] = []
    for r in range(1, rounds + 1):
        root = out_dir / f"round_{r}"
        beta = float(d.beta) * float(d.beta_decay) ** (r - 1)
        run_name = f"{d.run_name}_r{r}"
        collect_round(env_cfg, policy, _settings(d, beta), root, int(d.episodes), int(d.workers), bool(d.overwrite))
        _ghil("pack", f"data.root={root}")
        if use_features:
            # the base cache's encoder (frozen-encoder training never changes it): every cache must share it
            _ghil("featurize", f"data.root={root}", f"data.cache={root / 'packed'}", f"encoder.path={d.encoder}",
                  *[o for o in train if o.startswith("featurize.")])
        roots.append(str(root))
        _ghil("train", *[o for o in train if not o.startswith("featurize.")], f"run_name={run_name}",
              f"init_from={policy}", f"data.extra_roots=[{','.join(roots)}]")
        policy = str(Path("runs") / run_name / "checkpoints" / "last")
        record(r, root=str(root), beta=beta, checkpoint=policy, run_name=run_name, **evaluated(r, policy))
        print(f"DAgger round {r}/{rounds}: data {root}, beta {beta:.3f}, checkpoint {policy}")
