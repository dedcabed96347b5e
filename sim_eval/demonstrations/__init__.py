"""Demonstrations: the scripted expert (``expert/``), reset-free play episodes (``play.py``), ECoT reasoning labels
(``labels.py``) and ``ghil collect`` (``collect.py``), which writes them in CALVIN's on-disk format."""
