"""Simulation and evaluation: the embedded CALVIN playtable, the task oracle, the scripted expert, data
collection, the real calvin_env bridge and the CALVIN evaluation protocol."""
