"""CALVIN's protocol: the 34 tasks and their success oracle (``tasks.py``, ``oracle.py``), the symbolic initial
states (``initial_states.py``), the official 1000 evaluation chains (``chains.py``) and the instructions with their
phrasings (``instructions.py``); the data files it reads live in ``data/``."""
