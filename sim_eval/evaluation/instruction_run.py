"""`ghil run "open the drawer"`: one instruction, one rollout of an agent in the playtable, a video and a verdict.

The scene starts from a CALVIN initial state: ``run.initial_state`` is the index of an official chain whose start is
used, or null for the first official start from which the instruction's task is feasible (the drawer closed for
"open the drawer", ...). The agent acts until the task oracle reports the instruction's task done, or ``ep_len``
steps (CALVIN's 360). A composite instruction ("open the drawer, then push the blue block left") runs its subtasks
in order with the same agent, each judged by the oracle from where the last one ended.

Written to ``run.out_dir`` (default ``outputs/run/<instruction>_s<seed>``):

* ``rollout.mp4``: the static camera, the goal in force, the filter's candidates with their scores (the chosen one
  framed), the instruction and the agent's status (``sim_eval/evaluation/video.py``);
* ``verdict.json``: instruction, tasks, per-subtask success and steps, initial state, seed, agent and env choices,
  per-step time, the git commit.

Usage::

    ghil run "open the drawer"                                   # the default agent
    ghil run "turn on the led" agent=oracle_subgoal_policy run.seed=3 run.initial_state=12
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ghil.types import AgentDescription
from sim_eval.demonstrations.expert import task_feasible
from sim_eval.evaluation.evaluate import build_agent
from sim_eval.evaluation.rollout import EP_LEN, reset_agent, seed_everything, state_digest
from sim_eval.protocol.chains import load_official_chains
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.protocol.instructions import InstructionIndex
from sim_eval.protocol.oracle import oracle_for
from sim_eval.world.action_validation import InvalidActionError, validate_action

log = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 300


def slug(text: str, max_len: int = 40) -> str:
    """A folder name for an instruction: lower-case words joined by underscores."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "instruction"


def check_instruction(instruction: object) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError('ghil run needs an instruction: ghil run "open the drawer" (or run.instruction="...")')
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"the instruction is {len(instruction)} characters long; at most {MAX_INSTRUCTION_CHARS}")
    return instruction.strip()


def choose_start(tasks: list[str], initial_state: int | None) -> tuple[int, dict]:
    """(official chain index, its initial state): the given one, or the first from which ``tasks[0]`` is feasible."""
    chains = load_official_chains()
    if initial_state is not None:
        if not 0 <= int(initial_state) < len(chains):
            raise ValueError(f"run.initial_state={initial_state}: give an official chain index 0..{len(chains) - 1} "
                             "(its initial state is used), or null to pick one where the task is feasible")
        state = chains[int(initial_state)][0]
        robot_obs, scene_obs = state_to_obs(state)
        if not task_feasible(tasks[0], robot_obs, scene_obs):
            log.warning("%s is not feasible from the initial state of chain %d: the oracle cannot report it done",
                        tasks[0], initial_state)
        return int(initial_state), state
    for index, (state, _) in enumerate(chains):
        if task_feasible(tasks[0], *state_to_obs(state)):
            return index, state
    raise ValueError(f"no official initial state makes {tasks[0]} feasible")


def run(cfg: DictConfig) -> dict:
    """``ghil run``: roll the agent out on one instruction; returns the verdict (also written as verdict.json)."""
    __import__("ghil.extras").extras.check_config(cfg)
    r = cfg.run
    instruction = check_instruction(r.instruction)
    tasks = InstructionIndex().tasks_for(instruction)  # an unknown phrasing raises with the closest known ones
    ep_len = int(r.ep_len)
    if ep_len < 1:
        raise ValueError(f"run.ep_len must be >= 1, got {ep_len}")
    index, state = choose_start(tasks, None if r.initial_state is None else int(r.initial_state))
    seed = int(r.seed)
    out = Path(r.out_dir) if r.out_dir else Path("outputs") / "run" / f"{slug(instruction)}_s{seed}"
    agent = build_agent(cfg.agent)  # before any folder exists: a bad agent config makes nothing
    env = instantiate(cfg.env)
    oracle = oracle_for(env)
    out.mkdir(parents=True, exist_ok=True)
    from sim_eval.evaluation.video import RolloutVideo

    video = RolloutVideo(out / "rollout.mp4", fps=int(r.video_fps)) if r.video else None
    seed_everything(seed)
    if isinstance(getattr(env, "rng", None), np.random.Generator):
        env.rng = np.random.default_rng(seed)
    obs = env.reset(*state_to_obs(state))
    describe = getattr(agent, "describe", None)
    subtasks, step_s = [], []
    try:
        for k, task in enumerate(tasks):
            reset_agent(agent, seed, k)
            start_info = env.get_info()
            result = {"task": task, "success": False, "steps": ep_len, "failure": "timeout"}
            for step in range(ep_len):
                image = obs["rgb_obs"]["rgb_static"]
                t0 = time.perf_counter()
                action = agent.step(obs, instruction)
                step_s.append(time.perf_counter() - t0)
                if video is not None:
                    lines = [f"{instruction}  ({k + 1}/{len(tasks)}: {task})  step {step}", instruction]
                    video.add(image, lines, AgentDescription.coerce(describe() if describe else None))
                try:
                    obs, _, _, info = env.step(validate_action(action))
                except InvalidActionError as exc:
                    result = {"task": task, "success": False, "steps": step, "failure": "invalid_action",
                              "detail": str(exc)}
                    break
                if oracle.get_task_info_for_set(start_info, info, {task}):
                    result = {"task": task, "success": True, "steps": step + 1}
                    break
            subtasks.append({**result, "end_state": state_digest(obs)})
            log.info("%s: %s after %d steps", task, "done" if result["success"] else result["failure"],
                     result["steps"])
            if not result["success"]:
                break
    finally:
        if video is not None:
            video.close()
        close = getattr(env, "close", None)
        if callable(close):
            close()
    from ghil.paths import git_state

    from sim_eval.evaluation.evaluate import _choice_names

    names = _choice_names({k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("env", "agent")})
    verdict = {
        "instruction": instruction, "tasks": tasks, "success": len(subtasks) == len(tasks) and all(
            s["success"] for s in subtasks), "subtasks": subtasks, "initial_state": {"chain": index, "state": state},
        "seed": seed, "ep_len": ep_len, "agent": OmegaConf.to_container(cfg.agent, resolve=True),
        "names": names, "env": OmegaConf.to_container(cfg.env, resolve=True),
        "step_ms": {"p50": _pct(step_s, 50), "p95": _pct(step_s, 95), "n": len(step_s)},
        "video": str(out / "rollout.mp4") if video is not None else None, "git": git_state(),
    }
    (out / "verdict.json").write_text(json.dumps(verdict, indent=1, default=str), encoding="utf-8")
    done = sum(s["success"] for s in subtasks)
    print(f"{instruction!r}: {'success' if verdict['success'] else 'failure'} ({done}/{len(tasks)} subtasks, "
          f"{sum(s['steps'] for s in subtasks)} steps) -> {out}")
    return verdict


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None
