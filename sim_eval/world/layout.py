"""The fixed facts of CALVIN's scene D, in world coordinates (metres, radians).

Everything that must agree between the embedded playtable, the real calvin_env, the oracle, the scripted expert
and the initial-state realisation lives here, once. Values are read from calvin_env 797142c
(conf/scene/calvin_scene_D.yaml, data/calvin_table_D/urdf, conf/robot/panda_longer_finger.yaml) with the scene's
``global_scaling: 0.8`` already applied, so joint values are in the same metres that ``scene_obs`` reports.

Usage::

    from sim_eval.world import layout
    layout.NEUTRAL_ROBOT_OBS[:3]          # tcp xyz of the neutral pose
    layout.SLOTS["slider_left"]           # block centre for that symbolic slot
"""

from __future__ import annotations

import numpy as np

CONTROL_HZ = 30
PHYSICS_HZ = 240
N_SUBSTEPS = PHYSICS_HZ // CONTROL_HZ  # 8 physics substeps per env step

# ---------------------------------------------------------------------------------------------------------------
# Robot (Franka Panda on a pedestal in front of the desk)
ROBOT_BASE_POS = (-0.34, -0.46, 0.24)
ARM_JOINT_LOWER_RAD = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
ARM_JOINT_UPPER_RAD = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
GRIPPER_FINGER_LIMITS_M = (0.0, 0.04)  # per finger; opening width = sum of both
TCP_OFFSET_FROM_HAND_M = 0.14  # calvin's panda_longer_finger "tcp" link: panda_hand + 0.14 m along z
MAX_REL_POS_M = 0.02  # a relative action of 1 moves the target 2 cm ...
MAX_REL_ORN_RAD = 0.05  # ... or rotates it 0.05 rad
MAX_JOINT_FORCE = 200.0
GRIPPER_FORCE = 200.0
MAX_JOINT_VELOCITY = 2.0

# robot_obs layout (15): tcp pos 3, tcp euler 3, gripper opening width 1, arm joints 7, gripper action 1
ROBOT_OBS_DIM = 15
NEUTRAL_ROBOT_OBS = np.array(
    [
        0.02586889, -0.2313129, 0.5712808,  # tcp xyz
        3.09045411, -0.02908596, 1.50013585,  # tcp euler xyz
        0.07999963,  # gripper opening width
        -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928,  # joints
        1.0,  # gripper action (open)
    ]
)

# Workspace: every absolute position the world accepts (absolute tcp targets; block positions in a strict reset).
# A generous box around the Panda's reach: the shoulder (base + 0.333 m) is at (-0.34, -0.46, 0.57) and the tcp
# reaches at most ~1.1 m from it, so |x|, |y| <= 2 m and z in [-0.5, 2] m hold every pose the arm can take, with
# room to spare. Targets beyond it are never meant (a pybullet IK target near 1e308 loops forever in C, issue 10).
WORKSPACE_LOW_M = np.array([-2.0, -2.0, -0.5])
WORKSPACE_HIGH_M = np.array([2.0, 2.0, 2.0])
# Euler angles (absolute targets, observations): calvin accumulates relative rotations without wrapping, so an
# absolute target may leave [-pi, pi]; two full turns either way is far more than any real controller sends.
MAX_ABS_ANGLE_RAD = 4 * np.pi
# joint_abs targets and joint_rel deltas: one full turn. The Panda's joints span at most 5.8 rad and the env clips
# every joint target to the limits, so anything larger is a unit or scaling bug, not a command.
MAX_JOINT_ACTION_RAD = 2 * np.pi
FLOOR_Z = 0.0  # the invisible ground plane

ROBOT_OBS_FIELDS = ("tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_width",
                    *(f"joint_{i}" for i in range(1, 8)), "gripper_action")

# ---------------------------------------------------------------------------------------------------------------
# scene_obs layout (24)
SCENE_OBS_DIM = 24
SLIDER_IDX, DRAWER_IDX, BUTTON_IDX, SWITCH_IDX, LIGHTBULB_IDX, LED_IDX = range(6)
BLOCK_NAMES = ("block_red", "block_blue", "block_pink")  # scene D order
BLOCK_OBS_SLICES = {name: slice(6 + 6 * i, 12 + 6 * i) for i, name in enumerate(BLOCK_NAMES)}
SCENE_OBS_FIELDS = ("slider", "drawer", "button", "switch", "lightbulb", "led",
                    *(f"{name}_{c}" for name in BLOCK_NAMES for c in ("x", "y", "z", "roll", "pitch", "yaw")))

# Articulations: joint name -> (range in metres). Door values: slider 0 = right, 0.28 = left; drawer 0 = closed.
SLIDER_RANGE_M = (0.0, 0.28)
DRAWER_RANGE_M = (0.0, 0.22)
BUTTON_RANGE_M = (0.0, 0.02)
SWITCH_RANGE_M = (0.0, 0.088)
SLIDER_LEFT_M, DRAWER_OPEN_M, SWITCH_ON_M = 0.28, 0.22, 0.088
# Button and switch trigger at the middle of their travel (calvin_env Button/Switch).
BUTTON_TRIGGER_M = 0.5 * (BUTTON_RANGE_M[0] + BUTTON_RANGE_M[1])
SWITCH_TRIGGER_M = 0.5 * (SWITCH_RANGE_M[0] + SWITCH_RANGE_M[1])

