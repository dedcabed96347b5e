"""Building blocks of the scripted expert: reading the state, waypoint phases, and the relative-action controller.

The expert sees only ``robot_obs`` (15), ``scene_obs`` (24) and the fixed layout (``sim_eval.layout``), so it drives
the real calvin_env as well as the playtable, and it emits the same 7-D relative actions a learned policy would.

A task plan is a list of ``Phase``s. Each phase has a name (the label a reasoner learns as the subtask, e.g.
"reach handle", "grasp", "pull"), a tcp goal (position, yaw, gripper) computed from the current state, and a
completion test. The controller turns "where the tcp is" and "where it should be" into a clipped relative action.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sim_eval import layout

DOWN_ROLL_RAD = np.pi  # gripper pointing straight down
POS_GAIN = 1.0 / layout.MAX_REL_POS_M  # metres of error -> action units (1 unit = 2 cm)
ORN_GAIN = 1.0 / layout.MAX_REL_ORN_RAD
FINGERTIP_BELOW_TCP_M = 0.0134  # fingertips reach this far below the tcp (calvin's longer fingers)


def wrap_angle(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


@dataclass(frozen=True)
class RobotState:
    tcp_pos: np.ndarray  # (3,) metres
    tcp_euler: np.ndarray  # (3,) xyz euler, radians
    gripper_width_m: float
    joints_rad: np.ndarray  # (7,)
    gripper_action: float  # last commanded +-1

    @classmethod
    def from_obs(cls, robot_obs: np.ndarray) -> "RobotState":
        return cls(robot_obs[:3].copy(), robot_obs[3:6].copy(), float(robot_obs[6]), robot_obs[7:14].copy(),
                   float(robot_obs[14]))


@dataclass(frozen=True)
class Block:
    name: str
    pos: np.ndarray  # (3,) centre
    euler: np.ndarray  # (3,)
    size: tuple[float, float, float]

    @property
    def yaw(self) -> float:
        return float(self.euler[2])

    def half_extent_along(self, axis_xy: np.ndarray) -> float:
        """Half the block's footprint along a horizontal unit direction."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        ax, ay = np.array([c, s]), np.array([-s, c])
        return 0.5 * (abs(ax @ axis_xy) * self.size[0] + abs(ay @ axis_xy) * self.size[1])

    @property
    def top_z(self) -> float:
        return float(self.pos[2] + self.size[2] / 2)


@dataclass(frozen=True)
class SceneState:
    slider_m: float
    drawer_m: float
    button_m: float
    switch_m: float
    lightbulb_on: bool
    led_on: bool
    blocks: dict[str, Block]

    @classmethod
    def from_obs(cls, scene_obs: np.ndarray) -> "SceneState":
        blocks = {}
        for name in layout.BLOCK_NAMES:
            pose = scene_obs[layout.BLOCK_OBS_SLICES[name]]
            blocks[name] = Block(name, pose[:3].copy(), pose[3:6].copy(), layout.BLOCK_SIZES_M[name])
        return cls(float(scene_obs[layout.SLIDER_IDX]), float(scene_obs[layout.DRAWER_IDX]),
                   float(scene_obs[layout.BUTTON_IDX]), float(scene_obs[layout.SWITCH_IDX]),
                   bool(round(scene_obs[layout.LIGHTBULB_IDX])), bool(round(scene_obs[layout.LED_IDX])), blocks)


@dataclass(frozen=True)
class Goal:
    """Where the tcp should go: position (3,), yaw (rad, gripper pointing down), gripper command (+-1)."""

    pos: np.ndarray
    yaw: float
    gripper: float
    speed: float = 1.0  # cap on the action magnitude (1 = 2 cm per step)
    tol_m: float = 0.01  # how close counts as "reached"
    roll: float = DOWN_ROLL_RAD
    pitch: float = 0.0


GoalFn = Callable[[RobotState, SceneState], Goal]
DoneFn = Callable[[RobotState, SceneState, int], bool]  # (robot, scene, steps spent in this phase)


@dataclass
class Phase:
    name: str
    goal: GoalFn
    done: DoneFn | None = None  # default: the tcp reached the goal within its tolerance (and yaw within 0.1 rad)
    max_steps: int = 120  # a phase that takes longer than this is abandoned (the plan moves on)
    min_steps: int = 0


def reached(goal: Goal, robot: RobotState, yaw_tol: float = 0.1) -> bool:
    pos_ok = np.linalg.norm(goal.pos - robot.tcp_pos) < goal.tol_m
    return bool(pos_ok and abs(wrap_angle(goal.yaw - robot.tcp_euler[2])) < yaw_tol)


def relative_action(goal: Goal, robot: RobotState) -> np.ndarray:
    """Proportional control towards ``goal``: a 7-D relative action in [-1, 1] with a binary gripper."""
    pos_err = goal.pos - robot.tcp_pos
    pos_act = pos_err * POS_GAIN
    norm = np.linalg.norm(pos_act)
    if norm > goal.speed:
        pos_act *= goal.speed / norm
    orn_err = wrap_angle(np.array([goal.roll, goal.pitch, goal.yaw]) - robot.tcp_euler)
    orn_act = np.clip(orn_err * ORN_GAIN * 0.5, -1.0, 1.0)
    return np.concatenate([np.clip(pos_act, -1, 1), orn_act, [1.0 if goal.gripper > 0 else -1.0]])


@dataclass
class PlanRunner:
    """Steps through a list of phases; ``act`` returns (action, phase name)."""

    phases: list[Phase]
    index: int = 0
    steps_in_phase: int = 0
    history: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.index >= len(self.phases)

    @property
    def phase_name(self) -> str:
        return self.phases[self.index].name if not self.finished else "done"

    def act(self, robot: RobotState, scene: SceneState) -> tuple[np.ndarray, str]:
        while not self.finished:
            phase = self.phases[self.index]
            goal = phase.goal(robot, scene)
            if phase.done is not None:
                complete = phase.done(robot, scene, self.steps_in_phase)
            else:
                complete = reached(goal, robot)
            complete = (complete and self.steps_in_phase >= phase.min_steps) or self.steps_in_phase >= phase.max_steps
            if not complete:
                self.steps_in_phase += 1
                return relative_action(goal, robot), phase.name
            self.history.append(phase.name)
            self.index += 1
            self.steps_in_phase = 0
        # Plan finished: hold the pose with the last gripper command.
        hold = np.zeros(7)
        hold[6] = 1.0 if robot.gripper_action >= 0 else -1.0
        return hold, "done"
