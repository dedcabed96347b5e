"""Task plans of the scripted expert, one function per task family, and the feasibility test for each task.

Every plan is computed from the state at the moment each phase runs (goals are functions of the state), so the
expert recovers from small disturbances, works from any feasible start, and needs no simulator internals.
"""

from __future__ import annotations

import numpy as np

from sim_eval import layout
from sim_eval.expert.base import FINGERTIP_BELOW_TCP_M, Block, Goal, Phase, RobotState, SceneState, wrap_angle
from sim_eval.tasks import check_task_name

NEUTRAL_YAW = float(layout.NEUTRAL_ROBOT_OBS[5])
SAFE_Z = 0.58  # transit height above the desk: blocks (top 0.48) and fingers clear everything on it
OPEN, CLOSE = 1.0, -1.0

# Articulation geometry (see sim_eval/playtable/models.py; same layout as calvin's scene D)
DRAWER_BAR_Y_AT_ZERO = -0.261  # front face of the drawer's handle bar
DRAWER_GAP_Y_AT_ZERO = -0.212  # between the handle bar and the drawer front: where the fingers hook in
DRAWER_HANDLE_Z = 0.36
SLIDER_GRIP_AT_ZERO = layout.SLIDER_HANDLE_AT_ZERO
SLIDER_GRIP_HALF_WIDTH_M = 0.02
BUTTON_XY = layout.BUTTON_ORIGIN[:2]
SWITCH_GRIP_AT_ZERO = layout.SWITCH_HANDLE_AT_ZERO
SWITCH_OUT = np.array([0.0, -0.8660254, 0.5])  # out of the switch's track, towards the robot
DRAWER_INNER_X = (-0.02, 0.38)
DRAWER_BOTTOM_Z = 0.341
PLANK_X = (-0.36, 0.16)
SLOT_Y = 0.0924
# Over the sliding cabinet a shelf overhangs from y = 0.128: a vertical hand would hit it with its back, so the
# expert leans the fingers into the cabinet (wrist towards the robot) to grasp or place there.
CABINET_PITCH_RAD = -0.35
CABINET_FRONT_Y = 0.03


def _pitch_at(y: float) -> float:
    return CABINET_PITCH_RAD if y > CABINET_FRONT_Y else 0.0


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


