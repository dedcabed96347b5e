"""What every ghil ROS 2 node shares: QoS profiles, message <-> numpy conversions with their checks, the latest
inputs of a node (``InputStore``), the settings as ROS parameters, and spinning with a clean shutdown.

Standard messages only (PyPI has no custom-message build, shared/reference/ros2_on_pip.md section 4):

* images ``sensor_msgs/Image`` ``rgb8``, filled with ``tobytes()`` and read with ``np.frombuffer`` (no cv_bridge);
* token subgoals ``sensor_msgs/Image`` ``32FC1`` (a (n_tokens, token_dim) float matrix with a header);
* structured content (status, task, events, subgoal info) ``std_msgs/String`` holding JSON;
* joints ``sensor_msgs/JointState`` in, ``trajectory_msgs/JointTrajectory`` out.

Usage::

    image = image_from_msg(msg, expect=(200, 200))        # ImageError naming what is wrong
    spin([policy_node, subgoal_node], context)           # until SIGINT / SIGTERM, then shut down in safe order
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration, Time
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from ghil.runtime.safety import JointLimits, JointStateError, order_joint_state

log = logging.getLogger(__name__)

# Latched (a late or restarted subscriber gets the latest message): instruction, task, status.
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Status and robot events: latched too (a node that starts late still learns the robot is ready for the task), and a
# live subscriber gets every transition (idle, planning, executing, ... in quick
# succession would collapse in a depth-1 history); a late one takes the newest of the ten it receives.
STATUS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Camera and joint streams: RELIABLE (Fast DDS drops fragmented BEST_EFFORT frames), the newest 2 only.
STREAM = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)
# Commands and events: nothing may be lost in a burst.
COMMANDS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)

# The policy node's states in which the stages work on frames (idle, done, stopped and error leave them idle).
ACTIVE_STATES = ("planning", "executing")

# Joint names per robot model (ghil.runtime.safety holds their limits).
ROBOTS = {"panda": JointLimits.panda, "fr3": JointLimits.fr3}


class ImageError(ValueError):
    """An image message ghil cannot use (encoding, size, step, data length)."""


# -- time ---------------------------------------------------------------------------------------------------------


def to_time(seconds: float) -> Time:
    sec = math.floor(seconds)
    return Time(sec=int(sec), nanosec=int(round((seconds - sec) * 1e9)) % 1_000_000_000)


def seconds(stamp: Time) -> float:
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def to_duration(seconds_: float) -> Duration:
    sec = math.floor(seconds_)
    return Duration(sec=int(sec), nanosec=int(round((seconds_ - sec) * 1e9)) % 1_000_000_000)


def now_s(node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


# -- messages -----------------------------------------------------------------------------------------------------


def image_msg(array: np.ndarray, stamp_s: float, frame_id: str = "") -> Image:
    """An ``rgb8`` (uint8 (H, W, 3)) or ``32FC1`` (float32 (H, W)) Image message of ``array``."""
    a = np.ascontiguousarray(array)
    msg = Image()
    msg.header.stamp = to_time(stamp_s)
    msg.header.frame_id = frame_id
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        msg.encoding, msg.step = "rgb8", int(a.shape[1] * 3)
    elif a.ndim == 2:
        a = a.astype(np.float32)
        msg.encoding, msg.step = "32FC1", int(a.shape[1] * 4)
    else:
        raise ImageError(f"image_msg takes uint8 (H, W, 3) or float (H, W), got {a.dtype} {a.shape}")
    msg.height, msg.width = int(a.shape[0]), int(a.shape[1])
    msg.is_bigendian = 0
    msg.data = a.tobytes()  # bytes: 0.02 ms; a numpy array would be copied element by element (10 ms)
    return msg


def image_from_msg(msg: Image, expect: tuple[int, int] | None = None) -> np.ndarray:
    """The (H, W, 3) uint8 frame of an ``rgb8`` (or ``bgr8``, converted) message; ImageError for anything else."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise ImageError(f"image encoding {msg.encoding!r} is not supported: publish rgb8 (or bgr8)")
    h, w = int(msg.height), int(msg.width)
    if h < 1 or w < 1:
        raise ImageError(f"image size {w}x{h} is empty")
    if expect is not None and (h, w) != tuple(expect):
        raise ImageError(f"image is {w}x{h}, the policy takes {expect[1]}x{expect[0]}: publish that size")
    if int(msg.step) != w * 3:
        raise ImageError(f"image step {msg.step} != width * 3 = {w * 3} (padded rows are not supported)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != h * w * 3:
        raise ImageError(f"image data holds {data.size} bytes, {w}x{h} rgb8 needs {h * w * 3}")
    frame = data.reshape(h, w, 3)
    return np.ascontiguousarray(frame[..., ::-1]) if msg.encoding == "bgr8" else frame.copy()


def tokens_from_msg(msg: Image) -> np.ndarray:
    """The (n_tokens, token_dim) float32 matrix of a ``32FC1`` message; ImageError when it is malformed or not finite."""
    if msg.encoding != "32FC1":
        raise ImageError(f"token subgoal encoding {msg.encoding!r}, expected 32FC1")
    h, w = int(msg.height), int(msg.width)
    data = np.frombuffer(msg.data, dtype=np.float32)
    if h < 1 or w < 1 or data.size != h * w or int(msg.step) != w * 4:
        raise ImageError(f"token subgoal {w}x{h} (step {msg.step}) does not match its {data.size} floats")
    tokens = data.reshape(h, w).copy()
    if not np.all(np.isfinite(tokens)):
        raise ImageError("token subgoal is not finite")
    return tokens


def json_msg(payload: Mapping[str, Any]) -> String:
    return String(data=json.dumps(payload, default=_jsonable, sort_keys=True))


def _jsonable(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def parse_json(msg: String) -> dict | None:
    """The JSON object a String holds, or None when it holds anything else."""
    try:
        value = json.loads(msg.data)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def trajectory_msg(names: Sequence[str], positions: np.ndarray, times: np.ndarray, start_s: float | None,
                   frame_id: str = "") -> JointTrajectory:
    """A JointTrajectory of ``positions`` (T, n) at ``times`` (T,) s after ``start_s`` (None: stamp 0 = now)."""
    msg = JointTrajectory()
    msg.header.stamp = to_time(start_s) if start_s is not None else Time()
    msg.header.frame_id = frame_id
    msg.joint_names = list(names)
    for q, t in zip(np.asarray(positions, dtype=np.float64), np.asarray(times, dtype=np.float64)):
        point = JointTrajectoryPoint()
        point.positions = [float(x) for x in q]
        point.time_from_start = to_duration(float(t))
        msg.points.append(point)
    return msg


def joint_state_msg(names: Sequence[str], positions: Sequence[float], stamp_s: float) -> JointState:
    msg = JointState()
    msg.header.stamp = to_time(stamp_s)
    msg.name = list(names)
    msg.position = [float(x) for x in positions]
    return msg


# -- the latest inputs --------------------------------------------------------------------------------------------


class InputStore:
    """The newest valid camera frames and joint state of a node, with their stamps; bad messages are refused with
    a reason (the previous good input stays) and counted per source.

    ``cameras`` maps camera name -> (H, W) the stages take; ``finger_joints`` are read for the gripper width.
    """

    def __init__(self, cameras: Mapping[str, tuple[int, int]], limits: JointLimits,
                 finger_joints: Sequence[str] = ("panda_finger_joint1", "panda_finger_joint2")):
        self.cameras = {k: (int(v[0]), int(v[1])) for k, v in cameras.items()}
        self.limits = limits
        self.finger_joints = tuple(finger_joints)
        self._lock = threading.Lock()
        self.images: dict[str, np.ndarray] = {}
        self.image_stamps: dict[str, float] = {}
        self.joints: np.ndarray | None = None
        self.gripper_width: float | None = None
        self.joint_stamp: float | None = None
        self.rejected: dict[str, int] = {}
        self.last_error: str | None = None

    def _refuse(self, source: str, reason: str) -> str:
        with self._lock:
            self.rejected[source] = self.rejected.get(source, 0) + 1
            self.last_error = f"{source}: {reason}"
        return self.last_error

    def on_image(self, camera: str, msg: Image) -> str | None:
        """Keep a frame; returns the reason it was refused, or None."""
        try:
            frame = image_from_msg(msg, self.cameras[camera])
        except ImageError as err:
            return self._refuse(camera, str(err))
        with self._lock:
            self.images[camera] = frame
            self.image_stamps[camera] = seconds(msg.header.stamp)
        return None

    def on_joint_state(self, msg: JointState) -> str | None:
        try:
            q = order_joint_state(msg.name, msg.position, self.limits)
        except JointStateError as err:
            return self._refuse("joint_states", str(err))
        width = None
        index = {n: i for i, n in enumerate(msg.name)}
        if all(f in index for f in self.finger_joints):
            width = float(sum(msg.position[index[f]] for f in self.finger_joints))
            if not math.isfinite(width):
                return self._refuse("joint_states", f"finger joints {list(self.finger_joints)} are not finite")
        with self._lock:
            self.joints = q
            if width is not None:
                self.gripper_width = width
            self.joint_stamp = seconds(msg.header.stamp)
        return None

    def snapshot(self) -> tuple[dict[str, np.ndarray], np.ndarray | None, float | None, dict[str, float]]:
        """(frames, joints, gripper width, stamps by source) as one consistent copy."""
        with self._lock:
            stamps = dict(self.image_stamps)
            if self.joint_stamp is not None:
                stamps["joint_states"] = self.joint_stamp
            return dict(self.images), self.joints, self.gripper_width, stamps

    def complete(self) -> bool:
        with self._lock:
            return self.joints is not None and all(c in self.images for c in self.cameras)

    def clear(self) -> None:
        with self._lock:
            self.images.clear()
            self.image_stamps.clear()
            self.joints, self.gripper_width, self.joint_stamp = None, None, None


# -- what a stage node follows: the task, the robot's readiness, the policy's state ----------------------------


class TaskFollower:
    """The accepted task (``task_topic``), when the robot got ready for it (a sim's ``ready`` event, which may
    arrive before the task; or the task's arrival when ``wait_for_robot`` is off) and whether the policy node is
    planning or executing: what the subgoal and reasoner nodes need to know before they work on a frame."""

    def __init__(self, node, settings: Mapping[str, Any], callback_group=None):
        self._node, self._wait = node, bool(settings["wait_for_robot"])
        self._lock = threading.Lock()
        self.task: dict | None = None
        self._ready_stamp: float | None = None
        self._ready_by_task: dict = {}
        self._new_task = False
        self.policy_state = "idle"
        node.create_subscription(String, settings["task_topic"], self._on_task, LATCHED, callback_group=callback_group)
        node.create_subscription(String, settings["status_topic"], self._on_status, STATUS,
                                 callback_group=callback_group)
        node.create_subscription(String, settings["robot_events_topic"], self._on_robot_event, STATUS,
                                 callback_group=callback_group)

    def _on_task(self, msg: String) -> None:
        task = parse_json(msg)
        if task is None or "instruction" not in task:
            return
        with self._lock:
            self.task, self._new_task = task, True
            self._ready_stamp = self._ready_by_task.get(task.get("id")) if self._wait else now_s(self._node)

    def _on_status(self, msg: String) -> None:
        status = parse_json(msg)
        if status is not None:
            self.policy_state = str(status.get("state"))

    def _on_robot_event(self, msg: String) -> None:
        event = parse_json(msg)
        if not event or event.get("event") != "ready":
            return
        with self._lock:
            self._ready_by_task[event.get("task_id")] = float(event.get("stamp"))
            for old in list(self._ready_by_task)[:-8]:
                del self._ready_by_task[old]
            if self.task and event.get("task_id") == self.task.get("id"):
                self._ready_stamp = float(event.get("stamp"))

    def take(self) -> tuple[dict | None, float | None, bool]:
        """(task, ready stamp or None, whether the task is new since the last call)."""
        with self._lock:
            new, self._new_task = self._new_task, False
            return self.task, self._ready_stamp, new

    @property
    def active(self) -> bool:
        return self.policy_state in ACTIVE_STATES


# -- the reasoner's subtasks ------------------------------------------------------------------------------------


class SubtaskFollower:
    """The newest subtask the reasoner node published per task id (``subtask_topic``, latched JSON)."""

    def __init__(self, node, topic: str, callback_group=None):
        self._lock = threading.Lock()
        self._by_task: dict = {}
        node.create_subscription(String, topic, self._on_subtask, LATCHED, callback_group=callback_group)

    def _on_subtask(self, msg: String) -> None:
        payload = parse_json(msg)
        if payload and isinstance(payload.get("subtask"), str) and payload["subtask"].strip():
            with self._lock:
                self._by_task[payload.get("task_id")] = payload["subtask"].strip()
                for old in list(self._by_task)[:-8]:
                    del self._by_task[old]

    def current(self, task_id) -> str | None:
        with self._lock:
            return self._by_task.get(task_id)


# -- settings as ROS parameters -----------------------------------------------------------------------------------


def declare_settings(node, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Declare every scalar / list setting as a ROS parameter (the Hydra value is the default, so a params file or
    ``-p name:=value`` overrides it) and return the values in force. Nested mappings become dotted names."""
    out: dict[str, Any] = {}
    for key, value in _flatten(settings).items():
        if value is None:
            out[key] = None
            continue
        if isinstance(value, (list, tuple)) and not value:
            out[key] = list(value)
            continue
        declared = node.declare_parameter(key, list(value) if isinstance(value, (list, tuple)) else value)
        out[key] = declared.value
    return out


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# -- spinning -----------------------------------------------------------------------------------------------------


def ros_environment_defaults() -> None:
    """Localhost discovery unless the user chose otherwise (a robot graph should not leak onto the LAN)."""
    import os

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def make_executor(kind: str, context, threads: int = 6):
    """``events``: rclpy's EventsExecutor (C++, one thread; the default, since every slow stage runs on its own
    worker thread and the Python MultiThreadedExecutor's per-callback overhead at 30 Hz x 4 streams took most of a
    core and starved those workers of the interpreter lock); ``multi_threaded``: rclpy's MultiThreadedExecutor."""
    if kind == "events":
        from rclpy.experimental import EventsExecutor

        return EventsExecutor(context=context)
    if kind == "multi_threaded":
        return MultiThreadedExecutor(num_threads=threads, context=context)
    raise ValueError(f"unknown executor {kind!r}: events or multi_threaded")


def spin(nodes: Sequence[Any], context, threads: int = 6, until=None, executor: str = "events") -> None:
    """Spin ``nodes`` on one executor (``make_executor``) until SIGINT / SIGTERM (or ``until()`` is true), then shut down
    in the order that cannot abort the process: the executor (waits for running callbacks), the nodes' own workers
    and simulators (``close()``), the nodes, the context. A callback that raises is logged and the graph goes on."""
    executor = make_executor(executor, context, threads)
    for node in nodes:
        executor.add_node(node)
    try:
        while context.ok() and (until is None or not until()):
            try:
                executor.spin_once(timeout_sec=0.1)
            except (KeyboardInterrupt, ExternalShutdownException):
                raise
            except Exception as err:  # one callback's bug must not take the robot's graph down
                if not context.ok():
                    break
                log.error("a callback raised %s: %s", type(err).__name__, err, exc_info=err)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for node in nodes:  # no new callbacks, then wait for the running ones
            executor.remove_node(node)
        executor.shutdown(timeout_sec=5)
        for node in nodes:
            close = getattr(node, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as err:  # shutdown goes on for the other nodes
                    log.warning("closing %s: %s", node.get_name(), err)
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        # Callbacks caught by the shutdown raise "destruction was requested"; they are expected, not reported.
        for future in list(getattr(executor, "_futures", [])):
            if future.done():
                future.exception()
