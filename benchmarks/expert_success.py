"""Scripted-expert success per task, from CALVIN initial states and from states that play reaches.

Play episodes start from CALVIN's 192 symbolic initial states (realised exactly as the official evaluation does)
and chain random feasible tasks (least-covered first), until every task has at least ``--min-attempts`` attempts.
An attempt succeeds when the CALVIN oracle fires within 360 steps. Prints a table and writes JSON.

    python benchmarks/expert_success.py --min-attempts 30 --out outputs/expert_success.json
    python benchmarks/expert_success.py --env calvin      # the real calvin_env, if installed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sim_eval.demonstrations.expert import ScriptedExpert
from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs
from sim_eval.protocol.oracle import TaskOracle
from sim_eval.demonstrations.play import run_play_episode
from sim_eval.protocol.tasks import TASK_NAMES


def make_env(name: str):
    if name == "playtable":
        from sim_eval.world.playtable.env import PlayTableEnv
        return PlayTableEnv(cameras=[])
    from sim_eval.world.calvin_bridge import CalvinEnv
    return CalvinEnv(cameras=[])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="playtable", choices=["playtable", "calvin"])
    ap.add_argument("--min-attempts", type=int, default=30)
    ap.add_argument("--tasks-per-episode", type=int, default=6)
    ap.add_argument("--max-episodes", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/expert_success.json")
    args = ap.parse_args()

    env, oracle, expert = make_env(args.env), TaskOracle(), ScriptedExpert()
    rng = np.random.default_rng(args.seed)
    states = enumerate_symbolic_states()
    counts: Counter = Counter()
    results: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"initial": [], "play": []})
    t0, n_steps, episode = time.time(), 0, 0
    bar = tqdm(total=len(TASK_NAMES) * args.min_attempts, desc="attempts (capped per task)")
    while min(counts[t] for t in TASK_NAMES) < args.min_attempts and episode < args.max_episodes:
        robot_obs, scene_obs = state_to_obs(states[episode % len(states)])
        attempts = run_play_episode(env, expert, oracle, rng, robot_obs, scene_obs, args.tasks_per_episode, counts)
        for a in attempts:
            results[a.task]["initial" if a.first_in_episode else "play"].append(int(a.success))
            n_steps += a.end_step - a.start_step + 1
        bar.n = sum(min(counts[t], args.min_attempts) for t in TASK_NAMES)
        bar.refresh()
        episode += 1
    bar.close()
    wall = time.time() - t0

    print(f"\n{'task':<26} {'n':>4} {'succ %':>7}   {'from init':>10} {'from play':>10}")
    table = {}
    for task in TASK_NAMES:
        r = results[task]
        every = r["initial"] + r["play"]
        rate = 100.0 * np.mean(every) if every else float("nan")
        table[task] = {"n": len(every), "success_rate": rate, "n_initial": len(r["initial"]),
                       "success_initial": int(sum(r["initial"])), "n_play": len(r["play"]),
                       "success_play": int(sum(r["play"]))}
        print(f"{task:<26} {len(every):>4} {rate:>7.1f}   {sum(r['initial']):>4}/{len(r['initial']):<5} "
              f"{sum(r['play']):>4}/{len(r['play']):<5}")
    rates = [v["success_rate"] for v in table.values()]
    print(f"\nmin {min(rates):.1f} %  median {np.median(rates):.1f} %  over {len(TASK_NAMES)} tasks; "
          f"{episode} episodes, {n_steps} steps in {wall:.0f} s ({n_steps / wall:.0f} steps/s incl. expert+oracle)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": args.env, "seed": args.seed, "min_attempts": args.min_attempts,
                               "tasks_per_episode": args.tasks_per_episode, "episodes": episode, "steps": n_steps,
                               "wall_s": wall, "commit": commit, "per_task": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
