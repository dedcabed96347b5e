"""The ROS 2 graph's figures (issue 13): `ghil launch robot=sim` driven through its topics like a user would.

For N instructions (the first subtask of official chains 0..N-1, their evaluation phrasing, each from its chain's
own initial state: the sim is told the start on ``ros.sim_initial_state_topic``), printed:

* success through the graph (the sim oracle's verdict before ``ros.max_steps``) against the same agent run directly
  (``ghil run``'s rollout, same instruction and start, seed 0), each with a normal 95 % interval;
* instruction-to-first-command latency (p50 / p95 / max);
* commands: chunks per second sustained, the longest gap between two trajectory messages against the chunk's own
  duration, and how many chunks arrived after the time they were stamped to start;
* image latency sim -> this node (camera) and subgoal node -> this node (subgoal image, stamped with the frame it
  was made from, so it includes the generation time);
* CPU (% of one core) and resident memory per node process;
* stop-to-silence: from the stop service call to the last trajectory message (the hold), and that nothing follows.

Usage::

    python benchmarks/ros_graph.py --n 20 [--json] [--domain 91] [-- extra ghil launch overrides]

Needs the [ros] extra; takes ~N x 13 s plus the direct runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def proc_stat(pid: int) -> tuple[float, int] | None:
    """(cpu seconds, rss bytes) of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(proc.name))
            except OSError:
                continue
    return out


def role_of(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    for role in ("sim", "subgoals", "policy"):
        if f"nodes=[{role}]" in cmd:
            return role
    return "policy"


def pct(values, q, digits: int = 2):
    return round(float(np.percentile(values, q)), digits) if len(values) else None


def interval(k: int, n: int) -> tuple[float, float]:
    p = k / n
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    return round(max(0.0, p - half), 3), round(min(1.0, p + half), 3)


class Monitor:
    """A node recording what the graph publishes (EventsExecutor in a thread)."""

    def __init__(self, settings: dict):
        import rclpy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from ros_nodes.common import COMMANDS, LATCHED, STATUS, STREAM, make_executor, seconds

        self.rclpy, self.seconds = rclpy, seconds
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("ghil_benchmark", context=self.context)
        group = rclpy.callback_groups.ReentrantCallbackGroup()
        self.lock = threading.Lock()
        self.status: list[dict] = []
        self.trajectories: list[tuple[float, float, int, int]] = []  # (arrival s, start stamp, n points, task id)
        self.points: list[np.ndarray] = []  # each trajectory's joint positions (T, 7)
        self.camera_latency: list[float] = []
        self.subgoal_latency: list[float] = []
        n = self.node
        n.create_subscription(String, settings["status_topic"], self._on_status, STATUS, callback_group=group)
        n.create_subscription(JointTrajectory, settings["trajectory_topic"], self._on_trajectory, COMMANDS,
                              callback_group=group)
        n.create_subscription(Image, settings["camera_topics"]["rgb_static"],
                              lambda m: self._latency(self.camera_latency, m), STREAM, callback_group=group)
        n.create_subscription(Image, settings["subgoal_topic"], lambda m: self._latency(self.subgoal_latency, m),
                              STREAM, callback_group=group)
        self.pub = n.create_publisher(String, settings["instruction_topic"], LATCHED)
        from std_msgs.msg import Int32

        self.Int32 = Int32
        self.pub_start = n.create_publisher(Int32, settings["sim_initial_state_topic"], LATCHED)
        from std_srvs.srv import Trigger

        self.Trigger = Trigger
        self.stop = n.create_client(Trigger, settings["stop_service"])
        self.resume = n.create_client(Trigger, settings["resume_service"])
        self.executor = make_executor("events", self.context)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _spin(self):
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:
                if not self.context.ok():
                    return

    def _on_status(self, msg):
        with self.lock:
            self.status.append(json.loads(msg.data))

    def _on_trajectory(self, msg):
        with self.lock:
            task = self.status[-1].get("task_id", 0) if self.status else 0
            self.trajectories.append((self.now(), self.seconds(msg.header.stamp), len(msg.points), task))
            self.points.append(np.array([p.positions for p in msg.points]))

    def _latency(self, store, msg):
        store.append((self.now() - self.seconds(msg.header.stamp)) * 1000)

    def last(self) -> dict:
        with self.lock:
            return dict(self.status[-1]) if self.status else {}

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def say(self, text: str, start: int | None = None) -> int:
        from std_msgs.msg import String

        if start is not None:
            self.pub_start.publish(self.Int32(data=int(start)))
            time.sleep(0.2)  # the sim takes it before the task
        before = self.last().get("task_id", 0)
        self.pub.publish(String(data=text))
        return before

    def call(self, client):
        assert client.wait_for_service(timeout_sec=10)
        return client.call(self.Trigger.Request(), timeout_sec=10)

    def close(self):
        self.rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=5)
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()


