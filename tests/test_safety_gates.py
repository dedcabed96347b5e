"""ghil.runtime.safety: joint limits, joint-state ordering, the trajectory gate, hold, watchdog and stop latch."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghil.runtime.safety import (
    FR3_JOINT_NAMES,
    PANDA_JOINT_NAMES,
    GatedTrajectory,
    InputWatchdog,
    JointLimits,
    JointStateError,
    StopLatch,
    UnsafeCommandError,
    gate_trajectory,
    hold_trajectory,
    order_joint_state,
)

LIMITS = JointLimits()
# A comfortable configuration well inside the band (Panda "ready" pose).
READY = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])


def _assert_safe(gated: GatedTrajectory, measured: np.ndarray, limits: JointLimits = LIMITS) -> None:
    p, t = gated.points, gated.times
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(t))
    assert np.all(p >= limits.safe_lower) and np.all(p <= limits.safe_upper)
    full = np.vstack([measured[None, :], p])
    dts = np.diff(np.concatenate([[0.0], t]))
    speed = np.abs(np.diff(full, axis=0)) / dts[:, None]
    assert np.all(speed <= limits.velocity_array + 1e-9), speed.max(axis=0)


# ----------------------------------------------------------------------------------------------------- limits


def test_limits_defaults_are_the_panda_datasheet():
    assert LIMITS.names == tuple(f"panda_joint{i}" for i in range(1, 8)) == PANDA_JOINT_NAMES
    assert LIMITS.lower == (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)
    assert LIMITS.upper == (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)
    assert LIMITS.velocity == (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)
    assert LIMITS.margin == 0.1
    np.testing.assert_allclose(LIMITS.safe_upper - LIMITS.safe_lower, np.subtract(LIMITS.upper, LIMITS.lower) - 0.2)


def test_fr3_limits_have_fr3_names_and_panda_values():
    fr3 = JointLimits.fr3()
    assert fr3.names == FR3_JOINT_NAMES == tuple(f"fr3_joint{i}" for i in range(1, 8))
    assert (fr3.lower, fr3.upper, fr3.velocity, fr3.margin) == (LIMITS.lower, LIMITS.upper, LIMITS.velocity, 0.1)


def test_limits_are_frozen_and_accept_lists():
    limits = JointLimits(lower=list(LIMITS.lower), upper=np.array(LIMITS.upper))
    assert limits == LIMITS and isinstance(limits.lower, tuple) and hash(limits) == hash(LIMITS)
    with pytest.raises(AttributeError):
        limits.margin = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, message", [
    (dict(lower=LIMITS.lower[:6]), "lower has 6 values"),
    (dict(velocity=LIMITS.velocity + (1.0,)), "velocity has 8 values"),
    (dict(upper=LIMITS.upper[:3] + (float("nan"),) + LIMITS.upper[4:]), "panda_joint4"),
    (dict(lower=(float("-inf"),) + LIMITS.lower[1:]), "not finite"),
    (dict(velocity=(0.0,) + LIMITS.velocity[1:]), "velocity must be > 0"),
    (dict(lower=LIMITS.upper, upper=LIMITS.lower), "lower must be below upper"),
    (dict(margin=-0.01), "margin"),
    (dict(margin=float("nan")), "margin"),
    (dict(margin=1.6), r"leaves no room inside the limits of joints \['panda_joint4'\]"),  # joint 4 spans 3.002 rad
    (dict(names=PANDA_JOINT_NAMES[:6] + ("panda_joint1",)), "duplicate"),
    (dict(names=PANDA_JOINT_NAMES[:6]), "6 joints"),
])
def test_limits_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JointLimits(**kwargs)


# ---------------------------------------------------------------------------------------------- joint state


def test_joint_state_is_ordered_by_name_ignoring_extra_joints():
    rng = np.random.default_rng(0)
    names = list(PANDA_JOINT_NAMES) + ["panda_finger_joint1", "panda_finger_joint2"]
    values = dict(zip(PANDA_JOINT_NAMES, READY)) | {"panda_finger_joint1": 0.04, "panda_finger_joint2": float("nan")}
    for _ in range(5):
        shuffled = list(rng.permutation(names))
        q = order_joint_state(shuffled, [values[n] for n in shuffled], LIMITS)
        assert q.shape == (7,) and q.dtype == np.float64
        np.testing.assert_array_equal(q, READY)


def test_joint_state_errors_name_the_joints():
    names, pos = list(PANDA_JOINT_NAMES), list(READY)
    with pytest.raises(JointStateError, match=r"lacks joints \['panda_joint3'\]"):
        order_joint_state(names[:2] + names[3:], pos[:2] + pos[3:], LIMITS)
    with pytest.raises(JointStateError, match="more than once.*panda_joint2"):
        order_joint_state(names + ["panda_joint2"], pos + [0.0], LIMITS)
    with pytest.raises(JointStateError, match="7 names but 6 positions"):
        order_joint_state(names, pos[:6], LIMITS)
    bad = pos.copy()
    bad[4] = float("nan")
    with pytest.raises(JointStateError, match=r"not finite for joints \['panda_joint5'\]"):
        order_joint_state(names, bad, LIMITS)
    bad[4] = float("inf")
    with pytest.raises(JointStateError, match="panda_joint5"):
        order_joint_state(names, bad, LIMITS)
    # FR3 limits reject a Panda message: the names, not the positions, decide.
    with pytest.raises(JointStateError, match="fr3_joint1"):
        order_joint_state(names, pos, JointLimits.fr3())
    assert issubclass(JointStateError, ValueError)


# ------------------------------------------------------------------------------------------------------ gate


def _chunk(start: np.ndarray, step: np.ndarray, n: int = 5, dt: float = 0.1):
    points = start + np.arange(1, n + 1)[:, None] * step[None, :]
    return points, dt * np.arange(1, n + 1)


def test_safe_trajectory_is_unchanged_bit_identical():
    points, times = _chunk(READY, np.full(7, 0.01))
    gated = gate_trajectory(points, times, READY, LIMITS)
    assert gated.points.tobytes() == points.tobytes() and gated.times.tobytes() == times.tobytes()
    assert (gated.n_clamped_position, gated.n_limited_velocity, gated.modified) == (0, 0, False)
    assert gated.points is not points  # the caller's array is never aliased or mutated


def test_position_beyond_upper_comes_back_to_upper_minus_margin():
    upper = LIMITS.safe_upper
    measured = upper - 0.05  # near the top of the band, so velocity does not interfere
    points = np.tile(measured, (3, 1))
    points[1, 0] = LIMITS.upper[0] + 0.5     # beyond the hard limit
    points[2, 5] = LIMITS.upper[5] - 0.01    # inside the hard limit but inside the margin
    original = points.copy()
    gated = gate_trajectory(points, [0.1, 0.2, 0.3], measured, LIMITS)
    assert gated.points[1, 0] == upper[0] == pytest.approx(2.7973)
    assert gated.points[2, 5] == upper[5] == pytest.approx(3.6525)
    assert (gated.n_clamped_position, gated.n_limited_velocity) == (2, 0)
    np.testing.assert_array_equal(points, original)
    _assert_safe(gated, measured)

    below = np.tile(READY, (1, 1))
    below[0, 3] = LIMITS.lower[3] - 1.0
    gated = gate_trajectory(below, [10.0], READY, LIMITS)  # long dt: only the position clamp acts
    assert gated.points[0, 3] == LIMITS.safe_lower[3]


def test_velocity_is_limited_on_the_first_segment_from_measured():
    target = READY.copy()
    target[0] += 1.0  # 1 rad in 0.1 s = 10 rad/s >> 2.175
    gated = gate_trajectory(target[None, :], [0.1], READY, LIMITS)
    assert gated.points[0, 0] == pytest.approx(READY[0] + 2.175 * 0.1)
    np.testing.assert_array_equal(gated.points[0, 1:], READY[1:])  # other joints untouched
    assert gated.n_limited_velocity == 1 and gated.n_clamped_position == 0
    _assert_safe(gated, READY)


def test_velocity_is_limited_on_later_segments_and_propagates():
    points = np.tile(READY, (4, 1))
    points[2:, 6] += 1.0  # a jump between point 1 and 2 on joint 7 (limit 2.61 rad/s)
    gated = gate_trajectory(points, [0.1, 0.2, 0.3, 0.4], READY, LIMITS)
    np.testing.assert_array_equal(gated.points[:2], points[:2])
    assert gated.points[2, 6] == pytest.approx(READY[6] + 0.261)
    assert gated.points[3, 6] == pytest.approx(READY[6] + 0.522)  # moved from the moved point 2
    assert gated.n_limited_velocity == 2
    _assert_safe(gated, READY)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 20), scale=st.sampled_from([0.01, 0.3, 3.0, 30.0]))
def test_random_trajectories_always_satisfy_the_limits(seed, length, scale):
    rng = np.random.default_rng(seed)
    lo, hi = LIMITS.safe_lower, LIMITS.safe_upper
    measured = rng.uniform(lo, hi)
    points = measured + np.cumsum(rng.normal(0.0, scale, size=(length, 7)), axis=0)
    times = np.cumsum(rng.uniform(1e-3, 0.3, size=length))
    gated = gate_trajectory(points, times, measured, LIMITS)
    _assert_safe(gated, measured)
    assert gated.points.shape == (length, 7)
    np.testing.assert_array_equal(gated.times, times)
    assert 0 <= gated.n_clamped_position <= length and 0 <= gated.n_limited_velocity <= length


def test_measured_inside_the_margin_walks_back_without_a_velocity_jump():
    measured = READY.copy()
    measured[3] = LIMITS.upper[3] - 0.01  # the arm sits inside the margin of joint 4
    points = np.tile(READY, (1, 1))
    points[0, 3] = LIMITS.upper[3]
    gated = gate_trajectory(points, [0.01], measured, LIMITS)  # 0.09 rad in 0.01 s would be 9 rad/s
    assert measured[3] > gated.points[0, 3] > LIMITS.safe_upper[3]
    speed = abs(gated.points[0, 3] - measured[3]) / 0.01
    assert speed <= LIMITS.velocity[3] + 1e-9


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["points", "times", "measured"])
def test_non_finite_inputs_are_rejected(bad, where):
    points, times = _chunk(READY, np.full(7, 0.01))
    measured = READY.copy()
    {"points": points[2], "times": times, "measured": measured}[where][3 if where != "times" else 2] = float(bad)
    with pytest.raises(UnsafeCommandError, match="not finite"):
        gate_trajectory(points, times, measured, LIMITS)


def test_non_finite_error_names_rows_and_joints():
    points, times = _chunk(READY, np.zeros(7))
    points[1, 5] = np.nan
    with pytest.raises(UnsafeCommandError, match=r"rows \[1\], joints \['panda_joint6'\]"):
        gate_trajectory(points, times, READY, LIMITS)


@pytest.mark.parametrize("points, times, measured, message", [
    (np.zeros((3, 6)), [0.1, 0.2, 0.3], READY, "points must have shape"),
    (np.zeros(7), [0.1], READY, "points must have shape"),
    (np.zeros((0, 7)), [], READY, "points must have shape"),
    (np.tile(READY, (3, 1)), [0.1, 0.2], READY, "times_from_start must have shape"),
    (np.tile(READY, (3, 1)), [[0.1, 0.2, 0.3]], READY, "times_from_start must have shape"),
    (np.tile(READY, (3, 1)), [0.1, 0.2, 0.3], READY[:6], "measured must have shape"),
    (np.tile(READY, (3, 1)), [0.1, 0.2, 0.2], READY, "strictly increasing"),
    (np.tile(READY, (3, 1)), [0.1, 0.3, 0.2], READY, "strictly increasing"),
    (np.tile(READY, (3, 1)), [0.0, 0.1, 0.2], READY, "after 0 s"),
    (np.tile(READY, (3, 1)), [-0.1, 0.1, 0.2], READY, "after 0 s"),
    ([["a"] * 7], [0.1], READY, "numeric"),
])
def test_malformed_commands_are_rejected(points, times, measured, message):
    with pytest.raises(UnsafeCommandError, match=message):
        gate_trajectory(points, times, measured, LIMITS)
    assert issubclass(UnsafeCommandError, ValueError)


# ------------------------------------------------------------------------------------------------------ hold


def test_hold_is_the_measured_position_never_zero():
    measured = READY + 0.1  # no joint at zero
    gated = hold_trajectory(measured, LIMITS)
    assert gated.points.shape == (1, 7) and gated.times.tolist() == [0.1]
    np.testing.assert_array_equal(gated.points[0], measured)
    assert not np.any(gated.points == 0.0)
    assert gated.n_clamped_position == gated.n_limited_velocity == 0


def test_hold_clamps_a_measured_state_inside_the_margin():
    measured = READY.copy()
    measured[5] = LIMITS.lower[5] + 0.02  # inside joint 6's margin (lower -0.0175)
    gated = hold_trajectory(measured, LIMITS, dt=0.2)
    assert gated.times.tolist() == [0.2]
    assert gated.points[0, 5] == LIMITS.safe_lower[5]
    np.testing.assert_array_equal(np.delete(gated.points[0], 5), np.delete(measured, 5))
    assert gated.n_clamped_position == 1
    _assert_safe(gated, measured)


def test_hold_rejects_bad_input():
    with pytest.raises(UnsafeCommandError, match="not finite"):
        hold_trajectory(np.full(7, np.nan), LIMITS)
    with pytest.raises(UnsafeCommandError, match="dt"):
        hold_trajectory(READY, LIMITS, dt=0.0)
    with pytest.raises(UnsafeCommandError, match="measured must have shape"):
        hold_trajectory(READY[:5], LIMITS)


# -------------------------------------------------------------------------------------------------- watchdog


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_watchdog_staleness_with_a_fake_clock():
    clock = FakeClock()
    dog = InputWatchdog(max_age_s=0.5)
    assert dog.stale(clock()) == ["rgb_static", "rgb_gripper", "joint_states"]  # never seen is stale
    dog.update("rgb_static", clock())
    dog.update("joint_states", clock())
    assert dog.stale(clock()) == ["rgb_gripper"]
    dog.update("rgb_gripper", clock())
    assert dog.stale(clock()) == []
    clock.t += 0.5
    assert dog.stale(clock()) == []                # exactly max_age is still fresh
    dog.update("joint_states", clock())
    clock.t += 0.01
    assert dog.stale(clock()) == ["rgb_static", "rgb_gripper"]
    dog.update("rgb_static", clock() - 10.0)       # an out-of-order old stamp does not age the source
    assert dog.stale(clock()) == ["rgb_static", "rgb_gripper"]
    assert dog.age("joint_states", clock()) == pytest.approx(0.01)
    assert dog.age("rgb_gripper", clock()) == pytest.approx(0.51)
    dog.reset()
    assert dog.age("joint_states", clock()) == float("inf")
    assert len(dog.stale(clock())) == 3


def test_watchdog_validation():
    dog = InputWatchdog(sources=("a",))
    with pytest.raises(ValueError, match="unknown watchdog source 'b'"):
        dog.update("b", 1.0)
    with pytest.raises(ValueError, match="not finite"):
        dog.update("a", float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        dog.stale(float("inf"))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_age_s"):
            InputWatchdog(max_age_s=bad)
    with pytest.raises(ValueError, match="unique"):
        InputWatchdog(sources=("a", "a"))


# ----------------------------------------------------------------------------------------------- stop latch


def test_stop_latch_semantics():
    latch = StopLatch()
    assert latch.allow() and not latch.stopped and latch.reason is None
    assert latch.stop("operator e-stop") is True
    assert not latch.allow() and latch.stopped
    assert latch.stop("watchdog: rgb_static stale") is False
    assert latch.reason == "operator e-stop"  # the first reason is kept
    assert not latch.allow()                    # still latched: nothing un-stops it but resume()
    latch.resume()
    assert latch.allow() and latch.reason is None
    latch.stop("second")
    assert latch.reason == "second"


def test_stop_latch_concurrent_stop_and_resume():
    latch = StopLatch()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        try:
            rnd = random.Random(k)
            start.wait()
            for i in range(2000):
                if rnd.random() < 0.5:
                    latch.stop(f"t{k}-{i}")
                    # Right after our stop the latch is stopped unless another thread resumed it meanwhile,
                    # and its reason is always a real reason (never None while stopped).
                    reason = latch.reason
                    assert reason is None or reason.startswith("t")
                else:
                    latch.resume()
                latch.allow()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and errors == []
    latch.resume()
    assert latch.allow()
    assert latch.stop("final") and latch.reason == "final"


def test_stop_latch_first_of_many_concurrent_stops_wins():
    latch = StopLatch()
    start = threading.Barrier(16)
    won: list[bool] = []

    def stopper(k: int) -> None:
        start.wait()
        won.append(latch.stop(f"r{k}"))

    threads = [threading.Thread(target=stopper, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert won.count(True) == 1 and len(won) == 16
    assert latch.stopped and latch.reason.startswith("r")
