"""sim_eval.world.action_validation: every accepted form normalises to calvin's dict form; every bad input is refused
with a message that names the problem. Needs neither calvin_env nor pybullet."""

from __future__ import annotations

import numpy as np
import pytest

from sim_eval.world import layout
from sim_eval.world.action_validation import (
    ACTION_TYPES,
    InvalidActionError,
    InvalidStateError,
    validate_action,
    validate_state_obs,
)

# ------------------------------------------------------------------------------------------------ good actions


def test_plain_seven_vector_is_relative():
    out = validate_action([0, 0, -1, 0, 0, 0.5, 1])
    assert out["type"] == "cartesian_rel"
    assert out["action"].dtype == np.float64 and out["action"].shape == (7,)
    np.testing.assert_array_equal(out["action"], [0, 0, -1, 0, 0, 0.5, 1])


def test_numpy_float32_and_tuple_of_seven_are_relative():
    assert validate_action(np.zeros(7, dtype=np.float32) + np.r_[0, 0, 0, 0, 0, 0, -1])["type"] == "cartesian_rel"
    assert validate_action((0.1, 0, 0, 0, 0, 0, 1))["type"] == "cartesian_rel"


def test_result_is_a_copy_not_a_view():
    # calvin_env once scaled relative actions in place (fixed in 27a27a2); we must never alias the caller's array.
    action = np.array([1.0, 0, 0, 0, 0, 0, 1])
    out = validate_action(action)
    out["action"][0] = 0.0
    assert action[0] == 1.0


@pytest.mark.parametrize("gripper", [1, -1, 1.0, -1.0, np.array([1.0]), np.int64(-1)])
def test_pose_tuple_is_absolute_with_any_gripper_spelling(gripper):
    out = validate_action(([0.1, -0.2, 0.5], [3.1, 0.0, 1.5], gripper))
    assert out["type"] == "cartesian_abs"
    np.testing.assert_allclose(out["action"][:6], [0.1, -0.2, 0.5, 3.1, 0.0, 1.5])
    assert out["action"][-1] == float(np.ravel(gripper)[0])


def test_pose_tuple_with_quaternion_gives_eight_values():
    out = validate_action((np.array([0.1, -0.2, 0.5]), np.array([1.0, 0, 0, 0]), -1))
    assert out["type"] == "cartesian_abs" and out["action"].shape == (8,)


@pytest.mark.parametrize(
    "kind, values",
    [
        ("cartesian_rel", [0, 0, 0, 0, 0, 0, 1]),
        ("cartesian_abs", [0.1, -0.2, 0.5, 3.1, 0, 1.5, -1]),
        ("cartesian_abs", [0.1, -0.2, 0.5, 0, 0, 0, 1, 1]),
        ("joint_abs", list(layout.NEUTRAL_ROBOT_OBS[7:14]) + [1]),
        ("joint_rel", [0.0] * 7 + [-1]),
        # joint_rel deltas are radians, not normalised, so values beyond 1 are allowed
        ("joint_rel", [1.5, 0, 0, 0, 0, 0, 0, 1]),
    ],
)
def test_dict_forms(kind, values):
    out = validate_action({"action": values, "type": kind})
    assert out["type"] == kind
    np.testing.assert_array_equal(out["action"], np.asarray(values, dtype=float))


def test_dict_cartesian_abs_accepts_the_pose_tuple():
    out = validate_action({"action": ([0.1, -0.2, 0.5], [3.1, 0, 1.5], 1), "type": "cartesian_abs"})
    np.testing.assert_array_equal(out["action"], [0.1, -0.2, 0.5, 3.1, 0, 1.5, 1])


def test_validated_dict_is_a_fixed_point():
    out = validate_action([0.2, 0, 0, 0, 0, 0, 1])
    again = validate_action(out)
    assert again["type"] == out["type"]
    np.testing.assert_array_equal(again["action"], out["action"])


def test_action_types_table():
    assert set(ACTION_TYPES) == {"cartesian_rel", "cartesian_abs", "joint_abs", "joint_rel"}


