"""Issue 10, the world's part: reproductions of each defect the reliability probe found in sim_eval/world, and the
properties that must hold instead.

* an absolute target near 1e308 hung pybullet's IK forever (no signal stops it): now refused before any IK;
* a dict action whose ``type`` is a list raised TypeError; numeric strings, complex and bool arrays were accepted;
* impossible reset states were accepted silently (a strict mode refuses them; NaN/lengths always name the field);
  a refused reset drew from the env's random stream;
* a planted file in the shared URDF cache changed the world.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pybullet as p
import pytest

from sim_eval.world import layout
from sim_eval.world.action_validation import InvalidActionError, InvalidStateError, validate_action, validate_state_obs
from sim_eval.world.playtable import models
from sim_eval.world.playtable.env import PlayTableEnv

REPO = Path(__file__).resolve().parents[1]
NOOP = np.array([0, 0, 0, 0, 0, 0, 1.0])


@pytest.fixture(scope="module")
def env():
    e = PlayTableEnv(cameras=[])
    yield e
    e.close()


def _state(env) -> tuple[np.ndarray, np.ndarray]:
    obs = env.get_obs()
    return obs["robot_obs"].copy(), obs["scene_obs"].copy()


# ------------------------------------------------------------------------------------------------ 1. the IK hang

HANG_SCRIPT = textwrap.dedent("""
    import numpy as np
    from sim_eval.world.action_validation import InvalidActionError
    from sim_eval.world.playtable.env import PlayTableEnv
    env = PlayTableEnv(cameras=[])
    before = env.get_obs()["robot_obs"].copy()
    for action in [([9e307, 0.0, 0.5], [0.0, 0.0, 0.0], 1), ([0.1, -1.7e308, 0.5], [0.0, 0.0, 0.0, 1.0], -1),
                   {"type": "cartesian_abs", "action": [0.1, 0.0, 1e308, 0.0, 0.0, 0.0, 1]}]:
        try:
            env.step(action)
        except InvalidActionError as exc:
            print("REFUSED", str(exc).splitlines()[0], flush=True)
        else:
            print("STEPPED", flush=True)
    assert np.array_equal(env.get_obs()["robot_obs"], before), "a refused action moved the robot"
    print("DONE", flush=True)
