"""The Panda's kinematics for the ROS policy node, in numpy: measured joints -> CALVIN ``robot_obs``, relative
end-effector actions -> joint position targets. No simulator on the robot side (tests/test_architecture.py).

A policy trained on CALVIN's relative actions (``rel_ee``) never sees joints, but a JointTrajectoryController only
takes joints; this closes the gap with the robot model: ``PANDA`` holds the arm's kinematic chain (the Panda URDF's
joint origins and axes, CALVIN's longer fingers' ``tcp`` 0.14 m past the hand), where the arm's base sits in the
frame the policy was trained in (CALVIN's table frame: the playtable's base position), the joint limits and the
neutral posture IK pulls towards. tests/test_joint_commands.py checks it against the playtable's own URDF and FK.

IK is damped least squares on the tcp pose (position + rotation vector error; Newton steps from the seed until
the tcp is within 10 um) with one nullspace pull towards the neutral posture per solve, as calvin_env's robot does with pybullet's IK, and the 2 cm / 0.05 rad per unit scaling of
CALVIN's relative actions. Chunk hand-over follows calvin_env's robot: a relative action moves an internal
*target* pose (not the measured tcp), and the next chunk continues from the target the previous chunk reached, so
the commanded joints are continuous across chunks; ``anchor(robot_obs)`` puts the target on the measured tcp (a new
instruction, a resume after a stop). Each point's IK starts from the previous point's solution (the arm is assumed
to track its command), which keeps consecutive solutions on one branch.

Usage::

    kin = PandaKinematics()
    robot_obs = kin.robot_obs(joints, gripper_width=0.08, gripper_action=1)   # (15,) as calvin_env reports it
    kin.anchor(robot_obs)
    targets = kin.follow(rel_actions)                                          # (T, 7) joint targets, rad
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["ArmModel", "PANDA", "PandaKinematics", "euler_to_matrix", "matrix_to_euler"]

HALF_PI = math.pi / 2


@dataclass(frozen=True)
class ArmModel:
    """A serial arm: per revolute joint the fixed transform from its parent (xyz, rpy) and its axis (local z)."""

    joint_xyz: tuple[tuple[float, float, float], ...]
    joint_rpy: tuple[tuple[float, float, float], ...]
    tool_xyz: tuple[float, float, float]  # last joint -> tcp translation (flange, hand, tcp offsets)
    tool_yaw: float  # last joint -> tcp rotation about z (the hand's -45 degrees)
    base_xyz: tuple[float, float, float]  # the arm's base in the policy's world frame
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    rest: tuple[float, ...]  # the posture the IK's nullspace pulls towards
    max_rel_pos_m: float = 0.02  # CALVIN: a relative action of 1 moves the target 2 cm ...
    max_rel_orn_rad: float = 0.05  # ... or turns it 0.05 rad


# The Panda (pybullet_data franka_panda / franka_description joint origins), CALVIN's tcp 0.14 m past the hand,
# the base where CALVIN's table frame has it, the playtable's joint limits and neutral posture.
PANDA = ArmModel(
    joint_xyz=((0, 0, 0.333), (0, 0, 0), (0, -0.316, 0), (0.0825, 0, 0), (-0.0825, 0.384, 0), (0, 0, 0),
               (0.088, 0, 0)),
    joint_rpy=((0, 0, 0), (-HALF_PI, 0, 0), (HALF_PI, 0, 0), (HALF_PI, 0, 0), (-HALF_PI, 0, 0), (HALF_PI, 0, 0),
               (HALF_PI, 0, 0)),
    tool_xyz=(0.0, 0.0, 0.107 + 0.14),
    tool_yaw=-math.pi / 4,
    base_xyz=(-0.34, -0.46, 0.24),
    lower=(-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973),
    upper=(2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973),
    rest=(-1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928),
)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def euler_to_matrix(euler) -> np.ndarray:
    """pybullet's / URDF's xyz euler (roll, pitch, yaw): R = Rz(yaw) Ry(pitch) Rx(roll)."""
    r, p, y = (float(v) for v in euler)
    return _rot_z(y) @ _rot_y(p) @ _rot_x(r)


def matrix_to_euler(m: np.ndarray) -> np.ndarray:
    """The inverse of ``euler_to_matrix`` as pybullet's getEulerFromQuaternion reports it (pitch in [-pi/2, pi/2])."""
    pitch = -math.asin(max(-1.0, min(1.0, float(m[2, 0]))))
    if abs(m[2, 0]) < 1 - 1e-12:
        roll = math.atan2(m[2, 1], m[2, 2])
        yaw = math.atan2(m[1, 0], m[0, 0])
    else:  # gimbal lock: put the whole rotation about z into yaw
        roll, yaw = 0.0, math.atan2(-m[0, 1], m[1, 1])
    return np.array([roll, pitch, yaw])


def _rotation_vector(m: np.ndarray) -> np.ndarray:
    """The axis * angle of rotation matrix ``m`` (log map)."""
    cos = max(-1.0, min(1.0, (np.trace(m) - 1) / 2))
    angle = math.acos(cos)
    v = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    if angle < 1e-9:
        return v / 2
    if math.pi - angle < 1e-6:  # ~180 degrees: the axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(m) + 1) / 2, 0, None))
        axis *= np.sign(v + (v == 0))
        return axis / max(np.linalg.norm(axis), 1e-12) * angle
    return v * (angle / (2 * math.sin(angle)))


