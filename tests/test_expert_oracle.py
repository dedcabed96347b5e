"""Every task's oracle fires on the scripted expert's rollout and not on a no-op rollout from the same state."""

from __future__ import annotations

import numpy as np
import pytest

from sim_eval.world import layout
from sim_eval.demonstrations.expert import ScriptedExpert, task_feasible
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.protocol.oracle import TaskOracle
from sim_eval.demonstrations.play import run_play_episode
from sim_eval.world.playtable.env import PlayTableEnv
from sim_eval.protocol.tasks import TASK_NAMES

NOOP = np.array([0, 0, 0, 0, 0, 0, 1.0])


def _pose(x, y, z, yaw=np.pi / 2):
    return [x, y, z, 0.0, 0.0, yaw]


def _scene(slider=0.0, drawer=0.0, led=0, bulb=0, red=None, blue=None, pink=None) -> np.ndarray:
    """A scene_obs with blocks at the given poses (defaults: the CALVIN table slots and slider_left)."""
    red = red or _pose(*layout.SLOTS["table_0"])
    blue = blue or _pose(*layout.SLOTS["table_1"])
    pink = pink or _pose(*layout.SLOTS["slider_left"])
    return np.array([slider, drawer, 0.0, layout.SWITCH_ON_M * bulb, bulb, led, *red, *blue, *pink])


DRAWER_SLOT = (0.18, -0.29, 0.3608)  # resting on the drawer bottom (top face z 0.341)


def start_for(task: str) -> tuple[np.ndarray, list[str]]:
    """A start scene where ``task`` is feasible, and the tasks to run before it (to hold a block, say)."""
    colour = task.split("_")[1] if task.split("_")[1] in ("red", "blue", "pink") else None
    if task.endswith("_slider") and colour:
        placed = {"red": None, "blue": None, "pink": None}
        placed[colour] = _pose(*layout.SLOTS["slider_left"])
        if colour == "pink":
            return _scene(), []
        return _scene(pink=_pose(*layout.SLOTS["slider_right"]), **{colour: placed[colour]}), []
    if task.endswith("_drawer") and task.startswith("lift"):
        return _scene(drawer=layout.DRAWER_OPEN_M, **{colour: _pose(*DRAWER_SLOT)}), []
    if task == "push_into_drawer":
        return _scene(drawer=layout.DRAWER_OPEN_M, blue=_pose(*layout.SLOTS["slider_right"])), []
    if task in ("place_in_slider", "stack_block"):
        return _scene(), ["lift_red_block_table"]
    if task == "place_in_drawer":
        return _scene(drawer=layout.DRAWER_OPEN_M), ["lift_red_block_table"]
    if task == "unstack_block":
        return _scene(), ["lift_red_block_table", "stack_block"]
    if colour:  # rotate / push / lift from the table: the task's block on table slot 0, the pink one moved aside
        blocks = {"red": _pose(*layout.SLOTS["table_0"]), "blue": _pose(*layout.SLOTS["table_1"]),
                  "pink": _pose(*layout.SLOTS["slider_left"])}
        if colour != "red":
            blocks["red"], blocks[colour] = blocks[colour], blocks["red"]
        return _scene(**blocks), []
    return _scene(slider=layout.SLIDER_LEFT_M if task == "move_slider_right" else 0.0,
                  drawer=layout.DRAWER_OPEN_M if task == "close_drawer" else 0.0,
                  led=int(task == "turn_off_led"), bulb=int(task == "turn_off_lightbulb")), []


@pytest.fixture(scope="module")
def world():
    env = PlayTableEnv(cameras=[])
    yield env, TaskOracle(), ScriptedExpert()
    env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_expert_solves_and_noop_does_not(world, task):
    env, oracle, expert = world
    scene_obs, prefix = start_for(task)
    rng = np.random.default_rng(0)
    if not prefix:
        assert task_feasible(task, layout.NEUTRAL_ROBOT_OBS, scene_obs), task
    attempts = run_play_episode(env, expert, oracle, rng, layout.NEUTRAL_ROBOT_OBS, scene_obs,
                                n_tasks=len(prefix) + 1, task_order=[*prefix, task])
    assert [a.task for a in attempts] == [*prefix, task]
    assert all(a.success for a in attempts), [(a.task, a.success, a.phases) for a in attempts]

    # No-op from the state right before the task: the oracle must stay silent.
    obs = env.reset(layout.NEUTRAL_ROBOT_OBS, scene_obs)
    for pre in prefix:  # reproduce the prefix, then idle
        expert.reset(pre)
        for _ in range(360):
            action, phase = expert.act(obs["robot_obs"], obs["scene_obs"])
            if phase == "done":
                break
            obs, *_ = env.step(action)
    start = env.get_info()
    hold = NOOP.copy()
    hold[6] = obs["robot_obs"][14]
    for _ in range(60):
        _, _, _, info = env.step(hold)
        assert task not in oracle.get_task_info_for_set(start, info, {task})


def test_calvin_initial_state_chain_zero(world):
    """The expert completes the first official chain's first task from its exact initial state."""
    from sim_eval.protocol.chains import official_subset

    env, oracle, expert = world
    state, tasks = official_subset(1)[0]
    robot_obs, scene_obs = state_to_obs(state)
    attempts = run_play_episode(env, expert, oracle, np.random.default_rng(0), robot_obs, scene_obs,
                                n_tasks=1, task_order=list(tasks[:1]))
    assert attempts[0].success


@pytest.mark.parametrize("task", TASK_NAMES)
def test_expert_never_raises_on_infeasible_tasks(world, task):
    """Evaluation chains can ask for a task whose preconditions an earlier failure destroyed (no stack to unstack,
    no block over the drawer): the expert must still act, never raise."""
    env, _, expert = world
    scene_obs = _scene(pink=_pose(*layout.SLOTS["slider_right"]), blue=_pose(*layout.SLOTS["slider_left"]))
    obs = env.reset(layout.NEUTRAL_ROBOT_OBS, scene_obs)
    expert.reset(task)
    for _ in range(25):
        action, _ = expert.act(obs["robot_obs"], obs["scene_obs"])
        assert action.shape == (7,) and np.isfinite(action).all() and action[6] in (-1.0, 1.0)
        obs, *_ = env.step(action)