""")


def test_huge_absolute_target_is_refused_not_hung():
    """Before the fix the first step never returned (pybullet's IK loops in C, deaf to SIGINT/SIGALRM); run it in a
    child process so a regression fails this test instead of hanging the suite."""
    try:
        done = subprocess.run([sys.executable, "-c", HANG_SCRIPT], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child
        pytest.fail("env.step with an absolute target near 1e308 hung (pybullet IK loop)")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(("REFUSED", "STEPPED", "DONE"))]
    assert len(lines) == 4 and lines[-1] == "DONE", done.stdout
    assert all(line.startswith("REFUSED") and "workspace" in line for line in lines[:3]), done.stdout


@pytest.mark.parametrize("action, fragment", [
    (([2.5, 0.0, 0.5], [0, 0, 0], 1), "x = 2.5"),
    (([0.0, -2.01, 0.5], [0, 0, 0], 1), "y = -2.01"),
    (([0.0, 0.0, -0.6], [0, 0, 0], 1), "z = -0.6"),
    (([0.0, 0.0, 9e307], [0, 0, 0, 1], 1), "z = 9e+307"),
    ({"type": "cartesian_abs", "action": [-1e308, 0, 0.5, 0, 0, 0, 1]}, "outside the workspace"),
    (([0.1, 0.0, 0.5], [0, 0, 1e300], 1), "|angle| <="),
    (([0.1, 0.0, 0.5], [13.0, 0, 0], 1), "|angle| <="),
    ({"type": "joint_abs", "action": [1e6] * 7 + [1]}, "joint angles must satisfy"),
    ({"type": "joint_abs", "action": [0, 0, 0, -1e308, 0, 0, 0, 1]}, "indices [3]"),
    ({"type": "joint_rel", "action": [0, 0, 10.0, 0, 0, 0, 0, -1]}, "joint deltas must satisfy"),
])
def test_out_of_workspace_targets_are_refused_before_ik(env, monkeypatch, action, fragment):
    env.reset()
    before = _state(env)

    def no_ik(*args, **kwargs):  # pragma: no cover - reached only by a regression
        raise AssertionError("IK was called for an action validation should have refused")

    monkeypatch.setattr(p, "calculateInverseKinematics", no_ik)
    with pytest.raises(InvalidActionError) as err:
        env.step(action)
    assert fragment in str(err.value)
    after = _state(env)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_workspace_holds_every_reachable_pose(env):
    """The workspace is generous: every tcp pose the arm reaches with joints within its limits is a valid target,
    and the edges of the workspace (with angles at the bound) are stepped without trouble."""
    rng = np.random.default_rng(0)
    robot = env.robot
    try:
        for _ in range(300):
            q = rng.uniform(layout.ARM_JOINT_LOWER_RAD, layout.ARM_JOINT_UPPER_RAD)
            for j, v in enumerate(q):
                p.resetJointState(robot.uid, j, float(v), 0.0, physicsClientId=env.cid)
            pos, orn = robot.tcp_pose()
            validate_action((pos, orn, 1))
            validate_action((pos, p.getEulerFromQuaternion(orn), -1))
            validate_action({"type": "joint_abs", "action": [*q, 1]})
        env.reset()
        lo, hi, angle = layout.WORKSPACE_LOW_M, layout.WORKSPACE_HIGH_M, layout.MAX_ABS_ANGLE_RAD
        for corner in ([lo[0], lo[1], lo[2]], [hi[0], hi[1], hi[2]], [lo[0], hi[1], hi[2]]):
            env.step((corner, [angle, -angle, angle], 1))
        env.step({"type": "joint_rel", "action": [layout.MAX_JOINT_ACTION_RAD] * 7 + [1]})
        assert np.all(np.isfinite(env.get_obs()["robot_obs"]))
    finally:
        env.reset()


# ------------------------------------------------------------------------------------------------ 2. action types

@pytest.mark.parametrize("kind", [["cartesian_rel"], None, 3, {"a": 1}, ("joint_abs",), b"joint_abs"])
def test_dict_action_type_that_is_not_a_string(env, kind):
    """Before: a list ``type`` raised TypeError (unhashable) and aborted the evaluation."""
    env.reset()
    before = _state(env)
    with pytest.raises(InvalidActionError, match="'type' must be a string"):
        env.step({"action": [0] * 6 + [1], "type": kind})
    np.testing.assert_array_equal(_state(env)[0], before[0])


NOT_NUMBERS = [
    (["0.1"] * 6 + ["1"], "strings"),
    (np.array(["0", "0", "0", "0", "0", "0", "1"]), "strings"),
    ([0.1, 0, 0, 0, 0, 0, "1"], "strings"),  # numpy turns the whole list into strings
    (np.array([0.1, 0, 0, 0, 0, 0, 1], dtype=object).tolist()[:6] + ["1"], "strings"),
    (np.array([0, 0, 0, 0, 0, 0, 1], dtype=complex), "complex"),
    (np.array([0.1, 0, 0, 0, 0, 0, 1 + 0j]), "complex"),
    (np.array([np.float64(0.1), 0, 0, 0, 0, 0, 1j], dtype=object), "complex"),
    ([True] * 6 + [True], "bools"),
    (np.ones(7, dtype=bool), "bools"),
    (np.array([0.1, 0, 0, 0, 0, 0, True], dtype=object), "bool"),
    (([0.1, 0.0, 0.5], [0, 0, 0], True), "bools"),
    (([0.1, 0.0, 0.5], ["0", "0", "0"], 1), "strings"),
    ({"type": "joint_abs", "action": [b"0"] * 7 + [1]}, "must be numbers"),
    ({"type": "joint_rel", "action": np.zeros(8, dtype=complex)}, "complex"),
    (np.array([None] * 7), "must be numbers"),
]


@pytest.mark.parametrize("action, fragment", NOT_NUMBERS, ids=[repr(a)[:40] for a, _ in NOT_NUMBERS])
def test_only_real_numbers_are_actions(action, fragment):
    """Before: numeric strings and complex arrays were accepted (np.array(..., dtype=float) converts them)."""
    with pytest.raises(InvalidActionError) as err:
        validate_action(action)
    assert fragment in str(err.value)


def test_real_numbers_in_any_container_still_pass():
    expected = [0.5, 0, 0, 0, 0, 0, 1]
    for action in (np.array(expected, dtype=np.float32), np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.int8),
                   np.array(expected, dtype=object), [np.float32(0.5), np.int64(0), 0, 0.0, 0, 0, np.uint8(1)],
                   tuple(expected)):
        out = validate_action(action)
        assert out["type"] == "cartesian_rel" and out["action"].dtype == np.float64
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(validate_action(torch.tensor(expected))["action"], expected)
    np.testing.assert_array_equal(validate_action([torch.tensor(v) for v in expected])["action"], expected)


# ------------------------------------------------------------------------------------------------ 3. reset states

def _bad(vector: np.ndarray, idx: int, value: float) -> np.ndarray:
    out = vector.copy()
    out[idx] = value
    return out


@pytest.mark.parametrize("field, idx, value, name", [
    ("robot_obs", 9, np.nan, "joint_3"),
    ("robot_obs", 14, np.inf, "gripper_action"),
    ("scene_obs", 1, np.nan, "drawer"),
    ("scene_obs", 14, -np.inf, "block_blue_z"),
])
def test_non_finite_reset_state_names_field_and_index(env, field, idx, value, name):
    env.reset()
    robot, scene = _state(env)
    rng_state = env.rng.bit_generator.state
    kwargs = {"robot_obs": robot, "scene_obs": scene}
    kwargs[field] = _bad(kwargs[field], idx, value)
    for strict in (False, True):
        with pytest.raises(InvalidStateError, match=rf"{field}\[{idx}\] \({name}\)"):
            env.reset(**kwargs, strict=strict)
    assert env.rng.bit_generator.state == rng_state
    np.testing.assert_array_equal(_state(env)[1], scene)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(robot_obs=np.zeros(16)), "robot_obs must have shape (15,)"),
    (dict(scene_obs=np.zeros(25)), "scene_obs must have shape (24,)"),
    (dict(scene_obs=[0.0] * 23), "scene_obs must have shape (24,)"),
    (dict(scene_obs=["0"] * 24), "scene_obs must be 24 numbers"),
    (dict(robot_obs=np.zeros(15, dtype=complex)), "robot_obs must be 15 numbers"),
])
def test_wrong_reset_lengths_and_types(env, kwargs, fragment):
    with pytest.raises(InvalidStateError) as err:
        env.reset(**kwargs)
    assert fragment in str(err.value) and isinstance(err.value, ValueError)


def test_refused_reset_does_not_draw_from_the_random_stream(env):
    """Before: ``reset(robot_obs=bad)`` sampled the random scene (advancing env.rng) and only then refused the robot
    state, so every later random reset differed from an uninterrupted run."""
    env.reset()
    rng_state = env.rng.bit_generator.state
    before = _state(env)
    with pytest.raises(InvalidStateError):
        env.reset(robot_obs=np.full(15, np.nan))
    with pytest.raises(InvalidStateError):
        env.reset(robot_obs=_bad(layout.NEUTRAL_ROBOT_OBS, 7, 1e6), strict=True)
    assert env.rng.bit_generator.state == rng_state
    np.testing.assert_array_equal(_state(env)[0], before[0])
    np.testing.assert_array_equal(_state(env)[1], before[1])


IMPOSSIBLE = [
    ("scene_obs", layout.DRAWER_IDX, 5.0, "scene_obs[1] (drawer) = 5"),
    ("scene_obs", layout.SLIDER_IDX, -0.2, "scene_obs[0] (slider)"),
    ("scene_obs", layout.BUTTON_IDX, 0.5, "scene_obs[2] (button)"),
    ("scene_obs", layout.SWITCH_IDX, 1e9, "scene_obs[3] (switch)"),
    ("scene_obs", 6, 3.0, "scene_obs[6] (block_red_x)"),
    ("scene_obs", 20, -1.0, "scene_obs[20] (block_pink_z)"),
    ("scene_obs", 11, 100.0, "scene_obs[11] (block_red_yaw)"),
    ("robot_obs", 7, 1e6, "robot_obs[7] (joint_1) = 1e+06"),
    ("robot_obs", 10, 0.5, "robot_obs[10] (joint_4)"),  # joint 4's upper limit is -0.07 rad
    ("robot_obs", 6, 0.5, "robot_obs[6] (gripper_width)"),
    ("robot_obs", 2, 50.0, "robot_obs[2] (tcp_z)"),
    ("robot_obs", 14, 0.3, "robot_obs[14] (gripper_action)"),
]


@pytest.mark.parametrize("field, idx, value, fragment", IMPOSSIBLE, ids=[f for *_, f in IMPOSSIBLE])
def test_strict_reset_refuses_impossible_states(field, idx, value, fragment):
    """Before: a drawer at 5 m, joints at 1e6 rad, ... were teleported to silently. Strict mode names the value."""
    with PlayTableEnv(cameras=[], strict_reset=True) as strict_env:
        robot, scene = _state(strict_env)
        rng_state = strict_env.rng.bit_generator.state
        kwargs = {"robot_obs": robot, "scene_obs": scene}
        kwargs[field] = _bad(kwargs[field], idx, value)
        with pytest.raises(InvalidStateError) as err:
            strict_env.reset(**kwargs)
        assert fragment in str(err.value)
        assert strict_env.rng.bit_generator.state == rng_state
        after = _state(strict_env)
        np.testing.assert_array_equal(after[0], robot)
        np.testing.assert_array_equal(after[1], scene)
        strict_env.reset(**kwargs, strict=False)  # the per-call override: calvin's teleport-anywhere


def test_lights_must_be_zero_or_one_in_both_modes(env):
    for strict in (False, True):
        with pytest.raises(InvalidStateError, match="led"):
            env.reset(scene_obs=_bad(env.sample_scene_obs(), layout.LED_IDX, 0.5), strict=strict)


def test_strict_reset_accepts_every_legitimate_state():
    """Strict mode refuses no state the protocol, the random scenes or the world itself produce."""
    from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs

    for state in enumerate_symbolic_states():
        validate_state_obs(*state_to_obs(state), strict=True)
    with PlayTableEnv(cameras=[], strict_reset=True) as strict_env:
        rng = np.random.default_rng(1)
        for episode in range(4):
            strict_env.reset(scene_obs=strict_env.sample_scene_obs())
            for _ in range(60):  # a random walk, pressing into things, gripper toggling
                action = np.r_[rng.uniform(-1, 1, 6), rng.choice([-1.0, 1.0])]
                obs, *_ = strict_env.step(action)
                validate_state_obs(obs["robot_obs"], obs["scene_obs"], strict=True)
            strict_env.reset(robot_obs=obs["robot_obs"], scene_obs=obs["scene_obs"])  # round trip


# ------------------------------------------------------------------------------------------------ 4. URDF cache

def _block_size(env, name: str) -> tuple:
    return tuple(np.round(p.getCollisionShapeData(env.scene.block_uids[name], -1, physicsClientId=env.cid)[0][3], 6))


def test_planted_urdf_in_the_cache_is_replaced(tmp_path):
    """Before: a file with the cache's name was loaded as is; a planted block 10x larger changed the world."""
    paths = models.write_urdfs(tmp_path)
    genuine = paths["block_red"].read_bytes()
    planted = genuine.replace(b'size="0.056 0.04 0.04"', b'size="0.56 0.4 0.4"')
    assert planted != genuine
    paths["block_red"].write_bytes(planted)
    with PlayTableEnv(cameras=[], urdf_cache_dir=str(tmp_path)) as e:
        assert _block_size(e, "block_red") == layout.BLOCK_SIZES_M["block_red"]
        assert paths["block_red"].read_bytes() == genuine
        # planted after the env was built: every reset re-checks before bullet reads the files
        paths["table"].write_bytes(paths["table"].read_bytes().replace(b'upper="0.22"', b'upper="5.0"'))
        paths["block_red"].unlink()
        paths["block_red"].symlink_to(tmp_path / "elsewhere.urdf")
        (tmp_path / "elsewhere.urdf").write_bytes(planted)
        e.reset()
        assert _block_size(e, "block_red") == layout.BLOCK_SIZES_M["block_red"]
        drawer = p.getJointInfo(e.scene.table_uid, layout.TABLE_JOINT_IDS["base__drawer"], physicsClientId=e.cid)
        assert drawer[9] == pytest.approx(layout.DRAWER_RANGE_M[1])
        assert not paths["block_red"].is_symlink() and paths["block_red"].read_bytes() == genuine


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_default_cache_is_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(models.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(models, "_FALLBACK_DIR", None)
    root = models.write_urdfs()["table"].parent
    assert root == tmp_path / f"ghil_playtable_urdf-{os.getuid()}"
    st = os.stat(root)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    os.chmod(root, 0o777)  # ours but opened up: closed again
    models.write_urdfs()
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    # a symlink planted under our name (pointing at a folder someone else controls) is not followed
    for f in root.iterdir():
        f.unlink()
    root.rmdir()
    (tmp_path / "theirs").mkdir()
    root.symlink_to(tmp_path / "theirs")
    fallback = models.write_urdfs()["table"].parent
    assert fallback != root and not any((tmp_path / "theirs").iterdir())
    assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700


def test_gym_wrapper_does_not_convert_strings_or_complex():
    from sim_eval.world.playtable.gym_env import PlayTableGymEnv

    gym_env = PlayTableGymEnv(static_size=16, gripper_size=16)
    try:
        gym_env.reset(seed=0)
        gym_env.step(np.array([0.1, 0, 0, 0, 0, 0, 0.3]))  # a continuous gripper is thresholded, as before
        for bad in (["0.1"] * 7, np.zeros(7, dtype=complex), [True] * 7):
            with pytest.raises(InvalidActionError, match="must be numbers"):
                gym_env.step(bad)
    finally:
        gym_env.close()