class PandaKinematics:
    """FK and damped-least-squares IK of ``model`` (thread-safe; the target pose is the only state)."""

    def __init__(self, model: ArmModel = PANDA, iterations: int = 20, damping: float = 0.01,
                 nullspace_gain: float = 0.2, tolerance_m: float = 1e-5):
        self.model = model
        self.iterations, self.damping, self.nullspace_gain = int(iterations), float(damping), float(nullspace_gain)
        self.tolerance = float(tolerance_m)
        self._fixed = [(np.array(xyz, float), euler_to_matrix(rpy)) for xyz, rpy in
                       zip(model.joint_xyz, model.joint_rpy)]
        self._tool_p, self._tool_r = np.array(model.tool_xyz, float), _rot_z(model.tool_yaw)
        self._base = np.array(model.base_xyz, float)
        self.lower, self.upper = np.array(model.lower), np.array(model.upper)
        self.rest = np.array(model.rest)
        self._lock = threading.Lock()
        self.target_pos = np.zeros(3)
        self.target_orn = np.zeros(3)  # xyz euler, accumulated like calvin's (no wrapping)
        self._seed = self.rest.copy()
        self.anchored = False

    # -- forward kinematics -------------------------------------------------------------------------------------

    def _chain(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(tcp position, tcp rotation, joint axes (world), joint positions (world))."""
        p, r = self._base.copy(), np.eye(3)
        axes, origins = [], []
        cos, sin = np.cos(q), np.sin(q)
        for (xyz, fixed), c, s in zip(self._fixed, cos, sin):
            p = p + r @ xyz
            r = r @ fixed
            axes.append(r[:, 2])
            origins.append(p)
            r = r @ np.array(((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0)))
        return p + r @ self._tool_p, r @ self._tool_r, axes, origins

    def tcp_pose(self, joints) -> tuple[np.ndarray, np.ndarray]:
        """(tcp position (3,), tcp euler (3,)) for ``joints`` (7,)."""
        pos, rot, _, _ = self._chain(self._joints(joints))
        return pos, matrix_to_euler(rot)

    @staticmethod
    def _joints(joints, what: str = "joints") -> np.ndarray:
        q = np.asarray(joints, dtype=np.float64)
        if q.shape != (7,) or not np.all(np.isfinite(q)):
            raise ValueError(f"{what} must be 7 finite joint positions (rad), got {np.asarray(joints).tolist()}")
        return q

    def robot_obs(self, joints, gripper_width: float, gripper_action: int) -> np.ndarray:
        """CALVIN's ``robot_obs`` (15,) for measured ``joints`` (7,): tcp position, tcp euler, gripper opening width,
        the joints and the last gripper command (+-1), as calvin_env reports it."""
        q = self._joints(joints)
        width = float(gripper_width)
        if not math.isfinite(width):
            raise ValueError(f"gripper_width must be finite, got {gripper_width}")
        pos, euler = self.tcp_pose(q)
        action = 1.0 if gripper_action >= 0 else -1.0
        return np.array([*pos, *euler, width, *q, action], dtype=np.float64)

    # -- inverse kinematics -------------------------------------------------------------------------------------

    def ik(self, pos, orn_euler, seed) -> np.ndarray:
        """Joints (7,) within the limits reaching tcp ``pos`` with orientation ``orn_euler``, from ``seed``."""
        goal_p, goal_r = np.asarray(pos, float), euler_to_matrix(orn_euler)
        q = np.clip(np.asarray(seed, float), self.lower, self.upper)
        lam2 = self.damping ** 2
        for it in range(self.iterations):
            p, r, axes, origins = self._chain(q)
            err = np.concatenate([goal_p - p, _rotation_vector(goal_r @ r.T)])
            if np.linalg.norm(err[:3]) < self.tolerance and np.linalg.norm(err[3:]) < 10 * self.tolerance:
                break
            z = np.array(axes)  # (7, 3)
            jac = np.concatenate([np.cross(z, p - np.array(origins)).T, z.T])  # (6, 7) geometric Jacobian
            inv = jac.T @ np.linalg.inv(jac @ jac.T + lam2 * np.eye(6))
            dq = inv @ err
            if it == 0:  # the posture pull once per solve, then plain Newton steps converge onto the pose
                dq += (np.eye(7) - inv @ jac) @ (self.nullspace_gain * (self.rest - q))
            q = np.clip(q + dq, self.lower, self.upper)
        return q

    def anchor(self, robot_obs) -> None:
        """Put the target pose on ``robot_obs``'s tcp and seed the IK at its joints (the start of an episode)."""
        obs = np.asarray(robot_obs, dtype=np.float64)
        if obs.shape != (15,) or not np.all(np.isfinite(obs)):
            raise ValueError(f"anchor needs a finite (15,) robot_obs, got shape {obs.shape}")
        with self._lock:
            self.target_pos = obs[:3].copy()
            self.target_orn = obs[3:6].copy()
            self._seed = self._joints(obs[7:14], "robot_obs joints").copy()
            self.anchored = True

    def follow(self, rel_actions) -> np.ndarray:
        """Joint targets (T, 7) for relative actions (T, >= 6) in CALVIN's scaling, continuing the target pose."""
        a = np.asarray(rel_actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] < 6 or len(a) == 0 or not np.all(np.isfinite(a[:, :6])):
            raise ValueError(f"relative actions must be finite (T >= 1, 7), got shape {a.shape}")
        if not self.anchored:
            raise RuntimeError("PandaKinematics.follow before anchor(robot_obs): the target pose is unknown")
        m = self.model
        out = np.empty((len(a), 7))
        with self._lock:
            for i, action in enumerate(np.clip(a[:, :6], -1.0, 1.0)):
                self.target_pos = self.target_pos + action[:3] * m.max_rel_pos_m
                self.target_orn = self.target_orn + action[3:6] * m.max_rel_orn_rad
                out[i] = self._seed = self.ik(self.target_pos, self.target_orn, self._seed)
        return out

    def close(self) -> None:
        """Nothing to release (kept for callers that close their stages)."""
