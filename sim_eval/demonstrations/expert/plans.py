"""Task plans of the scripted expert, one function per task family, and the feasibility test for each task.

Every plan is computed from the state at the moment each phase runs (goals are functions of the state), so the
expert recovers from small disturbances, works from any feasible start, and needs no simulator internals.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sim_eval.world import layout
from sim_eval.demonstrations.expert.base import (FINGERTIP_BELOW_TCP_M, NEUTRAL_YAW, Block, Goal, Phase, RobotState, SceneState,
                                  hand_euler, wrap_angle, wrist_turn)
from sim_eval.protocol.tasks import check_task_name

SAFE_Z = 0.58  # transit height above the desk: blocks (top 0.48) and fingers clear everything on it
OPEN, CLOSE = 1.0, -1.0

# Articulation geometry (see sim_eval/world/playtable/models.py; same layout as calvin's scene D)
DRAWER_BAR_Y_AT_ZERO = -0.261  # front face of the drawer's handle bar
DRAWER_GAP_Y_AT_ZERO = -0.212  # between the handle bar and the drawer front: where the fingers hook in
DRAWER_HANDLE_Z = 0.36
SLIDER_GRIP_HALF_WIDTH_M = 0.02
BUTTON_XY = layout.BUTTON_ORIGIN[:2]
BUTTON_HOUSING_HALF_M = 0.04  # the housing is 8 cm square around the button, 2 cm tall
SWITCH_OUT = np.array([0.0, -0.8660254, 0.5])  # out of the switch's track, towards the robot
DRAWER_INNER_X = (0.003, 0.357)  # inner faces of the drawer's side walls
DRAWER_BOTTOM_Z = 0.341
PLANK_X = (-0.36, 0.16)
SLOT_Y = 0.0924
# Over the sliding cabinet a shelf overhangs from y = 0.14: a vertical hand would hit it with its back, so the
# expert leans the fingers into the cabinet (wrist towards the robot) and hovers lower there than over the desk.
# The door's grip sticks out of the cabinet down to y = -0.03, z = 0.51: the hand and a held block enter and leave
# the cabinet straight along y from in front of it, at the x of the open half they work in.
CABINET_LEAN = np.array([0.0, 0.35])
CABINET_ENTRY_Y = -0.04  # tcp beyond this (towards +y) counts as inside the cabinet's reach
CABINET_FRONT_Y = -0.10  # where the tcp moves sideways in front of the cabinet, clear of the grip
CABINET_HOVER_Z = 0.53  # fingertips above the blocks in there, hand below the shelf
# Beyond x = 0.3 a vertical hand is at the edge of the arm's reach (worse the higher and the further back): the
# expert leans the fingers outwards there, preferring a yaw that keeps the finger pads vertical.
FAR_RIGHT_X = 0.3
FAR_RIGHT_LEAN = np.array([0.45, 0.0])
NO_LEAN = np.zeros(2)


def _lean_at(pos: np.ndarray) -> np.ndarray:
    if pos[1] > layout.DESK_CABINET_Y:  # on the cabinet's shelf
        return CABINET_LEAN
    if pos[0] > FAR_RIGHT_X:
        return FAR_RIGHT_LEAN
    return NO_LEAN


def _hand(pos, yaw: float, gripper: float, lean: np.ndarray = NO_LEAN, **kw) -> Goal:
    roll, pitch, yaw_ = hand_euler(yaw, lean)
    return Goal(np.asarray(pos, dtype=float), yaw_, gripper, roll=roll, pitch=pitch, **kw)


def _cabinet_waypoint(tcp: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Where to go first on the way to ``target`` so the hand enters or leaves the cabinet straight along y."""
    inside, target_inside = in_cabinet_reach(tcp), in_cabinet_reach(target)
    lined_up = abs(tcp[0] - target[0]) < 0.02
    if inside and not (target_inside and lined_up):
        return np.array([tcp[0], CABINET_FRONT_Y, tcp[2]])
    if target_inside and not lined_up:
        return np.array([target[0], CABINET_FRONT_Y, target[2]])
    return None


def _routed(goal_fn):
    """A transit goal that goes round the door's grip (see ``_cabinet_waypoint``)."""
    def goal(r: RobotState, s: SceneState) -> Goal:
        g = goal_fn(r, s)
        waypoint = _cabinet_waypoint(r.tcp_pos, g.pos)
        return g if waypoint is None else replace(g, pos=waypoint, speed=max(g.speed, 0.8))
    return goal


def _fixed(pos, yaw=NEUTRAL_YAW, gripper=OPEN, **kw):
    pos = np.asarray(pos, dtype=float)
    return lambda r, s: Goal(pos, yaw, gripper, **kw)


def _tcp_for_tips(z_tips: float) -> float:
    return z_tips + FINGERTIP_BELOW_TCP_M


def _lift_to_safe(gripper: float, name: str = "lift", yaw=None) -> Phase:
    def goal(r: RobotState, s: SceneState) -> Goal:
        return Goal(np.array([r.tcp_pos[0], r.tcp_pos[1], max(SAFE_Z, r.tcp_pos[2])]),
                    float(r.tcp_euler[2]) if yaw is None else yaw, gripper, tol_m=0.02)

    return Phase(name, goal, done=lambda r, s, n: r.tcp_pos[2] > SAFE_Z - 0.02, max_steps=60)


def _leave_cabinet(gripper: float, name: str) -> list[Phase]:
    """Rise to the hover height, slide out in front of the cabinet, then rise to the transit height. The first two
    are skipped when the hand starts outside the cabinet."""
    memo: dict = {}

    def started_inside(r: RobotState) -> bool:
        return memo.setdefault("inside", in_cabinet_reach(r.tcp_pos))

    def rise(r, s):
        z = max(CABINET_HOVER_Z, r.tcp_pos[2])
        return _hand([*r.tcp_pos[:2], z], hand_heading(r), gripper, CABINET_LEAN, speed=0.5)

    def out(r, s):
        return _hand([r.tcp_pos[0], CABINET_FRONT_Y, r.tcp_pos[2]], hand_heading(r), gripper, CABINET_LEAN,
                     speed=0.6)
    return [
        Phase(name, rise, done=lambda r, s, n: not started_inside(r) or r.tcp_pos[2] > CABINET_HOVER_Z - 0.01,
              max_steps=40),
        Phase(name, out, done=lambda r, s, n: not started_inside(r) or r.tcp_pos[1] < CABINET_FRONT_Y + 0.03,
              max_steps=60),
        _lift_to_safe(gripper, name),
    ]


