"""Play-like episodes: the scripted expert chains random feasible tasks without resets, as CALVIN's play data does.

The same loop serves data collection (every step is handed to ``on_step``) and the expert's success benchmark
(every task attempt is returned with its outcome, and whether it started from a CALVIN initial state or from a
state earlier play reached).

Usage::

    attempts = run_play_episode(env, expert, oracle, rng, robot_obs, scene_obs, n_tasks=8)
    [(a.task, a.success) for a in attempts]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sim_eval.demonstrations.expert import ScriptedExpert, task_feasible
from sim_eval.protocol.tasks import TASK_NAMES

EP_LEN = 360  # CALVIN's per-subtask step budget


@dataclass
class TaskAttempt:
    task: str
    start_step: int  # index (within the episode) of the first action of this attempt
    success_step: int | None  # index of the step after which the oracle fired (None: failed)
    end_step: int  # last step of the attempt (the expert finishes its retreat after success)
    first_in_episode: bool  # started from the episode's initial state
    phases: list[tuple[int, str]] = field(default_factory=list)  # (step, phase name) at each phase change

    @property
    def success(self) -> bool:
        return self.success_step is not None


def feasible_tasks(robot_obs: np.ndarray, scene_obs: np.ndarray) -> list[str]:
    return [t for t in TASK_NAMES if task_feasible(t, robot_obs, scene_obs)]


def choose_task(robot_obs: np.ndarray, scene_obs: np.ndarray, rng: np.random.Generator,
                counts: Counter | None = None) -> str | None:
    """A random feasible task, weighted towards tasks seen least so far (so rare tasks still get covered)."""
    options = feasible_tasks(robot_obs, scene_obs)
    if not options:
        return None
    counts = counts or Counter()
    weights = np.array([1.0 / (1.0 + counts[t]) ** 2 for t in options])
    return options[rng.choice(len(options), p=weights / weights.sum())]


StepCallback = Callable[[dict, np.ndarray, str, str | None], None]  # (obs before the action, action, phase, task)


def run_play_episode(env, expert: ScriptedExpert, oracle, rng: np.random.Generator, robot_obs: np.ndarray,
                     scene_obs: np.ndarray, n_tasks: int, counts: Counter | None = None,
                     on_step: StepCallback | None = None, max_steps_per_task: int = EP_LEN,
                     task_order: list[str] | None = None) -> list[TaskAttempt]:
    """Reset once, then attempt ``n_tasks`` tasks in a row (chosen at random among feasible ones, or
    ``task_order``). A task counts as solved at the first step the oracle reports it; the expert then finishes its
    plan (retreat) before the next task starts, like an operator moving on."""
    obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    counts = counts if counts is not None else Counter()
    attempts: list[TaskAttempt] = []
    step = 0
    for k in range(n_tasks):
        if task_order is not None:
            if k >= len(task_order):
                break
            task = task_order[k]
        else:
            task = choose_task(obs["robot_obs"], obs["scene_obs"], rng, counts)
        if task is None:
            break
        counts[task] += 1
        expert.reset(task)
        start_info = env.get_info()
        attempt = TaskAttempt(task, step, None, step, first_in_episode=(k == 0))
        for t in range(max_steps_per_task):
            action, phase = expert.act(obs["robot_obs"], obs["scene_obs"])
            if not attempt.phases or attempt.phases[-1][1] != phase:
                attempt.phases.append((step, phase))
            if phase == "done":
                break
            if on_step is not None:
                on_step(obs, action, phase, task)
            obs, _, _, info = env.step(action)
            if attempt.success_step is None and oracle.get_task_info_for_set(start_info, info, {task}):
                attempt.success_step = step
            step += 1
        attempt.end_step = step - 1
        attempts.append(attempt)
    return attempts
