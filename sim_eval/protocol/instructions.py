"""What the agent is told in each evaluation mode, and the reverse map from an instruction to its task.

Modes:

* ``standard``: CALVIN's protocol; subtask ``k`` gets ``val_annotations[task][0]``.
* ``heldout_phrasings``: each instruction is replaced by one of the task's held-out paraphrases (never used in
  training), drawn with the chain's seed, so the same chain always gets the same wording.
* ``long_horizon``: every subtask of the chain gets one composite instruction naming all five, in order
  (``"<i1>, then <i2>, then ..."``), for agents that decompose instructions themselves. The agent is reset only at
  the chain's start, so it is not told where one subtask ends; the oracle still checks each subtask in turn.

Usage::

    chain_instructions(("open_drawer", ...), "standard", rng)   # ['pull the handle to open the drawer', ...]
    split_composite(compose_instructions(["a", "b"]))             # ['a', 'b']
    InstructionIndex().task_for("open the drawer")                # 'open_drawer'
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence

import numpy as np

from sim_eval.protocol.tasks import TASK_NAMES, eval_instruction, heldout_phrasings, train_phrasings

MODES = ("standard", "heldout_phrasings", "long_horizon")
COMPOSITE_SEPARATOR = ", then "


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def compose_instructions(parts: Sequence[str]) -> str:
    """Join subtask instructions into one composite instruction (the long-horizon mode's wording)."""
    for part in parts:
        if COMPOSITE_SEPARATOR in part:
            raise ValueError(f"instruction {part!r} contains the composite separator {COMPOSITE_SEPARATOR!r}")
    return COMPOSITE_SEPARATOR.join(parts)


def split_composite(text: str) -> list[str]:
    """The subtask instructions of a composite instruction (a plain instruction gives a one-item list)."""
    return [part.strip() for part in text.split(COMPOSITE_SEPARATOR)]


def chain_instructions(tasks: Sequence[str], mode: str, rng: np.random.Generator) -> list[str]:
    """The instruction given for each subtask of a chain in ``mode``."""
    check_mode(mode)
    if mode == "standard":
        return [eval_instruction(t) for t in tasks]
    if mode == "heldout_phrasings":
        return [str(rng.choice(heldout_phrasings(t))) for t in tasks]
    composite = compose_instructions([eval_instruction(t) for t in tasks])
    return [composite] * len(tasks)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(".").casefold())


class UnknownInstructionError(ValueError):
    """An instruction that matches no known phrasing of any of the 34 tasks."""


@functools.lru_cache(maxsize=1)
def _phrasing_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for task in TASK_NAMES:
        for text in (eval_instruction(task), *train_phrasings(task), *heldout_phrasings(task)):
            key = _normalise(text)
            if table.get(key, task) != task:
                raise ValueError(f"phrasing {text!r} is ambiguous: tasks {table[key]} and {task}")
            table[key] = task
    return table


class InstructionIndex:
    """Maps any known phrasing (evaluation, training or held-out; case and spacing ignored) to its task."""

    def __init__(self) -> None:
        self._table = _phrasing_table()

    def task_for(self, instruction: str) -> str:
        key = _normalise(instruction)
        if key in self._table:
            return self._table[key]
        close = difflib.get_close_matches(key, self._table, n=2, cutoff=0.7)
        hint = f"; closest known phrasings: {close}" if close else ""
        raise UnknownInstructionError(f"no task has the phrasing {instruction!r}{hint}")

    def tasks_for(self, instruction: str) -> list[str]:
        """The tasks named by a (possibly composite) instruction, in order."""
        return [self.task_for(part) for part in split_composite(instruction)]
