"""The subgoal node: the agent's goal provider (generator + GHIL-Glue filter, ``planners.subgoals.GeneratedSubgoals``)
beside the control loop. A thin shell: it turns the latest camera frames into an ``Observation``, asks the provider
for the subgoal at the control rate (the provider replans every ``replan_every`` steps itself and otherwise returns
the subgoal in force), and publishes each new one.

In: ``task_topic`` (the accepted instruction; until a reasoner node exists the instruction is the subtask), the
cameras, ``/joint_states`` (the observation's proprio, by forward kinematics), robot events (a sim's ready),
``status_topic`` (it idles unless the policy is planning or executing). Out, all stamped with the stamp of the
frames the subgoal was made from: ``subgoal_topic`` (rgb8; a token generator's decoded preview),
``subgoal_tokens_topic`` (32FC1 tokens, token generators), ``candidates_topic`` (the K candidates side by side),
``subgoal_info_topic`` (JSON: scores, chosen, step, replan time).

The provider runs behind ``ghil.runtime.async_goals.AsyncGoals``: the node's timer only hands it the newest
observation and publishes what the worker thread finished, so no executor callback ever waits for a generator
(a busy callback group makes rclpy's executor spin at full CPU, stealing the generator's interpreter lock: measured
80 % CPU and replans of 200-300 ms instead of 100). A slow or hung generator only delays new subgoals; an exception
in it is contained (counted, reported on the info topic) and the last subgoal stays in force.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from ghil.interfaces import GoalProvider
from ghil.runtime.async_goals import AsyncGoals
from ghil.types import Observation, Subgoal
from ros_nodes.common import (COMMANDS, ROBOTS, STREAM, InputStore, SubtaskFollower, TaskFollower, declare_settings,
                              image_msg, json_msg)

__all__ = ["SubgoalNode"]


class _StampedGoals:
    """The provider as AsyncGoals' inner stage, remembering which observation step each new subgoal came from."""

    def __init__(self, inner: GoalProvider):
        self.inner = inner
        self.made_at: dict[int, int] = {}  # id(subgoal) -> obs.t of the request that produced it
        self._last: Subgoal | None = None

    def bind_policy(self, policy) -> None:
        bind = getattr(self.inner, "bind_policy", None)
        if callable(bind):
            bind(policy)

    def seed(self, seed: int) -> None:
        seed_ = getattr(self.inner, "seed", None)
        if callable(seed_):
            seed_(seed)

    def reset(self) -> None:
        self.inner.reset()
        self.made_at.clear()
        self._last = None

    def goal(self, obs: Observation) -> Subgoal | None:
        subgoal = self.inner.goal(obs)
        if subgoal is not None and subgoal is not self._last:
            self._last = subgoal
            self.made_at[id(subgoal)] = int(obs.t)
            for key in list(self.made_at)[:-8]:
                del self.made_at[key]
        return subgoal


