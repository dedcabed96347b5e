"""`ghil bench agent=...`: per-stage latency percentiles and sustained actions per second in the playtable.

The agent acts for ``bench.n_steps`` steps on one instruction (the scene is reset to the start whenever the oracle
reports the task done, so the stages keep working on a live task). Each stage named in ``bench.stages`` is timed
around its method on the built agent (a dotted path from the runtime agent: ``policy.encode_observation`` is the
encoder pass, ``policy.predict_chunk`` encoder + sampler, ``goals.goal`` a replan, ``goals.generator.propose`` and
``goals.filter.score`` its two parts); paths the agent does not have are skipped, so one config serves every agent.
``sampler`` is derived as policy minus encoder. Camera images are rendered as part of ``env_step`` (the playtable
renders lazily; the bench reads every camera right after each step), so the stages time only their own work.
``actions_per_s`` counts the agent's own compute (``act``), and ``env_actions_per_s`` adds the simulator's step.

    ghil bench agent=oracle_subgoal_policy bench.n_steps=200
    ghil bench agent=ghil_glue --json        # one JSON object: {"replan_ms": {"p50", "p95"}, "actions_per_s", ...}
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sim_eval.evaluation.adapter import as_calvin_agent
from sim_eval.evaluation.instruction_run import check_instruction, choose_start
from sim_eval.evaluation.rollout import reset_agent, seed_everything
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.protocol.instructions import InstructionIndex
from sim_eval.protocol.oracle import oracle_for
from sim_eval.world.action_validation import validate_action

log = logging.getLogger(__name__)


class StageTimer:
    """Times calls of methods on live objects by replacing them on the instance (the class is untouched)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def wrap(self, root: object, path: str, name: str) -> bool:
        """Time ``root.<path>`` (dotted) as ``name``; False when the agent has no such method."""
        *owners, method = path.split(".")
        obj = root
        for part in owners:
            obj = getattr(obj, part, None)
            if obj is None:
                return False
        fn = getattr(obj, method, None)
        if not callable(fn):
            return False

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - t0)

        setattr(obj, method, timed)
        return True


def percentiles_ms(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values, dtype=np.float64) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3),
            "mean": round(float(ms.mean()), 3), "n": int(len(ms))}


def run(cfg: DictConfig) -> dict:
    """``ghil bench``: returns (and prints) the figures."""
    __import__("ghil.extras").extras.check_config(cfg)
    b = cfg.bench
    n_steps = int(b.n_steps)
    if n_steps < 1:
        raise ValueError(f"bench.n_steps must be >= 1, got {n_steps}")
    instruction = check_instruction(b.instruction)
    tasks = InstructionIndex().tasks_for(instruction)
    index, state = choose_start(tasks, None if b.initial_state is None else int(b.initial_state))
    if b.threads is not None:
        import torch

        torch.set_num_threads(int(b.threads))
    runtime = instantiate(cfg.agent)
    agent = as_calvin_agent(runtime)
    timer = StageTimer()
    stages: Mapping[str, str] = OmegaConf.to_container(b.stages, resolve=True)
    inner = getattr(agent, "agent", runtime)  # the runtime agent behind the CALVIN adapter
    timed = [name for name, path in stages.items() if timer.wrap(inner, path, name)]
    env = instantiate(cfg.env)
    oracle = oracle_for(env)
    seed_everything(int(b.seed))
    obs = _render(env.reset(*state_to_obs(state)))
    reset_agent(agent, int(b.seed), 0)
    start_info, task_k, episodes = env.get_info(), 0, 0
    act_s, env_s = [], []
    queue = getattr(inner, "queue", None)  # chunk policies: which steps start a new chunk (hand-over)
    pushed, deltas = (queue.n_pushed if queue is not None else 0), {"handover": [], "within": []}
    previous = None
    for step in range(n_steps + int(b.warmup_steps)):
        t0 = time.perf_counter()
        action = agent.step(obs, instruction)
        t1 = time.perf_counter()
        if queue is not None:
            new_chunk, pushed = queue.n_pushed != pushed, queue.n_pushed
            continuous = np.asarray(action, dtype=np.float64)[:6]  # gripper excluded: it switches by design
            if previous is not None and step >= int(b.warmup_steps):
                deltas["handover" if new_chunk else "within"].append(float(np.linalg.norm(continuous - previous)))
            previous = continuous
        obs, _, _, info = env.step(validate_action(action))
        _render(obs)
        t2 = time.perf_counter()
        if step == int(b.warmup_steps) - 1:  # first chunks and lazy set-up are not what a robot sustains
            timer.seconds.clear()
        elif step >= int(b.warmup_steps):
            act_s.append(t1 - t0)
            env_s.append(t2 - t1)
        if oracle.get_task_info_for_set(start_info, info, {tasks[task_k]}):
            task_k += 1
            if task_k == len(tasks):  # done: start over, so the stages keep working on a live task
                obs, task_k, episodes = _render(env.reset(*state_to_obs(state))), 0, episodes + 1
            reset_agent(agent, int(b.seed) + episodes, task_k)
            start_info = env.get_info()
            previous = None  # a new subtask's first action is no hand-over
    seconds = dict(timer.seconds)
    figures: dict = {f"{name}_ms": percentiles_ms(seconds[name]) for name in timed if seconds.get(name)}
    if seconds.get("policy") and seconds.get("encoder") and len(seconds["policy"]) == len(seconds["encoder"]):
        figures["sampler_ms"] = percentiles_ms(list(np.subtract(seconds["policy"], seconds["encoder"])))
    figures["step_ms"] = percentiles_ms(act_s)
    figures["env_step_ms"] = percentiles_ms(env_s)
    figures["actions_per_s"] = round(len(act_s) / sum(act_s), 2)
    figures["env_actions_per_s"] = round(len(act_s) / (sum(act_s) + sum(env_s)), 2)
    figures["replans"] = len(seconds.get("replan", []))
    if deltas["handover"] and deltas["within"]:
        # Relative actions are deltas from the measured pose, so every chunk starts from the measured state; the
        # jump is how much the commanded action changes at a chunk boundary vs between two steps of one chunk.
        figures["action_jump"] = {k: {"p50": round(float(np.percentile(v, 50)), 4),
                                      "p95": round(float(np.percentile(v, 95)), 4), "n": len(v)}
                                  for k, v in deltas.items()}
    figures["setup"] = {"instruction": instruction, "tasks": tasks, "initial_state_chain": index,
                        "n_steps": n_steps, "warmup_steps": int(b.warmup_steps), "seed": int(b.seed),
                        "threads": _threads(), "stages_timed": [name for name in timed if seconds.get(name)], "tasks_completed": episodes * len(tasks) + task_k}
    if b.json:
        print(json.dumps(figures))
    else:
        print(f"ghil bench over {n_steps} steps ({instruction!r}, torch threads {_threads()}):")
        for key, value in figures.items():
            if isinstance(value, dict) and "p50" in value:
                print(f"  {key[:-3]:<12} p50 {value['p50']:9.2f} ms   p95 {value['p95']:9.2f} ms   (n={value['n']})")
        print(f"  actions/s    {figures['actions_per_s']:.1f} (agent), {figures['env_actions_per_s']:.1f} "
              f"(agent + env)")
    return figures


def _render(obs: dict) -> dict:
    """Read every camera image now: the playtable renders lazily, and a frame first read inside the policy would
    bill the renderer to the policy's stage. Camera time belongs to ``env_step`` (what a robot's camera costs)."""
    for cam in list(obs.get("rgb_obs", {})):
        obs["rgb_obs"][cam]
    return obs


def _threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None
