"""Evaluation under CALVIN's protocol: ``ghil eval`` (``evaluate.py``: resumable, sharded runs), the per-chain loop
(``rollout.py``), records, metrics, reports and videos, the evaluation agents (``agents.py``), the adapter between
CALVIN observations and ghil's typed stages (``adapter.py``) and the privileged oracle subgoals
(``oracle_goals.py``)."""
