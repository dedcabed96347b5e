"""The worlds an agent acts in: the embedded CALVIN-compatible playtable (``playtable/``), the bridge to the real
calvin_env (``calvin_bridge.py``), the fixed scene layout both share (``layout.py``) and the action validation at
the env boundary (``action_validation.py``)."""