def depart() -> list[Phase]:
    """Get clear of whatever the previous task left the hand next to (a door grip, the switch, the cabinet) before
    heading for a new target: the evaluation starts the next subtask the moment the oracle fires, and a straight
    move from there can sweep through the desk's fixtures. Back out towards the robot, then rise; both phases end
    at once when the hand is already clear. The gripper keeps its last command."""
    memo: dict = {}

    def gripper(r: RobotState) -> float:
        return memo.setdefault("gripper", OPEN if r.gripper_action > 0 else CLOSE)

    def in_front_of_cabinet(r: RobotState) -> bool:  # the door grip, the switch and the shelf are all here
        return memo.setdefault("cabinet", bool(r.tcp_pos[1] > -0.06))

    def low(r: RobotState) -> bool:  # e.g. hooked in the drawer handle, or beside a block it pushed
        return memo.setdefault("low", bool(r.tcp_pos[2] < SAFE_Z - 0.03))

    def back(r, s):
        start = memo.setdefault("start", r.tcp_pos.copy())
        roll, pitch, yaw = r.tcp_euler
        return Goal(np.array([start[0], -0.10, start[2]]), float(yaw), gripper(r), speed=0.6, tol_m=0.02,
                    roll=float(roll), pitch=float(pitch))
    return [
        Phase("back away", back, done=lambda r, s, n: not in_front_of_cabinet(r) or r.tcp_pos[1] < -0.08,
              max_steps=40),
        Phase("rise", lambda r, s: Goal(np.array([r.tcp_pos[0], r.tcp_pos[1], SAFE_Z]), float(r.tcp_euler[2]),
                                        gripper(r), tol_m=0.02),
              done=lambda r, s, n: not (low(r) or in_front_of_cabinet(r)) or r.tcp_pos[2] > SAFE_Z - 0.03,
              max_steps=40),
    ]


def _wait(name: str, n_steps: int, gripper: float) -> Phase:
    # Hold the tcp where it is, leaning as it does, while the gripper closes or opens.
    def goal(r: RobotState, s: SceneState) -> Goal:
        roll, pitch, yaw = r.tcp_euler
        return Goal(r.tcp_pos.copy(), float(yaw), gripper, roll=float(roll), pitch=float(pitch))

    return Phase(name, goal, done=lambda r, s, n: n >= n_steps, max_steps=n_steps + 1)


# ---------------------------------------------------------------------------------------------------------------
# Drawer, slider, button, switch


def drawer_plan(open_: bool) -> list[Phase]:
    if open_:
        def hook(r, s):
            return np.array([0.18, DRAWER_GAP_Y_AT_ZERO - s.drawer_m, DRAWER_HANDLE_Z])
        target = lambda s0: min(layout.DRAWER_OPEN_M, s0 + 0.16)  # noqa: E731
        return [
            Phase("reach above handle", lambda r, s: Goal(hook(r, s) + [0, 0, 0.2], NEUTRAL_YAW, CLOSE, tol_m=0.03)),
            Phase("reach handle", lambda r, s: Goal(hook(r, s), NEUTRAL_YAW, CLOSE, speed=0.6, tol_m=0.012)),
            Phase("pull", lambda r, s: Goal(hook(r, s) + [0, -0.08, 0], NEUTRAL_YAW, CLOSE, speed=0.5),
                  done=lambda r, s, n: s.drawer_m >= layout.DRAWER_OPEN_M - 0.005, max_steps=90),
            Phase("release", lambda r, s: Goal(r.tcp_pos + [0, -0.03, 0.0], NEUTRAL_YAW, CLOSE),
                  done=lambda r, s, n: n >= 4, max_steps=5),
            _lift_to_safe(OPEN, "retreat", NEUTRAL_YAW),
        ]

    def bar_front(r, s):
        return np.array([0.18, DRAWER_BAR_Y_AT_ZERO - s.drawer_m - 0.03, DRAWER_HANDLE_Z])
    return [
        Phase("reach above handle", lambda r, s: Goal(bar_front(r, s) + [0, 0, 0.2], NEUTRAL_YAW, CLOSE, tol_m=0.03)),
        Phase("reach handle", lambda r, s: Goal(bar_front(r, s), NEUTRAL_YAW, CLOSE, speed=0.6, tol_m=0.012)),
        Phase("push", lambda r, s: Goal(bar_front(r, s) + [0, 0.08, 0], NEUTRAL_YAW, CLOSE, speed=0.5),
              done=lambda r, s, n: s.drawer_m <= 0.005, max_steps=90),
        Phase("back off", lambda r, s: Goal(r.tcp_pos + [0, -0.04, 0.0], NEUTRAL_YAW, CLOSE),
              done=lambda r, s, n: n >= 5, max_steps=6),
        _lift_to_safe(OPEN, "retreat", NEUTRAL_YAW),
    ]


