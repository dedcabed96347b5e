"""The reasoner node: the agent's reasoner (``planners.reasoner.VLMReasoner`` or any ``Reasoner``) beside the
graph. A thin shell: the reasoner runs behind ``ghil.runtime.async_reasoner.AsyncReasoner`` (no executor callback
waits for a VLM); each tick hands it the newest camera frame and publishes every new reasoning.

In: ``task_topic`` (the accepted instruction), the reasoner's camera, ``status_topic`` (it idles unless the policy
is planning or executing), robot events (a sim's ready). Out: ``reasoning_topic`` (String JSON: task_id, step,
stamp, the eight fields, the text, fallback, failures) and ``subtask_topic`` (String JSON {task_id, subtask,
stamp}, latched): the subgoal node and the policy node take it as the instruction of the lower stages. A composite
instruction's subtasks follow ``ghil.runtime.reasoned_agent.PlanFollower`` (forward only, one step after repeated
evidence), as in ``ghil eval``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from ghil.interfaces import Reasoner
from ghil.runtime.async_reasoner import AsyncReasoner
from ghil.runtime.reasoned_agent import PlanFollower
from ghil.types import Observation
from ros_nodes.common import COMMANDS, LATCHED, ROBOTS, STREAM, InputStore, TaskFollower, declare_settings, json_msg

__all__ = ["ReasonerNode"]


class ReasonerNode(Node):
    """See the module docstring. ``camera``: (name, (H, W)) of the image the reasoner reads."""

    def __init__(self, reasoner: Reasoner, camera: tuple[str, tuple[int, int]], settings: dict[str, Any],
                 context=None, name: str = "ghil_reasoner", advance_after: int = 2):
        super().__init__(name, namespace=settings.get("namespace") or None, context=context)
        if not isinstance(reasoner, Reasoner):
            raise TypeError(f"the reasoner node runs a ghil.interfaces.Reasoner, got {type(reasoner).__name__}")
        s = declare_settings(self, settings)
        self.s = s
        self.dt = 1.0 / float(s["reason_hz"])
        self.camera = camera[0]
        self.inputs = InputStore({camera[0]: camera[1]}, ROBOTS[s["robot_model"]](), s["finger_joints"])
        self.reasoner = AsyncReasoner(reasoner)
        self.plan = PlanFollower(advance_after)  # a composite instruction's subtasks, in order (ReasonedAgent's rule)
        self._last = None
        self._last_stamp: float | None = None
        self._subtask: str | None = None
        self.n_published = 0
        io = ReentrantCallbackGroup()
        self.pub_reasoning = self.create_publisher(String, s["reasoning_topic"], COMMANDS)
        self.pub_subtask = self.create_publisher(String, s["subtask_topic"], LATCHED)
        self.tasks = TaskFollower(self, s, io)
        self.create_subscription(JointState, s["joint_states_topic"], self.inputs.on_joint_state, STREAM,
                                 callback_group=io)
        self.create_subscription(Image, s[f"camera_topics.{self.camera}"],
                                 lambda msg: self.inputs.on_image(self.camera, msg), STREAM, callback_group=io)
        self.create_timer(self.dt, self._tick, callback_group=MutuallyExclusiveCallbackGroup())

    def _tick(self) -> None:
        task, ready, new = self.tasks.take()
        if task is None:
            return
        if new:
            self.reasoner.reset()
            self.plan.reset()
            self._last, self._subtask = None, None
        if ready is None or not self.tasks.active:
            return
        frames, joints, _, stamps = self.inputs.snapshot()
        if self.camera not in frames or stamps[self.camera] < ready or stamps[self.camera] == self._last_stamp:
            return
        self._last_stamp = stamps[self.camera]
        obs = Observation(images=frames, proprio=np.zeros(15, np.float32), instruction=task["instruction"],
                          t=max(0, int(round((stamps[self.camera] - ready) * float(self.s["control_hz"])))))
        try:
            reasoning = self.reasoner.reason(obs)  # the first of a task is computed here, later ones on the worker
        except Exception as err:  # e.g. an instruction the reasoner refuses: report, keep running
            self.pub_reasoning.publish(json_msg({"task_id": task["id"], "error": f"{type(err).__name__}: {err}"}))
            return
        if reasoning is self._last:
            return
        self._last = reasoning
        inner = self.reasoner.reasoner
        self.n_published += 1
        self.pub_reasoning.publish(json_msg({
            "task_id": task["id"], "step": obs.t, "stamp": stamps[self.camera], **dataclasses.asdict(reasoning),
            "fallback": bool(getattr(inner, "fallback", False)), "failures": int(getattr(inner, "n_failures", 0))}))
        subtask = self.plan.update(reasoning) or task["instruction"]
        if subtask != self._subtask:
            self._subtask = subtask
            self.pub_subtask.publish(json_msg({"task_id": task["id"], "subtask": subtask,
                                               "stamp": stamps[self.camera]}))

    def close(self) -> None:
        self.reasoner.close()
