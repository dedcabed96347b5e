"""Safety gates between a policy's joint-space output and the arm: the pure-Python half of the ROS policy node.

The node (``ros_nodes/``) stays a thin shell: it turns messages into arrays, calls the functions here, and turns
the result back into a ``trajectory_msgs/JointTrajectory``. Everything that decides whether a command is safe lives
here, so it is tested without rclpy, a simulator or a robot (numpy only; see tests/test_safety_gates.py).

* ``JointLimits``       -- position / velocity limits and the margin kept inside the position limits.
* ``order_joint_state`` -- ``/joint_states`` entries matched by name (the message's order is not guaranteed).
* ``gate_trajectory``   -- reject non-finite or malformed commands; clamp positions; limit joint velocity.
* ``hold_trajectory``   -- "stop" means hold the last measured position, never command zero.
* ``InputWatchdog``     -- which inputs are too old (or never seen) to act on.
* ``StopLatch``         -- a thread-safe e-stop latch: once stopped, stays stopped until ``resume()``.

Usage (inside the node's timer callback)::

    limits = JointLimits()
    q = order_joint_state(msg.name, msg.position, limits)
    if not latch.allow():
        return                                   # after the stop's one hold, nothing until resume()
    if watchdog.stale(now):
        latch.stop("stale inputs")
        publish(hold_trajectory(q, limits))      # hold the measured position once, never zero
        return
    gated = gate_trajectory(chunk_positions, chunk_times, q, limits)
    publish(gated)                               # and report gated.n_clamped_position / gated.n_limited_velocity
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PANDA_JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))
FR3_JOINT_NAMES = tuple(f"fr3_joint{i}" for i in range(1, 8))
# Franka Emika Panda datasheet (rad, rad/s).
PANDA_LOWER = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)
PANDA_UPPER = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)
PANDA_VELOCITY = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)


class JointStateError(ValueError):
    """A ``/joint_states`` message cannot be turned into the arm's joint vector."""


class UnsafeCommandError(ValueError):
    """A command is malformed or non-finite: it is rejected, not repaired (clamping NaN would invent a target)."""


def _float_tuple(values, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"JointLimits.{what} must be a sequence of numbers, got {values!r}") from error


