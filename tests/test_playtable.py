"""The embedded playtable: observation contract, exact state resets, bad input, lazy rendering, gym wrapper."""

from __future__ import annotations

import numpy as np
import pytest

from sim_eval.world import layout
from sim_eval.world.action_validation import InvalidActionError, InvalidStateError
from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs
from sim_eval.world.playtable.cameras import StaleObservationError
from sim_eval.world.playtable.env import PlayTableEnv
from sim_eval.world.playtable.gym_env import PlayTableGymEnv

NOOP = np.array([0, 0, 0, 0, 0, 0, 1.0])


@pytest.fixture(scope="module")
def env():
    e = PlayTableEnv()
    yield e
    e.close()


def test_observation_shapes_and_dtypes(env):
    obs = env.reset()
    assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["rgb_obs"]["rgb_static"].dtype == np.uint8
    assert obs["rgb_obs"]["rgb_gripper"].shape == (84, 84, 3) and obs["rgb_obs"]["rgb_gripper"].dtype == np.uint8
    assert obs["depth_obs"]["depth_static"].shape == (200, 200)
    assert obs["depth_obs"]["depth_static"].dtype == np.float32
    assert obs["depth_obs"]["depth_gripper"].shape == (84, 84)
    assert obs["robot_obs"].shape == (15,) and obs["robot_obs"].dtype == np.float64
    assert obs["scene_obs"].shape == (24,) and obs["scene_obs"].dtype == np.float64
    # The desk is in view: the static image is not one flat colour, and depth is metric (camera ~4 m away).
    assert obs["rgb_obs"]["rgb_static"].std() > 10
    assert 3.0 < float(np.median(obs["depth_obs"]["depth_static"])) < 5.0
    _, reward, done, info = env.step(NOOP)
    assert reward == 0 and done is False
    assert set(info) == {"robot_info", "scene_info"}
    assert set(info["scene_info"]["doors"]) == {"base__slide", "base__drawer"}


def test_configurable_resolution_and_camera_subset():
    with PlayTableEnv(static_size=64, gripper_size=32, cameras=["static"]) as small:
        obs = small.reset()
        assert obs["rgb_obs"]["rgb_static"].shape == (64, 64, 3)
        assert "rgb_gripper" not in obs["rgb_obs"]
        with pytest.raises(KeyError, match="rgb_gripper"):
            obs["rgb_obs"]["rgb_gripper"]


def test_neutral_pose_matches_calvin(env):
    obs = env.reset(robot_obs=layout.NEUTRAL_ROBOT_OBS)
    np.testing.assert_allclose(obs["robot_obs"], layout.NEUTRAL_ROBOT_OBS, atol=1e-4)


def test_reset_reproduces_all_192_symbolic_states(env):
    states = enumerate_symbolic_states()
    assert len(states) == 192
    for state in states:
        robot_obs, scene_obs = state_to_obs(state)
        obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        np.testing.assert_allclose(obs["scene_obs"], scene_obs, atol=2e-3, err_msg=str(state))
        np.testing.assert_allclose(obs["robot_obs"][7:14], robot_obs[7:14], atol=1e-4)  # one physics step moves them
        info = env.get_info()["scene_info"]
        assert info["lights"]["led"]["logical_state"] == state["led"]
        assert info["lights"]["lightbulb"]["logical_state"] == state["lightbulb"]


def test_relative_action_moves_target_by_calvin_scaling(env):
    obs = env.reset(robot_obs=layout.NEUTRAL_ROBOT_OBS, scene_obs=state_to_obs(enumerate_symbolic_states()[0])[1])
    x0, z0 = obs["robot_obs"][0], obs["robot_obs"][2]
    for _ in range(5):
        obs, *_ = env.step(np.array([0.5, 0, -1.0, 0, 0, 0, 1]))
    for _ in range(15):
        obs, *_ = env.step(NOOP)
    # 5 steps of -1 move the target 5 x 2 cm down (and of 0.5, 5 x 1 cm right); the arm follows it.
    assert obs["robot_obs"][2] == pytest.approx(z0 - 0.10, abs=0.005)
    assert obs["robot_obs"][0] == pytest.approx(x0 + 0.05, abs=0.005)


def test_gripper_closes_and_opens(env):
    obs = env.reset(robot_obs=layout.NEUTRAL_ROBOT_OBS)
    for _ in range(20):
        obs, *_ = env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
    assert obs["robot_obs"][6] < 0.005 and obs["robot_obs"][14] == -1
    for _ in range(20):
        obs, *_ = env.step(NOOP)
    assert obs["robot_obs"][6] > 0.075 and obs["robot_obs"][14] == 1


