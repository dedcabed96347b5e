"""Validation and normalisation of CALVIN actions and state observations, shared by every env we drive.

calvin_env checks actions with bare ``assert`` statements deep inside ``Robot.apply_action``: a bad gripper value
fails *after* the arm's motors have been commanded, a NaN silently poisons the IK target, and a shape slip (a
``(1, 7)`` batch) fails with an unpacking error. Both the real-calvin_env bridge (``sim_eval.world.calvin_bridge``) and
the embedded playtable (``sim_eval.world.playtable``) call these functions *before* touching the simulator, so a bad
input raises one clear :class:`InvalidActionError` / :class:`InvalidStateError` and leaves the state unchanged.

This module is deliberately free of calvin_env and pybullet imports: it only knows CALVIN's conventions.

Accepted action forms (the same as calvin_env's ``Robot.apply_action``):

* a plain array-like of length 7, ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``: **relative** cartesian, the
  first six in [-1, 1] (scaled by 0.02 m / 0.05 rad per step by the env). A plain 7-array is *always* relative,
  as in calvin_env.
* a tuple ``(pos[3], orn[3 euler | 4 quaternion xyzw], gripper)``: **absolute** world-frame TCP pose.
* a dict ``{"action": a, "type": t}`` with ``t`` one of

  - ``"cartesian_rel"``: ``a`` has 7 values, as the plain array;
  - ``"cartesian_abs"``: ``a`` has 7 values (pos, euler, gripper), 8 values (pos, quaternion, gripper) or is the
    ``(pos, orn, gripper)`` tuple;
  - ``"joint_abs"``: ``a`` has 8 values, 7 arm joint angles (rad) and the gripper;
  - ``"joint_rel"``: ``a`` has 8 values, 7 arm joint deltas (rad, *not* normalised, so not bounded to [-1, 1])
    and the gripper.

The gripper value must be exactly -1 (close) or +1 (open) in every form.

Usage::

    from sim_eval.world.action_validation import validate_action, validate_state_obs
    validate_action([0, 0, -1, 0, 0, 0, 1])
    # -> {"type": "cartesian_rel", "action": array([0., 0., -1., 0., 0., 0., 1.])}
    validate_action(([0.1, -0.2, 0.5], [3.14, 0, 1.5], -1))
    # -> {"type": "cartesian_abs", "action": array([0.1, -0.2, 0.5, 3.14, 0., 1.5, -1.])}
    robot_obs, scene_obs = validate_state_obs(robot_obs, scene_obs)   # float64 copies, or None where given None
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sim_eval.world import layout

__all__ = [
    "ACTION_TYPES",
    "InvalidActionError",
    "InvalidStateError",
    "validate_action",
    "validate_state_obs",
]

# Number of values in the flat array of each dict action type (cartesian_abs also allows 8, with a quaternion).
ACTION_TYPES: dict[str, tuple[int, ...]] = {
    "cartesian_rel": (7,),
    "cartesian_abs": (7, 8),
    "joint_abs": (8,),
    "joint_rel": (8,),
}
# How far a quaternion's norm may be from 1. calvin_env passes it on to pybullet's IK unchecked; a clearly
# non-unit quaternion is almost always a bug (euler angles or a wxyz/xyzw mix-up), so we refuse it.
QUATERNION_NORM_TOLERANCE = 1e-3

_GRIPPER_HINT = "threshold a continuous output at 0 first, e.g. gripper = 1.0 if g > 0 else -1.0"


class InvalidActionError(ValueError):
    """An action that calvin_env would reject (or silently mis-handle); raised before anything is stepped."""


class InvalidStateError(ValueError):
    """A ``robot_obs`` / ``scene_obs`` given to ``reset`` that does not have CALVIN's shape or is not finite."""


