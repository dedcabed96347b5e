"""The action-chunk queue shared by the sim harness, the ROS node and the async runner.

Vocabulary: ``chunk_len`` actions are predicted from the observation at step ``t0``; ``exec_len`` of them run
before the policy is asked again::

    step     0   1   2   3   4   5   6   7
    chunk    a0  a1  a2  a3  a4  a5  a6  a7      chunk_len = 8, predicted at step 0
    run      a0  a1  a2  a3 |replan               exec_len = 4; the next chunk has t0 = 4

With temporal ensembling (ACT, SuSIE's CALVIN policy) the policy is asked every ``exec_len`` steps (usually 1) and
the action for the current step is a weighted mean of every stored chunk's prediction for that step, with weight
``exp(-ensemble_decay * i)`` for the i-th oldest prediction (0 = uniform mean). Gripper commands are binarised to
exactly +-1 after averaging. ``clear()`` forgets everything: call it on episode reset, new instruction, newly
accepted subgoal (unless ensembling across subgoals is wanted) and e-stop.

Usage::

    queue = ChunkQueue(exec_len=8)
    if queue.empty():
        queue.push(policy.predict_chunk(obs, goal))
    action = queue.pop()            # (action_dim,) in robot units
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from ghil.types import ActionChunk, binarize_gripper


@dataclass
class _Stored:
    t0: int
    actions: Tensor  # (chunk_len, d)


class ChunkQueue:
    """Receding-horizon execution of action chunks, with optional temporal ensembling.

    ``exec_len``: actions taken from each chunk before ``empty()`` asks for a new one (1 <= exec_len).
    ``ensemble_decay``: None runs chunks open-loop; a float >= 0 averages overlapping predictions.
    ``gripper_index``: the column to binarise after averaging (None: leave actions as they are).
    """

    def __init__(self, exec_len: int, ensemble_decay: float | None = None, gripper_index: int | None = None):
        if not isinstance(exec_len, int) or exec_len < 1:
            raise ValueError(f"exec_len must be a positive int, got {exec_len!r}")
        if ensemble_decay is not None and not (ensemble_decay >= 0 and math.isfinite(ensemble_decay)):
            raise ValueError(f"ensemble_decay must be None or a finite float >= 0, got {ensemble_decay!r}")
        self.exec_len = exec_len
        self.ensemble_decay = ensemble_decay
        self.gripper_index = gripper_index
        self._chunks: deque[_Stored] = deque()
        self._t = 0  # control step of the next pop()
        self._since_push = 0  # pops since the last push
        self.n_pushed = 0  # chunks received since construction (not reset by clear(); for tests and stats)

    # -- state --------------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every stored chunk; the next ``empty()`` is True."""
        self._chunks.clear()
        self._since_push = 0

    def empty(self) -> bool:
        """True when the policy must be asked: nothing stored covers the next step, or exec_len steps have run."""
        if not self._chunks:
            return True
        if self._since_push >= self.exec_len:
            return True
        newest = self._chunks[-1]
        return self._t - newest.t0 >= len(newest.actions)

    def __len__(self) -> int:
        """Actions left in the newest chunk before a replan is due."""
        if not self._chunks:
            return 0
        newest = self._chunks[-1]
        return max(0, min(self.exec_len - self._since_push, len(newest.actions) - (self._t - newest.t0)))

    # -- push / pop ---------------------------------------------------------------------------------------------

    def push(self, chunk: ActionChunk) -> None:
        """Store a new chunk; execution continues from its first action (its ``t0`` becomes the current step)."""
        actions = chunk.actions.detach()
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"chunk actions must be (chunk_len >= 1, d), got {tuple(actions.shape)}")
        if self._chunks and actions.shape[1] != self._chunks[-1].actions.shape[1]:
            raise ValueError(f"chunk action_dim {actions.shape[1]} differs from the queued chunks' "
                             f"{self._chunks[-1].actions.shape[1]}")
        if not torch.isfinite(actions).all():
            raise ValueError("refusing a chunk with NaN/inf actions")
        if self.ensemble_decay is None:
            self._chunks.clear()  # open loop: only the newest chunk matters
        self._t = int(chunk.t0)
        self._chunks.append(_Stored(int(chunk.t0), actions))
        # Chunks that cannot cover the current step any more are dropped.
        while self._chunks and self._t - self._chunks[0].t0 >= len(self._chunks[0].actions):
            self._chunks.popleft()
        self._since_push = 0
        self.n_pushed += 1

    def pop(self) -> Tensor:
        """The action for the current step, (action_dim,); advances the step. RuntimeError when nothing covers it."""
        covering = [c for c in self._chunks if 0 <= self._t - c.t0 < len(c.actions)]
        if not covering:
            raise RuntimeError("ChunkQueue.pop() with no chunk covering the current step: push a chunk first "
                               "(check empty() before pop())")
        if self.ensemble_decay is None or len(covering) == 1:
            action = covering[-1].actions[self._t - covering[-1].t0]
        else:
            preds = torch.stack([c.actions[self._t - c.t0] for c in covering])  # oldest first, (n, d)
            weights = torch.exp(-self.ensemble_decay * torch.arange(len(covering), dtype=preds.dtype))
            action = (weights[:, None] * preds).sum(0) / weights.sum()
        if self.gripper_index is not None:
            action = binarize_gripper(action, self.gripper_index)
        self._t += 1
        self._since_push += 1
        while self._chunks and self._t - self._chunks[0].t0 >= len(self._chunks[0].actions):
            self._chunks.popleft()
        return action.clone()
