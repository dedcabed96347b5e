"""The ROS 2 graph with real rclpy (issue 13): nodes exchange real messages over Fast DDS on localhost.

Each xdist worker uses its own ROS_DOMAIN_ID (60 + worker index), ROS logs go to a temp folder, discovery stays on
localhost. The stages are tiny (a random 32 px DiT; fixed or scripted goal providers where a test is about the
node, not the model), the robot is the real playtable (32 px cameras) behind the sim node or a hand-fed stream.
Skipped when the [ros] extra is not installed.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="ghil_roslog_"))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
rclpy = pytest.importorskip("rclpy")
import rclpy.callback_groups  # noqa: E402

import torch  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from _policy_fixtures import SIZE, fake_stats, tiny_config  # noqa: E402
from ghil.runtime.joint_commands import ChunkCommander  # noqa: E402
from ghil.runtime.kinematics import PandaKinematics  # noqa: E402
from ghil.runtime.safety import PANDA_JOINT_NAMES, JointLimits  # noqa: E402
from ghil.types import JOINT_ABS, ActionChunk, Subgoal  # noqa: E402
from policies.dit import DiTPolicy  # noqa: E402
from policies.shortcut import ShortcutConfig  # noqa: E402
from ros_nodes.common import COMMANDS, LATCHED, STATUS, STREAM, image_msg, make_executor, joint_state_msg, seconds  # noqa: E402
from ros_nodes.launch import compose_launch_config, ros_settings  # noqa: E402
from ros_nodes.policy_node import PolicyNode  # noqa: E402
from sim_eval.ros_robot import SimNode  # noqa: E402
from ros_nodes.subgoal_node import SubgoalNode  # noqa: E402
from sim_eval.world.layout import NEUTRAL_ROBOT_OBS  # noqa: E402
from sim_eval.world.playtable.env import PlayTableEnv  # noqa: E402

FINGERS = ["panda_finger_joint1", "panda_finger_joint2"]
LIMITS = JointLimits.panda()


def domain_id() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 60 + int("".join(ch for ch in worker if ch.isdigit()) or 0)


def settings(**overrides) -> dict:
    cfg = compose_launch_config(["robot=sim"])
    s = ros_settings(cfg)
    s.update(overrides)
    return s


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)  # as `ghil launch` runs the stages (ros.torch_threads): one thread per stage
    torch.manual_seed(0)
    p = DiTPolicy(tiny_config(), ShortcutConfig())
    p.fit_normalizer(fake_stats())
    return p.eval()


@pytest.fixture(scope="module")
def kinematics():
    kin = PandaKinematics()
    yield kin
    kin.close()


class FixedGoals:
    """A goal provider with a fixed subgoal (the nodes are under test here, not the generator)."""

    def __init__(self, tokens: bool = False, fail_after: int | None = None, hang_after: int | None = None):
        self.tokens, self.fail_after, self.hang_after = tokens, fail_after, hang_after
        self.calls = 0
        self.instructions: list[str] = []
        self.release = threading.Event()

    def reset(self) -> None:
        pass

    def goal(self, obs):
        self.calls += 1
        self.instructions.append(obs.instruction)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("generator exploded")
        if self.hang_after is not None and self.calls > self.hang_after:
            self.release.wait(30)
        image = np.full((SIZE, SIZE, 3), 100 + (self.calls % 50), np.uint8)
        return Subgoal(image=image, tokens=np.full((1, 32), 0.1, np.float32) if self.tokens else None,
                       source="fixed")


class Probe(rclpy.node.Node):
    """Records what the graph publishes and talks to it like a user."""

    def __init__(self, context, s):
        super().__init__("probe", context=context)
        self.s = s
        self.lock = threading.Lock()
        self.status: list[dict] = []
        self.trajectories: list[tuple[float, JointTrajectory]] = []
        self.grippers: list[JointTrajectory] = []
        self.events: list[dict] = []
        self.infos: list[dict] = []
        # One reentrant group: in a mutually exclusive one a busy callback leaves the others ready, and rclpy's
        # executor then spins at full CPU (starving the nodes under test of the interpreter lock).
        group = rclpy.callback_groups.ReentrantCallbackGroup()
        self.create_subscription(String, s["status_topic"], lambda m: self._add(self.status, json.loads(m.data)),
                                 STATUS, callback_group=group)
        self.create_subscription(JointTrajectory, s["trajectory_topic"],
                                 lambda m: self._add(self.trajectories, (time.monotonic(), m)), COMMANDS, callback_group=group)
        self.create_subscription(JointTrajectory, s["gripper_topic"], lambda m: self._add(self.grippers, m), COMMANDS, callback_group=group)
        self.create_subscription(String, s["robot_events_topic"], lambda m: self._add(self.events, json.loads(m.data)),
                                 STATUS, callback_group=group)
        self.create_subscription(String, s["subgoal_info_topic"], lambda m: self._add(self.infos, json.loads(m.data)),
                                 COMMANDS, callback_group=group)
        self.pub_instruction = self.create_publisher(String, s["instruction_topic"], LATCHED, callback_group=group)
        self.pub_joints = self.create_publisher(JointState, s["joint_states_topic"], STREAM)
        self.pub_images = {c: self.create_publisher(Image, t, STREAM) for c, t in s["camera_topics"].items()}
        self.stop = self.create_client(Trigger, s["stop_service"])
        self.resume = self.create_client(Trigger, s["resume_service"])

    def _add(self, store, item):
        with self.lock:
            store.append(item)

    def say(self, text) -> None:
        self.pub_instruction.publish(String(data=text))

    def last_status(self) -> dict:
        with self.lock:
            return dict(self.status[-1]) if self.status else {}

    def call(self, client) -> Trigger.Response:
        assert client.wait_for_service(timeout_sec=5)
        return client.call(Trigger.Request(), timeout_sec=5)


class Graph:
    """Nodes of one test on one executor in a background thread, plus the probe."""

    def __init__(self, *nodes_factory, s):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id())
        self.nodes = [factory(self.context) for factory in nodes_factory]
        self.probe = Probe(self.context, s)
        self.executor = make_executor("events", self.context)
        for node in [*self.nodes, self.probe]:
            self.executor.add_node(node)
        self.closed = False
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception as err:  # a callback raised: recorded (tests assert none did), the graph goes on
                if not self.context.ok():
                    return
                import traceback
                self.errors.append("".join(traceback.format_exception(err)))

    def wait(self, predicate, timeout=15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    def close(self):
        if self.closed:
            return
        self.closed = True
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=5)
        self.executor.shutdown(timeout_sec=5)
        for node in self.nodes:
            close = getattr(node, "close", None)
            if callable(close):
                close()
        for node in [*self.nodes, self.probe]:
            node.destroy_node()


def sim_factory(s, **robot):
    def make(context):
        env = PlayTableEnv(static_size=SIZE, gripper_size=SIZE)
        return SimNode(env, s, {"reset_on_task": True, "initial_state": None, "seed": 0, **robot}, context=context)
    return make


def policy_factory(policy, kinematics, s, goal_input="image", limits=None, follow_subtasks=False):
    def make(context):
        commander = ChunkCommander(policy, kinematics=kinematics, limits=limits, control_hz=s["control_hz"])
        return PolicyNode(commander, kinematics, s, goal_input=goal_input, follow_subtasks=follow_subtasks,
                          context=context)
    return make


def subgoal_factory(goals, s, follow_subtasks=False):
    def make(context):
        return SubgoalNode(goals, {"rgb_static": (SIZE, SIZE), "rgb_gripper": (SIZE, SIZE)}, PandaKinematics(), s,
                           follow_subtasks=follow_subtasks, context=context)
    return make


@pytest.fixture
def graph_factory():
    graphs = []

    def build(*factories, s):
        g = Graph(*factories, s=s)
        graphs.append(g)
        return g

    yield build
    for g in graphs:
        g.close()
    for g in graphs:
        assert not g.errors, g.errors[0]


def states(probe) -> list[str]:
    with probe.lock:
        return [st["state"] for st in probe.status]


def in_band(positions) -> bool:
    q = np.asarray(positions)
    return bool(np.all(np.isfinite(q)) and np.all(q >= LIMITS.safe_lower - 1e-9) and np.all(q <= LIMITS.safe_upper + 1e-9))


# -- the sim-backed graph -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [False, True])
def test_graph_runs_an_instruction_on_the_sim_and_reports(graph_factory, policy, kinematics, tokens):
    s = settings(max_steps=45)
    goals = FixedGoals(tokens=tokens)
    g = graph_factory(sim_factory(s), policy_factory(policy, kinematics, s, "tokens" if tokens else "image"),
                      subgoal_factory(goals, s), s=s)
    probe = g.probe
    assert g.wait(lambda: probe.last_status().get("state") == "idle")
    probe.say("open the drawer")
    assert g.wait(lambda: probe.last_status().get("state") == "done", timeout=30), probe.last_status()
    seen = states(probe)
    assert seen.index("planning") < seen.index("executing") < seen.index("done")
    final = probe.last_status()
    assert final["verdict"]["reason"] == "step_limit" and final["instruction"] == "open the drawer"
    assert final["first_command_latency_s"] is not None and final["chunks"] >= 3
    ready = [e for e in probe.events if e.get("event") == "ready"]
    assert ready and ready[0]["task_id"] == final["task_id"] and ready[0]["tasks"] == ["open_drawer"]
    with probe.lock:
        trajectories = [m for _, m in probe.trajectories]
        grippers = list(probe.grippers)
    assert trajectories and all(list(m.joint_names) == list(PANDA_JOINT_NAMES) for m in trajectories)
    for m in trajectories:
        assert len(m.points) == policy.exec_len
        assert in_band([p.positions for p in m.points])
        times = [seconds(p.time_from_start) for p in m.points]
        assert np.allclose(times, np.arange(1, policy.exec_len + 1) / 30.0, atol=1e-6)
    assert all(list(m.joint_names) == FINGERS for m in grippers)
    assert {round(p.positions[0], 3) for m in grippers for p in m.points} <= {0.0, 0.04}
    # A chunk stamped ahead starts exactly where the previous one ends (stamp 0, "now", only when one was late).
    stamps = [seconds(m.header.stamp) for m in trajectories[1:]]
    pairs = [(a, b) for a, b in zip(stamps, stamps[1:]) if a > 0 and b > 0]
    assert pairs, f"no chunk was planned ahead of its start: {final}"
    assert all(b - a == pytest.approx(policy.exec_len / 30.0, abs=1e-6) for a, b in pairs)


@pytest.mark.slow
def test_stop_means_hold_then_silence_until_resume(graph_factory, policy, kinematics):
    s = settings(max_steps=100000)
    g = graph_factory(sim_factory(s), policy_factory(policy, kinematics, s), subgoal_factory(FixedGoals(), s), s=s)
    probe = g.probe
    probe.say("open the drawer")
    assert g.wait(lambda: probe.last_status().get("state") == "executing", timeout=30)
    assert g.wait(lambda: len(probe.trajectories) >= 3)
    before = len(probe.trajectories)
    response = probe.call(probe.stop)
    answered = time.monotonic()
    assert response.success
    time.sleep(1.0)
    with probe.lock:
        after = [(t, m) for t, m in probe.trajectories[before:]]
    late = [m for t, m in after if t > answered + 0.05]
    assert not late, f"{len(late)} trajectories after the stop was answered"
    holds = [m for _, m in after if len(m.points) == 1]
    assert len(holds) == 1, "stop publishes exactly one hold"
    hold = np.array(holds[0].points[0].positions)
    assert in_band(hold) and np.abs(hold).sum() > 1.0, "a hold is the measured position, never zeros"
    assert probe.last_status()["state"] == "stopped" and probe.last_status()["stop_reason"] == "stop service"
    probe.say("turn on the led")  # a new task while stopped is not executed before resume
    time.sleep(0.5)
    with probe.lock:
        assert len(probe.trajectories) == before + len(after)
    assert probe.call(probe.resume).success
    assert g.wait(lambda: probe.last_status().get("state") == "executing", timeout=15)
    assert g.wait(lambda: len(probe.trajectories) > before + len(after) + 2)


# -- a hand-fed stream: watchdog and bad inputs ---------------------------------------------------------------------


class Feeder:
    """Publishes camera frames and joint states at 30 Hz from the probe (no simulator) until stopped."""

    def __init__(self, probe, names=tuple(PANDA_JOINT_NAMES) + tuple(FINGERS)):
        self.probe, self.names = probe, list(names)
        self.running = True
        self.bad_image: Image | None = None
        self.positions = {n: float(q) for n, q in zip(PANDA_JOINT_NAMES, NEUTRAL_ROBOT_OBS[7:14])}
        self.positions.update({f: 0.04 for f in FINGERS})
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        frame = np.full((SIZE, SIZE, 3), 90, np.uint8)
        while self.running:
            now = self.probe.get_clock().now().nanoseconds * 1e-9
            for camera, pub in self.probe.pub_images.items():
                pub.publish(self.bad_image if self.bad_image is not None else image_msg(frame, now))
            self.probe.pub_joints.publish(joint_state_msg(self.names, [self.positions.get(n, 0.0)
                                                                       for n in self.names], now))
            time.sleep(1 / 30)

    def stop(self):
        self.running = False
        self.thread.join(timeout=2)


def no_sim_settings(**kw):
    return settings(wait_for_robot=False, max_steps=100000, **kw)


@pytest.mark.slow
def test_watchdog_stops_and_holds_on_stale_inputs(graph_factory, policy, kinematics):
    s = no_sim_settings(max_input_age_s=0.3)
    g = graph_factory(policy_factory(policy, kinematics, s), subgoal_factory(FixedGoals(), s), s=s)
    probe = g.probe
    feeder = Feeder(probe)
    try:
        probe.say("open the drawer")
        assert g.wait(lambda: probe.last_status().get("state") == "executing", timeout=20)
        assert g.wait(lambda: len(probe.trajectories) >= 2)
    finally:
        feeder.stop()
    assert g.wait(lambda: probe.last_status().get("state") == "stopped", timeout=5)
    status = probe.last_status()
    assert "stale" in status["stop_reason"] and "stale" in status["message"]
    n = len(probe.trajectories)
    with probe.lock:
        assert len(probe.trajectories[-1][1].points) == 1  # the last command was a hold
    time.sleep(0.6)
    assert len(probe.trajectories) == n


@pytest.mark.slow
def test_bad_images_and_joint_states_are_refused_and_the_node_keeps_running(graph_factory, policy, kinematics):
    s = no_sim_settings()
    node_box = {}

    def make_policy(context):
        node_box["node"] = policy_factory(policy, kinematics, s)(context)
        return node_box["node"]

    g = graph_factory(make_policy, s=s)
    probe = g.probe
    node = node_box["node"]
    feeder = Feeder(probe)
    try:
        assert g.wait(lambda: node.inputs.complete(), timeout=10)
        now = lambda: probe.get_clock().now().nanoseconds * 1e-9  # noqa: E731
        good = image_msg(np.zeros((SIZE, SIZE, 3), np.uint8), now())
        cases = {"encoding": dict(encoding="mono16"), "size": dict(height=SIZE + 1),
                 "step": dict(step=SIZE * 3 + 2), "data": dict(data=bytes(10))}
        for name, change in cases.items():
            bad = image_msg(np.zeros((SIZE, SIZE, 3), np.uint8), now())
            for key, value in change.items():
                setattr(bad, key, value)
            feeder.bad_image = bad
            before = sum(node.inputs.rejected.get(c, 0) for c in ("rgb_static", "rgb_gripper"))
            assert g.wait(lambda: sum(node.inputs.rejected.get(c, 0) for c in ("rgb_static", "rgb_gripper"))
                          > before, timeout=5), name
        assert "input refused" in probe.last_status()["message"] or node.message.startswith("input refused")
        feeder.bad_image = None
        del good
        # Joint states: reordered (matched by name), with unknown extras (ignored), with a missing joint (refused).
        feeder.names = list(reversed(PANDA_JOINT_NAMES)) + FINGERS + ["some_other_joint"]
        time.sleep(0.3)
        _, joints, width, _ = node.inputs.snapshot()
        np.testing.assert_allclose(joints, NEUTRAL_ROBOT_OBS[7:14])
        assert width == pytest.approx(0.08)
        before = node.inputs.rejected.get("joint_states", 0)
        feeder.names = list(PANDA_JOINT_NAMES[:-1])
        assert g.wait(lambda: node.inputs.rejected.get("joint_states", 0) > before, timeout=5)
        assert "lacks joints" in node.inputs.last_error
        # Still alive: the heartbeat goes on.
        stamp = probe.last_status()["stamp"]
        assert g.wait(lambda: probe.last_status()["stamp"] > stamp, timeout=3)
    finally:
        feeder.stop()


@pytest.mark.slow
def test_bad_and_flooding_instructions_are_rejected_with_a_reason(graph_factory, policy, kinematics):
    s = no_sim_settings()
    g = graph_factory(policy_factory(policy, kinematics, s), s=s)
    probe = g.probe
    assert g.wait(lambda: probe.last_status().get("state") == "idle")
    for text, reason in (("   ", "empty"), ("x" * 600, "512"), ("open\x1b[2J the drawer", "control")):
        n = probe.last_status().get("n_rejected", 0)
        probe.say(text)
        assert g.wait(lambda: probe.last_status().get("n_rejected", 0) > n, timeout=5), text[:20]
        assert reason in probe.last_status()["rejected"]["reason"]
    assert probe.last_status()["task_id"] == 0
    flood_qos = rclpy.qos.QoSProfile(depth=1000, reliability=LATCHED.reliability, durability=LATCHED.durability)
    flood = probe.create_publisher(String, s["instruction_topic"], flood_qos)
    start = time.monotonic()
    for i in range(1000):  # 1,000 per second
        flood.publish(String(data=f"open the drawer {i}"))
        time.sleep(0.001)
    elapsed = time.monotonic() - start
    time.sleep(1.0)
    status = probe.last_status()
    # The subscription's depth 1 coalesces what arrives faster than it is taken; of what it takes, the gate's bucket
    # (burst 4, 2/s) lets a handful through; the node is alive and says why the rest went.
    assert 1 <= status["task_id"] <= 4 + int(2 * (elapsed + 1.5)) + 1
    assert status["n_rejected"] >= 3 + 10
    assert status["rejected"]["reason"].startswith("rate")


# -- contained stage failures ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raises", "hangs"])
def test_a_failing_or_hung_generator_never_stops_the_control_loop(graph_factory, policy, kinematics, failure):
    s = no_sim_settings(stage_timeout_s=1.0)
    goals = FixedGoals(fail_after=1) if failure == "raises" else FixedGoals(hang_after=1)
    g = graph_factory(policy_factory(policy, kinematics, s), subgoal_factory(goals, s), s=s)
    probe = g.probe
    feeder = Feeder(probe)
    try:
        probe.say("open the drawer")
        assert g.wait(lambda: probe.last_status().get("state") == "executing", timeout=20)
        n = len(probe.trajectories)
        time.sleep(1.5)
        assert len(probe.trajectories) >= n + 5, "the policy keeps acting on the last subgoal"
        assert probe.last_status()["state"] == "executing"
        if failure == "raises":
            assert any("generator exploded" in (i.get("error") or "") for i in probe.infos)
            assert "generator exploded" in probe.last_status()["stage_warning"]
            assert probe.last_status()["stage_errors"] >= 1
        else:  # the hung stage is reported once the subgoal is older than stage_timeout_s
            assert g.wait(lambda: "may hang" in (probe.last_status().get("stage_warning") or ""), timeout=5)
    finally:
        goals.release.set()
        feeder.stop()


class NaNPolicy:
    """A joint_abs ChunkPolicy whose chunks are NaN (or, with ``far``, far beyond the joint limits)."""

    space = JOINT_ABS
    cameras = ("rgb_static", "rgb_gripper")
    image_sizes = (SIZE, SIZE)
    goal_camera = None
    uses_goal = False
    uses_language = True
    exec_len = 4

    def __init__(self, far: bool = False):
        self.far = far

    def predict_chunk(self, obs, goal=None, n_steps=None, generator=None, **kw):
        q = np.tile(np.r_[np.full(7, 10.0) if self.far else np.full(7, np.nan), 1.0], (8, 1))
        return ActionChunk(actions=torch.tensor(q, dtype=torch.float32), t0=obs.t, space="joint_abs")


@pytest.mark.slow
def test_nan_actions_are_never_published_and_far_targets_are_clamped(graph_factory, kinematics):
    s = no_sim_settings()
    g = graph_factory(policy_factory(NaNPolicy(), kinematics, s), s=s)
    probe = g.probe
    feeder = Feeder(probe)
    try:
        probe.say("open the drawer")
        assert g.wait(lambda: probe.last_status().get("state") == "error", timeout=10), probe.last_status()
        assert "non-finite" in probe.last_status()["message"]
        with probe.lock:
            assert all(len(m.points) == 1 and in_band(m.points[0].positions) for _, m in probe.trajectories)
    finally:
        feeder.stop()
        g.close()
    s2 = no_sim_settings()
    g2 = graph_factory(policy_factory(NaNPolicy(far=True), kinematics, s2), s=s2)
    feeder = Feeder(g2.probe)
    try:
        g2.probe.say("open the drawer")
        assert g2.wait(lambda: len(g2.probe.trajectories) >= 2, timeout=10)
        with g2.probe.lock:
            for _, m in g2.probe.trajectories:
                assert in_band([p.positions for p in m.points])
        # the joint-space policy's targets go out directly, clamped to the band and velocity-limited
        assert g2.probe.last_status()["clamped_points"] > 0
    finally:
        feeder.stop()


# -- `ghil launch` + `ghil say`: processes, signals ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny goal-conditioned DiT and a tiny SuSIE-style image generator, saved as the launch config loads them."""
    from ghil.nn.encoders import HashTextConfig
    from planners.image_generator import SusieConfig, SusieGenerator, UNetConfig

    folder = tmp_path_factory.mktemp("launch")
    torch.manual_seed(0)
    dit = DiTPolicy(tiny_config(), ShortcutConfig())
    dit.fit_normalizer(fake_stats())
    unet = UNetConfig(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, n_heads=2,
                      norm_num_groups=4)
    gen = SusieGenerator(SusieConfig(frame_size=SIZE, image_size=16, horizon=4, unet=unet,
                                     text_encoder=HashTextConfig(16)), ShortcutConfig())
    return {"policy": str(dit.save_pretrained(folder / "dit")), "generator": str(gen.save_pretrained(folder / "gen"))}


