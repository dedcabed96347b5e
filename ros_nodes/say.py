"""`ghil say "open the drawer" [--wait]`: publish an instruction to a running graph (the wheels ship no ros2cli).

The instruction goes out latched on ``--topic`` (default ``/ghil/instruction``); the command waits until the policy
node has subscribed (``--timeout``) so the message is not lost. With ``--wait`` it prints each status update of
the task the instruction started until it is done, stopped or in error; the exit code is 0 for done with success
(or no verdict), 1 for a failure, stop or error, 2 when the instruction was rejected, 3 when no graph answered.
``--stop`` / ``--resume`` call the stop / resume services instead.

Usage::

    ghil say "open the drawer" --wait
    ghil say --stop
"""

from __future__ import annotations

import argparse
import json
import sys
import time

TERMINAL = ("done", "stopped", "error")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ghil say", description=__doc__.split("\n\n")[0])
    parser.add_argument("instruction", nargs="?", help="the instruction, e.g. \"open the drawer\"")
    parser.add_argument("--wait", action="store_true", help="print status updates until the task ends")
    parser.add_argument("--stop", action="store_true", help="call the stop service (hold, publish nothing)")
    parser.add_argument("--resume", action="store_true", help="call the resume service")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the graph / the task")
    # The names default to the launch config's (ghil/configs/launch.yaml, `ros.*`), the one place they are set.
    parser.add_argument("--topic", help="default: ros.instruction_topic")
    parser.add_argument("--status-topic", help="default: ros.status_topic")
    parser.add_argument("--stop-service", help="default: ros.stop_service")
    parser.add_argument("--resume-service", help="default: ros.resume_service")
    args = parser.parse_args(argv)
    if sum([bool(args.instruction), args.stop, args.resume]) != 1:
        parser.error("give one instruction, or --stop, or --resume")
    from ros_nodes.launch import compose_launch_config

    ros = compose_launch_config([]).ros
    for name, key in (("topic", "instruction_topic"), ("status_topic", "status_topic"),
                      ("stop_service", "stop_service"), ("resume_service", "resume_service")):
        if getattr(args, name) is None:
            setattr(args, name, str(ros[key]))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from ros_nodes.common import LATCHED, STATUS, ros_environment_defaults

    ros_environment_defaults()
    context = rclpy.Context()
    rclpy.init(context=context, signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    node = rclpy.create_node("ghil_say", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        if args.stop or args.resume:
            client = node.create_client(Trigger, args.stop_service if args.stop else args.resume_service)
            if not client.wait_for_service(timeout_sec=args.timeout):
                print(f"ghil say: no graph offers {client.srv_name} (is `ghil launch` running, same "
                      "ROS_DOMAIN_ID?)", file=sys.stderr)
                return 3
            future = client.call_async(Trigger.Request())
            executor.spin_until_future_complete(future, timeout_sec=args.timeout)
            result = future.result()
            print(result.message if result is not None else "no answer")
            return 0 if result is not None and result.success else 1
        statuses: list[dict] = []

        def on_status(msg: String) -> None:
            try:
                statuses.append(json.loads(msg.data))
            except ValueError:
                pass

        node.create_subscription(String, args.status_topic, on_status, STATUS)
        pub = node.create_publisher(String, args.topic, LATCHED)
        deadline = time.monotonic() + args.timeout
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        if pub.get_subscription_count() == 0:
            print(f"ghil say: nothing subscribes to {args.topic} (is `ghil launch` running, same ROS_DOMAIN_ID?)",
                  file=sys.stderr)
            return 3
        # The task id before ours: the first status (latched) tells it; allow a moment for it to arrive.
        settle = time.monotonic() + 1.0
        while not statuses and time.monotonic() < settle:
            executor.spin_once(timeout_sec=0.05)
        before = statuses[-1].get("task_id", 0) if statuses else 0
        rejected_before = statuses[-1].get("n_rejected", 0) if statuses else 0
        pub.publish(String(data=args.instruction))
        if not args.wait:
            end = time.monotonic() + 1.0  # keep the latched message up until the graph has it
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=0.05)
                if statuses and (statuses[-1].get("task_id", 0) > before
                                 or statuses[-1].get("n_rejected", 0) > rejected_before):
                    break
            print(f"sent: {args.instruction}")
            return 0
        printed = None
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
            if not statuses:
                continue
            status = statuses[-1]
            if status.get("n_rejected", 0) > rejected_before and status.get("task_id", 0) == before:
                print(f"rejected: {status.get('rejected')}")
                return 2
            if status.get("task_id", 0) <= before:
                continue
            line = f"{status['state']}: {status.get('message') or ''}".rstrip(": ")
            if line != printed:
                print(line, flush=True)
                printed = line
            if status["state"] in TERMINAL:
                verdict = status.get("verdict") or {}
                print(json.dumps({"state": status["state"], "verdict": verdict,
                                  "first_command_latency_s": status.get("first_command_latency_s"),
                                  "chunks": status.get("chunks")}))
                ok = status["state"] == "done" and verdict.get("success") is not False
                return 0 if ok else 1
        print(f"ghil say: no end of the task within {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        executor.shutdown(timeout_sec=2)
        node.destroy_node()
        rclpy.try_shutdown(context=context)


if __name__ == "__main__":
    sys.exit(main())
