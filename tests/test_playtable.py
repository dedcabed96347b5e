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


# ------------------------------------------------------------------------------------------------ visuals

# Frames rendered with ``visuals="default"`` at commit 5cf11a7 (before any rendering speed-up), sha256 prefixes of
# rgb/depth bytes after reset to symbolic state k and 6 steps of FRAME_ACTION. The shipped policies were trained
# on this look: a change here changes what they see. Recorded with pybullet 3.2.7 (another TinyRenderer build may
# round differently: the test then skips rather than fail).
FRAME_ACTION = np.array([0.4, 0.3, -0.6, 0.1, 0, 0.2, 1.0])
DEFAULT_FRAME_SHA = {
    0: ("dc1d457ba915f238", "5c6af668a0c40f6c", "dd54a094ef5bfe44", "7bcf3a17182b7c09"),
    150: ("5aca94ddc9dea301", "9782f6100e52de1b", "37d936541a7d4d27", "c46b15c3aeafb35c"),
}
FRAME_SHA_PYBULLET = "3.2.7"


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_default_visuals_render_exactly_as_before(env):
    from importlib.metadata import version

    if version("pybullet") != FRAME_SHA_PYBULLET:
        pytest.skip(f"frame hashes were recorded with pybullet {FRAME_SHA_PYBULLET}, this is {version('pybullet')}")
    assert env.visuals == "default"
    states = enumerate_symbolic_states()
    for k, expected in DEFAULT_FRAME_SHA.items():
        robot_obs, scene_obs = state_to_obs(states[k])
        obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        for _ in range(6):
            obs, *_ = env.step(FRAME_ACTION)
        got = (_sha(obs["rgb_obs"]["rgb_static"]), _sha(obs["rgb_obs"]["rgb_gripper"]),
               _sha(obs["depth_obs"]["depth_static"]), _sha(obs["depth_obs"]["depth_gripper"]))
        assert got == expected, f"state {k}: the default look changed (rgb/depth static, gripper)"


@pytest.fixture(scope="module")
def fast_env():
    e = PlayTableEnv(visuals="fast")
    yield e
    e.close()


def test_unknown_visuals_are_refused():
    with pytest.raises(ValueError, match="visuals"):
        PlayTableEnv(visuals="low_poly")


def _expert_rollout(env, n_steps: int, read_images: bool) -> list[tuple]:
    from sim_eval.demonstrations.expert.agent import ScriptedExpert

    expert = ScriptedExpert()
    tasks = ["open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "turn_on_lightbulb"]
    robot_obs, scene_obs = state_to_obs(enumerate_symbolic_states()[3])
    obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    out, t = [], 0
    expert.reset(tasks[0])
    for _ in range(n_steps):
        if expert.finished:
            t += 1
            expert.reset(tasks[t % len(tasks)])
        action, _ = expert.act(obs["robot_obs"], obs["scene_obs"])
        obs, _, _, info = env.step(action)
        if read_images:
            for group in ("rgb_obs", "depth_obs"):
                for key in obs[group]:
                    obs[group][key]
        scene = info["scene_info"]
        out.append((obs["robot_obs"].copy(), obs["scene_obs"].copy(), scene["doors"], scene["buttons"],
                    scene["switches"], scene["lights"], len(info["robot_info"]["contacts"]),
                    len(scene["fixed_objects"]["table"]["contacts"])))
    return out


def test_fast_visuals_change_nothing_the_oracle_or_the_expert_sees(env, fast_env):
    """200 steps of the scripted expert: bit-identical robot_obs / scene_obs / info with both visual modes, the
    fast env rendering (and so switching colours for its layers) at every step."""
    a = _expert_rollout(env, 200, read_images=False)
    b = _expert_rollout(fast_env, 200, read_images=True)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x[0], y[0], err_msg=f"robot_obs at step {i}")
        np.testing.assert_array_equal(x[1], y[1], err_msg=f"scene_obs at step {i}")
        assert x[2:] == y[2:], f"info at step {i}"
    moved = a[-1][1][:6] - a[0][1][:6]
    assert np.count_nonzero(moved) >= 2  # the drawer, the LED, ... really moved


