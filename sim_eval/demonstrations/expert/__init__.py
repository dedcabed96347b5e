"""The scripted expert: solves every CALVIN task from any feasible state using only robot_obs, scene_obs and the
fixed scene layout, emitting 7-D relative actions plus the name of its current phase.

Usage::

    expert = ScriptedExpert()
    expert.reset("open_drawer")
    action, phase = expert.act(obs["robot_obs"], obs["scene_obs"])
"""

from sim_eval.demonstrations.expert.agent import ScriptedExpert, plan_for
from sim_eval.demonstrations.expert.plans import held_block, task_feasible

__all__ = ["ScriptedExpert", "plan_for", "task_feasible", "held_block"]
