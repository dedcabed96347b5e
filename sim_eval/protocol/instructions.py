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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ghil.types import COMPOSITE_SEPARATOR
from sim_eval.protocol.tasks import TASK_NAMES, check_task_name, eval_instruction, heldout_phrasings, train_phrasings

MODES = ("standard", "heldout_phrasings", "long_horizon")


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


def chain_instructions(tasks: Sequence[str], mode: str, rng: np.random.Generator,
                       phrasings: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The instruction given for each subtask of a chain in ``mode``. ``phrasings`` (``load_phrasings``: a user's
    task -> instructions table) replaces the mode's wording for the tasks it lists, one seeded choice per subtask;
    tasks it does not list keep the mode's wording. In long-horizon mode the chosen parts are composed."""
    check_mode(mode)
    phrasings = phrasings or {}

    def wording(task: str) -> str:
        if task in phrasings:
            return str(rng.choice(list(phrasings[task])))
        if mode == "heldout_phrasings":
            return str(rng.choice(heldout_phrasings(task)))
        return eval_instruction(task)

    parts = [wording(t) for t in tasks]
    if mode == "long_horizon":
        return [compose_instructions(parts)] * len(tasks)
    return parts


MAX_PHRASING_CHARS = 512


def load_phrasings(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A user's phrasings file (YAML: task name -> list of instructions), checked: known task names, non-empty lists
    of non-empty strings of at most 512 characters without the composite separator. ValueError naming the entry."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"eval.phrasings: no file {str(file)!r} (a YAML mapping: task name -> list of instructions)")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"eval.phrasings: {file} is not readable YAML: {err}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"eval.phrasings: {file} must map task names to lists of instructions, got "
                         f"{type(raw).__name__}")
    table: dict[str, tuple[str, ...]] = {}
    for task, texts in raw.items():
        try:
            check_task_name(task)
        except ValueError as err:
            raise ValueError(f"eval.phrasings: {err}") from None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts:
            raise ValueError(f"eval.phrasings: {task} needs a non-empty list of instructions, got {texts!r}")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"eval.phrasings: {task} has an empty or non-text instruction {text!r}")
            if len(text) > MAX_PHRASING_CHARS or COMPOSITE_SEPARATOR in text:
                raise ValueError(f"eval.phrasings: {task}: {text[:40]!r}... is longer than {MAX_PHRASING_CHARS} "
                                 f"characters or contains {COMPOSITE_SEPARATOR!r}")
        table[task] = tuple(" ".join(t.split()) for t in texts)
    return table


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
