"""PandaKinematics (FK / IK of the playtable's Panda) and ChunkCommander (policy chunk -> gated joint trajectory),
checked against the simulator itself and against fake policies whose chunks are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _policy_fixtures import SIZE, fake_stats, tiny_config
from ghil.runtime.joint_commands import ChunkCommander, JointCommand
from ghil.runtime.kinematics import PandaKinematics
from ghil.runtime.safety import PANDA_LOWER, PANDA_UPPER, JointLimits, UnsafeCommandError
from ghil.types import JOINT_ABS, REL_EE, ActionChunk, Observation, Subgoal
from policies.dit import DiTPolicy
from policies.shortcut import ShortcutConfig
from sim_eval.world import layout
from sim_eval.world.playtable.env import PlayTableEnv

NEUTRAL = np.asarray(layout.NEUTRAL_ROBOT_OBS, dtype=np.float64)
NEUTRAL_Q = NEUTRAL[7:14].copy()
HZ = 30.0
# The Panda datasheet band the gate keeps every published point in (margin 0.1 rad), written out independently.
BAND_LO = np.array(PANDA_LOWER) + 0.1
BAND_HI = np.array(PANDA_UPPER) - 0.1


@pytest.fixture(scope="module")
def kin():
    k = PandaKinematics()
    yield k
    k.close()


_OPEN_KINEMATICS: list[PandaKinematics] = []


def _new_kin() -> PandaKinematics:
    """A fresh PandaKinematics (own pybullet client), closed after the test by ``_close_kinematics``."""
    k = PandaKinematics()
    _OPEN_KINEMATICS.append(k)
    return k


@pytest.fixture(autouse=True)
def _close_kinematics():
    yield
    while _OPEN_KINEMATICS:
        _OPEN_KINEMATICS.pop().close()


def _env() -> PlayTableEnv:
    return PlayTableEnv(static_size=SIZE, gripper_size=SIZE, cameras=())


def _obs(t: int = 0, proprio=NEUTRAL) -> Observation:
    rng = np.random.default_rng(t)
    return Observation(images={c: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                               for c in ("rgb_static", "rgb_gripper")},
                       proprio=np.asarray(proprio, dtype=np.float32), t=t)


def _goal() -> Subgoal:
    return Subgoal(image=np.full((SIZE, SIZE, 3), 128, np.uint8), source="test")


class FakePolicy:
    """A ChunkPolicy returning a fixed chunk and recording every predict_chunk call's arguments."""

    cameras = ("rgb_static", "rgb_gripper")
    image_sizes = (SIZE, SIZE)
    uses_language = False

    def __init__(self, actions, space=JOINT_ABS, exec_len: int = 2, uses_goal: bool = False):
        self.actions = torch.as_tensor(np.asarray(actions, dtype=np.float32))
        self.space, self.exec_len, self.uses_goal = space, exec_len, uses_goal
        self.goal_camera = "rgb_static" if uses_goal else None
        self.calls: list[dict] = []

    def predict_chunk(self, obs, goal=None, n_steps=None, generator=None, **kwargs):
        self.calls.append({"obs": obs, "goal": goal, "n_steps": n_steps, "generator": generator, **kwargs})
        return ActionChunk(actions=self.actions.clone(), t0=int(obs.t), space=self.space.name)


def _joint_chunk(n: int = 6) -> np.ndarray:
    """(n, 8) joint_abs chunk: row k is the neutral posture + 0.01 k rad on every joint (inside the band, slow
    enough for the velocity limit from the neutral posture), gripper alternating +1 / -1."""
    rows = [np.r_[NEUTRAL_Q + 0.01 * k, 1.0 if k % 2 == 0 else -1.0] for k in range(n)]
    return np.array(rows, dtype=np.float32).astype(np.float64)  # what the policy's float32 tensor holds


def _rel_chunk(n: int = 6, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chunk = np.c_[rng.uniform(-0.8, 0.8, (n, 6)), np.where(np.arange(n) % 3 == 0, -1.0, 1.0)]
    return chunk.astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())  # goal-conditioned rel_ee, 32 px, chunk 4, exec 2
    policy.fit_normalizer(fake_stats())
    assert policy.space is REL_EE and policy.uses_goal
    return policy


# -- PandaKinematics -----------------------------------------------------------------------------------------------


