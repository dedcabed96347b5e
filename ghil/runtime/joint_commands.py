"""ChunkCommander: one policy chunk -> a safe, timed joint trajectory (the pure-Python core of the ROS policy node).

The node calls ``command(obs, subgoal, measured, ...)`` whenever the next chunk is due; this module predicts the
chunk (``policy.predict_chunk``, steered by the subgoal's tokens when it has them, else its image), takes the
``exec_len`` actions that will actually run, turns them into joint targets and passes them through the safety gate
(``ghil.runtime.safety.gate_trajectory``: finite, clamped into the limits' margin, velocity-limited):

* ``rel_ee`` policies (CALVIN's relative end-effector actions) reach joints through the robot model's inverse
  kinematics (``ghil.runtime.kinematics.PandaKinematics``), continuing the target pose of the previous chunk;
* ``joint_abs`` policies already give joint targets; they are published as they are (after the gate).

Latency compensation: a chunk is predicted from an observation taken ``skip`` control periods before it starts
running (the node plans one period ahead plus the inference time), so its first ``skip`` actions describe moves
the previous chunk already made; they are dropped and the next ``exec_len`` run (``skip`` is capped so a full
``exec_len`` remains in the chunk). Gripper commands stay exactly +-1.

Usage::

    commander = ChunkCommander(policy, kinematics=PandaKinematics(), exec_len=4)
    commander.reset(robot_obs)                           # anchor the target pose at the measured tcp
    cmd = commander.command(obs, subgoal, measured_joints, skip=1, start_in_s=0.02)
    cmd.positions, cmd.times, cmd.gripper                # (T, 7) rad, (T,) s from the chunk's start, (T,) +-1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ghil.interfaces import ChunkPolicy
from ghil.runtime.policy_agent import _POLICY_STREAM, derive_seed
from ghil.runtime.safety import JointLimits, UnsafeCommandError, gate_trajectory
from ghil.types import Observation, Subgoal

__all__ = ["ChunkCommander", "JointCommand"]


@dataclass(frozen=True)
class JointCommand:
    """A gated chunk: ``positions`` (T, n) at ``times`` (T,) seconds after the chunk starts, ``gripper`` (T,) +-1."""

    positions: np.ndarray
    times: np.ndarray
    gripper: np.ndarray
    t0: int  # control step of the observation the chunk was predicted from
    skipped: int  # leading actions dropped for latency
    n_clamped_position: int
    n_limited_velocity: int


class ChunkCommander:
    """Policy chunk -> gated joint trajectory (see the module docstring)."""

    def __init__(self, policy: ChunkPolicy, kinematics=None, limits: JointLimits | None = None,
                 exec_len: int | None = None, n_steps: int | None = None, control_hz: float = 30.0, seed: int = 0):
        import torch

        if not isinstance(policy, ChunkPolicy):
            raise TypeError(f"ChunkCommander needs a ghil.interfaces.ChunkPolicy, got {type(policy).__name__}")
        if policy.space.name not in ("rel_ee", "joint_abs"):
            raise ValueError(f"no joint commands for action space {policy.space.name!r} (rel_ee or joint_abs)")
        if policy.space.name == "rel_ee" and kinematics is None:
            raise ValueError("a rel_ee policy reaches joints through inverse kinematics: give kinematics="
                             "PandaKinematics()")
        self.policy, self.kinematics = policy, kinematics
        self.limits = limits or JointLimits.panda()
        self.exec_len = int(exec_len or policy.exec_len)
        if self.exec_len < 1:
            raise ValueError(f"exec_len must be >= 1, got {exec_len}")
        self.n_steps = n_steps
        if not np.isfinite(control_hz) or control_hz <= 0:
            raise ValueError(f"control_hz must be finite and > 0, got {control_hz}")
        self.dt = 1.0 / float(control_hz)
        self._torch = torch
        self.n_chunks = 0
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self._generator = self._torch.Generator().manual_seed(derive_seed(seed, _POLICY_STREAM))

    def reset(self, robot_obs) -> None:
        """A new episode (instruction, resume): IK continues from the measured tcp, not an old target."""
        if self.kinematics is not None:
            self.kinematics.anchor(robot_obs)
        self.n_chunks = 0

    def command(self, obs: Observation, subgoal: Subgoal | None, measured, skip: int = 0,
                start_in_s: float = 0.0, previous=None) -> JointCommand:
        """The gated trajectory of the next chunk; ``start_in_s``: seconds from now until it starts (the gate
        limits the first point's velocity from ``measured`` over that time plus one period). ``previous``: the last
        point of the chunk this one continues (it starts where that one ends); the gate then limits the velocity
        from it over one period, so the stream stays continuous instead of being pulled back towards a lagging
        measured state at every hand-over.

        Raises ``UnsafeCommandError`` when the policy gives non-finite actions (nothing is published) and
        ``ValueError`` for a goal-conditioned policy without a subgoal."""
        policy = self.policy
        if policy.uses_goal and subgoal is None:
            raise ValueError("this policy is goal-conditioned and no subgoal has arrived yet")
        extra = {}
        goal = None
        if subgoal is not None:
            goal = subgoal.image
            if subgoal.tokens is not None:
                extra["goal_tokens"] = subgoal.tokens
        with self._torch.no_grad():
            chunk = policy.predict_chunk(obs, goal, n_steps=self.n_steps, generator=self._generator, **extra)
        actions = chunk.actions.detach().cpu().numpy().astype(np.float64)
        if not np.all(np.isfinite(actions)):
            raise UnsafeCommandError(f"the policy returned non-finite actions at step {obs.t}: nothing published")
        skip = int(min(max(0, skip), max(0, len(actions) - self.exec_len)))
        run = actions[skip:skip + self.exec_len]
        gi = policy.space.gripper_index
        gripper = np.where(run[:, gi] >= 0, 1.0, -1.0)
        if policy.space.name == "rel_ee":
            targets = self.kinematics.follow(run)
        else:
            targets = run[:, :7]
        times = self.dt * np.arange(1, len(run) + 1)
        if previous is not None:
            gated = gate_trajectory(targets, times, previous, self.limits)
        else:
            gated = gate_trajectory(targets, times + max(0.0, float(start_in_s)), measured, self.limits)
        self.n_chunks += 1
        return JointCommand(positions=gated.points, times=times, gripper=gripper, t0=int(obs.t), skipped=skip,
                            n_clamped_position=gated.n_clamped_position, n_limited_velocity=gated.n_limited_velocity)
