"""Network building blocks shared by every learned stage (policy now; subgoal generator, filter and reasoner
next): the GroupNorm ResNet image encoder and frozen text encoders (``encoders.py``) and the image augmentation
with its de-synchronised mode (``augment.py``). Whole models live in ``policies/`` and ``planners/``."""