def direct_success(instructions: list[str], overrides: list[str]) -> list[dict]:
    """``ghil run`` (in this process, no video) on each instruction from chain i's start: the same agent, seed 0."""
    from hydra import compose, initialize_config_dir

    from ghil.paths import CONFIG_DIR
    from sim_eval.evaluation.instruction_run import run

    agent_overrides = [o for o in overrides if o.startswith(("agent", "env", "filter@", "generator@"))]
    out = []
    for i, text in enumerate(instructions):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="run", overrides=[f"run.instruction={text}", "run.video=false",
                                                        f"run.initial_state={i}",
                                                        f"run.out_dir=outputs/bench_ros/direct_{i}",
                                                        *agent_overrides])
        with contextlib.redirect_stdout(sys.stderr):  # run() prints its verdict line; stdout is for the figures
            verdict = run(cfg)
        out.append({"instruction": text, "success": bool(verdict["success"]),
                    "steps": sum(s["steps"] for s in verdict["subtasks"])})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--domain", type=int, default=91)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds per instruction")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct runs")
    parser.add_argument("overrides", nargs="*", help="extra `ghil launch` overrides (agent=..., ros.*=...)")
    args = parser.parse_args(argv)

    os.environ["ROS_DOMAIN_ID"] = str(args.domain)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from ros_nodes.launch import compose_launch_config, ros_settings
    from sim_eval.protocol.chains import load_official_chains
    from sim_eval.protocol.instructions import chain_instructions

    chains = load_official_chains()[: args.n]
    rng = np.random.default_rng(0)
    instructions = [chain_instructions(tasks[:1], "standard", rng)[0] for _, tasks in chains]
    overrides = ["robot=sim", *args.overrides]
    settings = ros_settings(compose_launch_config(overrides))

    launch = subprocess.Popen([sys.executable, "-m", "ghil.cli", "launch", *overrides],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    monitor = Monitor(settings)
    records, stop_figures, n_main, ready_s = [], {}, 0, None
    cpu: dict[str, list] = {}
    try:
        t_launch = time.monotonic()
        wanted = {"ghil_policy", "ghil_subgoals", "ghil_sim"}
        if not monitor.wait(lambda: monitor.last().get("state") == "idle"
                            and wanted <= set(monitor.node.get_node_names()) and monitor.camera_latency, 180):
            sys.exit("the graph did not come up within 180 s")
        ready_s = round(time.monotonic() - t_launch, 1)  # every node discovered and the sim's frames flowing
        monitor.wait(lambda: len(children(launch.pid)) >= 2, 60)
        pids = {role_of(p): p for p in [launch.pid, *children(launch.pid)]}
        time.sleep(3.0)  # the children finish warming up
        start_cpu = {role: proc_stat(pid) for role, pid in pids.items()}
        t_start = time.monotonic()
        for index, text in enumerate(instructions):
            before = monitor.say(text, start=index)
            ok = monitor.wait(lambda: monitor.last().get("task_id", 0) > before
                              and monitor.last().get("state") in ("done", "stopped", "error"), args.timeout)
            status = monitor.last()
            records.append({"instruction": text, "state": status.get("state") if ok else "timeout",
                            "success": bool((status.get("verdict") or {}).get("success")),
                            "steps": (status.get("verdict") or {}).get("steps"),
                            "first_command_latency_s": status.get("first_command_latency_s"),
                            "chunks": status.get("chunks"), "late_chunks": status.get("late_chunks"),
                            "plan_ms": status.get("plan_ms"), "tick_max_ms": status.get("tick_max_ms")})
            print(f"{text!r}: {records[-1]['state']} success={records[-1]['success']}", file=sys.stderr)
        wall = time.monotonic() - t_start
        for role, pid in pids.items():
            end = proc_stat(pid)
            if end and start_cpu.get(role):
                cpu[role] = [round(100 * (end[0] - start_cpu[role][0]) / wall, 1), round(end[1] / 2**20, 1)]
        # stop-to-silence, three times (the command figures above exclude this phase)
        n_main = len(monitor.trajectories)
        silences = []
        for index, text in enumerate(instructions[:3]):
            before = monitor.say(text, start=index)
            monitor.wait(lambda: monitor.last().get("task_id", 0) > before
                         and monitor.last().get("state") == "executing", 20)
            time.sleep(1.0)
            called = monitor.now()
            monitor.call(monitor.stop)
            time.sleep(1.0)
            with monitor.lock:
                after = [t for t, _, _, _ in monitor.trajectories if t >= called]
            silences.append({"last_message_after_call_ms": round((max(after) - called) * 1000, 2) if after else 0.0,
                             "messages_after_call": len(after)})
            monitor.call(monitor.resume)
            monitor.wait(lambda: monitor.last().get("state") in ("done", "error"), args.timeout)
        stop_figures = {"runs": silences}
    finally:
        monitor.close()
        launch.terminate()
        launch.wait(timeout=30)

    chunks = [(t, s, task) for t, s, n, task in monitor.trajectories[:n_main] if n > 1]
    gaps = np.array([(b[0] - a[0]) * 1000 for a, b in zip(chunks, chunks[1:]) if a[2] == b[2]])  # within a task
    worst = sorted(((b[0] - a[0]) * 1000, i, a[2]) for i, (a, b) in enumerate(zip(chunks, chunks[1:])) if a[2] == b[2])[-3:]
    print("worst gaps (ms, index, task):", [(round(g, 1), i, t) for g, i, t in worst], file=sys.stderr)
    ahead = [(a, b) for a, b in zip(chunks, chunks[1:]) if a[1] > 0 and b[1] > 0 and a[2] == b[2]]
    chunk_ms = round(float(np.median([(b[1] - a[1]) * 1000 for a, b in ahead])), 2) if ahead else None
    margins = np.array([(s - t) * 1000 for t, s, _ in chunks if s > 0])
    # The commanded-joint step (max over joints, rad) at a chunk hand-over vs between points inside a chunk.
    kept = [(m, task) for m, (_, _, n, task) in zip(monitor.points[:n_main], monitor.trajectories[:n_main]) if n > 1]
    boundary = [float(np.abs(b[0][0] - a[0][-1]).max()) for a, b in zip(kept, kept[1:]) if a[1] == b[1]]
    within = [float(np.abs(np.diff(m, axis=0)).max(axis=1).max()) for m, _ in kept if len(m) > 1]
    n_ok = sum(r["success"] for r in records)
    latencies = [r["first_command_latency_s"] * 1000 for r in records if r["first_command_latency_s"] is not None]
    result = {
        "graph_ready_s": ready_s, "n": len(records), "instructions": "first subtask of official chains 0..N-1, evaluation phrasing",
        "graph": {"success": n_ok, "rate": round(n_ok / len(records), 3), "ci95": interval(n_ok, len(records))},
        "first_command_latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95),
                                     "max": round(max(latencies), 1) if latencies else None},
        "commands": {"n": len(chunks), "chunk_ms": chunk_ms, "gap_ms_p50": pct(gaps, 50),
                     "gap_ms_p95": pct(gaps, 95), "gap_ms_max": round(float(gaps.max()), 1) if len(gaps) else None,
                     "margin_before_start_ms_p5": pct(margins, 5),
                     "margin_before_start_ms_min": round(float(margins.min()), 1) if len(margins) else None,
                     "arrived_after_start": int((margins < 0).sum()),
                     "chunks_late_total": sum(r["late_chunks"] or 0 for r in records),
                     "chunks_per_s_sustained": round(1000 / float(np.median(gaps)), 2) if len(gaps) else None},
        "joint_step_rad": {"handover_p50": pct(boundary, 50, 4), "handover_p95": pct(boundary, 95, 4),
                           "within_chunk_p50": pct(within, 50, 4), "within_chunk_p95": pct(within, 95, 4)},
        "image_latency_ms": {"camera_p50": pct(monitor.camera_latency, 50),
                             "camera_p95": pct(monitor.camera_latency, 95),
                             "subgoal_p50": pct(monitor.subgoal_latency, 50),
                             "subgoal_p95": pct(monitor.subgoal_latency, 95)},
        "cpu_pct_rss_mb": cpu, "stop": stop_figures, "records": records,
        "overrides": overrides,
    }
    if not args.no_direct:
        direct = direct_success(instructions, overrides)
        k = sum(d["success"] for d in direct)
        result["direct"] = {"success": k, "rate": round(k / len(direct), 3), "ci95": interval(k, len(direct)),
                            "records": direct}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r in records:
            print(r)
        for key, value in result.items():
            if key not in ("records", "direct"):
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
