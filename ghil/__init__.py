"""ghil: hierarchical language-to-robot planning (reasoner -> subgoal -> filter -> policy -> ROS 2)."""

__version__ = "0.1.0"