def _as_float_vector(values: Any, what: str) -> np.ndarray:
    """A fresh 1-D float64 copy (never a view: calvin_env once modified relative actions in place, 27a27a2)."""
    try:
        arr = np.array(values, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InvalidActionError(f"{what} must be numbers, got {values!r} ({exc})") from None
    if arr.ndim != 1:
        raise InvalidActionError(
            f"{what} must be a flat vector, got shape {arr.shape}"
            + ("; pass one action at a time (squeeze the batch axis)" if arr.ndim == 2 and arr.shape[0] == 1 else "")
        )
    return arr


def _check_finite(arr: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InvalidActionError(f"{what} has non-finite values (NaN or inf) at indices {bad.tolist()}: {arr.tolist()}")


def _check_gripper(value: float, what: str) -> None:
    if value not in (-1.0, 1.0):
        raise InvalidActionError(
            f"{what}: the gripper value must be exactly -1 (close) or +1 (open), got {value!r}; {_GRIPPER_HINT}"
        )


def _check_relative_range(arr: np.ndarray, what: str) -> None:
    out = np.flatnonzero(np.abs(arr[:6]) > 1.0)
    if out.size:
        raise InvalidActionError(
            f"{what}: relative values must lie in [-1, 1] (the env scales them by 0.02 m / 0.05 rad per step), "
            f"got {arr[out].tolist()} at indices {out.tolist()}; clip them, or send an absolute action"
        )


def _flatten_pose_tuple(action: Any, what: str) -> np.ndarray:
    """``(pos[3], orn[3|4], gripper)`` -> the flat 7/8-vector ``[*pos, *orn, gripper]``."""
    pos, orn, gripper = action
    pos = _as_float_vector(pos, f"{what} position")
    orn = _as_float_vector(orn, f"{what} orientation")
    # calvin_env accepts a scalar or a 1-element array here; both normalise to one trailing value.
    gripper = _as_float_vector(np.atleast_1d(gripper), f"{what} gripper")
    if pos.shape != (3,):
        raise InvalidActionError(f"{what}: the position must have 3 values (x, y, z), got {pos.shape[0]}")
    if orn.shape[0] not in (3, 4):
        raise InvalidActionError(
            f"{what}: the orientation must have 3 values (euler xyz) or 4 (quaternion xyzw), got {orn.shape[0]}"
        )
    if gripper.shape != (1,):
        raise InvalidActionError(f"{what}: the gripper must be one value, -1 or +1, got {gripper.tolist()}")
    return np.concatenate([pos, orn, gripper])


def _is_pose_tuple(action: Any) -> bool:
    """A 3-sequence whose first item is itself a sequence: calvin_env's absolute ``(pos, orn, gripper)`` form."""
    if not isinstance(action, (tuple, list)) or len(action) != 3:
        return False
    try:
        return np.ndim(action[0]) == 1 and np.ndim(action[1]) == 1
    except ValueError:  # a ragged item: not a pose tuple, the caller reports the shape problem
        return False


def _check_typed(kind: str, arr: np.ndarray, what: str) -> dict:
    sizes = ACTION_TYPES[kind]
    if arr.shape[0] not in sizes:
        layouts = {
            "cartesian_rel": "7 values [dx, dy, dz, droll, dpitch, dyaw, gripper]",
            "cartesian_abs": "7 values [x, y, z, roll, pitch, yaw, gripper] or 8 [x, y, z, qx, qy, qz, qw, gripper]",
            "joint_abs": "8 values [7 joint angles (rad), gripper]",
            "joint_rel": "8 values [7 joint deltas (rad), gripper]",
        }
        raise InvalidActionError(f"{what}: a {kind} action needs {layouts[kind]}, got {arr.shape[0]} values")
    _check_finite(arr, what)
    if kind == "cartesian_rel":
        _check_relative_range(arr, what)
    if kind == "cartesian_abs" and arr.shape[0] == 8:
        norm = float(np.linalg.norm(arr[3:7]))
        if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
            raise InvalidActionError(
                f"{what}: the quaternion (xyzw) must have unit norm, got norm {norm:.6g} for {arr[3:7].tolist()}"
            )
    _check_gripper(float(arr[-1]), what)
    return {"type": kind, "action": arr}


def validate_action(action: Any) -> dict:
    """Check an action in any of calvin_env's forms and return it as ``{"type": t, "action": flat float64 array}``.

    The returned array is a fresh copy (the caller's array is never aliased) with the gripper as its last value.
    calvin_env treats every returned dict exactly as it would have treated the original form. Raises
    :class:`InvalidActionError` with a message that names the problem; nothing is stepped.

    Example::

        validate_action(np.array([0.5, 0, 0, 0, 0, 0, -1]))["type"]    # "cartesian_rel"
        validate_action({"action": [0.0] * 7 + [1], "type": "joint_rel"})["action"].shape   # (8,)
    """
    if isinstance(action, Mapping):
        missing = [k for k in ("action", "type") if k not in action]
        if missing:
            raise InvalidActionError(
                f"a dict action needs the keys 'action' and 'type', missing {missing}; "
                f"got keys {sorted(map(str, action))}"
            )
        kind = action["type"]
        if kind not in ACTION_TYPES:
            raise InvalidActionError(f"unknown action type {kind!r}; choose one of {list(ACTION_TYPES)}")
        what = f"{kind} action"
        payload = action["action"]
        if kind == "cartesian_abs" and _is_pose_tuple(payload):
            return _check_typed(kind, _flatten_pose_tuple(payload, what), what)
        return _check_typed(kind, _as_float_vector(payload, what), what)

    if _is_pose_tuple(action):
        return _check_typed("cartesian_abs", _flatten_pose_tuple(action, "absolute action"), "absolute action")
    if action is None or isinstance(action, (str, bytes, bool, int, float, np.generic)):
        raise InvalidActionError(
            f"an action must be a 7-vector (relative), a (pos, orn, gripper) tuple (absolute) or a dict "
            f"{{'action': ..., 'type': ...}}; got {type(action).__name__} {action!r}"
        )
    arr = _as_float_vector(action, "relative action")
    if arr.shape[0] != 7:
        raise InvalidActionError(
            f"a plain action array is relative and must have 7 values [dx, dy, dz, droll, dpitch, dyaw, gripper], "
            f"got {arr.shape[0]}; for absolute poses pass (pos, orn, gripper) or a dict with an explicit 'type'"
        )
    return _check_typed("cartesian_rel", arr, "relative action")


def _validate_state_vector(values: Any, size: int, name: str, layout_hint: str) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InvalidStateError(f"{name} must be {size} numbers, got {values!r} ({exc})") from None
    if arr.shape != (size,):
        raise InvalidStateError(f"{name} must have shape ({size},) [{layout_hint}], got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InvalidStateError(f"{name} has non-finite values (NaN or inf) at indices {bad.tolist()}")
    return arr


def validate_state_obs(robot_obs: Any = None, scene_obs: Any = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Check the ``robot_obs`` (15) and ``scene_obs`` (24) given to ``reset``; return float64 copies.

    ``None`` passes through as ``None`` (the env's default pose / scene). Raises :class:`InvalidStateError` for a
    wrong shape, a NaN/inf, or a light state (``scene_obs[4]`` lightbulb, ``scene_obs[5]`` led) other than 0 or 1.
    Poses and joint values are not range-checked: any state calvin_env can teleport to is allowed.

    Example::

        robot_obs, scene_obs = validate_state_obs(layout.NEUTRAL_ROBOT_OBS, np.zeros(24))
    """
    if robot_obs is not None:
        robot_obs = _validate_state_vector(
            robot_obs, layout.ROBOT_OBS_DIM, "robot_obs",
            "tcp pos 3, tcp euler 3, gripper width 1, arm joints 7, gripper action 1",
        )
    if scene_obs is not None:
        scene_obs = _validate_state_vector(
            scene_obs, layout.SCENE_OBS_DIM, "scene_obs",
            "slider, drawer, button, switch, lightbulb, led, then x y z roll pitch yaw of the red, blue, pink blocks",
        )
        # calvin_env's Light.reset raises on anything but 0/1, and only after the doors were already moved:
        # refuse it here, before any part of the scene changes.
        for idx, name in ((layout.LIGHTBULB_IDX, "lightbulb"), (layout.LED_IDX, "led")):
            if scene_obs[idx] not in (0.0, 1.0):
                raise InvalidStateError(
                    f"scene_obs[{idx}] ({name}) is a logical light state and must be exactly 0 or 1, "
                    f"got {scene_obs[idx]!r}"
                )
    return robot_obs, scene_obs