@dataclass(frozen=True)
class JointLimits:
    """Per-joint limits of the arm, in the order of ``names`` (the order every array in this module uses).

    ``margin`` (rad) is kept inside the position limits, as MoveIt Servo does, so tracking error or the
    controller's interpolation cannot carry the arm into the hardware limits (where Franka's reflex stops it).
    """

    names: tuple[str, ...] = PANDA_JOINT_NAMES
    lower: tuple[float, ...] = PANDA_LOWER
    upper: tuple[float, ...] = PANDA_UPPER
    velocity: tuple[float, ...] = PANDA_VELOCITY
    margin: float = 0.1

    def __post_init__(self):
        # Normalise to tuples of floats (frozen: assign through object.__setattr__) so lists / arrays are accepted
        # and the limits stay hashable and immutable.
        names = tuple(self.names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"JointLimits.names must be non-empty strings, got {self.names!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"JointLimits.names has duplicate joints {duplicates}")
        object.__setattr__(self, "names", names)
        for what in ("lower", "upper", "velocity"):
            values = _float_tuple(getattr(self, what), what)
            if len(values) != len(names):
                raise ValueError(f"JointLimits.{what} has {len(values)} values for {len(names)} joints {names}")
            bad = [n for n, v in zip(names, values) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"JointLimits.{what} is not finite for joints {bad}")
            object.__setattr__(self, what, values)
        margin = float(self.margin)
        if not math.isfinite(margin) or margin < 0:
            raise ValueError(f"JointLimits.margin must be finite and >= 0 rad, got {self.margin!r}")
        object.__setattr__(self, "margin", margin)
        bad = [n for n, v in zip(names, self.velocity) if v <= 0]
        if bad:
            raise ValueError(f"JointLimits.velocity must be > 0 rad/s, not for joints {bad}")
        bad = [n for n, lo, hi in zip(names, self.lower, self.upper) if not lo < hi]
        if bad:
            raise ValueError(f"JointLimits.lower must be below upper, not for joints {bad}")
        # The safe band [lower + margin, upper - margin] must be non-empty or every clamp is contradictory.
        bad = [n for n, lo, hi in zip(names, self.lower, self.upper) if not lo + margin <= hi - margin]
        if bad:
            raise ValueError(f"JointLimits.margin {margin} rad leaves no room inside the limits of joints {bad}")

    @classmethod
    def panda(cls, margin: float = 0.1) -> "JointLimits":
        return cls(margin=margin)

    @classmethod
    def fr3(cls, margin: float = 0.1) -> "JointLimits":
        # FR3 reuses the Panda's numbers as a placeholder. The FR3's own position and velocity limits are not the
        # same on every joint (not checked here): replace these with the FR3 datasheet values before running one.
        return cls(names=FR3_JOINT_NAMES, margin=margin)

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def lower_array(self) -> np.ndarray:
        return np.array(self.lower, dtype=np.float64)

    @property
    def upper_array(self) -> np.ndarray:
        return np.array(self.upper, dtype=np.float64)

    @property
    def velocity_array(self) -> np.ndarray:
        return np.array(self.velocity, dtype=np.float64)

    @property
    def safe_lower(self) -> np.ndarray:
        """The lowest position ever commanded: ``lower + margin``."""
        return self.lower_array + self.margin

    @property
    def safe_upper(self) -> np.ndarray:
        """The highest position ever commanded: ``upper - margin``."""
        return self.upper_array - self.margin


def order_joint_state(names: Sequence[str], positions: Sequence[float], limits: JointLimits) -> np.ndarray:
    """The arm's joint vector ``(n,)`` in ``limits.names`` order, matched by name from a ``/joint_states`` message.

    ``sensor_msgs/JointState`` gives no ordering guarantee and usually carries extra joints (the gripper's finger
    joints); those are ignored. Raises ``JointStateError`` for a length mismatch, duplicate names, missing arm
    joints, or a non-finite arm joint (a NaN here would otherwise become the hold position).
    """
    names = list(names)
    positions = list(positions)
    if len(names) != len(positions):
        raise JointStateError(f"joint state has {len(names)} names but {len(positions)} positions")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JointStateError(f"joint state names joints more than once: {duplicates}")
    index = {name: i for i, name in enumerate(names)}
    missing = [n for n in limits.names if n not in index]
    if missing:
        raise JointStateError(f"joint state lacks joints {missing} (it has {names})")
    try:
        q = np.array([float(positions[index[n]]) for n in limits.names], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise JointStateError(f"joint state positions are not numbers: {positions!r}") from error
    bad = [n for n, v in zip(limits.names, q) if not np.isfinite(v)]
    if bad:
        raise JointStateError(f"joint state is not finite for joints {bad}")
    return q


@dataclass
class GatedTrajectory:
    """A command that satisfies the limits: ``points`` (T, n) positions at ``times`` (T,) seconds from start.

    ``n_clamped_position`` / ``n_limited_velocity`` count the points the gate changed (a point counts once however
    many of its joints were changed), so the node can report how often the policy asks for something unsafe.
    """

    points: np.ndarray
    times: np.ndarray
    n_clamped_position: int = 0
    n_limited_velocity: int = 0
    names: tuple[str, ...] = field(default=PANDA_JOINT_NAMES)

    @property
    def modified(self) -> bool:
        return bool(self.n_clamped_position or self.n_limited_velocity)


def _as_array(value, shape_hint: str, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise UnsafeCommandError(f"{what} must be numeric {shape_hint}, got {type(value).__name__}") from error
    return array


def gate_trajectory(points, times_from_start, measured, limits: JointLimits) -> GatedTrajectory:
    """Check and limit a joint-position trajectory before it is sent to the arm.

    ``points`` (T, n) joint positions, ``times_from_start`` (T,) strictly increasing seconds > 0, ``measured`` (n,)
    the current joints (the trajectory starts there at t = 0).

    Rejected (``UnsafeCommandError``): wrong shapes, an empty trajectory, NaN/inf anywhere, times not strictly
    increasing from > 0. Repaired: each point is clamped into ``[lower + margin, upper - margin]``; then every
    segment (measured -> point 0, point i -> point i + 1) is limited so ``|delta| <= velocity * dt`` per joint,
    by moving the later point toward the earlier one; the moved point is the start of the next segment, so the
    limit propagates forward (a too-fast chunk becomes a slower one that lags behind, never a jump).

    When ``measured`` is inside the band every output point is inside it too (a velocity-limited point lies
    between two in-band positions). If the arm itself starts outside the band (e.g. it was hand-guided into the
    margin), the velocity limit wins: the first points walk toward the band at no more than the velocity limit
    rather than jump into it.

    A trajectory that needs no repair comes back bit-identical (as float64).
    """
    n = limits.n
    p = _as_array(points, f"(T, {n})", "points")
    t = _as_array(times_from_start, "(T,)", "times_from_start")
    q = _as_array(measured, f"({n},)", "measured")
    if p.ndim != 2 or p.shape[1] != n or p.shape[0] < 1:
        raise UnsafeCommandError(f"points must have shape (T >= 1, {n}) for joints {limits.names}, got {p.shape}")
    if t.shape != (p.shape[0],):
        raise UnsafeCommandError(f"times_from_start must have shape ({p.shape[0]},) to match points, got {t.shape}")
    if q.shape != (n,):
        raise UnsafeCommandError(f"measured must have shape ({n},), got {q.shape}")
    for what, array in (("measured", q), ("times_from_start", t)):
        if not np.all(np.isfinite(array)):
            raise UnsafeCommandError(f"{what} is not finite: {array.tolist()}")
    if not np.all(np.isfinite(p)):
        rows = sorted(set(np.nonzero(~np.isfinite(p))[0].tolist()))
        joints = [limits.names[j] for j in sorted(set(np.nonzero(~np.isfinite(p))[1].tolist()))]
        raise UnsafeCommandError(f"points are not finite at rows {rows}, joints {joints}")
    if t[0] <= 0:
        raise UnsafeCommandError(f"times_from_start must start after 0 s (the measured state), got {t[0]}")
    dts = np.diff(np.concatenate([[0.0], t]))
    if np.any(dts <= 0):
        bad = np.nonzero(dts <= 0)[0].tolist()
        raise UnsafeCommandError(f"times_from_start must be strictly increasing; not at indices {bad}: {t.tolist()}")

    lo, hi, vmax = limits.safe_lower, limits.safe_upper, limits.velocity_array
    out = np.clip(p, lo, hi)
    clamped_rows = np.any(out != p, axis=1)

    limited_rows = np.zeros(p.shape[0], dtype=bool)
    prev = q
    for i in range(out.shape[0]):
        target = out[i]
        step = vmax * dts[i]
        delta = target - prev
        too_fast = np.abs(delta) > step
        if np.any(too_fast):
            moved = np.where(too_fast, prev + np.clip(delta, -step, step), target)
            # Keep the moved joint between prev and target: guards against a one-ulp overshoot of the band when
            # prev + step rounds past the (in-band) target.
            moved = np.clip(moved, np.minimum(prev, target), np.maximum(prev, target))
            out[i] = moved
            limited_rows[i] = True
        prev = out[i]

    return GatedTrajectory(points=out, times=t.copy(), n_clamped_position=int(clamped_rows.sum()),
                           n_limited_velocity=int(limited_rows.sum()), names=limits.names)


def hold_trajectory(measured, limits: JointLimits, dt: float = 0.1) -> GatedTrajectory:
    """One point at the measured position (clamped into the safe band), ``dt`` seconds from now.

    Stop means hold the last measured position, never command zero: zeros are a real, far-away configuration
    (joint 4 at 0 is even outside the Panda's limits) and the controller would drive the arm there. The point goes
    through ``gate_trajectory``, so a hold from inside the margin moves into the band no faster than the limit.
    """
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0:
        raise UnsafeCommandError(f"hold dt must be finite and > 0 s, got {dt}")
    q = _as_array(measured, f"({limits.n},)", "measured")
    if q.shape != (limits.n,):
        raise UnsafeCommandError(f"measured must have shape ({limits.n},), got {q.shape}")
    return gate_trajectory(q[None, :], [dt], q, limits)


class InputWatchdog:
    """Which inputs are too old to act on: a source is stale when never seen or older than ``max_age_s``.

    Stamps and ``now_s`` come from the same clock (the node passes ROS time in seconds); the watchdog keeps the
    newest stamp per source, so an out-of-order older message cannot make a source look older than it is.
    """

    def __init__(self, max_age_s: float = 0.5, sources: Sequence[str] = ("rgb_static", "rgb_gripper", "joint_states")):
        max_age_s = float(max_age_s)
        if not math.isfinite(max_age_s) or max_age_s <= 0:
            raise ValueError(f"InputWatchdog max_age_s must be finite and > 0 s, got {max_age_s}")
        sources = tuple(sources)
        if not sources or len(set(sources)) != len(sources):
            raise ValueError(f"InputWatchdog sources must be non-empty and unique, got {sources}")
        self.max_age_s = max_age_s
        self.sources = sources
        self._last: dict[str, float] = {}
        # ROS subscriptions may run on several executor threads.
        self._lock = threading.Lock()

    def _check(self, source: str) -> None:
        if source not in self.sources:
            raise ValueError(f"unknown watchdog source {source!r}; known sources are {list(self.sources)}")

    def update(self, source: str, stamp_s: float) -> None:
        self._check(source)
        stamp_s = float(stamp_s)
        if not math.isfinite(stamp_s):
            raise ValueError(f"watchdog stamp for {source!r} is not finite: {stamp_s}")
        with self._lock:
            self._last[source] = max(stamp_s, self._last.get(source, -math.inf))

    def age(self, source: str, now_s: float) -> float:
        """Seconds since ``source`` was last seen (inf if never)."""
        self._check(source)
        with self._lock:
            last = self._last.get(source)
        return math.inf if last is None else float(now_s) - last

    def stale(self, now_s: float) -> list[str]:
        """The sources that are stale at ``now_s``, in ``sources`` order (empty when every input is fresh)."""
        now_s = float(now_s)
        if not math.isfinite(now_s):
            raise ValueError(f"watchdog now_s is not finite: {now_s}")
        with self._lock:
            last = dict(self._last)
        return [s for s in self.sources if s not in last or now_s - last[s] > self.max_age_s]

    def reset(self) -> None:
        """Forget every stamp (every source is stale again), e.g. after a restart of the camera drivers."""
        with self._lock:
            self._last.clear()


class StopLatch:
    """An e-stop latch: ``stop(reason)`` latches until ``resume()``; ``allow()`` is False while stopped.

    A second ``stop`` while stopped keeps the first reason (the first cause is the one worth reporting). Guarded by
    a lock because ROS callbacks (a stop service, the watchdog timer, the policy timer) run on executor threads.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._reason: str | None = None

    def stop(self, reason: str) -> bool:
        """Latch a stop; True if this call latched it, False if it was already stopped."""
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = str(reason) or "stopped"
            return True

    def resume(self) -> None:
        with self._lock:
            self._reason = None

    @property
    def stopped(self) -> bool:
        with self._lock:
            return self._reason is not None

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason

    def allow(self) -> bool:
        return not self.stopped
