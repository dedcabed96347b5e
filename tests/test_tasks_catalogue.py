"""The task catalogue: official names and order, categories, evaluation instructions, phrasings, name checking."""

import re
from pathlib import Path

import pytest
import yaml

from sim_eval.protocol import tasks

DATA = Path(tasks.__file__).parent / "data"

# Protocol §2 table, written out independently of the module's derivation rule.
EXPECTED_CATEGORIES = {
    **{f"{verb}_{c}_block_{side}": 1 for verb in ("rotate", "push") for c in ("red", "blue", "pink")
       for side in ("right", "left")},
    "move_slider_left": 2, "move_slider_right": 2,
    "open_drawer": 3, "close_drawer": 3,
    **{f"lift_{c}_block_table": 4 for c in ("red", "blue", "pink")},
    **{f"lift_{c}_block_slider": 5 for c in ("red", "blue", "pink")},
    **{f"lift_{c}_block_drawer": 6 for c in ("red", "blue", "pink")},
    "place_in_slider": 7, "place_in_drawer": 7,
    "turn_on_lightbulb": 8, "turn_off_lightbulb": 8, "turn_on_led": 8, "turn_off_led": 8,
    "push_into_drawer": 9, "stack_block": 10, "unstack_block": 11,
}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def test_task_names_are_the_34_in_official_yaml_order():
    oracle_yaml = yaml.safe_load((DATA / "new_playtable_tasks.yaml").read_text())
    assert tasks.TASK_NAMES == tuple(oracle_yaml["tasks"])
    assert len(tasks.TASK_NAMES) == len(set(tasks.TASK_NAMES)) == 34
    assert tasks.TASK_NAMES[:2] == ("rotate_red_block_right", "rotate_red_block_left")
    assert tasks.TASK_NAMES[-1] == "push_into_drawer"


def test_validation_yaml_covers_exactly_the_catalogue():
    annotations = yaml.safe_load((DATA / "new_playtable_validation.yaml").read_text())
    assert set(annotations) == set(tasks.TASK_NAMES)


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_category_matches_protocol_table(name):
    assert tasks.task_category(name) == EXPECTED_CATEGORIES[name]


def test_eleven_categories_with_protocol_sizes():
    sizes = {c: sum(tasks.task_category(n) == c for n in tasks.TASK_NAMES) for c in range(1, 12)}
    assert sizes == {1: 12, 2: 2, 3: 2, 4: 3, 5: 3, 6: 3, 7: 2, 8: 4, 9: 1, 10: 1, 11: 1}
    assert set(tasks.CATEGORY_NAMES) == set(range(1, 12))


@pytest.mark.parametrize(
    "name, instruction",
    [
        ("rotate_red_block_right", "take the red block and rotate it to the right"),
        ("push_pink_block_left", "go push the pink block left"),
        ("move_slider_left", "push the sliding door to the left side"),
        ("open_drawer", "pull the handle to open the drawer"),
        ("lift_blue_block_slider", "lift the blue block from the sliding cabinet"),
        ("lift_red_block_drawer", "Take the red block from the drawer"),  # capital T is in the original
        ("place_in_drawer", "store the grasped block in the drawer"),
        ("push_into_drawer", "slide the block that it falls into the drawer"),
        ("unstack_block", "remove the stacked block"),
        ("turn_off_led", "press the button to turn off the led light"),
    ],
)
def test_eval_instruction_is_the_validation_string(name, instruction):
    assert tasks.eval_instruction(name) == instruction


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_phrasings_are_enough_distinct_and_never_the_eval_instruction(name):
    train, heldout = tasks.train_phrasings(name), tasks.heldout_phrasings(name)
    assert len(train) >= 6 and len(heldout) >= 2
    train_n, heldout_n = {_normalise(p) for p in train}, {_normalise(p) for p in heldout}
    assert len(train_n) == len(train) and len(heldout_n) == len(heldout)
    assert not train_n & heldout_n, "a held-out phrasing is also used for training"
    assert _normalise(tasks.eval_instruction(name)) not in train_n | heldout_n
    assert all(isinstance(p, str) and p.strip() for p in train + heldout)


@pytest.mark.parametrize("name", [n for n in tasks.TASK_NAMES if "_block_" in n and n.split("_")[1] in
                                  ("red", "blue", "pink")])
def test_block_phrasings_name_the_right_colour_only(name):
    colour = name.split("_")[1]
    others = {"red", "blue", "pink"} - {colour}
    for phrase in tasks.train_phrasings(name) + tasks.heldout_phrasings(name):
        words = set(re.findall(r"[a-z]+", phrase.lower()))
        assert colour in words and not words & others, phrase


def test_phrasings_file_lists_the_catalogue_in_order():
    raw = yaml.safe_load((DATA / "lang_phrasings.yaml").read_text())
    assert tuple(raw) == tasks.TASK_NAMES
    assert all(set(entry) == {"train", "heldout"} for entry in raw.values())


def test_check_task_name_accepts_known_names():
    assert tasks.check_task_name("open_drawer") == "open_drawer"


def test_unknown_name_error_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown CALVIN task name 'open_drawr'.*'open_drawer'"):
        tasks.check_task_name("open_drawr")
    with pytest.raises(ValueError, match="lift_red_block_table"):
        tasks.check_task_name("lift_red_block_tabel")


def test_unknown_name_without_close_match_lists_the_tasks():
    with pytest.raises(ValueError, match="known tasks: rotate_red_block_right"):
        tasks.check_task_name("make_coffee")


@pytest.mark.parametrize("bad", [None, 3, "", "OPEN_DRAWER"])
def test_non_task_values_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown CALVIN task name"):
        tasks.check_task_name(bad)


@pytest.mark.parametrize(
    "accessor", [tasks.task_category, tasks.eval_instruction, tasks.train_phrasings, tasks.heldout_phrasings]
)
def test_every_accessor_rejects_unknown_names(accessor):
    with pytest.raises(ValueError, match="did you mean 'turn_on_led'"):
        accessor("turn_on_leds")
