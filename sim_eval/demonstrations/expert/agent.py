"""ScriptedExpert: task name -> plan, stepped on robot_obs / scene_obs."""

from __future__ import annotations

import numpy as np

from sim_eval.demonstrations.expert import plans
from sim_eval.demonstrations.expert.base import Phase, PlanRunner, RobotState, SceneState
from sim_eval.protocol.tasks import check_task_name


def plan_for(task: str) -> list[Phase]:
    """The phase list that solves ``task`` (one of the 34 CALVIN task names). Tasks that start with a block in
    hand begin by carrying it off; the others first get clear of where the previous task left the hand."""
    check_task_name(task)
    if task in ("place_in_slider", "place_in_drawer", "stack_block"):
        return _task_plan(task)
    return [*plans.depart(), *_task_plan(task)]


def _task_plan(task: str) -> list[Phase]:
    words = task.split("_")
    if task in ("open_drawer", "close_drawer"):
        return plans.drawer_plan(open_=task == "open_drawer")
    if task.startswith("move_slider"):
        return plans.slider_plan(left=task.endswith("left"))
    if task in ("turn_on_led", "turn_off_led"):
        return plans.button_plan()
    if task in ("turn_on_lightbulb", "turn_off_lightbulb"):
        return plans.switch_plan(on=task == "turn_on_lightbulb")
    if task == "push_into_drawer":
        return plans.push_into_drawer_plan()
    if task == "place_in_slider":
        return plans.place_in_slider_plan()
    if task == "place_in_drawer":
        return plans.place_in_drawer_plan()
    if task == "stack_block":
        return plans.stack_plan()
    if task == "unstack_block":
        return plans.unstack_plan()
    block = f"block_{words[1]}"
    if words[0] == "rotate":
        return plans.rotate_plan(block, left=words[-1] == "left")
    if words[0] == "push":
        return plans.push_plan(block, right=words[-1] == "right")
    if words[0] == "lift":
        return plans.lift_plan(block)
    raise AssertionError(f"no plan for {task}")  # check_task_name admits only the 34 tasks


class ScriptedExpert:
    """Privileged-state expert. ``reset(task)`` starts a plan; ``act`` returns (action (7,), phase name)."""

    def __init__(self) -> None:
        self.task: str | None = None
        self._runner: PlanRunner | None = None

    def reset(self, task: str) -> None:
        self.task = task
        self._runner = PlanRunner(plan_for(task))

    @property
    def finished(self) -> bool:
        return self._runner is None or self._runner.finished

    @property
    def phase(self) -> str:
        return self._runner.phase_name if self._runner else "idle"

    def act(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> tuple[np.ndarray, str]:
        if self._runner is None:
            raise RuntimeError("call reset(task) before act()")
        return self._runner.act(RobotState.from_obs(np.asarray(robot_obs)), SceneState.from_obs(np.asarray(scene_obs)))
