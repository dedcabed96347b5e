"""The Embodied-Chain-of-Thought text format: a strict parser into ``ghil.types.Reasoning`` and a renderer back.

The eight tags come in their fixed order (``ghil.types.ECOT_TAGS``)::

    TASK: open the drawer. PLAN: 1. open the drawer. VISIBLE OBJECTS: drawer handle [12, 90, 40, 104], red block
    [100, 60, 118, 78] SUBTASK REASONING: the drawer is closed. SUBTASK: open the drawer. MOVE REASONING: the handle
    is left of the gripper. MOVE: move left down. GRIPPER POSITION: [120, 80, 110, 88, 101, 97, 93, 106, 88, 112]

The parser is one regex over the tag alternation (longer tags first: SUBTASK REASONING before SUBTASK, MOVE
REASONING before MOVE), then checks every field: each tag exactly once and in order, boxes of 4 integers inside
the image with x0 <= x1 and y0 <= y1, an even count of gripper integers inside the image, and (when a vocabulary is
given) a SUBTASK and PLAN steps from the known tasks. Every problem is reported, by field, in one
``ReasoningParseError`` (``.problems``); nothing is silently shifted or dropped, unlike the released parser. A
trailing ``ACTION:`` part (ECoT's action tokens) is ignored. ``prefix(text)`` gives the frozen high-level prefix
(up to and without `` MOVE REASONING:``) ECoT's prompt freezing re-uses between full reasonings.

Usage::

    reasoning = parse_reasoning(text, image_size=(200, 200), subtasks=known_instructions)
    text = render_reasoning(reasoning)           # parse_reasoning(render_reasoning(r)) == r
"""

from __future__ import annotations

import re
from collections.abc import Collection

from ghil.types import COMPOSITE_SEPARATOR, ECOT_TAGS, Reasoning

__all__ = ["ReasoningParseError", "parse_reasoning", "render_reasoning", "prefix", "FROZEN_UNTIL",
           "reasoning_from_label"]

FROZEN_UNTIL = "MOVE REASONING"  # the first tag regenerated on frozen-prefix updates
_FIELDS = ("task", "plan", "visible_objects", "subtask_reasoning", "subtask", "move_reasoning", "move",
           "gripper_position")
_TAG_RE = re.compile(r"(?<![A-Z])(" + "|".join(sorted(map(re.escape, (*ECOT_TAGS, "ACTION")), key=len, reverse=True))
                     + r"):")
_BOX_RE = re.compile(r"\s*(?P<name>[^\[\],]+?)\s*\[(?P<coords>[^\]]*)\]\s*,?")
_STEP_RE = re.compile(r"(?:^|\s)\d+\.\s+")


class ReasoningParseError(ValueError):
    """The text is not a well-formed reasoning; ``problems`` lists every malformed field as "FIELD: what"."""

    def __init__(self, problems: list[str], text: str):
        self.problems = list(problems)
        self.text = text
        super().__init__("malformed reasoning: " + "; ".join(self.problems))


def _ints(text: str) -> list[int] | None:
    parts = [p.strip() for p in text.split(",")]
    try:
        return [int(p) for p in parts if p != ""] if any(parts) else []
    except ValueError:
        return None


def _plan_steps(text: str) -> list[str]:
    body = text.strip()
    if not body:
        return []
    if not re.match(r"\d+\.\s", body):
        return [body.rstrip(".").strip()]
    return [s.strip().rstrip(".").strip() for s in _STEP_RE.split(body) if s.strip()]