# ------------------------------------------------------------------------------------------------ bad actions

BAD_ACTIONS = [
    # (action, a fragment the message must contain)
    (None, "must be a 7-vector"),
    (0.5, "must be a 7-vector"),
    ("open", "must be a 7-vector"),
    ([0, 0, 0, 0, 0, 1], "must have 7 values"),
    (np.zeros(8), "must have 7 values"),
    (np.zeros((1, 7)), "squeeze the batch axis"),
    (np.zeros((7, 1)), "flat vector"),
    (["a"] * 7, "must be numbers"),
    ([np.nan, 0, 0, 0, 0, 0, 1], "non-finite"),
    ([0, 0, np.inf, 0, 0, 0, 1], "non-finite"),
    ([0, 0, 0, 0, 0, 0, np.nan], "non-finite"),
    ([1.01, 0, 0, 0, 0, 0, 1], "[-1, 1]"),
    ([0, 0, 0, 0, 0, -3, 1], "[-1, 1]"),
    ([0, 0, 0, 0, 0, 0, 0], "exactly -1 (close) or +1 (open)"),
    ([0, 0, 0, 0, 0, 0, 0.7], "threshold"),
    ([0, 0, 0, 0, 0, 0, 2], "exactly -1 (close) or +1 (open)"),
    (([0.1, 0.2], [0, 0, 0], 1), "position must have 3 values"),
    (([0.1, 0.2, 0.3], [0, 0], 1), "3 values (euler xyz) or 4 (quaternion xyzw)"),
    (([0.1, 0.2, 0.3], [0, 0, 0, 0], 1), "unit norm"),
    (([0.1, 0.2, 0.3], [0, 0, 0], 0.3), "exactly -1 (close) or +1 (open)"),
    (([0.1, 0.2, 0.3], [0, 0, 0], [1, 1]), "gripper must be one value"),
    (([0.1, 0.2, np.nan], [0, 0, 0], 1), "non-finite"),
    ({"action": [0] * 7}, "needs the keys 'action' and 'type'"),
    ({"type": "cartesian_rel"}, "needs the keys 'action' and 'type'"),
    ({"action": [0] * 7, "type": "cartesian"}, "unknown action type"),
    ({"action": [0] * 6 + [1], "type": "joint_abs"}, "needs 8 values"),
    ({"action": [0] * 7 + [1], "type": "cartesian_rel"}, "needs 7 values"),
    ({"action": [0] * 5 + [1], "type": "cartesian_abs"}, "7 values"),
    ({"action": [2, 0, 0, 0, 0, 0, 1], "type": "cartesian_rel"}, "[-1, 1]"),
    ({"action": [0] * 7 + [0.5], "type": "joint_rel"}, "exactly -1 (close) or +1 (open)"),
    ({"action": [0] * 7 + [np.inf], "type": "joint_abs"}, "non-finite"),
    # issue 10: non-string types, values that are not real numbers, targets outside the workspace
    ({"action": [0] * 6 + [1], "type": ["cartesian_rel"]}, "'type' must be a string"),
    (["0.1"] * 6 + ["1"], "got strings"),
    (np.array([0, 0, 0, 0, 0, 0, 1], dtype=complex), "got complex numbers"),
    ([False] * 6 + [True], "got bools"),
    (([9e307, 0, 0.5], [0, 0, 0], 1), "outside the workspace"),
    (([0.1, 0, 0.5], [0, 0, 50.0], 1), "|angle| <="),
    ({"action": [0.1, 0, 3.0, 0, 0, 0, 1, 1], "type": "cartesian_abs"}, "z = 3"),
    ({"action": [7.0] + [0] * 6 + [1], "type": "joint_abs"}, "|q| <="),
    ({"action": [0] * 6 + [-7.0, 1], "type": "joint_rel"}, "|q| <="),
]


