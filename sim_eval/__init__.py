"""The simulator side of ghil, the only code that may read privileged simulator state:

* ``world/``           the embedded playtable and the real calvin_env bridge (pybullet)
* ``protocol/``        CALVIN's tasks, oracle, initial states, official chains and instructions
* ``demonstrations/``  the scripted expert, play episodes, reasoning labels, ``ghil collect``
* ``evaluation/``      ``ghil eval``: the rollout loop, records, metrics, reports, videos and evaluation agents
"""
