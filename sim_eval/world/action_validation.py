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

Values must be real numbers: ints, floats (any numpy int/float dtype, or an object array of such numbers). Refused:
strings (even numeric ones, ``"0.1"``), complex numbers (even with a zero imaginary part: numpy would drop it
silently) and bools (``True``/``False`` as an action is a mask passed by mistake, and a bool gripper cannot say -1).

Absolute targets must lie in the stated workspace (``layout.WORKSPACE_LOW_M`` .. ``WORKSPACE_HIGH_M``: |x|, |y| <= 2 m,
z in [-0.5, 2] m, a generous box around the Panda's reach) with euler angles |a| <= ``layout.MAX_ABS_ANGLE_RAD`` (4 pi);
joint targets and deltas must satisfy |q| <= ``layout.MAX_JOINT_ACTION_RAD`` (2 pi; the env then clips targets to the
Panda's limits). This is checked before any inverse kinematics runs: pybullet's IK loops forever, in C and deaf to
signals, on a target near 1e308.

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


_REAL_KINDS = frozenset("fiu")  # numpy dtype kinds accepted as numbers: float, signed and unsigned int
_REFUSED_SCALARS = (str, bytes, bool, np.bool_, complex, np.complexfloating)
_NOT_NUMBERS_HINT = ("pass real numbers (int or float): strings, even numeric ones, complex numbers and bools "
                     "are refused")


def _leaves(values: Any) -> list:
    """The scalars of a nested list/tuple, in numpy's flat order."""
    out: list = []
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        else:
            out.append(v)
    return out


def _real_array(values: Any, what: str, error: type[ValueError], must: str = "numbers") -> np.ndarray:
    """``values`` as a fresh float64 array, refusing anything that is not made of real numbers (see module doc)."""
    try:
        raw = np.asarray(values)
    except Exception as exc:  # ragged nesting, or an object numpy cannot take (its __array__ may raise anything)
        raise error(f"{what} must be {must}, got {values!r} ({type(exc).__name__}: {exc})") from None
    kind = raw.dtype.kind
    if kind == "O":  # a list mixing numpy scalars, tensors, None, ...: check each item
        items = raw.ravel()
        bad = [i for i, v in enumerate(items) if isinstance(v, _REFUSED_SCALARS)]
        if bad:
            raise error(f"{what} must be {must}, got {type(items[bad[0]]).__name__} {items[bad[0]]!r} at "
                        f"flat index {bad[0]}; {_NOT_NUMBERS_HINT}")
        try:
            return np.array([float(v) for v in items], dtype=np.float64).reshape(raw.shape)
        except Exception as exc:  # an item's own __float__ may raise anything (a multi-element tensor, a bad object)
            raise error(f"{what} must be {must}, got {values!r} ({type(exc).__name__}: {exc})") from None
    if isinstance(values, (list, tuple)) and kind != "b":  # numpy turns a bool among numbers into 0.0 / 1.0
        bools = [i for i, v in enumerate(_leaves(values)) if isinstance(v, (bool, np.bool_))]
        if bools:
            raise error(f"{what} must be {must}, got a bool at flat index {bools[0]} in {values!r}; "
                        f"{_NOT_NUMBERS_HINT}")
    if kind not in _REAL_KINDS:
        described = {"U": "strings", "S": "bytes", "c": "complex numbers", "b": "bools"}.get(kind, f"dtype {raw.dtype}")
        raise error(f"{what} must be {must}, got {described} {values!r}; {_NOT_NUMBERS_HINT}")
    # A fresh copy, never a view (calvin_env once modified relative actions in place, 27a27a2).
    return np.array(raw, dtype=np.float64, copy=True)


def _as_float_vector(values: Any, what: str) -> np.ndarray:
    """A fresh 1-D float64 copy of real numbers."""
    arr = _real_array(values, what, InvalidActionError)
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


_AXES = ("x", "y", "z")


_WORKSPACE = tuple(zip(layout.WORKSPACE_LOW_M.tolist(), layout.WORKSPACE_HIGH_M.tolist()))


def _check_workspace(arr: np.ndarray, what: str) -> None:
    """An absolute cartesian target inside the stated workspace, before any IK sees it (issue 10).

    Plain float comparisons: numpy on 3 values costs more than the check (this runs every step)."""
    pos = arr[:3].tolist()
    out = [i for i, (v, (lo, hi)) in enumerate(zip(pos, _WORKSPACE)) if not lo <= v <= hi]
    if out:
        lo, hi = layout.WORKSPACE_LOW_M, layout.WORKSPACE_HIGH_M
        got = ", ".join(f"{_AXES[i]} = {pos[i]:.6g}" for i in out)
        raise InvalidActionError(
            f"{what}: the absolute position is outside the workspace x [{lo[0]:g}, {hi[0]:g}], "
            f"y [{lo[1]:g}, {hi[1]:g}], z [{lo[2]:g}, {hi[2]:g}] m (layout.WORKSPACE_LOW_M/HIGH_M): {got}"
        )
    if arr.shape[0] == 7:  # euler xyz (a quaternion is bounded by its unit norm)
        euler = arr[3:6].tolist()
        out = [3 + i for i, v in enumerate(euler) if abs(v) > layout.MAX_ABS_ANGLE_RAD]
        if out:
            raise InvalidActionError(
                f"{what}: euler angles must satisfy |angle| <= {layout.MAX_ABS_ANGLE_RAD:.6g} rad (4 pi), got "
                f"{[euler[i - 3] for i in out]} at indices {out}; wrap them to [-pi, pi]"
            )


def _check_joint_magnitude(arr: np.ndarray, kind: str, what: str) -> None:
    joints = arr[:7].tolist()
    out = [i for i, v in enumerate(joints) if abs(v) > layout.MAX_JOINT_ACTION_RAD]
    if out:
        noun = "joint angles" if kind == "joint_abs" else "joint deltas"
        raise InvalidActionError(
            f"{what}: {noun} must satisfy |q| <= {layout.MAX_JOINT_ACTION_RAD:.6g} rad (2 pi; targets are then "
            f"clipped to the Panda's limits), got {[joints[i] for i in out]} at indices {out}; are they radians?"
        )


def _flatten_pose_tuple(action: Any, what: str) -> np.ndarray:
    """``(pos[3], orn[3|4], gripper)`` -> the flat 7/8-vector ``[*pos, *orn, gripper]``."""
    pos, orn, gripper = action
    pos = _as_float_vector(pos, f"{what} position")
    orn = _as_float_vector(orn, f"{what} orientation")
    # calvin_env accepts a scalar or a 1-element array here; both normalise to one trailing value.
    gripper = np.atleast_1d(_real_array(gripper, f"{what} gripper", InvalidActionError))
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
    except Exception:  # a ragged item, or one numpy cannot convert: not a pose tuple, the caller reports it
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
    if kind == "cartesian_abs":
        if arr.shape[0] == 8:
            norm = float(np.linalg.norm(arr[3:7]))
            if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
                raise InvalidActionError(
                    f"{what}: the quaternion (xyzw) must have unit norm, got norm {norm:.6g} for {arr[3:7].tolist()}"
                )
        _check_workspace(arr, what)
    elif kind in ("joint_abs", "joint_rel"):
        _check_joint_magnitude(arr, kind, what)
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
        if not isinstance(kind, str):
            raise InvalidActionError(
                f"a dict action's 'type' must be a string, one of {list(ACTION_TYPES)}; "
                f"got {type(kind).__name__} {kind!r}"
            )
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


# Strict resets (``validate_state_obs(..., strict=True)``): the range each state value may take. Measured states sit
# a little past a limit at times (joint limits are soft constraints), hence the tolerances; anything beyond them is
# a state the world cannot be in (a drawer 5 m out, a joint at 1e6 rad, a block under the floor).
STRICT_JOINT_TOLERANCE_RAD = 0.05
STRICT_LENGTH_TOLERANCE_M = 0.01
# Refused in both modes: no state of the world is a billion metres or radians away, and the physics overflows near
# 1e306 (a drawer there reads back NaN; a joint at 9e307 turns NaN on the first step, and IK seeded with it never
# returns). Lenient resets still teleport anywhere below it, as calvin_env.
MAX_STATE_MAGNITUDE = 1e9


def _strict_bounds() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    angle = layout.MAX_ABS_ANGLE_RAD
    tol_m, tol_q = STRICT_LENGTH_TOLERANCE_M, STRICT_JOINT_TOLERANCE_RAD
    width = 2 * layout.GRIPPER_FINGER_LIMITS_M[1]
    robot_lo = np.r_[layout.WORKSPACE_LOW_M, [-angle] * 3, -tol_m, layout.ARM_JOINT_LOWER_RAD - tol_q, -1.0]
    robot_hi = np.r_[layout.WORKSPACE_HIGH_M, [angle] * 3, width + tol_m, layout.ARM_JOINT_UPPER_RAD + tol_q, 1.0]
    doors = (layout.SLIDER_RANGE_M, layout.DRAWER_RANGE_M, layout.BUTTON_RANGE_M, layout.SWITCH_RANGE_M)
    block_lo = np.r_[layout.WORKSPACE_LOW_M[:2], layout.FLOOR_Z - 0.05, [-angle] * 3]
    block_hi = np.r_[layout.WORKSPACE_HIGH_M, [angle] * 3]
    n_blocks = len(layout.BLOCK_NAMES)
    scene_lo = np.r_[[lo - tol_m for lo, _ in doors], 0.0, 0.0, np.tile(block_lo, n_blocks)]
    scene_hi = np.r_[[hi + tol_m for _, hi in doors], 1.0, 1.0, np.tile(block_hi, n_blocks)]
    return robot_lo, robot_hi, scene_lo, scene_hi


ROBOT_OBS_LOW, ROBOT_OBS_HIGH, SCENE_OBS_LOW, SCENE_OBS_HIGH = _strict_bounds()


def _validate_state_vector(values: Any, size: int, name: str, fields: tuple[str, ...], layout_hint: str,
                           strict: bool, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    arr = _real_array(values, name, InvalidStateError, must=f"{size} numbers")
    if arr.shape != (size,):
        raise InvalidStateError(f"{name} must have shape ({size},) [{layout_hint}], got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        where = ", ".join(f"{name}[{i}] ({fields[i]}) = {arr[i]}" for i in bad)
        raise InvalidStateError(f"{name} has non-finite values (NaN or inf) at indices {bad.tolist()}: {where}")
    huge = np.flatnonzero(np.abs(arr) > MAX_STATE_MAGNITUDE)
    if huge.size:
        where = ", ".join(f"{name}[{i}] ({fields[i]}) = {arr[i]:.6g}" for i in huge)
        raise InvalidStateError(f"{name} has values beyond +-{MAX_STATE_MAGNITUDE:g} (m or rad), which no state of "
                                f"the world has and the physics cannot simulate: {where}")
    if strict:
        out = np.flatnonzero((arr < low) | (arr > high))
        if out.size:
            where = "; ".join(f"{name}[{i}] ({fields[i]}) = {arr[i]:.6g} is outside [{low[i]:.6g}, {high[i]:.6g}]"
                              for i in out)
            raise InvalidStateError(
                f"strict reset: {name} describes a state the world cannot be in: {where} (ranges: the Panda's "
                f"joint limits +-{STRICT_JOINT_TOLERANCE_RAD} rad, door travel +-{STRICT_LENGTH_TOLERANCE_M} m, "
                f"the workspace, |angle| <= 4 pi); reset with strict=False to teleport there anyway"
            )
    return arr


def validate_state_obs(robot_obs: Any = None, scene_obs: Any = None, *,
                       strict: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Check the ``robot_obs`` (15) and ``scene_obs`` (24) given to ``reset``; return float64 copies.

    ``None`` passes through as ``None`` (the env's default pose / scene). Always raises :class:`InvalidStateError`
    (a ``ValueError``) for a wrong shape, values that are not real numbers, a NaN/inf (naming the field and index,
    e.g. ``scene_obs[1] (drawer)``), a magnitude beyond ``MAX_STATE_MAGNITUDE`` (1e9), or a light state (``scene_obs[4]`` lightbulb, ``scene_obs[5]`` led) other
    than 0 or 1.

    ``strict=False`` (the default, as calvin_env) range-checks nothing else: any state calvin_env can teleport to
    is allowed. ``strict=True`` also refuses states the world cannot be in, naming each value out of range: arm
    joints beyond the Panda's limits (+-0.05 rad), gripper width outside [0, 0.08] m, a gripper action other than
    exactly -1/+1, slider/drawer/button/switch beyond their travel (+-1 cm), block or tcp positions outside the
    workspace (blocks not below the floor), euler angles beyond 4 pi. The tolerances let every measured state pass.

    Example::

        robot_obs, scene_obs = validate_state_obs(layout.NEUTRAL_ROBOT_OBS, np.zeros(24))
        validate_state_obs(scene_obs=np.r_[0, 5.0, np.zeros(22)], strict=True)   # InvalidStateError: drawer
    """
    if robot_obs is not None:
        robot_obs = _validate_state_vector(
            robot_obs, layout.ROBOT_OBS_DIM, "robot_obs", layout.ROBOT_OBS_FIELDS,
            "tcp pos 3, tcp euler 3, gripper width 1, arm joints 7, gripper action 1",
            strict, ROBOT_OBS_LOW, ROBOT_OBS_HIGH,
        )
        if strict and robot_obs[-1] not in (-1.0, 1.0):
            raise InvalidStateError(
                f"strict reset: robot_obs[14] (gripper_action) must be exactly -1 (closed) or +1 (open), "
                f"got {robot_obs[-1]!r}"
            )
    if scene_obs is not None:
        scene_obs = _validate_state_vector(
            scene_obs, layout.SCENE_OBS_DIM, "scene_obs", layout.SCENE_OBS_FIELDS,
            "slider, drawer, button, switch, lightbulb, led, then x y z roll pitch yaw of the red, blue, pink blocks",
            strict, SCENE_OBS_LOW, SCENE_OBS_HIGH,
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