def slider_plan(left: bool) -> list[Phase]:
    # Push the door's grip sideways with closed fingers from the side opposite to the motion.
    side = 1.0 if left else -1.0  # left = towards -x, so push from the +x side

    def beside(r, s, extra_y=0.0):
        grip = layout.slider_handle(s.slider_m)
        return grip + [side * (SLIDER_GRIP_HALF_WIDTH_M + 0.025), extra_y, 0.0]

    goal_m = (lambda s: layout.SLIDER_LEFT_M) if left else (lambda s: 0.0)  # noqa: E731
    done = (lambda r, s, n: s.slider_m >= layout.SLIDER_LEFT_M - 0.01) if left else \
        (lambda r, s, n: s.slider_m <= 0.01)
    return [
        Phase("reach in front of handle", lambda r, s: Goal(beside(r, s, -0.08), NEUTRAL_YAW, CLOSE, tol_m=0.02)),
        Phase("reach beside handle", lambda r, s: Goal(beside(r, s), NEUTRAL_YAW, CLOSE, speed=0.5, tol_m=0.01)),
        Phase("slide", lambda r, s: Goal(np.array([layout.slider_handle(goal_m(s))[0] + side * 0.015 - side * 0.03,
                                                   beside(r, s)[1], beside(r, s)[2]]), NEUTRAL_YAW, CLOSE, speed=0.5),
              done=done, max_steps=120),
        Phase("back off", lambda r, s: Goal(r.tcp_pos + [0, -0.06, 0.0], NEUTRAL_YAW, CLOSE),
              done=lambda r, s, n: n >= 6, max_steps=7),
        _lift_to_safe(OPEN, "retreat", NEUTRAL_YAW),
    ]


def button_plan() -> list[Phase]:
    above = np.array([*BUTTON_XY, 0.56])
    press = np.array([*BUTTON_XY, _tcp_for_tips(layout.BUTTON_TOP_Z - 0.016)])
    start_led = {}

    def pressed(r, s, n):
        start_led.setdefault("led", s.led_on)
        return s.button_m > layout.BUTTON_TRIGGER_M + 0.002
    return [
        Phase("reach above button", _fixed(above, gripper=CLOSE, tol_m=0.015)),
        Phase("press button", _fixed(press - [0, 0, 0.01], gripper=CLOSE, speed=0.4), done=pressed, max_steps=60),
        Phase("release button", _fixed(above, gripper=CLOSE, speed=0.6, tol_m=0.02),
              done=lambda r, s, n: s.button_m < 0.003 and r.tcp_pos[2] > 0.52, max_steps=40),
    ]


# The switch sits at the edge of the arm's reach: with the gripper pointing straight down the wrist cannot get there,
# so the expert tilts the fingers forward (towards +x and +y), as CALVIN's teleoperators did.
SWITCH_ROLL_RAD, SWITCH_PITCH_RAD = np.pi - 0.35, -0.45


