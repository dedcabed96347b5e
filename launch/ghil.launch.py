"""ros2 launch ghil ghil.launch.py [robot:=sim] [agent:=ghil_glue_tokens] [overrides:="ros.robot_model=fr3 ..."]

The same graph `ghil launch` starts, for a colcon workspace with the full ROS 2 (launch, launch_ros): one process per
role through the `ghil_node` executable, each composing ghil's launch config (ghil/configs/launch.yaml) from the
same Hydra overrides, so there is one source of parameters; `--ros-args` parameters (a params file below) override
the nodes' ROS parameters on top. A pip-only install has no `launch` package: use `ghil launch` there.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _nodes(context):
    robot = LaunchConfiguration("robot").perform(context)
    agent = LaunchConfiguration("agent").perform(context)
    extra = LaunchConfiguration("overrides").perform(context).split()
    params = LaunchConfiguration("params_file").perform(context)
    common = [f"robot={robot}", f"agent={agent}", *extra]
    roles = ["policy", "subgoals"] + (["sim"] if robot == "sim" else [])
    return [Node(package="ghil", executable="ghil_node", name=f"ghil_{role}", output="screen",
                 arguments=[*common, f"nodes=[{role}]"], parameters=[params] if params else [])
            for role in roles]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("robot", default_value="real", description="real (ros2_control) or sim (playtable)"),
        DeclareLaunchArgument("agent", default_value="ghil_glue_tokens", description="ghil agent config"),
        DeclareLaunchArgument("overrides", default_value="", description="more Hydra overrides, space separated"),
        DeclareLaunchArgument("params_file", default_value="", description="ROS parameters file for the nodes"),
        OpaqueFunction(function=_nodes),
    ])