class SubgoalNode(Node):
    """See the module docstring. ``goals`` is the agent's goal provider, already bound to its policy."""

    def __init__(self, goals: GoalProvider, cameras: dict[str, tuple[int, int]], kinematics,
                 settings: dict[str, Any], follow_subtasks: bool = False, context=None, name: str = "ghil_subgoals"):
        super().__init__(name, namespace=settings.get("namespace") or None, context=context)
        if not isinstance(goals, GoalProvider):
            raise TypeError(f"the subgoal node runs a ghil.interfaces.GoalProvider, got {type(goals).__name__}")
        s = declare_settings(self, settings)
        self.s, self.kinematics = s, kinematics
        self._stamped = _StampedGoals(goals)
        self.goals = AsyncGoals(self._stamped, name="ghil-subgoals")
        self._requests: dict[int, tuple[float, float]] = {}  # obs.t -> (its frames' stamp, when it was handed over)
        self.dt = 1.0 / float(s["control_hz"])
        self.inputs = InputStore(cameras, ROBOTS[s["robot_model"]](), s["finger_joints"])
        self._last_obs_stamp: float | None = None
        self._last_subgoal = None
        self._worker_errors = 0
        self.n_published = 0
        self.errors = 0
        group = MutuallyExclusiveCallbackGroup()
        io = ReentrantCallbackGroup()  # the input store locks; no input waits for another
        self.pub_image = self.create_publisher(Image, s["subgoal_topic"], STREAM)
        self.pub_tokens = self.create_publisher(Image, s["subgoal_tokens_topic"], STREAM)
        self.pub_candidates = self.create_publisher(Image, s["candidates_topic"], STREAM)
        self.pub_info = self.create_publisher(String, s["subgoal_info_topic"], COMMANDS)
        self.tasks = TaskFollower(self, s, io)
        self.create_subscription(JointState, s["joint_states_topic"], self.inputs.on_joint_state, STREAM,
                                 callback_group=io)
        for camera in cameras:
            self.create_subscription(Image, s[f"camera_topics.{camera}"],
                                     lambda msg, c=camera: self.inputs.on_image(c, msg), STREAM, callback_group=io)
        # With a reasoner node, its SUBTASK (not the user's instruction) is what the generator imagines.
        self.subtasks = SubtaskFollower(self, s["subtask_topic"], io) if follow_subtasks else None
        self.create_timer(self.dt, self._tick, callback_group=group)

    def _tick(self) -> None:
        task, ready, new = self.tasks.take()
        if task is None:
            return
        if new:
            self.goals.reset()  # a new task: no subgoal of the old one survives
            self._last_obs_stamp, self._last_subgoal = None, None
        if ready is None or not self.tasks.active:
            return
        frames, joints, width, stamps = self.inputs.snapshot()
        if joints is None or any(c not in frames for c in self.inputs.cameras):
            return
        obs_stamp = min(stamps[c] for c in frames)
        if obs_stamp < ready or obs_stamp == self._last_obs_stamp:
            return  # frames from before the robot's reset, or nothing new since the last call
        self._last_obs_stamp = obs_stamp
        instruction = task["instruction"]
        if self.subtasks is not None:
            instruction = self.subtasks.current(task["id"])
            if instruction is None:
                return  # the reasoner has not named the first subtask yet
        robot_obs = self.kinematics.robot_obs(joints, width if width is not None else 0.08, 1)
        obs = Observation(images=frames, proprio=robot_obs.astype(np.float32),
                          t=max(0, int(round((obs_stamp - ready) / self.dt))), instruction=instruction)
        self._requests[obs.t] = (obs_stamp, time.perf_counter())
        for key in sorted(self._requests)[:-64]:
            del self._requests[key]
        try:
            subgoal = self.goals.goal(obs)  # the first of a task is computed here, later ones on the worker
        except Exception as err:  # contained: the policy keeps the last subgoal
            self._report_error(task, obs.t, err)
            return
        if self.goals.errors != self._worker_errors:  # the worker's failures since the last tick
            self._worker_errors = self.goals.errors
            self._report_error(task, obs.t, self.goals.last_error)
        if subgoal is None or subgoal is self._last_subgoal:
            return  # the subgoal in force (no replan finished since the last tick)
        made_at = self._stamped.made_at.get(id(subgoal), obs.t)
        stamp, requested = self._requests.get(made_at, (obs_stamp, time.perf_counter()))
        self._last_subgoal = subgoal
        latency_ms = (time.perf_counter() - requested) * 1000
        self.pub_image.publish(image_msg(subgoal.image, stamp, frame_id=str(task["id"])))
        if subgoal.tokens is not None:
            self.pub_tokens.publish(image_msg(np.asarray(subgoal.tokens, np.float32), stamp,
                                              frame_id=str(task["id"])))
        if subgoal.candidates is not None and subgoal.candidates.ndim == 4:
            self.pub_candidates.publish(image_msg(np.concatenate(list(subgoal.candidates), axis=1), stamp,
                                                  frame_id=str(task["id"])))
        self.n_published += 1
        self.pub_info.publish(json_msg({
            "task_id": task["id"], "step": made_at, "stamp": stamp, "chosen": subgoal.chosen,
            "scores": None if subgoal.scores is None else np.asarray(subgoal.scores).round(4).tolist(),
            "source": subgoal.source, "latency_ms": round(latency_ms, 2), "n": self.n_published,
            "errors": self.goals.errors}))

    def _report_error(self, task: dict, step: int, err: BaseException | None) -> None:
        self.errors += 1
        text = f"{type(err).__name__}: {err}"
        self.pub_info.publish(json_msg({"task_id": task["id"], "error": text, "errors": self.errors, "step": step}))
        self.get_logger().warning(f"the goal provider raised {text}", throttle_duration_sec=2.0)

    def close(self) -> None:
        self.goals.close()