def approach_axis(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Direction the fingers point (the hand's z axis) for a tcp orientation given as xyz euler."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    # third column of Rz(yaw) @ Ry(pitch) @ Rx(roll)
    return np.array([cy * sp * cr + sy * sr, sy * sp * cr - cy * sr, cp * cr])


def switch_plan(on: bool) -> list[Phase]:
    axis = layout.SWITCH_AXIS
    sign = 1.0 if on else -1.0
    tip_offset = FINGERTIP_BELOW_TCP_M * approach_axis(
        SWITCH_ROLL_RAD, SWITCH_PITCH_RAD, NEUTRAL_YAW)

    def goal(tip: np.ndarray, **kw) -> Goal:
        return Goal(tip - tip_offset, NEUTRAL_YAW, CLOSE, roll=SWITCH_ROLL_RAD, pitch=SWITCH_PITCH_RAD, **kw)

    def start(s):
        # Fingertips just beyond the grip (below it to push up, above it to push down), slightly out of the track.
        grip = layout.switch_handle(s.switch_m)
        return grip - sign * 0.028 * axis + 0.012 * SWITCH_OUT

    def end(s):
        return layout.switch_handle(layout.SWITCH_ON_M + 0.01 if on else -0.01) \
            - sign * 0.018 * axis + 0.012 * SWITCH_OUT
    done = (lambda r, s, n: s.switch_m > layout.SWITCH_ON_M - 0.01) if on else (lambda r, s, n: s.switch_m < 0.01)
    return [
        Phase("reach in front of switch", lambda r, s: goal(start(s) + 0.06 * SWITCH_OUT, tol_m=0.015)),
        Phase("reach switch", lambda r, s: goal(start(s), speed=0.4, tol_m=0.008)),
        Phase("slide switch " + ("up" if on else "down"), lambda r, s: goal(end(s), speed=0.4), done=done,
              max_steps=80),
        Phase("back off", lambda r, s: Goal(r.tcp_pos + 0.06 * SWITCH_OUT, NEUTRAL_YAW, CLOSE, roll=SWITCH_ROLL_RAD,
                                            pitch=SWITCH_PITCH_RAD),
              done=lambda r, s, n: n >= 6, max_steps=7),
        _lift_to_safe(OPEN, "retreat", NEUTRAL_YAW),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Blocks

# How far the wrist turns from its neutral yaw, with a margin to joint 7's limits (radians, signed).
WRIST_TURN_RANGE = (-2.1, 2.9)
OPEN_FINGERS_HALF_SPAN_M = 0.052  # open fingers reach this far from the tcp along the closing axis
# The hand above the fingers is 20 cm wide along the closing axis: in the sliding cabinet (fingers closing along x)
# it needs this much room on either side from the cabinet's walls and the inclined door.
HAND_HALF_SPAN_M = 0.085


def grasp_pose(block: Block, turn_after: float = 0.0) -> tuple[float, np.ndarray]:
    """Gripper yaw that closes the fingers across the block's 4 cm side, and the lean (see ``hand_euler``) to grasp
    it with where it lies. Among the yaws that fit the block (and leave the wrist room to turn by ``turn_after``
    once it holds it), the least wrist turn wins, and when leaning, a yaw that leans along the finger pads (keeping
    them vertical) wins over one that would tilt them."""
    lean = _lean_at(block.pos)
    period = np.pi / 2 if abs(block.size[0] - block.size[1]) < 1e-6 else np.pi
    turns = [float(wrist_turn(block.yaw + k * period)) for k in range(4)]
    fits = [t for t in turns if all(WRIST_TURN_RANGE[0] <= t + d <= WRIST_TURN_RANGE[1] for d in (0.0, turn_after))]

    def cost(turn: float) -> float:
        return abs(turn) + (2.0 * _pads_tilt(NEUTRAL_YAW + turn, lean) if lean.any() else 0.0)
    turn = min(fits or turns, key=cost)
    tilted = lean.any() and _pads_tilt(NEUTRAL_YAW + turn, lean) > 0.5
    if turn_after and tilted and block.pos[1] < layout.DESK_CABINET_Y:
        # Leaning across the finger pads drops one fingertip 2 cm below the other, onto the desk beside the block (it
        # pushes a long block lying along y off the desk's right edge). A block to turn is lifted only 3 cm, which a
        # vertical hand still reaches at the far right of the desk.
        lean = NO_LEAN
    return NEUTRAL_YAW + turn, lean


def _pads_tilt(yaw: float, lean: np.ndarray) -> float:
    """0 when the hand at ``yaw`` leans along its x (the finger pads stay vertical), 1 when across the pads."""
    lean_dir = lean / max(np.linalg.norm(lean), 1e-9)
    return float(abs(np.cos(yaw) * lean_dir[1] - np.sin(yaw) * lean_dir[0]))


def hand_heading(robot: RobotState) -> float:
    """The yaw ``hand_euler`` was given for the hand's current orientation (its closing axis, seen from above)."""
    roll, pitch, yaw = robot.tcp_euler
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    closing = np.array([cy * sp * sr - sy * cr, sy * sp * sr + cy * cr])  # second column of Rz Ry Rx, x and y
    return float(np.arctan2(closing[0], -closing[1]))


def held_block(robot: RobotState, scene: SceneState) -> str | None:
    """The block between the fingers, if the gripper is closed on one."""
    if robot.gripper_action > 0 or robot.gripper_width_m < 0.02:
        return None
    for name, b in scene.blocks.items():
        if np.linalg.norm(b.pos - robot.tcp_pos) < 0.035:
            return name
    return None


def _grasp_offset(s: SceneState, b: Block, yaw: float) -> np.ndarray:
    """A shift of the grasp along the fingers' closing axis, away from a neighbour (block or wall) that the open
    fingers would otherwise land on. Closing fingers centre the block between them again, so the shift is bounded
    by the slack between the open fingers and the block."""
    closing, across = np.array([np.sin(yaw), -np.cos(yaw)]), np.array([np.cos(yaw), np.sin(yaw)])
    faces = {1.0: 0.2, -1.0: 0.2}  # distance along the closing axis to the nearest obstacle on either side
    for n, o in s.blocks.items():
        d = o.pos[:2] - b.pos[:2]
        if n == b.name or abs(o.pos[2] - b.pos[2]) > 0.03 or abs(d @ across) > o.half_extent_along(across) + 0.015:
            continue
        side = float(np.sign(d @ closing))
        faces[side] = min(faces[side], abs(d @ closing) - o.half_extent_along(closing))
    for wall_x in _walls_x(s, b):
        if abs(closing[0]) > 0.5:
            side = float(np.sign((wall_x - b.pos[0]) * closing[0]))
            faces[side] = min(faces[side], abs(wall_x - b.pos[0]) / abs(closing[0]))
    if min(faces.values()) > OPEN_FINGERS_HALF_SPAN_M + 0.008:
        return np.zeros(2)
    slack = max(0.0, 0.04 - b.half_extent_along(closing) - 0.004)
    return float(np.clip((faces[1.0] - faces[-1.0]) / 2, -slack, slack)) * closing


def _walls_x(s: SceneState, b: Block) -> tuple[float, ...]:
    """The side walls around a block in the sliding cabinet (its open part) or in the drawer."""
    if in_drawer(b, s):
        return DRAWER_INNER_X
    if in_slider(b):
        return _cabinet_part_of(s, b)
    return ()


def _cabinet_part_of(s: SceneState, b: Block) -> tuple[float, float]:
    left, right = _cabinet_open_parts(s)
    return left if b.pos[0] < left[1] else right


class _Grasp:
    """Reach above, descend around and close on a block. Which block is decided at the first step; the grasp pose
    each time the reach starts (a retry after a missed grasp re-plans from where the block now lies)."""

    def __init__(self, block_of, turn_after: float = 0.0):
        self._block_of = block_of
        self._turn_after = turn_after
        self._memo: dict = {}

    def name(self, s: SceneState) -> str:
        return self._memo.setdefault("name", self._block_of(s))

    def block(self, s: SceneState) -> Block:
        return s.blocks[self.name(s)]

    def pose(self, s: SceneState) -> tuple[float, np.ndarray]:
        if "pose" not in self._memo:  # fixed for the attempt: a block that turns while grasped must not be chased
            b = self.block(s)
            self._memo["pose"] = grasp_pose(b, self._turn_after)
            self._memo["offset"] = _grasp_offset(s, b, self._memo["pose"][0])
        return self._memo["pose"]

    def grip_point(self, s: SceneState) -> np.ndarray:
        """Where the tcp closes: the block's centre, shifted away from a close neighbour (see ``_grasp_offset``)."""
        self.pose(s)
        return self.block(s).pos + [*self._memo["offset"], 0.002]

    def held(self, r: RobotState, s: SceneState) -> bool:
        return held_block(r, s) == self.name(s)

    def _replan(self) -> None:
        self._memo.pop("pose", None)
        self._memo.pop("offset", None)

    def _goal(self, s: SceneState, pos, gripper: float, **kw) -> Goal:
        yaw, lean = self.pose(s)
        return _hand(pos, yaw, gripper, lean, **kw)

    def _above(self, s: SceneState) -> np.ndarray:
        grip = self.grip_point(s)
        z = CABINET_HOVER_Z if in_cabinet_reach(grip) else max(SAFE_Z, grip[2] + 0.07)
        return np.array([grip[0], grip[1], z])

    def phases(self, lift: bool = True) -> list[Phase]:
        """Up to the closed grasp; with ``lift``, also lifted clear (to the hover height in the cabinet, then out),
        re-grasping when the block did not come up between the fingers."""
        phases = [
            Phase("reach above block", _routed(lambda r, s: self._goal(s, self._above(s), OPEN, tol_m=0.012)),
                  max_steps=150, on_start=self._replan),
            Phase("descend to block", lambda r, s: self._goal(s, self.grip_point(s), OPEN, speed=0.5, tol_m=0.006),
                  max_steps=80),
            _wait("grasp", 10, CLOSE),
        ]
        if lift:
            phases.append(self.lift_phase("lift", SAFE_Z, speed=0.6))
        return phases

    def lift_phase(self, name: str, z: float, speed: float) -> Phase:
        def goal(r, s):
            top = CABINET_HOVER_Z if in_cabinet_reach(r.tcp_pos) else z
            return self._goal(s, [*r.tcp_pos[:2], top], CLOSE, speed=speed, tol_m=0.01)
        return Phase(name, goal, max_steps=60, check=self.held, redo_from="reach above block")


def in_cabinet_reach(pos: np.ndarray) -> bool:
    return bool(pos[1] > CABINET_ENTRY_Y)


def _nice(block_name: str) -> str:
    return block_name.replace("block_", "") + " block"


def lift_plan(block_name: str) -> list[Phase]:
    return [*_Grasp(lambda s: block_name).phases(), *_leave_cabinet(CLOSE, "lift")]


def _place_phases(where: str, target_fn, heading_fn=None) -> list[Phase]:
    """Carry the held block above ``target_fn(r, s)`` (block centre), lower it, open, and retreat. The hand keeps
    the heading it grasped with unless ``heading_fn(r, s)`` gives one (decided when the carry starts)."""
    memo: dict = {}

    def heading(r, s):
        if "heading" not in memo:
            memo["heading"] = hand_heading(r) if heading_fn is None else heading_fn(r, s)
        return memo["heading"]

    def goal(r, s, pos, **kw):
        return _hand(pos, heading(r, s), CLOSE, _lean_at(target_fn(r, s)), **kw)

    def above(r, s):
        t = target_fn(r, s)
        return np.array([t[0], t[1], CABINET_HOVER_Z if in_cabinet_reach(t) else SAFE_Z])

    def lower(r, s):
        return target_fn(r, s) + [0, 0, 0.012]
    return [
        *_leave_cabinet(CLOSE, "lift"),
        Phase("carry to " + where, _routed(lambda r, s: goal(r, s, above(r, s), tol_m=0.012)), max_steps=150),
        Phase("lower into " + where, lambda r, s: goal(r, s, lower(r, s), speed=0.4, tol_m=0.008), max_steps=80),
        _wait("release", 8, OPEN),
        *_leave_cabinet(OPEN, "retreat"),
    ]


def place_in_slider_plan() -> list[Phase]:
    def target(r, s):
        return np.array([_slider_place_x(s, held_block(r, s)), SLOT_Y, layout.PLANK_TOP_Z + 0.02])
    # Facing the cabinet (fingers closing along x) keeps the hand's back off the shelf and the door.
    return _place_phases("sliding cabinet", _once(target), heading_fn=lambda r, s: NEUTRAL_YAW)


def _once(fn):
    """``fn`` evaluated at the first call and then remembered (a target that must not move while approached)."""
    memo: dict = {}
    return lambda r, s: memo.setdefault("value", fn(r, s))


def _slider_place_x(s: SceneState, held: str | None) -> float:
    """The x in the open part of the cabinet where the hand keeps the most room from the walls and the door, and
    the open fingers from the blocks already there."""
    others = [b for n, b in s.blocks.items() if n != held and in_slider(b)]
    best, best_room = PLANK_X[0] + HAND_HALF_SPAN_M, -np.inf
    for lo, hi in _cabinet_open_parts(s):
        for x in np.linspace(lo, hi, 27):
            room = min(x - lo, hi - x) - HAND_HALF_SPAN_M
            for b in others:
                room = min(room, abs(x - b.pos[0]) - b.half_extent_along(np.array([1.0, 0.0]))
                           - OPEN_FINGERS_HALF_SPAN_M)
            if room > best_room:
                best, best_room = x, room
    return float(best)


def _cabinet_open_parts(s: SceneState) -> tuple[tuple[float, float], ...]:
    """The x ranges of the sliding cabinet the door leaves open (one of them empty at either end of its travel)."""
    door_lo, door_hi = -0.1 - s.slider_m, 0.18 - s.slider_m
    return (PLANK_X[0], door_lo), (door_hi, PLANK_X[1])


def place_in_drawer_plan() -> list[Phase]:
    def target(r, s):
        return np.array([*_drawer_place_xy(s, held_block(r, s)), DRAWER_BOTTOM_Z + 0.02])
    return _place_phases("drawer", _once(target))


def _drawer_place_xy(s: SceneState, held: str | None) -> np.ndarray:
    """The spot in the part of the drawer that sticks out of the desk where the open fingers and the block keep the
    most room from the drawer's walls, the desk's front edge and the blocks already in the drawer."""
    y_lo, y_hi = -0.157 - s.drawer_m, layout.DESK_FRONT_Y
    others = [b for n, b in s.blocks.items() if n != held and in_drawer(b, s)]
    best, best_room = np.array([0.18, (y_lo + y_hi) / 2]), -np.inf
    for x in np.linspace(*DRAWER_INNER_X, 15):
        for y in np.linspace(y_lo, y_hi, 7):
            room = min(min(x - DRAWER_INNER_X[0], DRAWER_INNER_X[1] - x) - OPEN_FINGERS_HALF_SPAN_M,
                       min(y - y_lo, y_hi - y) - 0.04)
            for b in others:
                room = min(room, np.linalg.norm(b.pos[:2] - [x, y]) - np.hypot(*b.size[:2]) / 2
                           - OPEN_FINGERS_HALF_SPAN_M)
            if room > best_room + 1e-9:
                best, best_room = np.array([x, y]), room
    return best


def stack_plan() -> list[Phase]:
    chosen: dict = {}

    def target(r, s):
        if "base" not in chosen:  # pick the base once: the held block must not switch targets mid-air
            chosen["base"] = _stack_base(s, held_block(r, s)).name
        base = s.blocks[chosen["base"]]
        return np.array([base.pos[0], base.pos[1], base.top_z + 0.02 + 0.004])
    return _place_phases("top of block", target)


def _stack_base(s: SceneState, held: str | None) -> Block:
    # A block on the table other than the held one, nearest the desk centre. An evaluation chain can ask for a
    # stack when none is on the table (an earlier subtask went astray): then try the nearest other block anyway.
    others = [b for n, b in s.blocks.items() if n != held]
    candidates = [b for b in others if on_table(b)] or others
    return min(candidates, key=lambda b: abs(b.pos[0] - 0.15) + abs(b.pos[1] + 0.09))


def unstack_plan() -> list[Phase]:
    grasp = _Grasp(_unstack_target)

    def free_spot(r, s):
        b = grasp.block(s)
        others = [o.pos[:2] for n, o in s.blocks.items() if n != grasp.name(s)]
        candidates = [np.array([x, y]) for x in np.linspace(0.02, 0.28, 8) for y in (-0.13, -0.06)]
        best = max(candidates, key=lambda c: min(np.linalg.norm(c - o) for o in others)
                   - 0.1 * np.linalg.norm(c - b.pos[:2]))
        return np.array([best[0], best[1], layout.DESK_TOP_Z + 0.02])

    return [*grasp.phases(), *_place_phases("table", _once(free_spot))]


def _turning_spot(s: SceneState, b: Block) -> np.ndarray:
    """Where to turn ``b``: where it lies, or up to 6 cm away when it lies too close to another block or the button
    housing to turn there (the oracle allows 0.1 m of travel)."""
    radius = np.hypot(*b.size[:2]) / 2  # the footprint sweeps this circle as it turns

    def room(xy):
        gaps = [np.linalg.norm(o.pos[:2] - xy) - radius - np.hypot(*o.size[:2]) / 2
                for n, o in s.blocks.items() if n != b.name and on_table(o)]
        housing = np.clip(xy, BUTTON_XY - BUTTON_HOUSING_HALF_M, BUTTON_XY + BUTTON_HOUSING_HALF_M)
        gaps.append(np.linalg.norm(xy - housing) - radius)
        gaps.append(xy[1] - radius - layout.DESK_FRONT_Y)  # stay on the desk, clear of the cabinet front
        gaps.append(layout.DESK_CABINET_Y - (xy[1] + radius))
        return min(gaps)
    offsets = [np.array([dx, dy]) for dx in np.linspace(-0.06, 0.06, 7) for dy in np.linspace(-0.06, 0.06, 7)
               if np.hypot(dx, dy) <= 0.061]
    best = max(offsets, key=lambda o: min(room(b.pos[:2] + o), 0.005) - 0.05 * np.linalg.norm(o))
    return b.pos[:2] + best


def rotate_plan(block_name: str, left: bool) -> list[Phase]:
    turn = (1.0 if left else -1.0) * np.deg2rad(80)
    grasp = _Grasp(lambda s: block_name, turn_after=turn)
    start: dict = {}

    def spot(s, dz):
        if "xy" not in start:
            start["xy"] = _turning_spot(s, s.blocks[block_name]) + grasp.grip_point(s)[:2] - s.blocks[block_name].pos[:2]
        return np.array([*start["xy"], layout.DESK_TOP_Z + 0.02 + dz])

    def turned(s):
        return grasp.pose(s)[0] + turn

    def hand(s, pos, yaw, **kw):
        return _hand(pos, yaw, CLOSE, grasp.pose(s)[1], **kw)

    def turn_done(r, s, n):
        return abs(wrap_angle(hand(s, r.tcp_pos, turned(s)).yaw - r.tcp_euler[2])) < 0.06
    return [
        *grasp.phases(lift=False),
        Phase("lift slightly", lambda r, s: hand(s, spot(s, 0.03), grasp.pose(s)[0], speed=0.5, tol_m=0.008),
              max_steps=40, check=grasp.held, redo_from="reach above block"),
        Phase("rotate " + ("left" if left else "right"), lambda r, s: hand(s, spot(s, 0.03), turned(s), speed=0.5),
              done=turn_done, max_steps=80),
        Phase("put down", lambda r, s: hand(s, spot(s, 0.006), turned(s), speed=0.4, tol_m=0.006), max_steps=40),
        _wait("release", 8, OPEN),
        _lift_to_safe(OPEN, "retreat"),
    ]


PUSH_TRAVEL_M = 0.135  # the oracle wants > 0.1 m; a little more absorbs the block's slip at the end


def push_travel(b: Block, direction: np.ndarray) -> float:
    """How far the expert pushes ``b`` along x: its usual stroke, or less where the button housing stops it."""
    housing_lo, housing_hi = BUTTON_XY - BUTTON_HOUSING_HALF_M, BUTTON_XY + BUTTON_HOUSING_HALF_M
    half_y = b.half_extent_along(np.array([0.0, 1.0]))
    in_line = b.pos[1] - half_y < housing_hi[1] and b.pos[1] + half_y > housing_lo[1]
    lead = b.pos[0] + direction[0] * b.half_extent_along(direction)  # the block's leading face
    if not in_line or direction[0] > 0 or lead < housing_hi[0]:
        return PUSH_TRAVEL_M
    return min(PUSH_TRAVEL_M, lead - housing_hi[0])


def push_plan(block_name: str, right: bool) -> list[Phase]:
    direction = np.array([1.0, 0.0]) if right else np.array([-1.0, 0.0])
    memo: dict = {}

    def behind(r, s, back=0.03):
        b = s.blocks[block_name]
        offset = b.half_extent_along(direction) + 0.012 + back
        xy = b.pos[:2] - direction * offset
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])

    def start(s):
        if "start" not in memo:
            b = s.blocks[block_name]
            memo["start"], memo["travel"] = b.pos[:2].copy(), push_travel(b, direction)
        return memo["start"]

    def goal_xy(r, s):
        b = s.blocks[block_name]
        xy = start(s) + direction * (memo["travel"] - b.half_extent_along(direction) - 0.012)
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])

    def moved(s) -> float:
        return float((s.blocks[block_name].pos[:2] - start(s)) @ direction)

    def strike() -> list[Phase]:
        # The push stops short of the oracle's 0.1 m; the rest is done by strikes aimed just past the block's near
        # face: the fingers stop there and the block slides on alone, so the task ends with the hand clear of the
        # block (a next task such as push_into_drawer needs the robot not touching it when it starts).
        aim: dict = {}
        return [
            Phase("draw back", lambda r, s: Goal(behind(r, s, back=0.02), yaw, CLOSE, speed=0.5, tol_m=0.004),
                  done=lambda r, s, n: moved(s) > travel_goal() or reached(behind(r, s, back=0.02), r), max_steps=10),
            Phase("strike", lambda r, s: Goal(aim.setdefault("at", behind(r, s, back=-0.01)), yaw, CLOSE, speed=1.0),
                  done=lambda r, s, n: moved(s) > travel_goal() or n >= 4, max_steps=5),
        ]
    yaw = NEUTRAL_YAW
    travel_goal = lambda: min(0.115, memo["travel"] - 0.002)  # noqa: E731

    def reached(pos, r) -> bool:
        return bool(np.linalg.norm(pos - r.tcp_pos) < 0.005)
    return [
        Phase("reach behind " + _nice(block_name), lambda r, s: Goal(behind(r, s) + [0, 0, 0.1], yaw, CLOSE, tol_m=0.015)),
        Phase("lower behind " + _nice(block_name), lambda r, s: Goal(behind(r, s), yaw, CLOSE, speed=0.5, tol_m=0.008)),
        Phase("push " + ("right" if right else "left"), lambda r, s: Goal(goal_xy(r, s), yaw, CLOSE, speed=0.35),
              done=lambda r, s, n: moved(s) > PUSH_BEFORE_STRIKE_M, max_steps=90),
        *[phase for _ in range(N_STRIKES) for phase in strike()],
        Phase("push " + ("right" if right else "left"), lambda r, s: Goal(goal_xy(r, s), yaw, CLOSE, speed=0.35),
              done=lambda r, s, n: moved(s) > travel_goal(), max_steps=60),
        Phase("back off", lambda r, s: Goal(r.tcp_pos + np.array([*(-direction * 0.04), 0.0]), yaw, CLOSE),
              done=lambda r, s, n: n >= 5, max_steps=6),
        _lift_to_safe(OPEN, "retreat"),
    ]


