"""Per-step reasoning labels for an Embodied-Chain-of-Thought reasoner, projected from ground truth.

For every frame of a play episode: the plan (the episode's remaining tasks as instructions), the subtask (the
expert's phase), the move primitive (from the end-effector motion over the next few steps), the gripper's future
pixel positions in the static camera, and the visible objects with pixel boxes (occlusion checked against the
rendered depth).

Usage::

    labeller = ReasoningLabeller(env.cameras["static"])
    per_frame = labeller.annotate(frames, tasks_per_frame, phases, plan)
"""

from __future__ import annotations

import numpy as np

from sim_eval.world import layout
from sim_eval.demonstrations.expert.base import wrap_angle

MOVE_HORIZON = 4  # steps of look-ahead that define the move primitive
FUTURE_GRIPPER_STEPS = (0, 4, 8, 12, 16)  # which future tcp positions are projected
MIN_MOVE_M = 0.006  # below this displacement over MOVE_HORIZON steps the robot counts as still
MIN_TURN_RAD = 0.08

# Direction words in the robot's frame of reference (it faces +y): +x = right, +y = forward, +z = up.
_AXIS_WORDS = ((0, "right", "left"), (1, "forward", "backward"), (2, "up", "down"))

# Fixed scene parts with a representative point and half-size (metres) for their pixel box.
_FIXTURES = {
    "drawer handle": (lambda s: layout.drawer_handle(s[layout.DRAWER_IDX]), 0.06),
    "sliding door handle": (lambda s: layout.slider_handle(s[layout.SLIDER_IDX]), 0.04),
    "button": (lambda s: np.array([*layout.BUTTON_ORIGIN[:2], layout.BUTTON_TOP_Z]), 0.03),
    "switch": (lambda s: layout.switch_handle(s[layout.SWITCH_IDX]), 0.04),
    "led": (lambda s: layout.LED_POS + [0, 0, 0.008], 0.05),
    "light bulb": (lambda s: layout.LIGHTBULB_POS + [0, 0.028, 0.025], 0.03),
}


def move_primitive(tcp_now: np.ndarray, tcp_later: np.ndarray, yaw_now: float, yaw_later: float,
                   gripper_now: float, gripper_later: float) -> str:
    """A short motion phrase like 'move left down' / 'close gripper' / 'rotate left' / 'stop'."""
    if gripper_later != gripper_now:
        return "close gripper" if gripper_later < 0 else "open gripper"
    delta = tcp_later - tcp_now
    words = [pos if d > 0 else neg for axis, pos, neg in _AXIS_WORDS if abs(d := delta[axis]) >= MIN_MOVE_M
             and abs(d) >= 0.4 * np.abs(delta).max()]
    turn = wrap_angle(yaw_later - yaw_now)
    if abs(turn) >= MIN_TURN_RAD and not words:
        return "rotate left" if turn > 0 else "rotate right"
    return "move " + " ".join(words) if words else "stop"


def block_corners(pose: np.ndarray, size: tuple[float, float, float]) -> np.ndarray:
    """(8, 3) world corners of a block with pose (x, y, z, roll, pitch, yaw)."""
    from scipy.spatial.transform import Rotation

    half = np.array(size) / 2
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    return pose[:3] + Rotation.from_euler("xyz", pose[3:6]).apply(signs * half)


class ReasoningLabeller:
    """Projects ground truth through the static camera into ECoT-style labels."""

    def __init__(self, camera):
        self.camera = camera
        self._eye = np.array(camera.eye)

    def _box(self, points: np.ndarray) -> list[int] | None:
        uv = self.camera.project(points)
        w, h = self.camera.width, self.camera.height
        lo, hi = np.floor(uv.min(0)), np.ceil(uv.max(0))
        if hi[0] < 0 or hi[1] < 0 or lo[0] >= w or lo[1] >= h:
            return None
        return [int(max(lo[0], 0)), int(max(lo[1], 0)), int(min(hi[0], w - 1)), int(min(hi[1], h - 1))]

    def _occluded(self, point: np.ndarray, depth: np.ndarray | None) -> bool:
        if depth is None:
            return False
        u, v = self.camera.project(point)
        col, row = int(u), int(v)
        if not (0 <= row < depth.shape[0] and 0 <= col < depth.shape[1]):
            return True
        # Rendered depth is distance along the view axis; compare with the point's, with slack for the surface.
        view_dir = np.array(self.camera.target) - self._eye
        view_dir /= np.linalg.norm(view_dir)
        return depth[row, col] < (point - self._eye) @ view_dir - 0.03

    def visible_objects(self, scene_obs: np.ndarray, depth_static: np.ndarray | None) -> dict[str, list[int]]:
        objects = {}
        for name in layout.BLOCK_NAMES:
            pose = scene_obs[layout.BLOCK_OBS_SLICES[name]]
            if self._occluded(pose[:3], depth_static):
                continue
            box = self._box(block_corners(pose, layout.BLOCK_SIZES_M[name]))
            if box is not None:
                objects[name.replace("block_", "") + " block"] = box
        for name, (where, half) in _FIXTURES.items():
            centre = where(scene_obs)
            if self._occluded(centre, depth_static):
                continue
            box = self._box(centre + np.array([[sx, sy, sz] for sx in (-half, half) for sy in (-half, half)
                                               for sz in (-half / 2, half / 2)]))
            if box is not None:
                objects[name] = box
        return objects

    def annotate(self, robot_obs: np.ndarray, scene_obs: np.ndarray, depth_static: list[np.ndarray | None],
                 actions: np.ndarray, phases: list[str], tasks: list[str | None], plan_text: list[str],
                 task_text: list[str | None]) -> list[dict]:
        """Labels for T frames: robot_obs (T, 15), scene_obs (T, 24), rel actions (T, 7); phases/tasks per frame."""
        n = len(robot_obs)
        tcp_px = self.camera.project(robot_obs[:, :3])
        labels = []
        for t in range(n):
            later = min(t + MOVE_HORIZON, n - 1)
            move = move_primitive(robot_obs[t, :3], robot_obs[later, :3], robot_obs[t, 5], robot_obs[later, 5],
                                  np.sign(actions[t - 1, 6]) if t else robot_obs[t, 14], np.sign(actions[t, 6]))
            future = [[round(float(c), 1) for c in tcp_px[min(t + k, n - 1)]] for k in FUTURE_GRIPPER_STEPS]
            labels.append({
                "task": task_text[t],
                "plan": plan_text,
                "subtask": phases[t],
                "move": move,
                "gripper_position": future[0],
                "future_gripper_positions": future,
                "gripper": "open" if actions[t, 6] > 0 else "closed",
                "visible_objects": self.visible_objects(scene_obs[t], depth_static[t]),
                "task_name": tasks[t],
            })
        return labels
