"""The ECoT text format (planners/ecot_format.py): round trips, and every malformed field reported by name."""

from __future__ import annotations

import pytest

from ghil.types import Reasoning
from planners.ecot_format import ReasoningParseError, parse_reasoning, prefix, render_reasoning

SIZE = (200, 200)
GOOD = Reasoning(task="open the drawer, then lift the red block", plan=("open the drawer", "lift the red block"),
                 visible_objects={"drawer handle": (12, 90, 40, 104), "red block": (100, 60, 118, 78)},
                 subtask_reasoning="the drawer is closed.", subtask="open the drawer",
                 move_reasoning="the handle is left of the gripper.", move="move left down",
                 gripper_position=((120, 80), (110, 88), (101, 97), (93, 106), (88, 112)))
VOCAB = ("open the drawer", "lift the red block")


def test_render_then_parse_is_the_identity():
    text = render_reasoning(GOOD)
    assert text.startswith("TASK: open the drawer, then lift the red block. PLAN: 1. open the drawer. 2. lift")
    assert parse_reasoning(text, SIZE, VOCAB) == GOOD
    # A reasoning without a subtask, a move or gripper points is rendered, but not accepted back as a full one.
    problems = _problems(render_reasoning(Reasoning(task="stop")))
    assert {p.split(":")[0] for p in problems} == {"SUBTASK", "MOVE", "GRIPPER POSITION"}


def test_action_tokens_and_whitespace_are_tolerated_but_nothing_is_shifted():
    text = render_reasoning(GOOD).replace(" SUBTASK:", "\n  SUBTASK:") + " ACTION: <a1> <a2>"
    assert parse_reasoning(text, SIZE) == GOOD


def _problems(text, **kw) -> list[str]:
    with pytest.raises(ReasoningParseError) as info:
        parse_reasoning(text, **kw)
    return info.value.problems


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace("[12, 90, 40, 104]", "[12, 90, 40]"), "VISIBLE OBJECTS: 'drawer handle' needs 4"),
    (lambda t: t.replace("[12, 90, 40, 104]", "[50, 90, 40, 104]"), "x0 > x1"),
    (lambda t: t.replace("[100, 60, 118, 78]", "[100, 60, 218, 78]"), "outside the 200x200"),
    (lambda t: t.replace("[120, 80, 110", "[120, 80, 110, 5"), "GRIPPER POSITION: needs an even"),
    (lambda t: t.replace("[120, 80,", "[520, 80,"), "GRIPPER POSITION: [(520.0, 80.0)] outside"),
    (lambda t: t.replace("GRIPPER POSITION: [", "GRIPPER POSITION: ("), "expected a bracketed list"),
    (lambda t: t.replace(" MOVE: move left down.", ""), "missing tags ['MOVE']"),
    (lambda t: t + " SUBTASK: again", "SUBTASK: appears more than once"),
    (lambda t: t.replace("SUBTASK: open the drawer.", "SUBTASK: open the fridge."), "not a known subtask"),
    (lambda t: t.replace("2. lift the red block.", "2. dance."), "PLAN: unknown steps ['dance']"),
    (lambda t: "Sure! " + t, "text before TASK"),
    (lambda t: t.replace("MOVE: move left down.", "MOVE:"), "MOVE: empty"),
])
def test_each_malformed_field_is_named(edit, field):
    problems = _problems(edit(render_reasoning(GOOD)), image_size=SIZE, subtasks=VOCAB)
    assert any(field in p for p in problems), problems


def test_order_and_garbage():
    text = render_reasoning(GOOD)
    swapped = text.replace("TASK: open the drawer, then lift the red block. ", "") + " TASK: late"
    assert any("out of order" in p for p in _problems(swapped))
    for garbage in ("", "hello there", "\x00\x01", "TASK"):
        assert _problems(garbage)
    assert _problems(b"TASK: x")[0].startswith("not text")


def test_partial_reasonings_stop_after_a_tag_in_order():
    text = render_reasoning(GOOD, stop_after="SUBTASK")
    assert text.endswith("SUBTASK: open the drawer.")
    r = parse_reasoning(text, SIZE, require_all=False)
    assert r.subtask == "open the drawer" and r.move == "" and r.gripper_position == ()
    with pytest.raises(ReasoningParseError, match="missing tags"):
        parse_reasoning(text, SIZE)
    holey = text.replace(" PLAN: 1. open the drawer. 2. lift the red block.", "")
    assert any("missing tags ['PLAN'] before SUBTASK" in p for p in _problems(holey, require_all=False))


def test_the_frozen_prefix_ends_before_move_reasoning():
    text = render_reasoning(GOOD)
    head = prefix(text)
    assert head.endswith("SUBTASK: open the drawer. ") and "MOVE" not in head
    assert parse_reasoning(head + text[len(head):], SIZE) == GOOD
    with pytest.raises(ValueError):
        prefix("TASK: x. SUBTASK: y.")


LABEL = {"task": "close the drawer", "plan": ["close the drawer", "pull out the drawer"],
         "subtask": "reach above handle", "move": "close gripper", "gripper_position": [57.3, 103.1],
         "future_gripper_positions": [[57.3, 103.1], [58.4, 114.3], [59.6, 128.3]], "gripper": "closed",
         "visible_objects": {"blue block": [62, 62, 79, 80], "drawer handle": [69, 159, 122, 199]},
         "task_name": "close_drawer"}


def test_a_collected_label_becomes_a_well_formed_training_target():
    from planners.ecot_format import reasoning_from_label

    r = reasoning_from_label(LABEL, instruction="close the drawer, then pull out the drawer")
    assert r.subtask == "close the drawer" and r.task.startswith("close the drawer, then")
    assert r.plan == ("close the drawer", "pull out the drawer") and r.move == "close gripper"
    assert reasoning_from_label(LABEL).plan == ("close the drawer",)  # the episode's later tasks were not asked for
    assert r.gripper_position[1] == (58.0, 114.0) and r.visible_objects["drawer handle"] == (69, 159, 122, 199)
    assert "reach above handle" in r.subtask_reasoning
    text = render_reasoning(r)
    assert parse_reasoning(text, SIZE, subtasks=LABEL["plan"]) == r  # the target text parses back exactly
    with pytest.raises(ValueError, match="not an ECoT label"):
        reasoning_from_label({"plan": []})
    # A future position below the frame (the gripper leaving the view) is clamped to the border.
    low = dict(LABEL, future_gripper_positions=[[57.3, 103.1], [71.4, 204.6]])
    with pytest.raises(ReasoningParseError, match="outside"):
        parse_reasoning(render_reasoning(reasoning_from_label(low)), SIZE)
    clamped = reasoning_from_label(low, image_size=SIZE)
    assert clamped.gripper_position[-1] == (71.0, 199.0) and parse_reasoning(render_reasoning(clamped), SIZE) == clamped