def push_into_drawer_plan() -> list[Phase]:
    chosen: dict = {}

    def name(s):
        if "name" not in chosen:
            chosen["name"] = _push_into_drawer_target(s)
        return chosen["name"]

    def direction(s):
        # Pushed straight towards the robot, a block near a side wall drops in against it (often tipped), where the
        # fingers cannot get round it to lift it again: the push slants towards the drawer's centre line so the
        # block lands clear of the walls. Fixed at the start of the push.
        if "direction" not in chosen:
            b = s.blocks[name(s)]
            half_x = b.half_extent_along(np.array([1.0, 0.0]))
            land_x = float(np.clip(b.pos[0], DRAWER_INNER_X[0] + half_x + PUSH_WALL_ROOM_M,
                                   DRAWER_INNER_X[1] - half_x - PUSH_WALL_ROOM_M))
            d = np.array([land_x - b.pos[0], layout.DESK_FRONT_Y - 0.04 - b.pos[1]])
            chosen["direction"] = d / np.linalg.norm(d)
        return chosen["direction"]

    def behind(r, s, back=0.03):
        b, d = s.blocks[name(s)], direction(s)
        xy = b.pos[:2] - d * (b.half_extent_along(d) + 0.012 + back)
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])

    def through(r, s):
        # Follow the block well past the desk edge: a block that only just tips over it can come to rest on the
        # drawer's back wall instead of its bottom (and the oracle wants it on the bottom).
        b, d = s.blocks[name(s)], direction(s)
        xy = b.pos[:2] + d * (b.pos[1] - (layout.DESK_FRONT_Y - PUSH_PAST_EDGE_M)) / abs(d[1])
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])
    yaw = NEUTRAL_YAW
    return [
        Phase("reach behind block", lambda r, s: Goal(behind(r, s) + [0, 0, 0.1], yaw, CLOSE, tol_m=0.015)),
        Phase("lower behind block", lambda r, s: Goal(behind(r, s), yaw, CLOSE, speed=0.5, tol_m=0.008)),
        Phase("push into drawer", lambda r, s: Goal(through(r, s), yaw, CLOSE, speed=0.35),
              done=lambda r, s, n: s.blocks[name(s)].pos[2] < DRAWER_RIM_Z - 0.01, max_steps=90),
        _lift_to_safe(OPEN, "retreat"),
    ]


