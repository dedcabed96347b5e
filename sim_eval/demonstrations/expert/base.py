"""Building blocks of the scripted expert: reading the state, waypoint phases, and the relative-action controller.

The expert sees only ``robot_obs`` (15), ``scene_obs`` (24) and the fixed layout (``sim_eval.world.layout``), so it drives
the real calvin_env as well as the playtable, and it emits the same 7-D relative actions a learned policy would.

A task plan is a list of ``Phase``s. Each phase has a name (the label a reasoner learns as the subtask, e.g.
"reach handle", "grasp", "pull"), a tcp goal (position, yaw, gripper) computed from the current state, and a
completion test. The controller turns "where the tcp is" and "where it should be" into a clipped relative action.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sim_eval.world import layout

DOWN_ROLL_RAD = np.pi  # gripper pointing straight down
POS_GAIN = 1.0 / layout.MAX_REL_POS_M  # metres of error -> action units (1 unit = 2 cm)
FINGERTIP_BELOW_TCP_M = 0.0134  # fingertips reach this far below the tcp (calvin's longer fingers)


NEUTRAL_YAW = float(layout.NEUTRAL_ROBOT_OBS[5])
# The hand turns about the vertical from about -2.2 to +3.1 rad away from the neutral yaw (joint 7 and the arm's
# posture together); yaw errors are measured as turns inside that range, never across the unreachable sector
# behind it, so going from one end of the range to the other sweeps through the neutral yaw.
WRIST_MID_TURN_RAD = 0.45


def wrap_angle(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def wrist_turn(yaw):
    """A hand yaw as a turn from the neutral yaw, in the range the wrist can reach (see ``WRIST_MID_TURN_RAD``)."""
    return wrap_angle(np.asarray(yaw) - NEUTRAL_YAW - WRIST_MID_TURN_RAD) + WRIST_MID_TURN_RAD


def hand_euler(yaw: float, lean: np.ndarray = np.zeros(2)) -> tuple[float, float, float]:
    """(roll, pitch, yaw) of a hand whose fingers point down, turned to ``yaw`` about the vertical, then tilted so the
    fingers point towards the horizontal direction of ``lean`` by its length (radians)."""
    angle = float(np.linalg.norm(lean))
    rot = _rot_z(yaw) @ np.diag([1.0, -1.0, -1.0])  # Rz(yaw) Rx(pi)
    if angle > 0:
        axis = np.array([lean[1], -lean[0], 0.0]) / angle  # turning -z about this axis tips it towards +lean
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = (np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k) @ rot
    # xyz euler of R = Rz(yaw) Ry(pitch) Rx(roll), pybullet's convention
    return (float(np.arctan2(rot[2, 1], rot[2, 2])), float(-np.arcsin(np.clip(rot[2, 0], -1, 1))),
            float(np.arctan2(rot[1, 0], rot[0, 0])))


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


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
    on_start: Callable[[], None] | None = None  # called when the phase is entered (e.g. to re-plan a retry)
    check: Callable[[RobotState, SceneState], bool] | None = None  # after the phase: did it work?
    redo_from: str | None = None  # if the check fails, go back to this phase (a bounded number of times)


def reached(goal: Goal, robot: RobotState, yaw_tol: float = 0.1) -> bool:
    pos_ok = np.linalg.norm(goal.pos - robot.tcp_pos) < goal.tol_m
    return bool(pos_ok and abs(wrap_angle(goal.yaw - robot.tcp_euler[2])) < yaw_tol)


# How far the controller's target may lead the measured tcp. calvin's relative actions move an internal target
# (robot.target_pos += action * 2 cm), not the tcp: a controller that keeps commanding towards a goal the arm cannot
# reach (a blocked finger, the edge of the workspace) winds that target up, metres away, and the arm then lunges
# through IK's far-off solution. Bounding the lead keeps pressing forces and recoveries sane.
TARGET_LEAD_M = 0.05
TARGET_LEAD_RAD = 0.3


@dataclass
class TargetTracker:
    """The expert's own account of calvin's target pose: the measured pose when a task starts, plus every relative
    action sent since (exactly what calvin_env's ``use_target_pose`` robot does with them)."""

    pos: np.ndarray | None = None
    orn: np.ndarray | None = None  # xyz euler, accumulated without wrapping, as calvin does

    def sync(self, robot: RobotState) -> None:
        self.pos, self.orn = robot.tcp_pos.copy(), robot.tcp_euler.copy()

    def action(self, goal: Goal, robot: RobotState) -> np.ndarray:
        """Proportional control towards ``goal`` with a bounded target lead: a 7-D relative action in [-1, 1]."""
        if self.pos is None:
            self.sync(robot)
        step = (goal.pos - robot.tcp_pos) * POS_GAIN
        norm = np.linalg.norm(step)
        if norm > goal.speed:
            step *= goal.speed / norm
        lead = self.pos + step * layout.MAX_REL_POS_M - robot.tcp_pos
        lead *= min(1.0, TARGET_LEAD_M / max(np.linalg.norm(lead), 1e-9))
        pos_act = np.clip((robot.tcp_pos + lead - self.pos) / layout.MAX_REL_POS_M, -1, 1)

        orn_err = wrap_angle(np.array([goal.roll, goal.pitch, goal.yaw]) - robot.tcp_euler)
        orn_err[2] = wrist_turn(goal.yaw) - wrist_turn(robot.tcp_euler[2])
        orn_lead = wrap_angle(self.orn - robot.tcp_euler) + orn_err * 0.5
        orn_lead = np.clip(orn_lead, -TARGET_LEAD_RAD, TARGET_LEAD_RAD)
        orn_act = np.clip((orn_lead - wrap_angle(self.orn - robot.tcp_euler)) / layout.MAX_REL_ORN_RAD, -1, 1)

        self.pos = self.pos + pos_act * layout.MAX_REL_POS_M
        self.orn = self.orn + orn_act * layout.MAX_REL_ORN_RAD
        return np.concatenate([pos_act, orn_act, [1.0 if goal.gripper > 0 else -1.0]])


MAX_REDOS = 2  # retries per plan (e.g. re-grasping a block that slipped)


@dataclass
class PlanRunner:
    """Steps through a list of phases; ``act`` returns (action, phase name)."""

    phases: list[Phase]
    tracker: TargetTracker = field(default_factory=TargetTracker)
    index: int = 0
    steps_in_phase: int = 0
    redos: int = 0
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
            if self.steps_in_phase == 0 and phase.on_start is not None:
                phase.on_start()
            goal = phase.goal(robot, scene)
            if phase.done is not None:
                complete = phase.done(robot, scene, self.steps_in_phase)
            else:
                complete = reached(goal, robot)
            complete = (complete and self.steps_in_phase >= phase.min_steps) or self.steps_in_phase >= phase.max_steps
            if not complete:
                self.steps_in_phase += 1
                return self.tracker.action(goal, robot), phase.name
            self.history.append(phase.name)
            self.index = self._next_index(phase, robot, scene)
            self.steps_in_phase = 0
        # Plan finished: hold the pose with the last gripper command.
        hold = np.zeros(7)
        hold[6] = 1.0 if robot.gripper_action >= 0 else -1.0
        return hold, "done"

    def _next_index(self, phase: Phase, robot: RobotState, scene: SceneState) -> int:
        if phase.check is not None and self.redos < MAX_REDOS and not phase.check(robot, scene):
            self.redos += 1
            return [p.name for p in self.phases].index(phase.redo_from)
        return self.index + 1
