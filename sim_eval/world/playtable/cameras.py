"""CALVIN's two cameras (static 200x200 fov 10, wrist 84x84 fov 75), rendered with pybullet's TinyRenderer.

Images are produced lazily: ``CameraFrames`` renders a camera the first time one of its images is read and
refuses to render for a state the simulator has already left, so stepping without looking costs physics only and
a stale read is an error rather than a wrong picture.

Usage::

    cam = StaticCamera(width=200, height=200)
    rgb, depth = cam.render(client)
    u, v = cam.project(np.array([0.0, 0.0, 0.46]))
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pybullet as p

from sim_eval.world import layout


def depth_from_zbuffer(zbuffer: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenGL depth buffer -> metric depth (calvin's Camera.z_buffer_to_real_distance).

    The arithmetic is ``far * near / (far - (far - near) * z)`` in float64, clipped to [near, far] (float error can
    put the background a hair past far), then float32; done in place in one float64 buffer, which gives the same
    bits as the expression with temporaries at a fraction of the cost (no fresh pages for every temporary)."""
    depth = np.asarray(zbuffer).astype(np.float64)
    np.multiply(depth, far - near, out=depth)
    np.subtract(far, depth, out=depth)
    np.divide(far * near, depth, out=depth)
    np.clip(depth, near, far, out=depth)
    return depth.astype(np.float32)


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> a new contiguous (H, W, 3) uint8 (alpha dropped); 4x faster than copying a [..., :3] view."""
    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    if sys.byteorder != "little":  # pragma: no cover - the channel shifts below assume little-endian words
        return np.ascontiguousarray(rgba[..., :3])
    word = rgba.view(np.uint32)[..., 0]
    rgb = np.empty(rgba.shape[:-1] + (3,), dtype=np.uint8)
    rgb[..., 0] = word
    rgb[..., 1] = word >> 8
    rgb[..., 2] = word >> 16
    return rgb


class _Camera:
    name: str
    width: int
    height: int
    near: float
    far: float
    fov_deg: float

    def __init__(self) -> None:
        self.projection_matrix = p.computeProjectionMatrixFOV(self.fov_deg, self.width / self.height, self.near,
                                                              self.far)
        self.light: dict = {}

    def view_matrix(self, client: int) -> tuple:
        raise NotImplementedError

    def render(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """(rgb (H, W, 3) uint8, metric depth (H, W) float32)."""
        _, _, rgba, zbuf, _ = p.getCameraImage(
            self.width, self.height, self.view_matrix(client), self.projection_matrix,
            renderer=p.ER_TINY_RENDERER, flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=client, **self.light)
        rgb = rgba_to_rgb(np.asarray(rgba, dtype=np.uint8).reshape(self.height, self.width, 4))
        depth = depth_from_zbuffer(np.asarray(zbuf, dtype=np.float32).reshape(self.height, self.width),
                                   self.near, self.far)
        return rgb, depth

    def project(self, points_world: np.ndarray, client: int | None = None) -> np.ndarray:
        """World points (..., 3) -> pixel coordinates (..., 2) as (u = column, v = row), floats."""
        pts = np.asarray(points_world, dtype=float)
        homo = np.concatenate([pts, np.ones(pts.shape[:-1] + (1,))], axis=-1)
        proj = np.array(self.projection_matrix).reshape(4, 4).T
        view = np.array(self.view_matrix(client)).reshape(4, 4).T
        clip = homo @ (proj @ view).T
        ndc = clip[..., :3] / clip[..., 3:4]
        u = (ndc[..., 0] + 1) / 2 * self.width
        v = (1 - (ndc[..., 1] + 1) / 2) * self.height
        return np.stack([u, v], axis=-1)


class StaticCamera(_Camera):
    """The fixed third-person camera; ``jitter_m`` offsets eye and target (domain randomisation)."""

    name = "static"

    def __init__(self, width: int = 200, height: int = 200):
        cfg = layout.STATIC_CAMERA
        self.width, self.height = width, height
        self.fov_deg, self.near, self.far = cfg["fov_deg"], cfg["near"], cfg["far"]
        self.eye, self.target, self.up = np.array(cfg["eye"]), np.array(cfg["target"]), np.array(cfg["up"])
        super().__init__()
        self.set_offset(np.zeros(3), np.zeros(3))

    def set_offset(self, eye_offset: np.ndarray, target_offset: np.ndarray) -> None:
        self._view = p.computeViewMatrix((self.eye + eye_offset).tolist(), (self.target + target_offset).tolist(),
                                         self.up.tolist())

    def view_matrix(self, client: int | None = None) -> tuple:
        return self._view


class GripperCamera(_Camera):
    """The wrist camera on the robot's ``gripper_cam`` link (looks along its +y, up is its -z, as calvin)."""

    name = "gripper"

    def __init__(self, robot_uid: int, camera_link: int, width: int = 84, height: int = 84):
        cfg = layout.GRIPPER_CAMERA
        self.width, self.height = width, height
        self.fov_deg, self.near, self.far = cfg["fov_deg"], cfg["near"], cfg["far"]
        self.robot_uid, self.camera_link = robot_uid, camera_link
        super().__init__()

    def view_matrix(self, client: int) -> tuple:
        pos, orn = p.getLinkState(self.robot_uid, self.camera_link, computeForwardKinematics=True,
                                  physicsClientId=client)[4:6]
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        pos = np.array(pos)
        return p.computeViewMatrix(pos.tolist(), (pos + rot[:, 1]).tolist(), (-rot[:, 2]).tolist())


class StaleObservationError(RuntimeError):
    """An observation's images were read after the simulator had moved on to another state."""


class CameraFrames(Mapping):
    """A read-only mapping ``{"rgb_<cam>": ..}`` or ``{"depth_<cam>": ..}`` that renders on first access.

    Both mappings of one observation share a cache, so reading rgb_static and depth_static renders once.
    """

    def __init__(self, prefix: str, cameras: list[_Camera], cache: dict, render: Callable[[_Camera], tuple],
                 is_current: Callable[[], bool]):
        self._prefix, self._cameras = prefix, {c.name: c for c in cameras}
        self._cache, self._render, self._is_current = cache, render, is_current

    def __getitem__(self, key: str) -> np.ndarray:
        cam_name = key.removeprefix(self._prefix + "_")
        if not key.startswith(self._prefix + "_") or cam_name not in self._cameras:
            raise KeyError(f"{key!r}: this observation has {sorted(self)}")
        if cam_name not in self._cache:
            if not self._is_current():
                raise StaleObservationError(
                    f"{key} was read after the env stepped or reset; read images before the next step "
                    "(or keep the arrays you read)")
            self._cache[cam_name] = self._render(self._cameras[cam_name])
        rgb, depth = self._cache[cam_name]
        return rgb if self._prefix == "rgb" else depth

    def __iter__(self) -> Iterator[str]:
        return iter(f"{self._prefix}_{name}" for name in self._cameras)

    def __len__(self) -> int:
        return len(self._cameras)

    def __repr__(self) -> str:
        return f"CameraFrames({list(self)})"