PUSH_WALL_ROOM_M = 0.07
PUSH_BEFORE_STRIKE_M = 0.07  # a sideways push stops here (the oracle wants > 0.1 m) and strikes do the rest
N_STRIKES = 4
PUSH_PAST_EDGE_M = 0.09  # how far beyond the desk's front edge the push follows the block
DRAWER_RIM_Z = 0.401  # top of the drawer's walls  # where push_into_drawer aims a block: this far between its side and a drawer wall


# ---------------------------------------------------------------------------------------------------------------
# Where blocks are (symbolic predicates from geometry)


def on_table(b: Block) -> bool:
    return (layout.DESK_FRONT_Y < b.pos[1] < layout.DESK_CABINET_Y and abs(b.pos[2] - (layout.DESK_TOP_Z + 0.02)) < 0.012
            and layout.DESK_X[0] < b.pos[0] < layout.DESK_X[1])


def in_slider(b: Block) -> bool:
    return (PLANK_X[0] < b.pos[0] < PLANK_X[1] and 0.02 < b.pos[1] < 0.16
            and abs(b.pos[2] - (layout.PLANK_TOP_Z + 0.02)) < 0.012)


def slider_half_open(b: Block, s: SceneState) -> bool:
    door_lo, door_hi = -0.1 - s.slider_m, 0.18 - s.slider_m
    half = b.half_extent_along(np.array([1.0, 0.0]))
    return b.pos[0] + half < door_lo - 0.005 or b.pos[0] - half > door_hi + 0.005