def test_forward_kinematics_matches_the_simulator(kin):
    env = _env()
    try:
        states = [env.reset()["robot_obs"]]
        np.testing.assert_allclose(states[0][7:14], NEUTRAL_Q, atol=1e-4)  # one physics step after the teleport
        rng = np.random.default_rng(11)
        for k in range(40):
            gripper = -1.0 if (k // 10) % 2 else 1.0  # open, then closed, ...: both gripper actions and widths
            obs, *_ = env.step(np.r_[rng.uniform(-1, 1, 6), gripper])
            if k % 5 == 4:
                states.append(obs["robot_obs"])
        moved = max(np.linalg.norm(s[:3] - states[0][:3]) for s in states)
        assert moved > 0.05  # the states are spread out, not all near the neutral pose
        assert {s[14] for s in states} == {1.0, -1.0}
        for ro in states:
            fk = kin.robot_obs(ro[7:14], ro[6], ro[14])
            assert fk.shape == (15,)
            np.testing.assert_allclose(fk[:3], ro[:3], rtol=0, atol=1e-6)
            np.testing.assert_allclose(fk[3:6], ro[3:6], rtol=0, atol=1e-6)
            assert fk[6] == ro[6] and fk[14] == ro[14]
            assert np.array_equal(fk[7:14], ro[7:14])
    finally:
        env.close()


def _random_walk() -> np.ndarray:
    """24 seeded random relative actions (the tcp ends 10 cm from the start), gripper closing for the last third."""
    rng = np.random.default_rng(4)
    return np.c_[rng.uniform(-1, 1, (24, 6)), np.where(np.arange(24) < 16, 1.0, -1.0)]


def _sweep() -> np.ndarray:
    """16 steps of full speed along -x while yawing: 32 cm in one direction, where the IK's seed matters."""
    return np.tile([-1.0, 0, 0, 0, 0, 0.5, 1.0], (16, 1))


# Measured max tcp position / euler error of the joint playback against the simulator's cartesian control:
#   random walk 0.44 mm / 0.12 mrad (other seeds of the same kind: <= 1.4 mm / 2 mrad), sweep 0.28 mm.
# For comparison, the same playback with the translation scaled by 0.9: 10.8 mm; x/y swapped: 40 mm; the rotation
# dropped: 194 mrad; every IK seeded at the anchor instead of the previous solution: 4.6 mm on the sweep.
@pytest.mark.parametrize("make_actions", [_random_walk, _sweep], ids=["random_walk", "sweep"])
def test_ik_playback_reproduces_cartesian_control(kin, make_actions):
    actions = make_actions()
    env_a, env_b = _env(), _env()
    try:
        env_a.reset()
        ro_b = env_b.reset()["robot_obs"]
        kin.anchor(ro_b)
        start = ro_b[:3].copy()
        targets, pos_err, orn_err = [], [], []
        for a in actions:
            pa = env_a.step(a)[0]["robot_obs"]  # cartesian_rel: the simulator's own IK
            q = kin.follow(a[None])[0]
            targets.append(q)
            pb = env_b.step({"type": "joint_abs", "action": np.r_[q, a[6]]})[0]["robot_obs"]
            pos_err.append(np.linalg.norm(pa[:3] - pb[:3]))
            orn_err.append(np.max(np.abs(np.angle(np.exp(1j * (pa[3:6] - pb[3:6]))))))
        assert np.linalg.norm(pa[:3] - start) > 0.07  # it went somewhere
    finally:
        env_a.close()
        env_b.close()
    assert max(pos_err) < 2.5e-3, max(pos_err)
    assert max(orn_err) < 0.01, max(orn_err)
    # The whole sequence at once gives the same targets: follow continues its target pose between calls.
    kin.anchor(ro_b)
    np.testing.assert_allclose(kin.follow(actions), np.array(targets), rtol=0, atol=1e-12)


def test_follow_checks_its_input_and_clips(kin):
    with pytest.raises(RuntimeError, match="anchor"):
        _new_kin().follow(np.zeros((2, 7)))

    kin.anchor(NEUTRAL)
    for bad in (np.full((2, 7), np.nan), np.zeros(7), np.zeros((3, 5)), np.zeros((0, 7))):
        with pytest.raises(ValueError):
            kin.follow(bad)
    with pytest.raises(ValueError):
        kin.anchor(np.zeros(14))
    nan_obs = NEUTRAL.copy()
    nan_obs[9] = np.nan
    with pytest.raises(ValueError):
        kin.anchor(nan_obs)

    big = np.array([[5.0, 0, 0, 0, 0, 0, 1], [0, -7.0, 0, 0, 0, 3.0, 1]])
    kin.anchor(NEUTRAL)
    q_big = kin.follow(big)
    kin.anchor(NEUTRAL)
    q_unit = kin.follow(np.clip(big, -1, 1))
    np.testing.assert_allclose(q_big, q_unit, rtol=0, atol=1e-12)
    kin.anchor(NEUTRAL)
    q_half = kin.follow(np.clip(big, -1, 1) * 0.5)
    assert np.max(np.abs(q_half - q_unit)) > 1e-3  # the clip is at 1, not below it

    kin.anchor(NEUTRAL)
    q_zero = kin.follow(np.zeros((5, 7)))
    assert q_zero.shape == (5, 7)
    np.testing.assert_allclose(q_zero, np.broadcast_to(NEUTRAL_Q, (5, 7)), rtol=0, atol=2e-3)
    # ...and the tcp they reach is the anchored one.
    fk = kin.robot_obs(q_zero[-1], NEUTRAL[6], 1)
    np.testing.assert_allclose(fk[:3], NEUTRAL[:3], rtol=0, atol=1e-3)


def test_follow_moves_the_tcp_by_calvins_scaling(kin):
    kin.anchor(NEUTRAL)
    q = kin.follow(np.array([[1.0, 0, 0, 0, 0, 0, 1], [0, 0, -1.0, 0, 0, 0, 1], [0, 0, -1.0, 0, 0, 0, 1]]))
    tcp = np.array([kin.robot_obs(qi, 0.08, 1)[:3] for qi in q])
    np.testing.assert_allclose(tcp[0] - NEUTRAL[:3], [0.02, 0, 0], atol=1e-3)
    np.testing.assert_allclose(tcp[2] - NEUTRAL[:3], [0.02, 0, -0.04], atol=1e-3)


# -- ChunkCommander --------------------------------------------------------------------------------------------------


def test_band_is_the_panda_safe_band():
    limits = JointLimits.panda()
    np.testing.assert_allclose(limits.safe_lower, BAND_LO, rtol=0, atol=1e-12)
    np.testing.assert_allclose(limits.safe_upper, BAND_HI, rtol=0, atol=1e-12)


def _assert_well_formed(cmd: JointCommand, exec_len: int) -> None:
    assert cmd.positions.shape == (exec_len, 7)
    assert np.all(np.isfinite(cmd.positions))
    assert np.all(cmd.positions >= BAND_LO) and np.all(cmd.positions <= BAND_HI)
    np.testing.assert_allclose(cmd.times, np.arange(1, exec_len + 1) / HZ, rtol=0, atol=1e-12)
    assert cmd.gripper.shape == (exec_len,) and set(cmd.gripper.tolist()) <= {-1.0, 1.0}


def test_commander_with_a_tiny_rel_ee_dit(dit):
    commander = ChunkCommander(dit, kinematics=_new_kin(), control_hz=HZ, seed=0)
    commander.reset(NEUTRAL)
    cmd = commander.command(_obs(0), _goal(), NEUTRAL_Q, skip=1, start_in_s=0.02)
    _assert_well_formed(cmd, dit.exec_len)
    assert cmd.skipped == 1 and cmd.t0 == 0
    # The published joints are the IK of the chunk (a step of at most 2 cm / 0.05 rad from the neutral pose).
    assert np.max(np.abs(cmd.positions - NEUTRAL_Q)) < 0.3
    cmd2 = commander.command(_obs(2), _goal(), cmd.positions[-1], skip=5)
    _assert_well_formed(cmd2, dit.exec_len)
    assert cmd2.skipped == 4 - dit.exec_len and cmd2.t0 == 2  # capped: chunk 4, exec 2
    assert commander.n_chunks == 2


def test_skip_drops_leading_actions_and_is_capped():
    chunk = _joint_chunk(6)
    policy = FakePolicy(chunk, JOINT_ABS, exec_len=2)
    commander = ChunkCommander(policy, control_hz=HZ)
    for skip, first in ((0, 0), (1, 1), (3, 3), (4, 4), (10, 4), (-2, 0)):
        cmd = commander.command(_obs(), None, NEUTRAL_Q, skip=skip)
        assert cmd.skipped == first
        assert np.array_equal(cmd.positions, chunk[first:first + 2, :7])
        assert np.array_equal(cmd.gripper, chunk[first:first + 2, 7])
        np.testing.assert_allclose(cmd.times, [1 / HZ, 2 / HZ], rtol=0, atol=1e-12)
        assert cmd.n_clamped_position == 0 and cmd.n_limited_velocity == 0
    long = ChunkCommander(policy, exec_len=5, control_hz=10.0).command(_obs(), None, NEUTRAL_Q, skip=3)
    assert long.skipped == 1 and np.array_equal(long.positions, chunk[1:6, :7])
    np.testing.assert_allclose(long.times, np.arange(1, 6) / 10.0, rtol=0, atol=1e-12)


def test_rel_ee_skip_and_continuation_go_through_ik():
    chunk = _rel_chunk(6)
    chunk[1, 6] = 0.5  # not exactly +-1: published as +1
    chunk[2, 6] = -0.25  # published as -1
    policy = FakePolicy(chunk, REL_EE, exec_len=3)
    commander = ChunkCommander(policy, kinematics=_new_kin(), control_hz=HZ)
    commander.reset(NEUTRAL)
    first = commander.command(_obs(), None, NEUTRAL_Q, skip=1)
    second = commander.command(_obs(), None, first.positions[-1], skip=1)

    ref = _new_kin()
    ref.anchor(NEUTRAL)
    expect1 = ref.follow(chunk[1:4])
    expect2 = ref.follow(chunk[1:4])  # the second chunk continues from the target the first reached
    assert first.n_clamped_position == 0 and first.n_limited_velocity == 0
    np.testing.assert_allclose(first.positions, expect1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(second.positions, expect2, rtol=0, atol=1e-12)
    assert np.max(np.abs(second.positions - first.positions)) > 1e-3
    assert np.array_equal(first.gripper, [1.0, -1.0, -1.0])


def test_joint_abs_positions_are_published_or_clamped():
    chunk = _joint_chunk(4)
    cmd = ChunkCommander(FakePolicy(chunk, JOINT_ABS, exec_len=4)).command(_obs(), None, NEUTRAL_Q)
    assert np.array_equal(cmd.positions, chunk[:, :7])  # inside the band: bit-identical
    assert np.array_equal(cmd.gripper, chunk[:, 7])

    # Outside the band on three joints (above upper, above upper, below lower); the arm is measured just inside
    # the band there, so only the position clamp acts (no velocity limiting).
    measured = NEUTRAL_Q.astype(np.float32).astype(np.float64)  # the other joints pass through the chunk's float32
    measured[[0, 3, 5]] = [2.79, -0.175, 0.09]
    out = np.tile(np.r_[measured, 1.0], (2, 1))
    out[:, 0], out[:, 3], out[:, 5] = 3.5, 0.5, -1.0
    cmd = ChunkCommander(FakePolicy(out, JOINT_ABS, exec_len=2)).command(_obs(), None, measured)
    expect = measured.copy()
    expect[[0, 3, 5]] = [2.8973 - 0.1, -0.0698 - 0.1, -0.0175 + 0.1]
    np.testing.assert_allclose(cmd.positions, np.tile(expect, (2, 1)), rtol=0, atol=1e-12)
    assert np.all(cmd.positions >= BAND_LO) and np.all(cmd.positions <= BAND_HI)
    assert cmd.n_clamped_position == 2 and cmd.n_limited_velocity == 0


def test_start_in_s_widens_the_first_velocity_limit():
    # panda_joint1 jumps 0.1 rad: more than 2.175 rad/s allows in one 1/30 s period, less than over 1/30 s + 50 ms.
    jump = np.r_[NEUTRAL_Q, 1.0].astype(np.float32).astype(np.float64)[None]
    measured = jump[0, :7].copy()
    measured[0] -= 0.1
    commander = ChunkCommander(FakePolicy(jump, JOINT_ABS, exec_len=1), control_hz=HZ)
    now = commander.command(_obs(), None, measured, start_in_s=0.0)
    assert now.n_limited_velocity == 1
    np.testing.assert_allclose(now.positions[0, 0], measured[0] + 2.175 / HZ, rtol=0, atol=1e-9)
    later = commander.command(_obs(), None, measured, start_in_s=0.05)
    assert later.n_limited_velocity == 0 and np.array_equal(later.positions, jump[:, :7])
    assert np.array_equal(now.times, later.times) and later.times[0] == pytest.approx(1 / HZ)


def test_a_continuing_chunk_is_velocity_limited_from_the_previous_point_not_the_measured_one():
    # The arm lags 0.3 rad behind its command; the next chunk continues the command 0.01 rad further on.
    target = np.r_[NEUTRAL_Q, 1.0].astype(np.float32).astype(np.float64)[None]
    previous = target[0, :7].copy()
    previous[0] -= 0.01
    measured = previous.copy()
    measured[0] -= 0.3
    commander = ChunkCommander(FakePolicy(target, JOINT_ABS, exec_len=1), control_hz=HZ)
    continuing = commander.command(_obs(), None, measured, start_in_s=0.05, previous=previous)
    assert continuing.n_limited_velocity == 0 and np.array_equal(continuing.positions, target[:, :7])
    # From the lagging measured state the same point would be pulled back (the hand-over sawtooth).
    fresh = commander.command(_obs(), None, measured, start_in_s=0.05)
    assert fresh.n_limited_velocity == 1 and fresh.positions[0, 0] < target[0, 0] - 0.05
    # A continuing chunk that jumps is still limited, from the previous point.
    jump = previous.copy()
    jump[0] -= 0.2
    limited = commander.command(_obs(), None, measured, previous=jump)
    np.testing.assert_allclose(limited.positions[0, 0], jump[0] + 2.175 / HZ, rtol=0, atol=1e-9)


def test_commander_refuses_what_it_cannot_publish():
    bad = _joint_chunk(4)
    bad[2, 4] = np.nan
    with pytest.raises(UnsafeCommandError):
        ChunkCommander(FakePolicy(bad, JOINT_ABS)).command(_obs(), None, NEUTRAL_Q)
    bad_rel = _rel_chunk(4)
    bad_rel[0, 1] = np.inf
    commander = ChunkCommander(FakePolicy(bad_rel, REL_EE), kinematics=_new_kin())
    commander.reset(NEUTRAL)
    with pytest.raises(UnsafeCommandError):
        commander.command(_obs(), None, NEUTRAL_Q)

    goal_policy = FakePolicy(_joint_chunk(4), JOINT_ABS, uses_goal=True)
    with pytest.raises(ValueError, match="subgoal"):
        ChunkCommander(goal_policy).command(_obs(), None, NEUTRAL_Q)
    assert goal_policy.calls == []  # refused before predicting
    with pytest.raises(ValueError, match="kinematics"):
        ChunkCommander(FakePolicy(_rel_chunk(4), REL_EE))
    with pytest.raises(TypeError, match="ChunkPolicy"):
        ChunkCommander(object())


def test_token_subgoals_steer_by_tokens():
    policy = FakePolicy(_joint_chunk(4), JOINT_ABS, uses_goal=True)
    commander = ChunkCommander(policy, n_steps=2)
    tokens = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    image = np.full((SIZE, SIZE, 3), 77, np.uint8)
    commander.command(_obs(), Subgoal(image=image, tokens=tokens), NEUTRAL_Q)
    commander.command(_obs(), Subgoal(image=image), NEUTRAL_Q)
    with_tokens, without = policy.calls
    assert "goal_tokens" in with_tokens and np.array_equal(with_tokens["goal_tokens"], tokens)
    assert with_tokens["goal"] is image and with_tokens["n_steps"] == 2
    assert isinstance(with_tokens["generator"], torch.Generator)
    assert without.get("goal_tokens") is None and without["goal"] is image


def test_same_seed_same_positions(dit):
    def positions(seed: int) -> np.ndarray:
        commander = ChunkCommander(dit, kinematics=_new_kin(), seed=seed)
        commander.reset(NEUTRAL)
        return np.stack([commander.command(_obs(t), _goal(), NEUTRAL_Q).positions for t in (0, 2)])

    a = positions(0)
    assert np.array_equal(a, positions(0))
    assert not np.allclose(a, positions(1), rtol=0, atol=1e-6)


def test_reset_reanchors_the_target_pose():
    policy = FakePolicy(_rel_chunk(4, seed=8), REL_EE, exec_len=2)
    commander = ChunkCommander(policy, kinematics=_new_kin())
    commander.reset(NEUTRAL)
    c1 = commander.command(_obs(), None, NEUTRAL_Q).positions
    c2 = commander.command(_obs(), None, c1[-1]).positions
    assert np.max(np.abs(c2 - c1)) > 1e-3  # without a reset the target keeps moving
    commander.reset(NEUTRAL)
    assert commander.n_chunks == 0
    c3 = commander.command(_obs(), None, NEUTRAL_Q).positions

    fresh = ChunkCommander(policy, kinematics=_new_kin())
    fresh.reset(NEUTRAL)
    np.testing.assert_allclose(c3, fresh.command(_obs(), None, NEUTRAL_Q).positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c3, c1, rtol=0, atol=1e-12)


def test_dit_commander_reset_and_seed_reproduce_a_fresh_one(dit):
    commander = ChunkCommander(dit, kinematics=_new_kin(), seed=4)
    commander.reset(NEUTRAL)
    commander.command(_obs(0), _goal(), NEUTRAL_Q)
    commander.command(_obs(2), _goal(), NEUTRAL_Q)
    commander.reset(NEUTRAL)
    commander.seed(4)
    again = commander.command(_obs(0), _goal(), NEUTRAL_Q).positions
    fresh = ChunkCommander(dit, kinematics=_new_kin(), seed=4)
    fresh.reset(NEUTRAL)
    assert np.array_equal(again, fresh.command(_obs(0), _goal(), NEUTRAL_Q).positions)