def parse_reasoning(text: object, image_size: tuple[int, int] | None = None,
                    subtasks: Collection[str] | None = None, require_all: bool = True) -> Reasoning:
    """The ``Reasoning`` a model wrote; ``ReasoningParseError`` naming every malformed field otherwise.

    ``image_size`` (width, height) bounds boxes and gripper pixels; ``subtasks`` (lower-cased comparison) is the known
    vocabulary SUBTASK and the PLAN steps must come from; ``require_all=False`` accepts a text that stops after any
    tag (a reasoner asked to stop early), still in order.
    """
    if not isinstance(text, str):
        raise ReasoningParseError([f"not text ({type(text).__name__})"], repr(text))
    problems: list[str] = []
    matches = list(_TAG_RE.finditer(text))
    if matches and text[:matches[0].start()].strip():
        problems.append(f"text before TASK: {text[:matches[0].start()].strip()[:40]!r}")
    values: dict[str, str] = {}
    order: list[str] = []
    for i, m in enumerate(matches):
        tag = m.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if tag == "ACTION":
            break
        if tag in values:
            problems.append(f"{tag}: appears more than once")
            continue
        values[tag] = text[m.end():end].strip()
        order.append(tag)
    expected = [t for t in ECOT_TAGS if t in values]
    if order != expected:
        problems.append(f"tags out of order: {order} (expected the order {list(ECOT_TAGS)})")
    missing = [t for t in ECOT_TAGS if t not in values]
    if require_all and missing:
        problems.append(f"missing tags {missing}")
    elif missing and values:
        last = max(ECOT_TAGS.index(t) for t in values)
        gaps = [t for t in ECOT_TAGS[:last] if t not in values]
        if gaps:
            problems.append(f"missing tags {gaps} before {ECOT_TAGS[last]}")
    if not values:
        raise ReasoningParseError(problems or ["no ECoT tags (TASK: ... SUBTASK: ...)"], text)

    width, height = image_size if image_size is not None else (None, None)
    fields: dict[str, object] = {}
    for tag, name in zip(ECOT_TAGS, _FIELDS):
        if tag not in values:
            continue
        raw = values[tag]
        if name == "plan":
            fields[name] = tuple(_plan_steps(raw))
        elif name == "visible_objects":
            boxes: dict[str, tuple[int, int, int, int]] = {}
            rest = raw
            pos = 0
            while pos < len(rest) and rest[pos:].strip():
                m = _BOX_RE.match(rest, pos)
                if m is None:
                    problems.append(f"VISIBLE OBJECTS: cannot read {rest[pos:].strip()[:40]!r} as 'name [x0, y0, x1, "
                                    "y1]'")
                    break
                pos = m.end()
                label, coords = m.group("name").strip(), _ints(m.group("coords"))
                if coords is None or len(coords) != 4:
                    problems.append(f"VISIBLE OBJECTS: {label!r} needs 4 integers, got [{m.group('coords')}]")
                    continue
                x0, y0, x1, y1 = coords
                if x0 > x1 or y0 > y1:
                    problems.append(f"VISIBLE OBJECTS: {label!r} box {coords} has x0 > x1 or y0 > y1")
                    continue
                if width is not None and not (0 <= x0 and x1 < width and 0 <= y0 and y1 < height):
                    problems.append(f"VISIBLE OBJECTS: {label!r} box {coords} is outside the {width}x{height} image")
                    continue
                if label in boxes:
                    problems.append(f"VISIBLE OBJECTS: {label!r} listed twice")
                    continue
                boxes[label] = (x0, y0, x1, y1)
            fields[name] = boxes
        elif name == "gripper_position":
            inner = raw.strip()
            if not (inner.startswith("[") and inner.endswith("]")):
                problems.append(f"GRIPPER POSITION: expected a bracketed list [x, y, ...], got {inner[:40]!r}")
                continue
            coords = _ints(inner[1:-1])
            if coords is None or not coords or len(coords) % 2:
                problems.append(f"GRIPPER POSITION: needs an even, non-zero count of integers, got {inner[:60]!r}")
                continue
            points = tuple((float(coords[i]), float(coords[i + 1])) for i in range(0, len(coords), 2))
            if width is not None:
                outside = [p for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
                if outside:
                    problems.append(f"GRIPPER POSITION: {outside} outside the {width}x{height} image")
                    continue
            fields[name] = points
        else:
            value = raw.strip()
            if name in ("task", "subtask", "move") and not value:
                problems.append(f"{tag}: empty")
            fields[name] = value.rstrip(".").strip() if name in ("task", "subtask", "move") else value
    if subtasks is not None:
        known = {s.lower().strip() for s in subtasks}
        if "subtask" in fields and fields["subtask"] and str(fields["subtask"]).lower() not in known:
            problems.append(f"SUBTASK: {fields['subtask']!r} is not a known subtask")
        unknown = [s for s in fields.get("plan", ()) if s.lower() not in known]
        if unknown:
            problems.append(f"PLAN: unknown steps {unknown}")
    if problems:
        raise ReasoningParseError(problems, text)
    if "task" not in fields:
        raise ReasoningParseError(["TASK: missing"], text)
    return Reasoning(**fields)


def render_reasoning(reasoning: Reasoning, stop_after: str | None = None) -> str:
    """The ECoT text of ``reasoning`` (``parse_reasoning`` reads it back equal); ``stop_after`` ends after a tag."""
    parts = []
    for tag, name in zip(ECOT_TAGS, _FIELDS):
        value = getattr(reasoning, name)
        if name == "plan":
            text = " ".join(f"{i}. {step}." for i, step in enumerate(value, 1))
        elif name == "visible_objects":
            text = ", ".join(f"{label} [{', '.join(str(c) for c in box)}]" for label, box in value.items())
        elif name == "gripper_position":
            text = "[" + ", ".join(str(int(round(c))) for point in value for c in point) + "]" if value else "[]"
        elif name in ("task", "subtask", "move"):
            text = f"{value}." if value else ""
        else:
            text = value
        parts.append(f"{tag}: {text}".rstrip())
        if stop_after == tag:
            break
    return " ".join(parts)


def prefix(text: str) -> str:
    """The frozen high-level prefix of a reasoning text: everything before `` MOVE REASONING:`` (ECoT's prompt
    freezing), ending with a space so the model continues with that tag; ValueError when the tag is absent."""
    m = re.search(r"(?<![A-Z])" + FROZEN_UNTIL + ":", text)
    if m is None:
        raise ValueError(f"no {FROZEN_UNTIL}: tag to freeze before")
    return text[:m.start()].rstrip() + " "


def reasoning_from_label(label: dict, instruction: str | None = None,
                         image_size: tuple[int, int] | None = None) -> Reasoning:
    """The training target of one frame's ECoT label (``ghil collect``'s ``ecot_labels/*.jsonl``, projected from
    ground truth by sim_eval/demonstrations/labels.py) as a ``Reasoning``.

    SUBTASK is the current task's instruction (the language the generator, filter and policy were trained on); the
    expert's phase ("reach above handle") and the gripper state are the SUBTASK / MOVE REASONING; PLAN is the parts
    of the TASK (a composite instruction's subtasks, in order; the play episode's later tasks were never asked for,
    so they are not in it); GRIPPER POSITION the projected future tcp pixels, clamped into ``image_size`` (width,
    height) when given (6 % of collected frames project a future position below the frame: the gripper leaving the
    view is drawn at the border, as a strictly parsed reply must be). ``instruction`` is the TASK the user gave
    (default: the current task's)."""
    try:
        task = str(label["task"]).strip()
        phase = str(label.get("subtask", "")).strip()
        gripper = str(label.get("gripper", "")).strip()
        points = label.get("future_gripper_positions") or [label["gripper_position"]]
        if image_size is not None:
            w, h = image_size
            points = [(min(max(u, 0), w - 1), min(max(v, 0), h - 1)) for u, v in points]
        given = (instruction or task).strip()
        return Reasoning(
            task=given, plan=tuple(part.strip() for part in given.split(COMPOSITE_SEPARATOR)),
            visible_objects={str(k): tuple(int(round(c)) for c in box)
                             for k, box in dict(label.get("visible_objects", {})).items()},
            subtask_reasoning=f"the current task is to {task}; its next phase is to {phase}." if phase else "",
            subtask=task,
            move_reasoning=f"to {phase} with the gripper {gripper}." if phase and gripper else "",
            move=str(label["move"]).strip(),
            gripper_position=tuple((float(round(u)), float(round(v))) for u, v in points))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not an ECoT label ({type(err).__name__}: {err}); expected the keys task, plan, subtask, "
                         "move, gripper_position, visible_objects") from None