def in_drawer(b: Block, s: SceneState) -> bool:
    return (DRAWER_INNER_X[0] < b.pos[0] < DRAWER_INNER_X[1] and b.pos[2] < layout.DESK_TOP_Z - 0.02
            and -0.16 - s.drawer_m < b.pos[1] < 0.04 - s.drawer_m)


def drawer_block_reachable(b: Block, s: SceneState) -> bool:
    # Reachable from above only where the drawer sticks out of the desk; and the oracle wants it resting on the
    # drawer (not on another block in there).
    on_bottom = b.pos[2] < DRAWER_BOTTOM_Z + 0.035
    return (in_drawer(b, s) and on_bottom
            and b.pos[1] + b.half_extent_along(np.array([0.0, 1.0])) < layout.DESK_FRONT_Y - 0.01)


def stacked_top(s: SceneState) -> str | None:
    for n, b in s.blocks.items():
        for m, c in s.blocks.items():
            if n != m and b.pos[2] > c.pos[2] + 0.03 and np.linalg.norm(b.pos[:2] - c.pos[:2]) < 0.05:
                return n
    return None


def _unstack_target(s: SceneState) -> str:
    # The top block of a stack; without a stack (an earlier subtask went astray) the highest block.
    return stacked_top(s) or max(s.blocks, key=lambda n: s.blocks[n].pos[2])