def launch_overrides(ckpt, *extra):
    return ["robot=sim", "agent=susie", f"agent.policy.path={ckpt['policy']}",
            f"agent.goals.generator.path={ckpt['generator']}", "env.static_size=32", "env.gripper_size=32",
            *extra]


def ghil(*args, env=None, **kw):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "ghil.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def ros_env():
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id() + 20)  # apart from the in-process tests' domain
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def children_of(pid: int) -> list[int]:
    import pathlib

    out = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(proc.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return stat[0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_launch_say_wait_and_clean_shutdown(tiny_checkpoints, signal_name):
    import signal

    env = ros_env()
    launch = ghil("launch", *launch_overrides(tiny_checkpoints, "ros.max_steps=30"), env=env)
    try:
        say = ghil("say", "open the drawer", "--wait", "--timeout", "90", env=env)
        out, _ = say.communicate(timeout=120)
        assert say.returncode == 0, out
        lines = out.strip().splitlines()
        assert any(line.startswith("executing") for line in lines), out
        final = json.loads(lines[-1])
        assert final["state"] == "done" and final["verdict"]["reason"] == "step_limit" and final["chunks"] >= 3
        rejected = ghil("say", "x" * 600, "--wait", "--timeout", "30", env=env)
        out, _ = rejected.communicate(timeout=60)
        assert rejected.returncode == 2 and "too long" in out, out
        children = children_of(launch.pid)
        assert len(children) == 2, children  # the subgoal node and the sim, each in its own process
    finally:
        launch.send_signal(getattr(signal, signal_name))
        try:
            out, _ = launch.communicate(timeout=30)
        except Exception:
            launch.kill()
            raise
    assert launch.returncode == 0, out[-2000:]
    time.sleep(0.5)
    assert not [c for c in children if alive(c)], "orphan node processes left behind"


def test_say_reports_when_no_graph_answers():
    env = ros_env()
    env["ROS_DOMAIN_ID"] = str(domain_id() + 30)
    proc = ghil("say", "open the drawer", "--timeout", "2", env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "nothing subscribes" in out
    proc = ghil("say", env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "give one instruction" in out


# -- launch plumbing (no graph) ---------------------------------------------------------------------------------------


def test_processes_roles_and_ros_args_are_split_as_documented():
    from ros_nodes.launch import plan_processes, split_ros_args

    assert plan_processes(compose_launch_config(["robot=sim"])) == (["policy"], ["subgoals", "reasoner", "sim"])
    assert plan_processes(compose_launch_config([])) == (["policy"], ["subgoals", "reasoner"])
    assert plan_processes(compose_launch_config(["robot=sim", "agent=ghil_glue_tokens"])) == (
        ["policy"], ["subgoals", "sim"])
    assert plan_processes(compose_launch_config(["robot=sim", "ros.processes=single"])) == (
        ["policy", "subgoals", "reasoner", "sim"], [])
    assert plan_processes(compose_launch_config(["nodes=[sim]", "robot=sim"])) == (["sim"], [])
    assert split_ros_args(["robot=sim", "--ros-args", "-p", "max_steps:=5"]) == (
        ["robot=sim"], ["--ros-args", "-p", "max_steps:=5"])
    assert split_ros_args(["agent=susie"]) == (["agent=susie"], [])


def test_launch_refuses_agents_the_graph_cannot_run():
    from ros_nodes.launch import build_sim, build_stages

    with pytest.raises(ValueError, match="PolicyAgent"):
        build_stages(compose_launch_config(["agent=expert"]))
    with pytest.raises(ValueError, match="privileged"):
        build_stages(compose_launch_config(["agent=oracle_subgoal_policy"]))
    with pytest.raises(ValueError, match="robot=sim"):
        build_sim(compose_launch_config(["nodes=[sim]"]))


def test_ros_parameters_override_the_launch_config(policy, kinematics):
    context = rclpy.Context()
    rclpy.init(args=["ghil", "--ros-args", "-p", "max_steps:=7", "-p", "status_topic:=/other/status"],
               context=context, domain_id=domain_id())
    try:
        node = policy_factory(policy, kinematics, no_sim_settings())(context)
        assert node.s["max_steps"] == 7 and node.s["status_topic"] == "/other/status"
        assert node.pub_status.topic_name == "/other/status"
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


# -- the reasoner node -------------------------------------------------------------------------------------------------


class RecordingPolicy:
    """A ChunkPolicy that delegates to ``inner`` and records each observation's instruction."""

    def __init__(self, inner):
        self.inner, self.instructions = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_chunk(self, obs, goal=None, **kw):
        self.instructions.append(obs.instruction)
        return self.inner.predict_chunk(obs, goal, **kw)


class ScriptedReasoner:
    """Names the last part of a composite instruction as the subtask, at every reasoning."""

    camera = "rgb_static"

    def reason(self, obs):
        from ghil.types import Reasoning

        parts = obs.instruction.split(", then ")
        return Reasoning(task=obs.instruction, plan=tuple(parts), subtask=parts[-1], move="move left")


@pytest.mark.slow
def test_the_reasoner_node_names_the_subtask_the_subgoal_and_policy_nodes_follow(graph_factory, policy, kinematics):
    from ros_nodes.reasoner_node import ReasonerNode

    s = settings(max_steps=45)
    goals, recording = FixedGoals(), RecordingPolicy(policy)
    reasonings = []
    g = graph_factory(sim_factory(s), policy_factory(recording, kinematics, s, follow_subtasks=True),
                      subgoal_factory(goals, s, follow_subtasks=True),
                      lambda context: ReasonerNode(ScriptedReasoner(), ("rgb_static", (SIZE, SIZE)), s,
                                                   context=context), s=s)
    probe = g.probe
    subtasks = []
    probe.create_subscription(String, s["reasoning_topic"], lambda m: reasonings.append(json.loads(m.data)), COMMANDS)
    probe.create_subscription(String, s["subtask_topic"], lambda m: subtasks.append(json.loads(m.data)["subtask"]),
                              LATCHED)
    probe.say("open the drawer, then turn on the led")
    assert g.wait(lambda: probe.last_status().get("state") == "executing", timeout=30), probe.last_status()
    # The plan is followed forward from its first step: the reasoner naming the second part twice in a row
    # (advance_after=2) moves the graph on, and the generator and the policy follow the published subtask.
    assert g.wait(lambda: "turn on the led" in recording.instructions and "turn on the led" in goals.instructions,
                  timeout=30)
    assert subtasks[:2] == ["open the drawer", "turn on the led"]
    assert set(goals.instructions) <= {"open the drawer", "turn on the led"}
    assert recording.instructions[-1] == "turn on the led"
    assert g.wait(lambda: reasonings)
    first = reasonings[0]
    assert first["subtask"] == "turn on the led" and first["plan"] == ["open the drawer", "turn on the led"]
    assert first["task_id"] == probe.last_status()["task_id"] and first["fallback"] is False


def test_agents_with_a_reasoner_get_a_reasoner_process():
    from ros_nodes.launch import plan_processes

    assert plan_processes(compose_launch_config(["agent=ghil_glue_reasoner", "robot=sim"])) == (
        ["policy"], ["subgoals", "reasoner", "sim"])


@pytest.mark.slow
def test_launch_splits_a_reasoned_agent_into_three_nodes():
    from planners.reasoner import VLMReasoner
    from ros_nodes.launch import build_stages
    from ros_nodes.reasoner_node import ReasonerNode

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id())
    try:
        nodes = build_stages(compose_launch_config(["agent=ghil_glue_reasoner", "nodes=[policy,subgoals,reasoner]"]),
                             context)
        assert set(nodes) == {"policy", "subgoals", "reasoner"}
        assert isinstance(nodes["reasoner"], ReasonerNode)
        assert isinstance(nodes["reasoner"].reasoner.reasoner, VLMReasoner)
        assert nodes["policy"].subtasks is not None and nodes["subgoals"].subtasks is not None
        for node in nodes.values():
            node.close()
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
