"""The policy node: instruction in, safe joint trajectories out. A thin shell around ``ChunkCommander`` (the policy,
IK and the safety gate, ghil/runtime/joint_commands.py), ``InstructionGate``, ``InputWatchdog`` and ``StopLatch``.

In: ``instruction_topic`` (String, latched; checked by the gate), the cameras (rgb8), ``/joint_states`` (matched by
name), the subgoal (rgb8 image or 32FC1 tokens from the subgoal node), robot events (a sim's ready and verdicts).
Out: ``task_topic`` (the accepted instruction with an id, latched: the subgoal node and the sim follow it),
``trajectory_topic`` (JointTrajectory: the chunk's ``exec_len`` actions as timed points), ``gripper_topic`` (the
finger joints), ``status_topic`` (JSON, latched, on every change and at ``status_hz``).
Services: ``stop_service`` (hold the measured position once, then publish nothing until ``resume_service``).

Timing (the control loop is a thread ticking at ``control_hz``): chunk k+1 is predicted ``plan_ahead_periods`` periods
plus the measured (p90) planning time before chunk k ends and stamped to start exactly when chunk k ends (``header.stamp``
in the future, as ros2_control's JointTrajectoryController takes it), so the points form one gap-free stream; the
first actions a late observation already covers are dropped (``ChunkCommander`` ``skip``). Commanded joints
continue the previous chunk's target pose (IK), so the hand-over does not jump.

States: idle -> planning (instruction accepted; waiting for the robot, fresh inputs, a first subgoal) ->
executing -> done (the robot's oracle verdict, or ``max_steps`` periods) | stopped (stop service or stale inputs;
resume goes back to planning) | error (the policy failed three times in a row).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from ghil.runtime.instruction_gate import REPEAT, InstructionGate
from ghil.runtime.joint_commands import ChunkCommander
from ghil.runtime.safety import InputWatchdog, StopLatch, UnsafeCommandError, hold_trajectory
from ghil.types import Observation, Subgoal
from ros_nodes.common import (ACTIVE_STATES, COMMANDS, LATCHED, ROBOTS, STATUS, STREAM, ImageError, InputStore,
                              SubtaskFollower, declare_settings, image_from_msg, json_msg, now_s, parse_json,
                              seconds, tokens_from_msg, trajectory_msg)

log = logging.getLogger(__name__)

__all__ = ["PolicyNode"]

MAX_POLICY_FAILURES = 3


class PolicyNode(Node):
    """See the module docstring. ``commander`` holds the policy; ``kinematics`` gives robot_obs from joints."""

    def __init__(self, commander: ChunkCommander, kinematics, settings: dict[str, Any], goal_input: str = "image",
                 follow_subtasks: bool = False, context=None, name: str = "ghil_policy"):
        super().__init__(name, namespace=settings.get("namespace") or None, context=context)
        if goal_input not in ("image", "tokens"):
            raise ValueError(f"goal_input must be 'image' or 'tokens' (a token-space generator), got {goal_input!r}")
        self.goal_input = goal_input
        s = declare_settings(self, settings)
        self.s = s
        self.commander, self.kinematics = commander, kinematics
        policy = commander.policy
        self.limits = ROBOTS[s["robot_model"]]()
        self.dt = 1.0 / float(s["control_hz"])
        cameras = {cam: (size, size) for cam, size in zip(policy.cameras, policy.image_sizes)}
        missing = [c for c in cameras if not s.get(f"camera_topics.{c}")]
        if missing:
            raise ValueError(f"the policy reads cameras {list(cameras)}; give camera_topics for {missing}")
        self.inputs = InputStore(cameras, self.limits, s["finger_joints"])
        self.watchdog = InputWatchdog(float(s["max_input_age_s"]), (*cameras, "joint_states"))
        self.gate = InstructionGate()
        self.latch = StopLatch()
        self._lock = threading.RLock()  # state machine + publishing: a stop can never interleave with a publish
        self.state, self.message = "idle", ""
        self._state_before_stop = "idle"
        self.task: dict[str, Any] | None = None
        self.task_id = 0
        self.verdict: dict[str, Any] | None = None
        self.rejected: dict[str, Any] | None = None
        self.n_rejected = 0
        self._ready_stamp: float | None = None  # the robot's "ready" for this task (sim reset), ROS seconds
        self._subgoal: Subgoal | None = None
        self._subgoal_stamp: float | None = None
        self._next_start: float | None = None  # when the next chunk must start (the end of the last one)
        self._exec_start: float | None = None
        self._anchored = False
        self._last_point: np.ndarray | None = None
        self._gripper_action = 1
        self._plan_s = deque([0.02], maxlen=20)  # recent planning times, for the lead
        self._failures = 0
        self._task_chunks = 0
        self.stage_errors, self.stage_error = 0, None
        self.stats = {"chunks": 0, "late_chunks": 0, "held": 0, "clamped_points": 0, "limited_points": 0,
                      "first_command_latency_s": None, "policy_errors": 0, "skipped_actions": 0}
        self.tick_intervals: deque = deque(maxlen=3000)  # seconds between control ticks (the timer's punctuality)
        self._last_tick: float | None = None  # (wall time, ROS start stamp) of every trajectory published

        self._io_group = ReentrantCallbackGroup()  # inputs never wait for each other (the store and state lock)
        self._service_group = MutuallyExclusiveCallbackGroup()
        self.pub_task = self.create_publisher(String, s["task_topic"], LATCHED)
        self.pub_status = self.create_publisher(String, s["status_topic"], STATUS)
        self.pub_trajectory = self.create_publisher(JointTrajectory, s["trajectory_topic"], COMMANDS)
        self.pub_gripper = self.create_publisher(JointTrajectory, s["gripper_topic"], COMMANDS)
        self.create_subscription(String, s["instruction_topic"], self._on_instruction, LATCHED,
                                 callback_group=self._io_group)
        self.create_subscription(JointState, s["joint_states_topic"], self._on_joint_state, STREAM,
                                 callback_group=self._io_group)
        for camera in cameras:
            self.create_subscription(Image, s[f"camera_topics.{camera}"],
                                     lambda msg, c=camera: self._on_image(c, msg), STREAM,
                                     callback_group=self._io_group)
        if policy.uses_goal:
            # A token subgoal travels as its tokens plus its preview image, paired by their common stamp.
            self._goal_images: dict[float, np.ndarray] = {}
            self._goal_tokens: dict[float, np.ndarray] = {}
            self.create_subscription(Image, s["subgoal_topic"], self._on_subgoal_image, STREAM,
                                     callback_group=self._io_group)
            if goal_input == "tokens":
                self.create_subscription(Image, s["subgoal_tokens_topic"], self._on_subgoal_tokens, STREAM,
                                         callback_group=self._io_group)
        # The subgoal node's errors and silence show in this node's status (a raising or hung stage is reported).
        self.create_subscription(String, s["subgoal_info_topic"], self._on_subgoal_info, COMMANDS,
                                 callback_group=self._io_group)
        self.create_subscription(String, s["robot_events_topic"], self._on_robot_event, STATUS,
                                 callback_group=self._io_group)
        # With a reasoner node, the policy's language is the reasoner's SUBTASK for the current task.
        self.subtasks = SubtaskFollower(self, s["subtask_topic"], self._io_group) if follow_subtasks else None
        self.create_service(Trigger, s["stop_service"], self._on_stop, callback_group=self._service_group)
        self.create_service(Trigger, s["resume_service"], self._on_resume, callback_group=self._service_group)
        # The control loop is a plain thread on a monotonic schedule, not an executor timer: a timer callback that
        # outlasts its period makes rclpy's MultiThreadedExecutor spin at full CPU (its group is busy while the
        # timer is ready again), which is what delayed the ticks by 30-70 ms when planning ran inside one.
        self._running = True
        self._control_thread = threading.Thread(target=self._control_loop, name="ghil-control", daemon=True)
        self._control_thread.start()
        self.create_timer(1.0 / float(s["status_hz"]), self._publish_status, callback_group=self._service_group)
        self._publish_status()

    # -- inputs -------------------------------------------------------------------------------------------------

    def _on_image(self, camera: str, msg: Image) -> None:
        error = self.inputs.on_image(camera, msg)
        if error is None:
            self.watchdog.update(camera, seconds(msg.header.stamp))
        else:
            self._report_input_error(error)

    def _on_joint_state(self, msg: JointState) -> None:
        error = self.inputs.on_joint_state(msg)
        if error is None:
            self.watchdog.update("joint_states", seconds(msg.header.stamp))
        else:
            self._report_input_error(error)

    def _report_input_error(self, error: str) -> None:
        with self._lock:
            if error != self.message:
                self.message = f"input refused: {error}"
                self.get_logger().warning(self.message, throttle_duration_sec=2.0)
                self._publish_status()

    def _on_subgoal_image(self, msg: Image) -> None:
        try:
            image = image_from_msg(msg, self._goal_size())
        except ImageError as err:
            self._report_input_error(f"subgoal: {err}")
            return
        self._offer_subgoal(seconds(msg.header.stamp), image=image)

    def _on_subgoal_tokens(self, msg: Image) -> None:
        try:
            tokens = tokens_from_msg(msg)
        except ImageError as err:
            self._report_input_error(f"subgoal tokens: {err}")
            return
        self._offer_subgoal(seconds(msg.header.stamp), tokens=tokens)

    def _offer_subgoal(self, stamp: float, image: np.ndarray | None = None, tokens: np.ndarray | None = None) -> None:
        with self._lock:
            for store, value in ((self._goal_images, image), (self._goal_tokens, tokens)):
                if value is not None:
                    store[stamp] = value
                    for old in sorted(store)[:-4]:
                        del store[old]
            image = self._goal_images.get(stamp)
            tokens = self._goal_tokens.get(stamp) if self.goal_input == "tokens" else None
            if image is None or (self.goal_input == "tokens" and tokens is None):
                return  # the other half has not arrived yet
            if self._subgoal_stamp is not None and stamp <= self._subgoal_stamp:
                return
            try:
                subgoal = Subgoal(image=image, tokens=tokens, source="topic")
            except (TypeError, ValueError) as err:
                self._report_input_error(f"subgoal: {err}")
                return
            self._subgoal, self._subgoal_stamp = subgoal, stamp

    def _on_subgoal_info(self, msg: String) -> None:
        info = parse_json(msg)
        if not info or "error" not in info:
            return
        with self._lock:
            if self.task is not None and info.get("task_id") == self.task["id"]:
                self.stage_errors += 1
                self.stage_error = f"subgoal node: {info['error']}"[:300]
                self._publish_status()

    def _goal_size(self) -> tuple[int, int]:
        policy = self.commander.policy
        size = dict(zip(policy.cameras, policy.image_sizes))[policy.goal_camera]
        return (size, size)

    def _on_robot_event(self, msg: String) -> None:
        event = parse_json(msg)
        if event is None:
            return
        with self._lock:
            if self.task is None or event.get("task_id") != self.task["id"]:
                return
            kind = event.get("event")
            if kind == "ready":
                self._ready_stamp = float(event.get("stamp", now_s(self)))
            elif kind == "verdict":
                self.verdict = {k: event.get(k) for k in ("success", "tasks", "completed", "steps", "reason")}
                if event.get("final") and self.state in ACTIVE_STATES:
                    self._finish("robot verdict: " + ("success" if event.get("success") else "failure"))
            elif kind == "error":
                self.message = f"robot: {event.get('message')}"
                self._publish_status()

    def _on_instruction(self, msg: String) -> None:
        verdict = self.gate.check(msg.data, time.monotonic())
        with self._lock:
            if not verdict.ok:
                if verdict.reason == REPEAT:
                    return
                self.n_rejected += 1
                self.rejected = {"instruction": str(msg.data)[:80], "reason": verdict.reason}
                self._publish_status()
                return
            if self.latch.stopped:
                # A new task while stopped is kept for resume, never executed straight away.
                self.message = "instruction accepted while stopped: call resume to execute it"
            self._start_task(verdict.text)

    def _start_task(self, text: str) -> None:
        self.task_id += 1
        self.task = {"id": self.task_id, "instruction": text, "received": now_s(self)}
        self.verdict, self._ready_stamp = None, None if self.s["wait_for_robot"] else now_s(self)
        self._subgoal, self._subgoal_stamp = None, None
        self._next_start, self._exec_start, self._anchored = None, None, False
        self._failures = 0
        self._task_chunks = 0
        self.stage_errors, self.stage_error = 0, None
        self.stats["first_command_latency_s"] = None
        self.tick_intervals.clear()
        if not self.latch.stopped:
            self.state, self.message = "planning", ""
        else:
            self._state_before_stop = "planning"  # resume plans this task
        self.pub_task.publish(json_msg({"id": self.task_id, "instruction": text}))
        self._publish_status()

    # -- services -----------------------------------------------------------------------------------------------

    def _on_stop(self, request, response):
        with self._lock:
            first = self.latch.stop("stop service")
            if first:
                self._hold()
                self._state_before_stop = self.state
            self.state, self.message = "stopped", "stopped by the stop service: call resume to continue"
            self._publish_status()
        response.success, response.message = True, "stopped: holding the measured position"
        return response

    def _on_resume(self, request, response):
        with self._lock:
            if not self.latch.stopped:
                response.success, response.message = True, "not stopped"
                return response
            self.latch.resume()
            self._next_start, self._anchored = None, False  # re-anchor at the measured state
            self.watchdog.reset()
            # A task that was running (or arrived while stopped) is planned again from the measured state; an ended
            # one stays ended.
            before = self._state_before_stop
            self.state = before if before in ("idle", "done") else ("planning" if self.task else "idle")
            self._exec_start = None if self.state == "planning" else self._exec_start
            self.message = "resumed"
            self._publish_status()
        response.success, response.message = True, f"resumed ({self.state})"
        return response

    def _hold(self) -> None:
        """Publish one hold at the measured position (never zero); nothing when the position is unknown."""
        _, joints, _, _ = self.inputs.snapshot()
        if joints is None:
            return
        held = hold_trajectory(joints, self.limits, dt=self.dt)
        self.pub_trajectory.publish(trajectory_msg(self.limits.names, held.points, held.times, None))
        self.stats["held"] += 1

    def _finish(self, message: str) -> None:
        self.state, self.message = "done", message
        self.gate.done()
        self._publish_status()

    # -- the control loop ---------------------------------------------------------------------------------------

    def _control_loop(self) -> None:
        next_tick = time.monotonic()
        while self._running and self.context.ok():
            next_tick += self.dt
            try:
                self._control()
            except Exception as err:  # never let the loop die: report, hold, stop
                if not self.context.ok():
                    return  # shutting down
                self.get_logger().error(f"control loop: {type(err).__name__}: {err}")
                with self._lock:
                    if self.latch.stop(f"control loop error: {err}"):
                        self._hold()
                    self.state, self.message = "error", f"{type(err).__name__}: {err}"
                    self._publish_status()
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.monotonic()  # late: do not try to catch up with a burst of ticks

    def _control(self) -> None:
        tick = time.monotonic()
        if self._last_tick is not None:
            self.tick_intervals.append(tick - self._last_tick)
        self._last_tick = tick
        with self._lock:
            request = self._due()
        if request is None:
            return
        # The policy runs outside the node lock: input callbacks (which take it) never queue up behind inference and
        # starve the executor's threads; a stop or a new task that arrives meanwhile voids the chunk (checked below).
        t_begin = time.perf_counter()
        try:
            cmd = self.commander.command(request["obs"], request["subgoal"], request["joints"],
                                         skip=request["skip"], start_in_s=request["start_at"] - request["now"],
                                         previous=request["previous"])
            error = None
        except (UnsafeCommandError, ValueError, RuntimeError) as err:
            cmd, error = None, err
        with self._lock:
            if self.task is None or self.task["id"] != request["task_id"] or self.latch.stopped:
                return  # a stop or a new task arrived while planning: the chunk is dropped
            if error is not None:
                self._policy_failed(error)
                return
            self._publish_chunk(cmd, request, time.perf_counter() - t_begin)

    def _due(self) -> dict | None:
        """Under the lock: the inputs of the chunk to plan now, or None (nothing due, or waiting; says why)."""
        if self.latch.stopped or self.state not in ACTIVE_STATES or self.task is None:
            return None
        now = now_s(self)
        if self._ready_stamp is None:
            self.message = "waiting for the robot to get ready"
            return None
        stale = self.watchdog.stale(now)
        if stale:
            if self.state == "executing":
                if self.latch.stop(f"stale inputs {stale}"):
                    self._hold()
                    self._state_before_stop = self.state
                self.state = "stopped"
                self.message = f"stale inputs {stale} (older than {self.s['max_input_age_s']} s): holding; " \
                               "call resume to continue"
                self._publish_status()
            else:
                self.message = f"waiting for inputs {stale}"
            return None
        if self._exec_start is not None and now - self._exec_start >= int(self.s["max_steps"]) * self.dt:
            self.verdict = self.verdict or {"success": None, "reason": "step_limit"}
            self._finish(f"step limit ({self.s['max_steps']} control periods)")
            return None
        # The lead adapts to the measured planning time (p90 of the last 20): measured over 20 instructions, a fixed
        # 3-period lead let 3 of 1,560 chunks arrive after their start (by up to 10 ms), this one none (>= 30 ms early).
        lead = float(self.s["plan_ahead_periods"]) * self.dt + float(np.percentile(self._plan_s, 90))
        if self._next_start is not None and now + lead < self._next_start:
            return None  # the current chunk still runs past the next tick
        frames, joints, width, stamps = self.inputs.snapshot()
        if min(stamps.values()) < self._ready_stamp:
            self.message = "waiting for inputs newer than the robot's reset"
            return None
        subgoal = self._subgoal
        if self.commander.policy.uses_goal and (subgoal is None or self._subgoal_stamp < self._ready_stamp):
            self.message = "waiting for the first subgoal"
            return None
        instruction = self.task["instruction"]
        if self.subtasks is not None:
            instruction = self.subtasks.current(self.task["id"])
            if instruction is None:
                self.message = "waiting for the reasoner's first subtask"
                return None
        width = width if width is not None else (self.s["gripper_open_m"] if self._gripper_action > 0 else 0.0)
        robot_obs = self.kinematics.robot_obs(joints, width, self._gripper_action)
        if not self._anchored:
            self.commander.reset(robot_obs)
            self._anchored = True
        obs_stamp = min(stamps[c] for c in frames)
        start = self._next_start if self._next_start is not None and self._next_start > now else None
        start_at = start if start is not None else now
        # An observation stamped at tick k shows the state after step k: its chunk's first action is for tick k + 1.
        skip = max(0, int(round((start_at - obs_stamp) / self.dt)) - 1) if self._next_start is not None else 0
        obs = Observation(images=frames, proprio=robot_obs.astype(np.float32),
                          t=max(0, int(round((obs_stamp - self._ready_stamp) / self.dt))),
                          instruction=instruction)
        # A chunk that starts where the last one ends is velocity-limited from that one's last point.
        previous = self._last_point if start is not None else None
        return {"task_id": self.task["id"], "obs": obs, "subgoal": subgoal, "joints": joints, "skip": skip,
                "now": now, "start": start, "start_at": start_at, "previous": previous}

    def _policy_failed(self, error: BaseException) -> None:
        self._failures += 1
        self.stats["policy_errors"] += 1
        self.message = f"policy failed ({self._failures}/{MAX_POLICY_FAILURES}): {error}"
        self.get_logger().warning(self.message)
        if self._failures >= MAX_POLICY_FAILURES:
            if self.latch.stop("policy failed"):
                self._hold()
                self._state_before_stop = "planning"  # resume retries the task
            self.state = "error"
        self._publish_status()

    def _publish_chunk(self, cmd, request: dict, plan_s: float) -> None:
        self._failures = 0
        start, start_at, now = request["start"], request["start_at"], request["now"]
        self.pub_trajectory.publish(trajectory_msg(self.limits.names, cmd.positions, cmd.times, start))
        half = float(self.s["gripper_open_m"]) / 2
        fingers = np.repeat(np.where(cmd.gripper > 0, half, 0.0)[:, None], len(self.s["finger_joints"]), axis=1)
        self.pub_gripper.publish(trajectory_msg(self.s["finger_joints"], fingers, cmd.times, start))
        self._gripper_action = int(cmd.gripper[-1])
        self._last_point = cmd.positions[-1].copy()
        self._plan_s.append(plan_s)
        self._next_start = start_at + len(cmd.times) * self.dt
        st = self.stats
        st["chunks"] += 1
        self._task_chunks += 1
        st["late_chunks"] += int(start is None and self._task_chunks > 1)  # a task's first chunk starts "now"
        st["clamped_points"] += cmd.n_clamped_position
        st["limited_points"] += cmd.n_limited_velocity
        st["skipped_actions"] += cmd.skipped
        if self.state == "planning":
            self.state, self.message = "executing", ""
            if self._exec_start is None:
                self._exec_start = start_at
            if st["first_command_latency_s"] is None:
                st["first_command_latency_s"] = now - self.task["received"]
            self._publish_status()

    # -- status -------------------------------------------------------------------------------------------------

    def _stage_warning(self, now: float) -> str | None:
        """A stage that raised, or a subgoal older than ``stage_timeout_s`` while executing (a hung generator)."""
        warnings = []
        if self.state == "executing" and self._subgoal_stamp is not None and self.commander.policy.uses_goal:
            age = now - self._subgoal_stamp
            if age > float(self.s["stage_timeout_s"]):
                warnings.append(f"no new subgoal for {age:.1f} s (the subgoal node may hang): acting on the last one")
        if self.stage_error:
            warnings.append(self.stage_error)
        return "; ".join(warnings) or None

    def status(self) -> dict[str, Any]:
        with self._lock:
            plan_ms = float(np.median(self._plan_s)) * 1000
            now = now_s(self)
            return {"state": self.state, "task_id": self.task_id,
                    "instruction": None if self.task is None else self.task["instruction"],
                    "message": self.message, "verdict": self.verdict, "stop_reason": self.latch.reason,
                    "rejected": self.rejected, "n_rejected": self.n_rejected,
                    "inputs_refused": dict(self.inputs.rejected), "plan_ms": round(plan_ms, 2),
                    "control_period_ms": round(self.dt * 1000, 2), "stamp": now_s(self),
                    "tick_max_ms": round(max(self.tick_intervals, default=0.0) * 1000, 1),
                    "subgoal_age_s": None if self._subgoal_stamp is None else round(now - self._subgoal_stamp, 3),
                    "stage_warning": self._stage_warning(now), "stage_errors": self.stage_errors,
                    **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.stats.items()}}

    def _publish_status(self) -> None:
        self.pub_status.publish(json_msg(self.status()))

    def destroy_node(self) -> None:
        self.close()
        super().destroy_node()

    def close(self) -> None:
        self._running = False
        if self._control_thread.is_alive():
            self._control_thread.join(timeout=2.0)

