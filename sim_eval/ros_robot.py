"""The sim node: the playtable (or calvin_env through ``env=calvin``) as a ROS 2 robot (simulator side: the graph's
robot-side nodes never import it; ``ghil/configs/robot/sim.yaml`` composes it in).

At ``control_hz`` it steps the simulator once (CALVIN's 30 Hz: 8 physics substeps), following the newest
JointTrajectory on ``trajectory_topic`` and the finger trajectory on ``gripper_topic``, then publishes the frames of
the state it reached (rgb8 on ``camera_topics``) and ``/joint_states`` (arm + finger joints), stamped when that state
was reached. A trajectory stamped in the future starts at the first tick at or after its stamp (how a
JointTrajectoryController takes chunk k+1 sent before chunk k ends); from then its points run one per tick, and
after the last one the arm holds it. With no trajectory the arm holds where it is.

On each task (``task_topic``, published by the policy node) it resets to an official initial state from which the
task is feasible (``robot.initial_state`` or the first such chain start, as ``ghil run``), publishes ``ready`` on
``robot_events_topic``, and reports the oracle's verdict there (``verdict`` events: per-subtask progress, and the
final one when every subtask is done). Unknown phrasings run without a verdict.

Run alone: ``ghil_node robot=sim nodes=[sim] [hydra overrides]`` (what ``ghil launch robot=sim`` starts as a child).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Int32, String
from trajectory_msgs.msg import JointTrajectory

from ros_nodes.common import (COMMANDS, LATCHED, ROBOTS, STATUS, STREAM, declare_settings, image_msg, joint_state_msg,
                              json_msg, now_s, parse_json, seconds)

log = logging.getLogger(__name__)

__all__ = ["SimNode"]


class _Playback:
    """One received trajectory: its joint positions by point, started at the first tick at or after ``start``."""

    def __init__(self, names: list[str], points: np.ndarray, start: float | None):
        self.names, self.points, self.start = names, points, start
        self.index = -1  # the point executed last; -1: not started


class SimNode(Node):
    """See the module docstring. ``env`` is a PlayTableEnv-like simulator; ``settings`` the launch config's ros
    block plus ``robot`` (reset_on_task, initial_state, seed)."""

    def __init__(self, env, settings: dict[str, Any], robot: dict[str, Any], context=None, name: str = "ghil_sim"):
        super().__init__(name, namespace=settings.get("namespace") or None, context=context)
        from sim_eval.protocol.instructions import InstructionIndex
        from sim_eval.protocol.oracle import oracle_for

        s = declare_settings(self, settings)
        self.s, self.env = s, env
        self.robot_cfg = dict(robot)
        self.limits = ROBOTS[s["robot_model"]]()
        self.dt = 1.0 / float(s["control_hz"])
        self.oracle = oracle_for(env)
        self.index = InstructionIndex()
        self._lock = threading.Lock()
        self._arm: _Playback | None = None
        self._arm_next: _Playback | None = None
        self._grip: _Playback | None = None
        self._grip_next: _Playback | None = None
        self._pending_task: dict | None = None
        self.task: dict | None = None
        self._tasks: list[str] = []
        self._done: list[str] = []
        self._start_info = None
        self._steps = 0
        self._cameras = {c: s[f"camera_topics.{c}"] for c in ("rgb_static", "rgb_gripper")
                         if s.get(f"camera_topics.{c}") and c.removeprefix("rgb_") in env.camera_names}
        self.pub_images = {c: self.create_publisher(Image, topic, STREAM) for c, topic in self._cameras.items()}
        self.pub_joints = self.create_publisher(JointState, s["joint_states_topic"], STREAM)
        self.pub_events = self.create_publisher(String, s["robot_events_topic"], STATUS)
        io = ReentrantCallbackGroup()
        self.create_subscription(JointTrajectory, s["trajectory_topic"], self._on_arm, COMMANDS, callback_group=io)
        self.create_subscription(JointTrajectory, s["gripper_topic"], self._on_gripper, COMMANDS, callback_group=io)
        self.create_subscription(String, s["task_topic"], self._on_task, LATCHED, callback_group=io)
        # Which official start the next task resets to (-1: the first where it is feasible), e.g. for benchmarks.
        self.create_subscription(Int32, s["sim_initial_state_topic"], self._on_initial_state, LATCHED,
                                 callback_group=io)
        from sim_eval.evaluation.instruction_run import choose_start

        choose_start(["open_drawer"], None)  # loads the official chains and the expert's checks before the first task
        obs = env.get_obs()
        self._hold_q = np.asarray(obs["robot_obs"][7:14], dtype=np.float64)
        self._gripper = 1.0 if obs["robot_obs"][14] >= 0 else -1.0
        self.create_timer(self.dt, self._tick, callback_group=MutuallyExclusiveCallbackGroup())

    # -- commands -----------------------------------------------------------------------------------------------

    def _playback(self, msg: JointTrajectory, names: tuple[str, ...]) -> _Playback | None:
        index = {n: i for i, n in enumerate(msg.joint_names)}
        missing = [n for n in names if n not in index]
        if missing or not msg.points:
            self._event({"event": "error", "message": f"trajectory refused: joints {missing} missing"
                         if missing else "trajectory refused: no points"})
            return None
        points = np.array([[p.positions[index[n]] for n in names] for p in msg.points], dtype=np.float64)
        if not np.all(np.isfinite(points)):
            self._event({"event": "error", "message": "trajectory refused: non-finite positions"})
            return None
        stamp = seconds(msg.header.stamp)
        return _Playback(list(names), points, stamp if stamp > 0 else None)

    def _on_arm(self, msg: JointTrajectory) -> None:
        playback = self._playback(msg, self.limits.names)
        if playback is not None:
            with self._lock:
                self._arm_next = playback

    def _on_gripper(self, msg: JointTrajectory) -> None:
        playback = self._playback(msg, tuple(self.s["finger_joints"]))
        if playback is not None:
            with self._lock:
                self._grip_next = playback

    def _on_initial_state(self, msg: Int32) -> None:
        with self._lock:
            self.robot_cfg["initial_state"] = None if msg.data < 0 else int(msg.data)

    def _on_task(self, msg: String) -> None:
        task = parse_json(msg)
        if task is not None and "instruction" in task and "id" in task:
            with self._lock:
                self._pending_task = task

    # -- the tick -----------------------------------------------------------------------------------------------

    def _advance(self, current: _Playback | None, pending: _Playback | None, now: float):
        """(playback in force, pending one): the pending one takes over once its start time has come."""
        if pending is not None and (pending.start is None or pending.start <= now + 1e-4):
            return pending, None
        return current, pending

    def _tick(self) -> None:
        now = now_s(self)
        with self._lock:
            task, self._pending_task = self._pending_task, None
            self._arm, self._arm_next = self._advance(self._arm, self._arm_next, now)
            self._grip, self._grip_next = self._advance(self._grip, self._grip_next, now)
            arm, grip = self._arm, self._grip
        if task is not None:
            self._begin(task)
            self._publish_state(now_s(self))
            self._event({"event": "ready", "stamp": now_s(self), "tasks": self._tasks,
                         "chain": self.robot_cfg.get("_chain")})
            return
        if arm is not None and arm.index < len(arm.points) - 1:
            arm.index += 1
            self._hold_q = arm.points[arm.index]
        if grip is not None and grip.index < len(grip.points) - 1:
            grip.index += 1
            width = float(grip.points[grip.index].sum())
            self._gripper = 1.0 if width >= float(self.s["gripper_open_m"]) / 2 else -1.0
        q = np.clip(self._hold_q, self.limits.lower_array, self.limits.upper_array)
        obs, _, _, info = self.env.step({"type": "joint_abs", "action": np.r_[q, self._gripper]})
        self._steps += 1
        self._publish_state(now_s(self), obs)  # stamped when the state was reached (after the step)
        self._judge(info)

    def _begin(self, task: dict) -> None:
        from sim_eval.evaluation.instruction_run import choose_start
        from sim_eval.protocol.initial_states import state_to_obs

        self.task, self._done, self._steps = task, [], 0
        try:
            self._tasks = self.index.tasks_for(task["instruction"])
        except (KeyError, ValueError) as err:
            self._tasks = []
            self._event({"event": "error", "message": f"no oracle verdict for this instruction: {err}"})
        with self._lock:
            self._arm = self._arm_next = self._grip = self._grip_next = None
        if self.robot_cfg.get("reset_on_task", True) and self._tasks:
            with self._lock:
                initial = self.robot_cfg.get("initial_state")
            try:
                index, state = choose_start(self._tasks, None if initial is None else int(initial))
            except ValueError as err:  # no feasible start / a bad index: say so, keep the scene as it is
                self._event({"event": "error", "message": str(err)})
                index, state = None, None
        else:
            index, state = None, None
        if state is not None:
            self.robot_cfg["_chain"] = index
            if isinstance(getattr(self.env, "rng", None), np.random.Generator):
                self.env.rng = np.random.default_rng(int(self.robot_cfg.get("seed", 0)))
            self.env.reset(*state_to_obs(state))
        robot_obs = self.env.get_obs()["robot_obs"]
        self._hold_q = np.asarray(robot_obs[7:14], dtype=np.float64)
        self._gripper = 1.0 if robot_obs[14] >= 0 else -1.0
        self._start_info = self.env.get_info()

    def _publish_state(self, stamp: float, obs: dict | None = None) -> None:
        """The cameras and joint states of ``obs`` (default: the env's current observation)."""
        obs = self.env.get_obs() if obs is None else obs
        for camera, pub in self.pub_images.items():
            pub.publish(image_msg(obs["rgb_obs"][camera], stamp, frame_id=camera))
        robot_obs = obs["robot_obs"]
        finger = float(robot_obs[6]) / 2
        names = (*self.limits.names, *self.s["finger_joints"])
        positions = (*robot_obs[7:14], *([finger] * len(self.s["finger_joints"])))
        self.pub_joints.publish(joint_state_msg(names, positions, stamp))

    def _judge(self, info: dict) -> None:
        if self.task is None or not self._tasks or len(self._done) == len(self._tasks):
            return
        current = self._tasks[len(self._done)]
        if self.oracle.get_task_info_for_set(self._start_info, info, {current}):
            self._done.append(current)
            self._start_info = info  # the next subtask is judged from where this one ended
            final = len(self._done) == len(self._tasks)
            self._event({"event": "verdict", "success": final, "final": final, "tasks": self._tasks,
                         "completed": list(self._done), "steps": self._steps, "reason": "oracle"})

    def _event(self, payload: dict) -> None:
        task_id = None if self.task is None else self.task.get("id")
        self.pub_events.publish(json_msg({"task_id": task_id, **payload}))

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if callable(close):
            close()

