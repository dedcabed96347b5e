"""`ghil launch`: the ROS 2 graph from the agent config `ghil run` uses, without ros2 launch (PyPI has none).

The agent (``agent=...``) is built exactly as ``ghil run`` builds it and split into its stages: the subgoal node gets
its goal provider (generator + filter, bound to the policy, so token stages share its encoders) and the policy node
its policy, behind ``ChunkCommander`` (IK + safety gate). Each role runs in its own process (``ros.processes``): the
policy node in this one, the subgoal node and, with ``robot=sim``, the simulated robot (``robot.node``:
``sim_eval.ros_robot.SimNode``, composed by the config so robot-side code never imports the simulator) as children
with the same overrides, started as ``ghil_node ... nodes=[role]`` and stopped with this process. SIGINT / SIGTERM
shut everything down cleanly (rc 0, no orphan).

Usage::

    ghil launch robot=sim                          # the shipped hierarchy driving the simulated robot
    ghil say "open the drawer" --wait              # from another shell
    ghil launch agent=susie_tokens ros.robot_model=fr3 ros.trajectory_topic=/fr3_arm_controller/joint_trajectory
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ROLES = ("policy", "subgoals", "reasoner", "sim")
REASONED = "ghil.runtime.reasoned_agent.ReasonedAgent"  # an agent config with a reasoner in front (ghil_glue_reasoner)


def compose_launch_config(overrides: list[str]) -> DictConfig:
    """The launch config for ``overrides`` (Hydra's compose API: the same config ``ghil launch`` composes)."""
    from hydra import compose, initialize_config_dir

    from ghil.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="launch", overrides=list(overrides))


def ros_settings(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.ros, resolve=True)


def build_stages(cfg: DictConfig, context=None) -> dict[str, Any]:
    """The agent's stages as nodes: {"policy": PolicyNode, "subgoals": SubgoalNode} (a language-only policy has no
    subgoal node). Raises ValueError for agents that are not a goal-conditioned PolicyAgent hierarchy."""
    from hydra.utils import instantiate

    from ghil.runtime.joint_commands import ChunkCommander
    from ghil.runtime.kinematics import PandaKinematics
    from ghil.runtime.policy_agent import NoGoal, PolicyAgent
    from ghil.runtime.reasoned_agent import ReasonedAgent
    from planners.subgoals import GeneratedSubgoals, proposal_method
    from ros_nodes.common import ROBOTS
    from ros_nodes.policy_node import PolicyNode
    from ros_nodes.subgoal_node import SubgoalNode

    agent = instantiate(cfg.agent)
    reasoner, advance_after = None, 2
    if isinstance(agent, ReasonedAgent):  # reasoner -> the lower hierarchy: the reasoner gets its own node
        agent, reasoner, advance_after = agent.agent, agent.reasoner, agent.follower.advance_after
    if not isinstance(agent, PolicyAgent):
        raise ValueError(f"ghil launch runs a PolicyAgent hierarchy (agent=ghil_glue_tokens, susie_tokens, "
                         f"ghil_glue, flat_policy, ghil_glue_reasoner, ...); agent={cfg.agent.get('_target_')} is not "
                         "one")
    settings = ros_settings(cfg)
    warm_up(agent, int(cfg.agent.get("seed", 0)))
    kinematics = PandaKinematics()
    commander = ChunkCommander(agent.policy, kinematics=kinematics, limits=ROBOTS[settings["robot_model"]](),
                               exec_len=agent.exec_len, n_steps=agent.n_steps,
                               control_hz=float(settings["control_hz"]), seed=int(cfg.agent.get("seed", 0)))
    goals = agent.goals
    goal_input = "image"
    if isinstance(goals, GeneratedSubgoals) and proposal_method(goals.generator)[1]:
        goal_input = "tokens"
    elif not isinstance(goals, (GeneratedSubgoals, NoGoal)):
        raise ValueError(f"the goal provider {type(goals).__name__} needs the simulator's privileged state (oracle "
                         "subgoals): the graph runs generated subgoals (agent=ghil_glue_tokens, susie_tokens, ...)")
    nodes: dict[str, Any] = {}
    roles = list(cfg.get("nodes", ["policy", "subgoals"]))
    follow = reasoner is not None
    policy = agent.policy
    cameras = {c: (size, size) for c, size in zip(policy.cameras, policy.image_sizes)}
    if "policy" in roles:
        nodes["policy"] = PolicyNode(commander, kinematics, settings, goal_input=goal_input, follow_subtasks=follow,
                                     context=context)
    if "subgoals" in roles and not isinstance(goals, NoGoal):
        nodes["subgoals"] = SubgoalNode(goals, cameras, PandaKinematics(), settings, follow_subtasks=follow,
                                        context=context)
    if "reasoner" in roles and reasoner is not None:
        from ros_nodes.reasoner_node import ReasonerNode

        camera = getattr(reasoner, "camera", "rgb_static")
        nodes["reasoner"] = ReasonerNode(reasoner, (camera, cameras[camera]), settings, context=context,
                                         advance_after=advance_after)
    return nodes


def warm_up(agent, seed: int) -> None:
    """One subgoal and one chunk on a blank observation before the graph starts, so the first instruction does not
    pay for lazy initialisation (the text encoder's first call alone takes ~3 s on 2 cores); then re-seeded."""
    import numpy as np

    from ghil.runtime.kinematics import PANDA, PandaKinematics
    from ghil.types import Observation

    policy = agent.policy
    images = {c: np.zeros((s, s, 3), np.uint8) for c, s in zip(policy.cameras, policy.image_sizes)}
    proprio = PandaKinematics().robot_obs(PANDA.rest, 0.08, 1)
    obs = Observation(images=images, proprio=proprio.astype(np.float32), t=0, instruction="open the drawer")
    agent.reset()
    agent.act(obs)
    agent.seed(seed)
    agent.reset()