def test_fast_static_layers_match_a_single_pass(fast_env):
    """The layered static frame equals a one-pass render of the same state but for a few contact pixels, while
    doors, lamps and blocks change; the gripper image is the same before and after a layered render."""
    from sim_eval.demonstrations.expert.agent import ScriptedExpert

    env, expert = fast_env, ScriptedExpert()
    robot_obs, scene_obs = state_to_obs(enumerate_symbolic_states()[3])
    obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    for task in ("open_drawer", "turn_on_led"):
        expert.reset(task)
        for _ in range(45):
            action, _ = expert.act(obs["robot_obs"], obs["scene_obs"])
            obs, *_ = env.step(action)
            gripper_before = obs["rgb_obs"]["rgb_gripper"]
            rgb, depth = obs["rgb_obs"]["rgb_static"], obs["depth_obs"]["depth_static"]
            ref_rgb, ref_depth = env.cameras["static"].render(env.cid)
            assert np.any(rgb != ref_rgb, axis=2).sum() <= 4
            np.testing.assert_allclose(depth, ref_depth, atol=1e-3)
            np.testing.assert_array_equal(env.cameras["gripper"].render(env.cid)[0], gripper_before)
    assert env.scene.led_on and obs["scene_obs"][layout.DRAWER_IDX] > 0.1
    stats = env._static_view.stats
    assert stats["fixed"] == 1 and stats["dynamic"] >= 80 and stats["movable_rect"] >= 10  # the layers did the work


def test_fast_desk_looks_like_the_default_desk(env, fast_env):
    """The fast desk (outer-surface meshes) draws like the default boxes: same shapes, same colours."""
    import pybullet as p

    frames = []
    robot_obs, scene_obs = state_to_obs(enumerate_symbolic_states()[100])
    for e in (env, fast_env):
        e.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        for link in range(-1, p.getNumJoints(e.robot.uid, physicsClientId=e.cid)):
            p.changeVisualShape(e.robot.uid, link, rgbaColor=(0, 0, 0, 0), physicsClientId=e.cid)
        frames.append((e.cameras["static"].render(e.cid)[0], e.cameras["gripper"].render(e.cid)[0]))
        e.reset()  # rebuilds the world: the robot is visible again
    for default, fast in zip(*frames):
        assert np.any(default != fast, axis=2).mean() < 0.002


def test_surface_quads_drop_hidden_faces():
    from sim_eval.world.playtable.models import Box, surface_quads

    two = [(Box((0, 0, 0), (1, 1, 1)), "a"), (Box((1, 0, 0), (2, 1, 1)), "b")]  # touching along x = 1
    quads = surface_quads(two)
    area = sum(np.linalg.norm(np.cross(c[1] - c[0], c[3] - c[0])) for q in quads.values() for c, _ in q)
    assert area == pytest.approx(10.0)  # the 2x1x1 union's outer surface; the shared face is gone
    for q in quads.values():
        for corners, normal in q:  # counter-clockwise seen from outside
            assert np.dot(np.cross(corners[1] - corners[0], corners[2] - corners[0]), normal) > 0
    assert "a" in quads and "b" in quads
    floor = surface_quads(two, drop_below_z=0.0)
    assert sum(len(q) for q in floor.values()) == sum(len(q) for q in quads.values()) - 2


def test_fast_meshes_are_checked_like_the_urdfs(tmp_path):
    from sim_eval.world.playtable import models

    paths = models.write_urdfs(tmp_path, "fast")
    meshes = models.mesh_texts("fast")
    assert meshes and models.mesh_texts("default") == {}
    name, data = next(iter(meshes.items()))
    (tmp_path / name).write_bytes(data.replace(b"v ", b"v 9", 1))  # a planted mesh is replaced on the next call
    assert models.write_urdfs(tmp_path, "fast") == paths
    assert (tmp_path / name).read_bytes() == data
    assert name.encode() in paths["table"].read_bytes() or name.encode() in paths["robot"].read_bytes()


def test_layered_visuals_look_like_default_but_for_contact_pixels(env):
    """``visuals="layered"`` (the default models, the static view from cached layers) shows what ``default``
    shows: the gripper image to the bit, the static one but for a few pixels where surfaces touch."""
    from sim_eval.demonstrations.expert.agent import ScriptedExpert

    robot_obs, scene_obs = state_to_obs(enumerate_symbolic_states()[3])
    with PlayTableEnv(visuals="layered") as layered:
        obs = {e: e.reset(robot_obs=robot_obs, scene_obs=scene_obs) for e in (env, layered)}
        expert = ScriptedExpert()
        expert.reset("open_drawer")
        for _ in range(30):
            action, _ = expert.act(obs[env]["robot_obs"], obs[env]["scene_obs"])
            obs = {e: e.step(action)[0] for e in (env, layered)}
            a, b = obs[env], obs[layered]
            np.testing.assert_array_equal(a["rgb_obs"]["rgb_gripper"], b["rgb_obs"]["rgb_gripper"])
            assert np.any(a["rgb_obs"]["rgb_static"] != b["rgb_obs"]["rgb_static"], axis=2).sum() <= 4
            np.testing.assert_allclose(a["depth_obs"]["depth_static"], b["depth_obs"]["depth_static"], atol=1e-3)
        assert layered._static_view.stats["dynamic"] >= 25
