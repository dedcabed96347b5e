"""The Franka Panda of the playtable, controlled like calvin_env's ``Robot``.

Relative cartesian actions are scaled (2 cm, 0.05 rad per unit) and added to an internal *target* pose, not to the
measured tcp, so a policy that keeps commanding "down" keeps pressing; nullspace IK towards the neutral posture
turns the target pose into joint position targets (200 N, 2 rad/s), and the gripper is a binary open/close command.

Usage::

    robot = PandaRobot(client, urdf_path)
    robot.reset(layout.NEUTRAL_ROBOT_OBS)
    robot.apply_action({"type": "cartesian_rel", "action": np.array([0, 0, -1, 0, 0, 0, 1.0])})
"""

from __future__ import annotations

import numpy as np
import pybullet as p

from sim_eval.world import layout

ARM_JOINT_IDS = tuple(range(7))
FINGER_JOINT_IDS = (9, 10)
IK_ITERATIONS = 30
IK_RESIDUAL_M = 1e-4


class PandaRobot:
    """Loads the Panda, applies actions and reports calvin's ``robot_obs`` / ``robot_info``."""

    def __init__(self, client: int, urdf_path):
        self.cid = client
        self.uid = p.loadURDF(str(urdf_path), basePosition=layout.ROBOT_BASE_POS, useFixedBase=True,
                              flags=p.URDF_USE_SELF_COLLISION_EXCLUDE_ALL_PARENTS, physicsClientId=client)
        names = {p.getJointInfo(self.uid, i, physicsClientId=client)[12].decode(): i
                 for i in range(p.getNumJoints(self.uid, physicsClientId=client))}
        self.tcp_link = names["tcp"]
        self.camera_link = names["gripper_cam"]
        self.finger_links = (names["panda_leftfinger"], names["panda_rightfinger"])
        # Keep the fingers centred on the hand, as calvin does, so grasps do not drift sideways.
        gear = p.createConstraint(self.uid, FINGER_JOINT_IDS[0], self.uid, FINGER_JOINT_IDS[1], p.JOINT_GEAR,
                                  (1, 0, 0), (0, 0, 0), (0, 0, 0), physicsClientId=client)
        p.changeConstraint(gear, gearRatio=-1, erp=0.1, maxForce=50, physicsClientId=client)
        n_dof = 9
        # Nullspace IK pulls towards the neutral posture, so long episodes do not drift into odd elbow configurations.
        self._ik_lower = list(layout.ARM_JOINT_LOWER_RAD) + [0.0, 0.0]
        self._ik_upper = list(layout.ARM_JOINT_UPPER_RAD) + [0.04, 0.04]
        self._ik_range = [u - lo for u, lo in zip(self._ik_upper, self._ik_lower)]
        self._ik_rest = list(layout.NEUTRAL_ROBOT_OBS[7:14]) + [0.04, 0.04]
        assert len(self._ik_rest) == n_dof
        self.gripper_action = 1
        self.target_pos = np.zeros(3)
        self.target_orn = np.zeros(3)  # xyz euler, accumulated like calvin's (no wrapping)
        self.last_joint_targets = np.array(layout.NEUTRAL_ROBOT_OBS[7:14])

    # ------------------------------------------------------------------------------------------------ reset
    def reset(self, robot_obs: np.ndarray) -> None:
        """Put the arm at ``robot_obs``'s joints and gripper width; the target pose becomes the resulting tcp."""
        joints = robot_obs[7:14]
        finger = float(np.clip(robot_obs[6] / 2, *layout.GRIPPER_FINGER_LIMITS_M))
        for j, q in zip(ARM_JOINT_IDS, joints):
            p.resetJointState(self.uid, j, float(q), 0.0, physicsClientId=self.cid)
        for j in FINGER_JOINT_IDS:
            p.resetJointState(self.uid, j, finger, 0.0, physicsClientId=self.cid)
        self.gripper_action = 1 if robot_obs[14] >= 0 else -1
        self._command_joints(np.asarray(joints, dtype=float))
        self._command_gripper()
        pos, orn = self.tcp_pose()
        self.target_pos = np.array(pos)
        self.target_orn = np.array(p.getEulerFromQuaternion(orn))

    # ------------------------------------------------------------------------------------------------ control
    def apply_action(self, action: dict) -> None:
        """Apply a validated action dict ``{"type": ..., "action": ndarray}`` (see sim_eval.world.action_validation)."""
        kind, a = action["type"], np.asarray(action["action"], dtype=float)
        if kind == "cartesian_rel":
            self.target_pos = self.target_pos + a[:3] * layout.MAX_REL_POS_M
            self.target_orn = self.target_orn + a[3:6] * layout.MAX_REL_ORN_RAD
            joints = self.ik(self.target_pos, self.target_orn)
        elif kind == "cartesian_abs":
            pos, orn = a[:3], a[3:-1]
            if len(orn) == 4:
                orn = np.array(p.getEulerFromQuaternion(orn))
            self.target_pos, self.target_orn = np.array(pos), np.array(orn)
            joints = self.ik(self.target_pos, self.target_orn)
        elif kind == "joint_abs":
            joints = a[:7]
        elif kind == "joint_rel":
            joints = self.joint_positions() + a[:7]
        else:  # validation rejects other kinds before we get here
            raise ValueError(f"unknown action type {kind!r}")
        self.gripper_action = int(a[-1])
        self._command_joints(joints)
        self._command_gripper()

    def ik(self, pos: np.ndarray, orn_euler: np.ndarray) -> np.ndarray:
        q = p.calculateInverseKinematics(
            self.uid, self.tcp_link, pos.tolist(), p.getQuaternionFromEuler(orn_euler.tolist()),
            lowerLimits=self._ik_lower, upperLimits=self._ik_upper, jointRanges=self._ik_range,
            restPoses=self._ik_rest, maxNumIterations=IK_ITERATIONS, residualThreshold=IK_RESIDUAL_M,
            physicsClientId=self.cid)
        return np.array(q[:7])

    def _command_joints(self, joints: np.ndarray) -> None:
        # Joint targets are clipped to the Panda's limits: nothing outside them is ever commanded.
        joints = np.clip(joints, layout.ARM_JOINT_LOWER_RAD, layout.ARM_JOINT_UPPER_RAD)
        self.last_joint_targets = joints
        for j, q in zip(ARM_JOINT_IDS, joints):  # per joint: the array call cannot set maxVelocity
            p.setJointMotorControl2(self.uid, j, p.POSITION_CONTROL, targetPosition=float(q),
                                    force=layout.MAX_JOINT_FORCE, maxVelocity=layout.MAX_JOINT_VELOCITY,
                                    physicsClientId=self.cid)

    def _command_gripper(self) -> None:
        lo, hi = layout.GRIPPER_FINGER_LIMITS_M
        target, force = (hi, layout.GRIPPER_FORCE / 100) if self.gripper_action == 1 else (lo, layout.GRIPPER_FORCE)
        for j in FINGER_JOINT_IDS:
            p.setJointMotorControl2(self.uid, j, p.POSITION_CONTROL, targetPosition=target, force=force,
                                    maxVelocity=1.0, physicsClientId=self.cid)

    # ------------------------------------------------------------------------------------------------ state
    def tcp_pose(self) -> tuple[tuple, tuple]:
        state = p.getLinkState(self.uid, self.tcp_link, computeForwardKinematics=True, physicsClientId=self.cid)
        return state[4], state[5]

    def joint_positions(self) -> np.ndarray:
        return np.array([s[0] for s in p.getJointStates(self.uid, ARM_JOINT_IDS, physicsClientId=self.cid)])

    def gripper_width(self) -> float:
        return float(sum(s[0] for s in p.getJointStates(self.uid, FINGER_JOINT_IDS, physicsClientId=self.cid)))

    def get_observation(self) -> tuple[np.ndarray, dict]:
        """(robot_obs (15,), robot_info) exactly as calvin_env's Robot.get_observation (euler obs)."""
        pos, orn = self.tcp_pose()
        euler = p.getEulerFromQuaternion(orn)
        width = self.gripper_width()
        joints = self.joint_positions()
        obs = np.array([*pos, *euler, width, *joints, self.gripper_action], dtype=np.float64)
        info = {"tcp_pos": pos, "tcp_orn": euler, "gripper_opening_width": width,
                "arm_joint_states": joints.tolist(), "gripper_action": self.gripper_action, "uid": self.uid,
                "contacts": p.getContactPoints(bodyA=self.uid, physicsClientId=self.cid)}
        return obs, info
