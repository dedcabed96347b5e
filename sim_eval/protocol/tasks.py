"""The catalogue of CALVIN's 34 tasks: names, chain-generator categories, instructions and phrasings.

The task order is CALVIN's official one: the order of ``new_playtable_tasks.yaml`` (the oracle's task ids), which
is also the key order of the chain generator in ``multistep_sequences.py``. The evaluation instruction of a task is
``val_annotations[task][0]`` from ``new_playtable_validation.yaml``; training and held-out phrasings live in
``data/lang_phrasings.yaml`` and never contain the evaluation wording, so the evaluation instruction stays unseen.

Usage::

    from sim_eval.protocol import tasks
    tasks.TASK_NAMES[0]                      # 'rotate_red_block_right'
    tasks.task_category("open_drawer")       # 3
    tasks.eval_instruction("open_drawer")    # 'pull the handle to open the drawer'
    tasks.train_phrasings("open_drawer")     # ('open the drawer', ...)
    tasks.check_task_name("open_drawr")      # ValueError: ... did you mean 'open_drawer'?
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources

import yaml

# Official order (oracle task ids and generator key order); see the module docstring.
TASK_NAMES: tuple[str, ...] = (
    "rotate_red_block_right",
    "rotate_red_block_left",
    "rotate_blue_block_right",
    "rotate_blue_block_left",
    "rotate_pink_block_right",
    "rotate_pink_block_left",
    "push_red_block_right",
    "push_red_block_left",
    "push_blue_block_right",
    "push_blue_block_left",
    "push_pink_block_right",
    "push_pink_block_left",
    "move_slider_left",
    "move_slider_right",
    "open_drawer",
    "close_drawer",
    "lift_red_block_table",
    "lift_red_block_slider",
    "lift_red_block_drawer",
    "lift_blue_block_table",
    "lift_blue_block_slider",
    "lift_blue_block_drawer",
    "lift_pink_block_table",
    "lift_pink_block_slider",
    "lift_pink_block_drawer",
    "place_in_slider",
    "place_in_drawer",
    "stack_block",
    "unstack_block",
    "turn_on_lightbulb",
    "turn_off_lightbulb",
    "turn_on_led",
    "turn_off_led",
    "push_into_drawer",
)

# Chain-generator categories: a valid evaluation chain draws its 5 tasks from 5 distinct categories.
CATEGORY_NAMES: dict[int, str] = {
    1: "rotate_or_push",
    2: "slider",
    3: "drawer",
    4: "lift_table",
    5: "lift_slider",
    6: "lift_drawer",
    7: "place",
    8: "lights",
    9: "push_into_drawer",
    10: "stack",
    11: "unstack",
}


def _category_of(name: str) -> int:
    """Derive a task's category from its name (the rule behind CALVIN's hand-written table)."""
    if name.startswith(("rotate_", "push_")) and name != "push_into_drawer":
        return 1
    if name.startswith("move_slider_"):
        return 2
    if name in ("open_drawer", "close_drawer"):
        return 3
    if name.startswith("lift_"):
        return {"table": 4, "slider": 5, "drawer": 6}[name.rsplit("_", 1)[1]]
    if name.startswith("place_in_"):
        return 7
    if name.startswith("turn_"):
        return 8
    return {"push_into_drawer": 9, "stack_block": 10, "unstack_block": 11}[name]


TASK_CATEGORIES: dict[str, int] = {name: _category_of(name) for name in TASK_NAMES}

_DATA_PACKAGE = "sim_eval.protocol"
VALIDATION_FILE = "new_playtable_validation.yaml"
PHRASINGS_FILE = "lang_phrasings.yaml"


def check_task_name(name: str) -> str:
    """Return ``name`` if it is one of the 34 CALVIN tasks, else raise a ``ValueError`` suggesting close matches."""
    if isinstance(name, str) and name in TASK_CATEGORIES:
        return name
    close = difflib.get_close_matches(str(name), TASK_NAMES, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known tasks: {', '.join(TASK_NAMES)}"
    raise ValueError(f"unknown CALVIN task name {name!r}; {hint}")


def task_category(name: str) -> int:
    """The chain-generator category (1..11) of a task."""
    return TASK_CATEGORIES[check_task_name(name)]


def _read_data_yaml(filename: str) -> dict:
    text = resources.files(_DATA_PACKAGE).joinpath("data", filename).read_text(encoding="utf-8")
    return yaml.safe_load(text)


@functools.lru_cache(maxsize=None)
def _eval_instructions() -> dict[str, str]:
    annotations = _read_data_yaml(VALIDATION_FILE)
    missing = set(TASK_NAMES) - set(annotations)
    if missing:
        raise ValueError(f"{VALIDATION_FILE} lacks tasks: {sorted(missing)}")
    return {name: annotations[name][0] for name in TASK_NAMES}


def eval_instruction(name: str) -> str:
    """The official evaluation instruction, ``val_annotations[name][0]`` (wording and capitals kept verbatim)."""
    return _eval_instructions()[check_task_name(name)]


@functools.lru_cache(maxsize=None)
def _phrasings() -> dict[str, dict[str, tuple[str, ...]]]:
    raw = _read_data_yaml(PHRASINGS_FILE)
    for name in raw:
        check_task_name(name)
    missing = set(TASK_NAMES) - set(raw)
    if missing:
        raise ValueError(f"{PHRASINGS_FILE} lacks tasks: {sorted(missing)}")
    return {name: {split: tuple(raw[name][split]) for split in ("train", "heldout")} for name in TASK_NAMES}


def train_phrasings(name: str) -> tuple[str, ...]:
    """Paraphrases of the task for training; none equals the evaluation instruction or a held-out phrasing."""
    return _phrasings()[check_task_name(name)]["train"]


def heldout_phrasings(name: str) -> tuple[str, ...]:
    """Paraphrases never used in training, for the "held-out phrasings" evaluation mode."""
    return _phrasings()[check_task_name(name)]["heldout"]
