"""`ghil demo`: the scripted expert runs the first official CALVIN chains on the configured env and writes one
video per chain (static camera, instruction and expert phase in the title bar) plus a JSON summary.

    ghil demo demo.n_chains=3
"""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from sim_eval.chains import official_subset
from sim_eval.expert import ScriptedExpert
from sim_eval.initial_states import state_to_obs
from sim_eval.oracle import TaskOracle
from sim_eval.tasks import eval_instruction
from sim_eval.video import caption_frame


def run(cfg: DictConfig) -> None:
    d = cfg.demo
    env = instantiate(cfg.env)
    oracle, expert = TaskOracle(), ScriptedExpert()
    out = Path(d.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, (state, tasks) in enumerate(tqdm(official_subset(int(d.n_chains)), desc="chains")):
        robot_obs, scene_obs = state_to_obs(state)
        obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        frames, done = [], 0
        for task in tasks:
            text = eval_instruction(task)
            expert.reset(task)
            start = env.get_info()
            success = False
            for _ in range(int(d.max_steps_per_task)):
                action, phase = expert.act(obs["robot_obs"], obs["scene_obs"])
                frames.append(caption_frame(obs["rgb_obs"]["rgb_static"], [f"{done + 1}/5 {text}", phase]))
                obs, _, _, info = env.step(action)
                if oracle.get_task_info_for_set(start, info, {task}):
                    success = True
                    break
            if not success:
                break
            done += 1
        path = out / f"chain_{i:03d}.mp4"
        imageio.mimwrite(path, np.stack(frames), fps=int(d.fps), macro_block_size=1)
        summary.append({"chain": i, "tasks": list(tasks), "completed": done, "video": str(path)})
        print(f"chain {i}: {done}/5 completed -> {path}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