@pytest.mark.parametrize("bad, match", [
    (np.zeros(6), "length|7"),
    (np.array([0, 0, np.nan, 0, 0, 0, 1.0]), "NaN|finite"),
    (np.array([0, 0, np.inf, 0, 0, 0, 1.0]), "inf|finite"),
    (np.array([0, 0, 3.0, 0, 0, 0, 1.0]), "range|\\[-1, 1\\]"),
    (np.array([0, 0, 0, 0, 0, 0, 0.5]), "gripper"),
    ({"type": "teleport", "action": np.zeros(7)}, "type"),
])
def test_bad_actions_raise_before_stepping(env, bad, match):
    obs = env.reset()
    before_robot, before_scene = obs["robot_obs"].copy(), obs["scene_obs"].copy()
    with pytest.raises(InvalidActionError, match=match):
        env.step(bad)
    after = env.get_obs()
    np.testing.assert_array_equal(after["robot_obs"], before_robot)
    np.testing.assert_array_equal(after["scene_obs"], before_scene)


def test_bad_reset_state_raises_and_keeps_state(env):
    obs = env.reset()
    before = obs["scene_obs"].copy()
    with pytest.raises(InvalidStateError, match="scene_obs"):
        env.reset(scene_obs=np.zeros(23))
    with pytest.raises(InvalidStateError, match="robot_obs"):
        env.reset(robot_obs=np.full(15, np.nan))
    np.testing.assert_array_equal(env.get_obs()["scene_obs"], before)


def test_images_render_lazily_and_stale_reads_fail(env, monkeypatch):
    calls = []
    cam = env.cameras["static"]
    original = cam.render
    monkeypatch.setattr(cam, "render", lambda client: calls.append(1) or original(client))
    obs = env.reset()
    for _ in range(5):
        obs, *_ = env.step(NOOP)
    assert calls == []  # stepping without looking renders nothing
    rgb = obs["rgb_obs"]["rgb_static"]
    obs["depth_obs"]["depth_static"]
    assert len(calls) == 1 and rgb.shape == (200, 200, 3)  # rgb and depth of one camera: one render
    old = obs
    env.step(NOOP)
    with pytest.raises(StaleObservationError):
        old["rgb_obs"]["rgb_gripper"]


def test_unknown_camera_and_bad_size():
    with pytest.raises(ValueError, match="unknown camera"):
        PlayTableEnv(cameras=["static", "tactile"])
    with pytest.raises(ValueError, match="static_size"):
        PlayTableEnv(static_size=0)


def test_button_toggles_led_and_switch_sets_bulb(env):
    _, scene_obs = state_to_obs(enumerate_symbolic_states()[0])
    env.reset(scene_obs=scene_obs)
    led0 = env.get_info()["scene_info"]["lights"]["led"]["logical_state"]
    # Press the button by teleporting its joint down, then let it spring back: one toggle per press.
    env.scene._set_joint("base__button", layout.BUTTON_RANGE_M[1])
    env.step(NOOP)
    assert env.get_info()["scene_info"]["lights"]["led"]["logical_state"] == 1 - led0
    for _ in range(10):
        env.step(NOOP)
    assert env.get_obs()["scene_obs"][layout.BUTTON_IDX] < layout.BUTTON_TRIGGER_M
    assert env.get_info()["scene_info"]["lights"]["led"]["logical_state"] == 1 - led0
    env.scene._set_joint("base__switch", layout.SWITCH_ON_M)
    env.step(NOOP)
    assert env.get_obs()["scene_obs"][layout.LIGHTBULB_IDX] == 1.0


def test_save_and_restore_state(env):
    obs = env.reset()
    snapshot = env.save_state()
    before = env.get_obs()["scene_obs"].copy(), env.get_obs()["robot_obs"].copy()
    for _ in range(10):
        env.step(np.array([1.0, 0, -0.5, 0, 0, 0, -1]))
    env.restore_state(snapshot)
    env.forget_state(snapshot)
    np.testing.assert_allclose(env.get_obs()["scene_obs"], before[0], atol=1e-9)
    np.testing.assert_allclose(env.get_obs()["robot_obs"], before[1], atol=1e-9)


def test_gymnasium_wrapper():
    genv = PlayTableGymEnv(static_size=48, gripper_size=32)
    try:
        obs, info = genv.reset(seed=3)
        assert "scene_info" in info
        assert genv.observation_space.contains(obs)
        obs, reward, terminated, truncated, _ = genv.step(np.array([0, 0, 0, 0, 0, 0, 0.3]))
        assert obs["robot_obs"][14] == 1.0 and not terminated and not truncated
    finally:
        genv.close()