def _push_into_drawer_target(s: SceneState) -> str:
    # The block the plan pushes: the feasible candidate, else (an evaluation chain may ask regardless) the block
    # nearest the drawer's centre line.
    return push_into_drawer_candidate(s) or min(
        s.blocks, key=lambda n: np.linalg.norm(s.blocks[n].pos[:2] - [np.mean(DRAWER_INNER_X), -0.1]))


def push_into_drawer_candidate(s: SceneState) -> str | None:
    """A block the expert can push off the desk's front edge into the open drawer: on the table, clear of the
    other blocks (the oracle wants it touching only the table top at the start), and wholly over the drawer's
    inside so it drops in rather than onto a side wall."""
    if s.drawer_m < 0.15:
        return None
    for n, b in s.blocks.items():
        half_x = b.half_extent_along(np.array([1.0, 0.0]))
        over_drawer = DRAWER_INNER_X[0] + half_x + 0.005 < b.pos[0] < DRAWER_INNER_X[1] - half_x - 0.005
        if on_table(b) and over_drawer and b.pos[1] < -0.06 and _clear_around(s, n):
            return n
    return None


def _clear_around(s: SceneState, name: str, radius: float = 0.075) -> bool:
    b = s.blocks[name]
    return all(np.linalg.norm(b.pos[:2] - o.pos[:2]) > radius for n, o in s.blocks.items() if n != name)


def task_feasible(task: str, robot_obs: np.ndarray, scene_obs: np.ndarray) -> bool:
    """Whether the expert's plan for ``task`` can succeed from this state (CALVIN's symbolic preconditions, made
    geometric, plus the room the motion needs)."""
    check_task_name(task)
    r, s = RobotState.from_obs(robot_obs), SceneState.from_obs(scene_obs)
    held = held_block(r, s)
    if task in ("place_in_slider", "place_in_drawer", "stack_block"):
        if held is None:
            return False
        if task == "place_in_drawer":
            return s.drawer_m > 0.18
        if task == "stack_block":
            return any(on_table(b) and n != held for n, b in s.blocks.items())
        return True
    if held is not None:
        return False
    if task == "open_drawer":
        return s.drawer_m < layout.DRAWER_OPEN_M - 0.125
    if task == "close_drawer":
        return s.drawer_m > 0.125
    if task == "move_slider_left":
        return s.slider_m < layout.SLIDER_LEFT_M - 0.155
    if task == "move_slider_right":
        return s.slider_m > 0.155
    if task == "turn_on_led":
        return not s.led_on
    if task == "turn_off_led":
        return s.led_on
    if task == "turn_on_lightbulb":
        return not s.lightbulb_on
    if task == "turn_off_lightbulb":
        return s.lightbulb_on
    if task == "push_into_drawer":
        return push_into_drawer_candidate(s) is not None
    if task == "unstack_block":
        return stacked_top(s) is not None
    colour = task.split("_")[1]
    b = s.blocks[f"block_{colour}"]
    if task.startswith(("rotate", "push_")) or task.startswith("lift") and task.endswith("table"):
        if not on_table(b) or not _clear_around(s, b.name):
            return False
        if task.startswith("push_"):
            right = task.endswith("right")
            reach_x = b.pos[0] + (0.14 if right else -0.14)
            behind_x = b.pos[0] - (0.06 if right else -0.06)
            # Room to push 0.14 m along the desk and to stand behind the block; a block in line with the button
            # housing must have room to move more than 0.1 m before it hits it.
            room = push_travel(b, np.array([1.0 if right else -1.0, 0.0]))
            return -0.10 < reach_x < 0.42 and -0.10 < behind_x < 0.40 and b.pos[1] < -0.07 and room > 0.104
        return True
    if task.endswith("slider"):
        # The hand must fit between the cabinet's walls and the door (a block left beside the door edge cannot
        # be grasped from above).
        lo, hi = _cabinet_part_of(s, b)
        return in_slider(b) and slider_half_open(b, s) and min(b.pos[0] - lo, hi - b.pos[0]) >= HAND_HALF_SPAN_M
    if task.endswith("drawer"):
        return s.drawer_m > 0.15 and drawer_block_reachable(b, s)
    raise AssertionError(task)