@pytest.mark.parametrize("action, fragment", BAD_ACTIONS, ids=[repr(a)[:40] for a, _ in BAD_ACTIONS])
def test_bad_action_has_clear_error(action, fragment):
    with pytest.raises(InvalidActionError) as err:
        validate_action(action)
    assert fragment in str(err.value)


def test_errors_are_value_errors():
    # Callers that only know "bad input" can catch ValueError.
    assert issubclass(InvalidActionError, ValueError) and issubclass(InvalidStateError, ValueError)


# ------------------------------------------------------------------------------------------------ state obs


def _scene_obs() -> np.ndarray:
    scene = np.zeros(layout.SCENE_OBS_DIM)
    scene[layout.LED_IDX] = 1
    return scene


def test_state_obs_pass_and_copy():
    robot_in, scene_in = layout.NEUTRAL_ROBOT_OBS, _scene_obs()
    robot, scene = validate_state_obs(robot_in, scene_in)
    assert robot.shape == (15,) and scene.shape == (24,) and robot.dtype == scene.dtype == np.float64
    robot[0] = 99.0
    assert robot_in[0] != 99.0


def test_state_obs_none_passes_through():
    assert validate_state_obs(None, None) == (None, None)
    robot, scene = validate_state_obs(list(layout.NEUTRAL_ROBOT_OBS), None)
    assert scene is None and robot.shape == (15,)


BAD_STATES = [
    (dict(robot_obs=np.zeros(14)), "robot_obs must have shape (15,)"),
    (dict(robot_obs=np.zeros((1, 15))), "robot_obs must have shape (15,)"),
    (dict(robot_obs=np.r_[layout.NEUTRAL_ROBOT_OBS[:-1], np.nan]), "robot_obs has non-finite"),
    (dict(robot_obs=["x"] * 15), "robot_obs must be 15 numbers"),
    (dict(scene_obs=np.zeros(23)), "scene_obs must have shape (24,)"),
    (dict(scene_obs=np.zeros(30)), "scene_obs must have shape (24,)"),
    (dict(scene_obs=np.r_[np.zeros(23), np.inf]), "scene_obs has non-finite"),
    (dict(scene_obs=np.r_[0, 0, 0, 0, 0.5, np.zeros(19)]), "lightbulb"),
    (dict(scene_obs=np.r_[0, 0, 0, 0, 0, 2, np.zeros(18)]), "led"),
]


@pytest.mark.parametrize(
    "kwargs, fragment", BAD_STATES, ids=[f"{list(k)[0]}-{i}" for i, (k, _) in enumerate(BAD_STATES)]
)
def test_bad_state_has_clear_error(kwargs, fragment):
    with pytest.raises(InvalidStateError) as err:
        validate_state_obs(**kwargs)
    assert fragment in str(err.value)


def test_lenient_state_obs_teleports_anywhere_finite():
    # calvin_env's behaviour: any finite state with the right lengths (and 0/1 lights) is accepted.
    scene = _scene_obs()
    scene[layout.DRAWER_IDX] = 5.0
    robot = np.r_[layout.NEUTRAL_ROBOT_OBS[:7], np.full(7, 1e6), 1.0]
    validate_state_obs(robot, scene)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(scene_obs=np.r_[0, 5.0, np.zeros(22)]), "scene_obs[1] (drawer) = 5 is outside"),
    (dict(robot_obs=np.r_[layout.NEUTRAL_ROBOT_OBS[:7], np.full(7, 1e6), 1.0]), "robot_obs[7] (joint_1)"),
    (dict(robot_obs=np.r_[layout.NEUTRAL_ROBOT_OBS[:14], 0.0]), "robot_obs[14] (gripper_action)"),
])
def test_strict_state_obs_refuses_impossible_states(kwargs, fragment):
    with pytest.raises(InvalidStateError) as err:
        validate_state_obs(**kwargs, strict=True)
    assert fragment in str(err.value)


def test_strict_state_obs_accepts_the_neutral_pose_and_a_resting_scene():
    validate_state_obs(layout.NEUTRAL_ROBOT_OBS, _scene_obs(), strict=True)