def build_sim(cfg: DictConfig, context=None):
    """The simulated robot named by ``robot.node`` (``robot=sim``: sim_eval.ros_robot.SimNode) around ``env``."""
    from hydra.utils import instantiate

    if not cfg.robot.get("node"):
        raise ValueError("nodes=[sim] needs a simulated robot: add robot=sim")
    env = instantiate(cfg.env)
    robot = OmegaConf.to_container(cfg.robot, resolve=True)
    robot.pop("node")
    return instantiate(cfg.robot.node)(env, ros_settings(cfg), robot, context=context)


def run_nodes(cfg: DictConfig, roles: tuple[str, ...] | None = None, context=None,
              ros_args: list[str] | None = None) -> int:
    """Run the chosen roles in this process until SIGINT / SIGTERM; 0 on a clean shutdown. ``ros_args``
    (``--ros-args -p name:=value --params-file f.yaml``, what ros2 launch passes) override the nodes' parameters."""
    import rclpy

    from ros_nodes.common import ros_environment_defaults, spin

    roles = tuple(roles or cfg.get("nodes", ["policy", "subgoals"]))
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown node roles {unknown}; choose from {list(ROLES)}")
    threads = int(cfg.ros.get("threads", 6))
    if "torch" in sys.modules or set(roles) & {"policy", "subgoals"}:
        import torch

        torch.set_num_threads(int(cfg.ros.get("torch_threads", 1)))
    ros_environment_defaults()
    context = context or rclpy.Context()
    # SIGINT and SIGTERM end the spin loop (checked every 0.1 s) and the shutdown runs in its safe order; rclpy's own
    # handlers are not installed (measured: with them a SIGTERM still killed the process with rc 143).
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    rclpy.init(args=["ghil", *(ros_args or [])], context=context,
               signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    nodes = []
    try:
        if "sim" in roles:
            nodes.append(build_sim(cfg, context))
        stage_roles = [r for r in roles if r != "sim"]
        if stage_roles:
            sub = OmegaConf.merge(cfg, {"nodes": stage_roles})
            nodes.extend(build_stages(sub, context).values())
    except BaseException:
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        raise
    names = ", ".join(n.get_fully_qualified_name() for n in nodes)
    print(f"ghil launch: running {names} (ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')}); Ctrl-C stops",
          flush=True)
    try:
        spin(nodes, context, threads=threads, until=stop.is_set, executor=str(cfg.ros.get("executor", "events")))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("ghil launch: stopped", flush=True)
    return 0


def _child_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not inside a Hydra app (tests call run() directly)
        return []


def _child_setup(nice: int):
    def setup() -> None:
        """In the child, before exec: SIGTERM when the launching process dies, however it dies (Linux prctl), so a
        killed ``ghil launch`` leaves no orphan node behind; a lower priority for the model stages."""
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if nice:
            os.nice(int(nice))

    return setup


def plan_processes(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(roles run in this process, roles run as child processes). ``ros.processes=per_node`` (default) gives every
    stage its own interpreter: the policy's control timer never waits for the generator's Python (measured: with
    both in one process, 30-70 ms late ticks and chunks that miss their start); ``single`` runs all in one."""
    roles = list(cfg.get("nodes", ["policy", "subgoals"]))
    if cfg.agent.get("_target_") == REASONED and "reasoner" not in roles and roles[:2] == ["policy", "subgoals"]:
        roles.append("reasoner")
    if cfg.robot.get("sim") and "sim" not in roles:
        roles.append("sim")
    if cfg.ros.get("processes", "per_node") == "single":
        return roles, []
    here = ["policy"] if "policy" in roles else roles[:1]
    return here, [r for r in roles if r not in here]


def run(cfg: DictConfig) -> None:
    """``ghil launch``: the policy node in this process, the other roles (subgoals; the sim with ``robot=sim``) as
    child processes with the same overrides; they are stopped with it."""
    __import__("ghil.extras").extras.check_config(cfg)
    import ros_nodes.common  # noqa: F401  (a missing [ros] extra is reported here, in one line)

    here, children_roles = plan_processes(cfg)
    overrides = [o for o in _child_overrides() if not o.startswith("nodes=")]
    nice = dict(cfg.ros.get("nice", {}))
    children = [subprocess.Popen([sys.executable, "-m", "ros_nodes.launch", *overrides, f"nodes=[{role}]"],
                                 preexec_fn=_child_setup(int(nice.get(role, 0)))) for role in children_roles]
    try:
        run_nodes(cfg, roles=tuple(here))
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def split_ros_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra overrides, ROS arguments): everything from ``--ros-args`` on belongs to ROS."""
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        return argv[:i], argv[i:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    """``python -m ros_nodes.launch [hydra overrides] [--ros-args ...]`` (console script ``ghil_node``): the roles of
    ``nodes=[...]`` in this one process (what ``ghil launch`` starts for each child; also what ``ros2 run ghil
    ghil_node`` and launch/ghil.launch.py run)."""
    overrides, ros_args = split_ros_args(list(sys.argv[1:] if argv is None else argv))
    return run_nodes(compose_launch_config(overrides), ros_args=ros_args)


if __name__ == "__main__":
    sys.exit(main())