# ---------------------------------------------------------------------------------------------------------------
# Desk geometry (the `table` body). Its link names and ids match calvin_env so oracle contacts agree.
TABLE_LINK_IDS = {"base_link": -1, "button_link": 0, "switch_link": 1, "slide_link": 2, "drawer_link": 3,
                  "led_link": 4, "light_link": 5, "plank_link": 6}
TABLE_JOINT_IDS = {"base__button": 0, "base__switch": 1, "base__slide": 2, "base__drawer": 3}
DESK_TOP_Z = 0.44  # the table top surface
PLANK_TOP_Z = 0.441  # the sliding cabinet's shelf: calvin's slider slots (z 0.46099) rest exactly on it
DESK_X = (-0.44, 0.44)
DESK_FRONT_Y, DESK_CABINET_Y, DESK_BACK_Y = -0.18, 0.02, 0.18

# Joint origins in the world (scaled), with the direction the joint value moves the link.
SLIDER_ORIGIN = np.array([-0.1, 0.075, 0.535264])
SLIDER_AXIS = np.array([-1.0, 0.0, 0.0])  # increasing value moves the door left
DRAWER_ORIGIN = np.array([0.18, 0.0, 0.32])
DRAWER_AXIS = np.array([0.0, -1.0, 0.0])  # increasing value pulls the drawer towards the robot
BUTTON_ORIGIN = np.array([-0.12, -0.12, 0.46])
BUTTON_AXIS = np.array([0.0, 0.0, -1.0])  # pressing moves it down
SWITCH_ORIGIN = np.array([0.3, 0.060928, 0.494890])
SWITCH_AXIS = np.array([0.0, 0.5, 0.8660254])  # lever slides up and back to switch the bulb on
LED_POS = np.array([-0.12, 0.16, 0.647846])
LIGHTBULB_POS = np.array([0.3, 0.132, 0.647848])

# Handles, in world coordinates at joint value 0 (add value * axis for the current position).
SLIDER_HANDLE_AT_ZERO = np.array([0.04, 0.0165, 0.569])  # centre of the door's grip bar (4 cm wide in x)
DRAWER_HANDLE_AT_ZERO = np.array([0.18, -0.25, 0.36])  # centre of the bar in front of the drawer face
BUTTON_TOP_Z = 0.484  # top of the unpressed button cap
SWITCH_HANDLE_AT_ZERO = np.array([0.3, 0.035, 0.512])  # centre of the lever's grip at value 0

# ---------------------------------------------------------------------------------------------------------------
# Blocks (calvin scene D: red "middle", blue "small", pink "big", URDF sizes times 0.8)
BLOCK_SIZES_M = {
    "block_red": (0.056, 0.04, 0.04),
    "block_blue": (0.04, 0.04, 0.04),
    "block_pink": (0.08, 0.04, 0.04),
}
BLOCK_COLORS_RGBA = {"block_red": (1, 0, 0, 1), "block_blue": (0, 0, 1, 1), "block_pink": (1, 0, 1, 1)}
BLOCK_MASS_KG = 1.0
BLOCK_LATERAL_FRICTION = 0.7
BLOCK_SPINNING_FRICTION = 0.001

# Symbolic block slots (calvin_agent.evaluation.utils) and random-placement surfaces (scene YAML).
SLOTS = {
    "table_0": np.array([0.0500000896, -0.120000177, 0.459990009]),
    "table_1": np.array([0.229995412, -0.11999514, 0.45999001]),
    "slider_left": np.array([-0.240851662, 0.0924044687, 0.460990009]),
    "slider_right": np.array([0.070341633, 0.0924044687, 0.460990009]),
}
SURFACES = {
    "table": ((0.0, -0.15, 0.46), (0.35, -0.03, 0.46)),
    "slider_left": ((-0.32, 0.05, 0.46), (-0.16, 0.12, 0.46)),
    "slider_right": ((-0.05, 0.05, 0.46), (0.13, 0.12, 0.46)),
}
BLOCK_YAW_RANGE_RAD = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)

# ---------------------------------------------------------------------------------------------------------------
# Cameras (calvin_env conf/cameras/cameras/*.yaml)
STATIC_CAMERA = dict(
    fov_deg=10.0, near=0.01, far=10.0,
    eye=(2.871459009488717, -2.166602199425597, 2.555159848480571),
    target=(-0.026242351159453392, -0.0302329882979393, 0.3920000493526459),
    up=(0.4041403970338857, 0.22629790978217404, 0.8862616969685161),
)
GRIPPER_CAMERA = dict(fov_deg=75.0, near=0.01, far=2.0)
# gripper_cam link: panda_hand * (xyz=(-0.1, 0, 0), rpy=(1.3, 0, -1.57)); looks along its +y, up is its -z.
GRIPPER_CAMERA_OFFSET_XYZ = (-0.1, 0.0, 0.0)
GRIPPER_CAMERA_OFFSET_RPY = (1.3, 0.0, -1.57)


def slider_handle(slider_value: float) -> np.ndarray:
    return SLIDER_HANDLE_AT_ZERO + slider_value * SLIDER_AXIS


def drawer_handle(drawer_value: float) -> np.ndarray:
    return DRAWER_HANDLE_AT_ZERO + drawer_value * DRAWER_AXIS


def switch_handle(switch_value: float) -> np.ndarray:
    return SWITCH_HANDLE_AT_ZERO + switch_value * SWITCH_AXIS