def _wait(name: str, n_steps: int, gripper: float) -> Phase:
    # Hold the tcp where it is while the gripper closes or opens.
    def goal(r: RobotState, s: SceneState) -> Goal:
        return Goal(r.tcp_pos.copy(), float(r.tcp_euler[2]), gripper)

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
        grip = SLIDER_GRIP_AT_ZERO + s.slider_m * layout.SLIDER_AXIS
        return grip + [side * (SLIDER_GRIP_HALF_WIDTH_M + 0.025), extra_y, 0.0]

    goal_m = (lambda s: layout.SLIDER_LEFT_M) if left else (lambda s: 0.0)  # noqa: E731
    done = (lambda r, s, n: s.slider_m >= layout.SLIDER_LEFT_M - 0.01) if left else \
        (lambda r, s, n: s.slider_m <= 0.01)
    return [
        Phase("reach in front of handle", lambda r, s: Goal(beside(r, s, -0.08), NEUTRAL_YAW, CLOSE, tol_m=0.02)),
        Phase("reach beside handle", lambda r, s: Goal(beside(r, s), NEUTRAL_YAW, CLOSE, speed=0.5, tol_m=0.01)),
        Phase("slide", lambda r, s: Goal(np.array([SLIDER_GRIP_AT_ZERO[0] - goal_m(s) + side * 0.015 - side * 0.03,
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
        grip = SWITCH_GRIP_AT_ZERO + s.switch_m * axis
        return grip - sign * 0.028 * axis + 0.012 * SWITCH_OUT

    def end(s):
        return SWITCH_GRIP_AT_ZERO + (layout.SWITCH_ON_M + 0.01 if on else -0.01) * axis \
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


def grasp_yaw(block: Block, reference_yaw: float = NEUTRAL_YAW) -> float:
    """Gripper yaw that closes the fingers across the block's 4 cm side, nearest to ``reference_yaw``."""
    period = np.pi / 2 if abs(block.size[0] - block.size[1]) < 1e-6 else np.pi
    k = np.round((reference_yaw - block.yaw) / period)
    return float(block.yaw + k * period)


def held_block(robot: RobotState, scene: SceneState) -> str | None:
    """The block between the fingers, if the gripper is closed on one."""
    if robot.gripper_action > 0 or robot.gripper_width_m < 0.02:
        return None
    for name, b in scene.blocks.items():
        if np.linalg.norm(b.pos - robot.tcp_pos) < 0.035:
            return name
    return None


def _grasp_phases(block_of, lift_to: float | None = SAFE_Z) -> list[Phase]:
    """Reach above, descend around and close on the block ``block_of(scene)`` names (decided at the first step)."""
    memo: dict = {}

    def block(s: SceneState) -> Block:
        if "name" not in memo:
            memo["name"] = block_of(s)
        return s.blocks[memo["name"]]

    def yaw(r, s):
        if "yaw" not in memo:  # decide once, so a block that turns while grasped does not make the hand chase it
            memo["yaw"] = grasp_yaw(block(s), NEUTRAL_YAW)
        return memo["yaw"]

    def above(r, s):
        b = block(s)
        return np.array([b.pos[0], b.pos[1], max(SAFE_Z, b.pos[2] + 0.1)])

    def at(r, s):
        b = block(s)
        return np.array([b.pos[0], b.pos[1], b.pos[2] + 0.002])
    def pitch(s):
        if "pitch" not in memo:
            memo["pitch"] = _pitch_at(block(s).pos[1])
        return memo["pitch"]
    phases = [
        Phase("reach above block", lambda r, s: Goal(above(r, s), yaw(r, s), OPEN, tol_m=0.012, pitch=pitch(s)),
              max_steps=150),
        Phase("descend to block", lambda r, s: Goal(at(r, s), yaw(r, s), OPEN, speed=0.5, tol_m=0.006,
                                                    pitch=pitch(s)), max_steps=80),
        _wait("grasp", 10, CLOSE),
    ]
    if lift_to is not None:
        phases.append(Phase("lift", lambda r, s: Goal(np.array([*r.tcp_pos[:2], lift_to]), yaw(r, s), CLOSE,
                                                      speed=0.6, tol_m=0.01, pitch=pitch(s)), max_steps=60))
    return phases


def _nice(block_name: str) -> str:
    return block_name.replace("block_", "") + " block"


def lift_plan(block_name: str) -> list[Phase]:
    return _grasp_phases(lambda s: block_name)


def _place_phases(where: str, target_fn) -> list[Phase]:
    """Carry the held block above ``target_fn(r, s)`` (block centre), lower it, open, and retreat."""
    def above(r, s):
        t = target_fn(r, s)
        return np.array([t[0], t[1], SAFE_Z])

    def lower(r, s):
        return target_fn(r, s) + [0, 0, 0.012]
    yaw = lambda r, s: float(r.tcp_euler[2])  # noqa: E731  keep the yaw the block was grasped with
    pitch = lambda r, s: _pitch_at(target_fn(r, s)[1])  # noqa: E731
    return [
        _lift_to_safe(CLOSE, "lift"),
        Phase("carry to " + where, lambda r, s: Goal(above(r, s), yaw(r, s), CLOSE, tol_m=0.012, pitch=pitch(r, s)),
              max_steps=150),
        Phase("lower into " + where, lambda r, s: Goal(lower(r, s), yaw(r, s), CLOSE, speed=0.4, tol_m=0.008,
                                                       pitch=pitch(r, s)), max_steps=80),
        _wait("release", 8, OPEN),
        _lift_to_safe(OPEN, "retreat"),
    ]


def place_in_slider_plan() -> list[Phase]:
    def target(r, s):
        # The open half of the cabinet is the one the door does not cover (door spans 0.28 m, starts at x = -0.1).
        door_lo, door_hi = -0.1 - s.slider_m, 0.18 - s.slider_m
        gaps = [(PLANK_X[0], door_lo), (door_hi, PLANK_X[1])]
        lo, hi = max(gaps, key=lambda g: g[1] - g[0])
        return np.array([(lo + hi) / 2, SLOT_Y, layout.PLANK_TOP_Z + 0.02])
    return _place_phases("sliding cabinet", target)


def place_in_drawer_plan() -> list[Phase]:
    def target(r, s):
        # The part of the drawer that sticks out of the desk (y < -0.18), centred.
        y_front, y_desk = -0.157 - s.drawer_m, layout.DESK_FRONT_Y
        return np.array([0.18, (y_front + y_desk) / 2, DRAWER_BOTTOM_Z + 0.02])
    return _place_phases("drawer", target)


def stack_plan() -> list[Phase]:
    def target(r, s):
        held = held_block(r, s)
        base = _stack_base(s, held)
        return np.array([base.pos[0], base.pos[1], base.top_z + 0.02 + 0.004])
    return _place_phases("top of block", target)


def _stack_base(s: SceneState, held: str | None) -> Block:
    # The lowest block on the table other than the held one, nearest the desk centre.
    candidates = [b for n, b in s.blocks.items() if n != held and on_table(b)]
    return min(candidates, key=lambda b: abs(b.pos[0] - 0.15) + abs(b.pos[1] + 0.09))


def unstack_plan() -> list[Phase]:
    top = {}

    def top_name(s):
        if "name" not in top:
            top["name"] = stacked_top(s)
        return top["name"]

    def free_spot(r, s):
        b = s.blocks[top_name(s)]
        others = [o.pos[:2] for n, o in s.blocks.items() if n != top_name(s)]
        candidates = [np.array([x, y]) for x in np.linspace(0.02, 0.33, 8) for y in (-0.13, -0.06)]
        best = max(candidates, key=lambda c: min(np.linalg.norm(c - o) for o in others) - 0.1 * np.linalg.norm(c - b.pos[:2]))
        return np.array([best[0], best[1], layout.DESK_TOP_Z + 0.02])

    return [*_grasp_phases(top_name, lift_to=None), *_place_phases("table", free_spot)]


def rotate_plan(block_name: str, left: bool) -> list[Phase]:
    memo: dict = {}

    def yaw0(r, s):
        if "yaw" not in memo:
            memo["yaw"] = grasp_yaw(s.blocks[block_name], NEUTRAL_YAW)
            memo["xy"] = s.blocks[block_name].pos[:2].copy()
        return memo["yaw"]

    def turned(r, s):
        return yaw0(r, s) + (1.0 if left else -1.0) * np.deg2rad(80)

    def lifted(r, s):
        yaw0(r, s)
        return np.array([*memo["xy"], layout.DESK_TOP_Z + 0.02 + 0.03])

    def down(r, s):
        yaw0(r, s)
        return np.array([*memo["xy"], layout.DESK_TOP_Z + 0.02 + 0.006])
    return [
        *_grasp_phases(lambda s: block_name, lift_to=None),
        Phase("lift slightly", lambda r, s: Goal(lifted(r, s), yaw0(r, s), CLOSE, speed=0.5, tol_m=0.008), max_steps=40),
        Phase("rotate " + ("left" if left else "right"), lambda r, s: Goal(lifted(r, s), turned(r, s), CLOSE, speed=0.5),
              done=lambda r, s, n: abs(wrap_angle(turned(r, s) - r.tcp_euler[2])) < 0.06, max_steps=80),
        Phase("put down", lambda r, s: Goal(down(r, s), turned(r, s), CLOSE, speed=0.4, tol_m=0.006), max_steps=40),
        _wait("release", 8, OPEN),
        _lift_to_safe(OPEN, "retreat"),
    ]


def push_plan(block_name: str, right: bool) -> list[Phase]:
    direction = np.array([1.0, 0.0]) if right else np.array([-1.0, 0.0])
    memo: dict = {}

    def behind(r, s, back=0.03):
        b = s.blocks[block_name]
        offset = b.half_extent_along(direction) + 0.012 + back
        xy = b.pos[:2] - direction * offset
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])

    def goal_xy(r, s):
        if "start" not in memo:
            memo["start"] = s.blocks[block_name].pos[:2].copy()
        b = s.blocks[block_name]
        xy = memo["start"] + direction * 0.135 - direction * (b.half_extent_along(direction) + 0.012)
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])
    yaw = NEUTRAL_YAW
    return [
        Phase("reach behind " + _nice(block_name), lambda r, s: Goal(behind(r, s) + [0, 0, 0.1], yaw, CLOSE, tol_m=0.015)),
        Phase("lower behind " + _nice(block_name), lambda r, s: Goal(behind(r, s), yaw, CLOSE, speed=0.5, tol_m=0.008)),
        Phase("push " + ("right" if right else "left"), lambda r, s: Goal(goal_xy(r, s), yaw, CLOSE, speed=0.35),
              done=lambda r, s, n: (s.blocks[block_name].pos[:2] - memo["start"]) @ direction > 0.125, max_steps=90),
        Phase("back off", lambda r, s: Goal(r.tcp_pos + np.array([*(-direction * 0.04), 0.0]), yaw, CLOSE),
              done=lambda r, s, n: n >= 5, max_steps=6),
        _lift_to_safe(OPEN, "retreat"),
    ]


def push_into_drawer_plan() -> list[Phase]:
    chosen = {}

    def name(s):
        if "name" not in chosen:
            chosen["name"] = push_into_drawer_candidate(s)
        return chosen["name"]

    direction = np.array([0.0, -1.0])

    def behind(r, s, back=0.03):
        b = s.blocks[name(s)]
        xy = b.pos[:2] - direction * (b.half_extent_along(direction) + 0.012 + back)
        return np.array([*xy, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])

    def through(r, s):
        b = s.blocks[name(s)]
        return np.array([b.pos[0], layout.DESK_FRONT_Y - 0.03, _tcp_for_tips(layout.DESK_TOP_Z + 0.008)])
    yaw = NEUTRAL_YAW
    return [
        Phase("reach behind block", lambda r, s: Goal(behind(r, s) + [0, 0, 0.1], yaw, CLOSE, tol_m=0.015)),
        Phase("lower behind block", lambda r, s: Goal(behind(r, s), yaw, CLOSE, speed=0.5, tol_m=0.008)),
        Phase("push into drawer", lambda r, s: Goal(through(r, s), yaw, CLOSE, speed=0.35),
              done=lambda r, s, n: s.blocks[name(s)].pos[2] < layout.DESK_TOP_Z - 0.02, max_steps=90),
        _lift_to_safe(OPEN, "retreat"),
    ]


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
    # Reachable from above only where the drawer sticks out of the desk.
    return in_drawer(b, s) and b.pos[1] + b.half_extent_along(np.array([0.0, 1.0])) < layout.DESK_FRONT_Y - 0.01


def stacked_top(s: SceneState) -> str | None:
    for n, b in s.blocks.items():
        for m, c in s.blocks.items():
            if n != m and b.pos[2] > c.pos[2] + 0.03 and np.linalg.norm(b.pos[:2] - c.pos[:2]) < 0.05:
                return n
    return None


def push_into_drawer_candidate(s: SceneState) -> str | None:
    if s.drawer_m < 0.15:
        return None
    for n, b in s.blocks.items():
        if on_table(b) and DRAWER_INNER_X[0] + 0.04 < b.pos[0] < DRAWER_INNER_X[1] - 0.04 and b.pos[1] < -0.06:
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
            # Room to push 0.14 m along the desk (the button housing ends at x = -0.08) and to stand behind it.
            return -0.10 < reach_x < 0.42 and -0.10 < behind_x < 0.40 and b.pos[1] < -0.07
        return True
    if task.endswith("slider"):
        return in_slider(b) and slider_half_open(b, s)
    if task.endswith("drawer"):
        return s.drawer_m > 0.15 and drawer_block_reachable(b, s)
    raise AssertionError(task)
