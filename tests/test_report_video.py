"""report.md's figures (reference curves told apart, every label inside the SVG) and rollout-video frames (words
kept apart, captions wrapped by width, the goal panel labelled, candidates with scores and the chosen one marked,
the agent's status and compact reasoning shown)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ghil.types import AgentDescription, Reasoning, Subgoal
from sim_eval.evaluation.metrics import TaskCount
from sim_eval.evaluation.report import PUBLISHED_ABC_D, per_task_svg, sr_curve_svg
from sim_eval.evaluation.video import (CHOSEN, N_CAPTION_LINES, RolloutVideo, caption_lines, compact_reasoning,
                                       draw_text, text_width)
from sim_eval.protocol.tasks import TASK_NAMES

SVG = "{http://www.w3.org/2000/svg}"


# ------------------------------------------------------------------------------------------------------ report
def _text_extents(svg: str):
    """(x0, x1, y, text) of every text element, its width estimated at 0.6 em per character (generous for
    sans-serif), placed by its text-anchor."""
    root = ET.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    out = []
    for el in root.iter(f"{SVG}text"):
        x, size, text = float(el.get("x")), float(el.get("font-size")), el.text or ""
        w = 0.6 * size * len(text)
        anchor = el.get("text-anchor", "start")
        x0 = x - w if anchor == "end" else x - w / 2 if anchor == "middle" else x
        out.append((x0, x0 + w, float(el.get("y")), text))
    return width, height, out


@pytest.mark.parametrize("label", ["expert", "oracle_subgoal_policy", "a_very_long_agent_configuration_name_indeed"])
def test_sr_curve_tells_references_apart_and_keeps_labels_inside(label):
    svg = sr_curve_svg((0.9, 0.7, 0.5, 0.3, 0.1), label)
    root = ET.fromstring(svg)
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == len(PUBLISHED_ABC_D) + 1
    strokes = [el.get("stroke") for el in lines]
    assert len(set(strokes)) == len(strokes), strokes  # one colour per curve
    dashes = [el.get("stroke-dasharray") for el in lines[:-1]]
    assert None not in dashes and len(set(dashes)) == len(dashes)  # each reference its own dash
    assert lines[-1].get("stroke-dasharray") is None and float(lines[-1].get("stroke-width")) > max(
        float(el.get("stroke-width")) for el in lines[:-1])  # this run: solid, boldest
    legend = {el.get("stroke") for el in root.findall(f"{SVG}line") if el.get("stroke") != "#dddddd"}
    assert legend == set(strokes)  # every curve has its legend sample, in its colour
    width, height, texts = _text_extents(svg)
    for x0, x1, y, text in texts:
        assert 0 <= x0 and x1 <= width and 0 < y <= height, (text, x0, x1, width)
    shown = " ".join(t for *_, t in texts)
    assert "GHIL-Glue" in shown and "400 chains" in shown  # wrapped, not cut
    if len(label) < 30:
        assert label in shown


def test_per_task_chart_keeps_labels_inside():
    svg = per_task_svg({t: TaskCount(successes=99, attempts=100) for t in TASK_NAMES})
    width, height, texts = _text_extents(svg)
    for x0, x1, y, text in texts:
        assert 0 <= x0 and x1 <= width and 0 < y <= height, (text, x0, x1, width)


# ------------------------------------------------------------------------------------------------------- video
def _blank_runs(img: Image.Image) -> list[int]:
    """Widths of the ink-free column runs between the first and last inked column."""
    ink = (np.asarray(img)[..., 0] > 80).any(axis=0)
    cols = np.flatnonzero(ink)
    runs, n = [], 0
    for inked in ink[cols[0]:cols[-1] + 1]:
        if not inked:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_drawn_words_keep_a_visible_gap():
    # Pillow's default FreeType font draws a space ~2 px wide: "to open" became "toopen" in the videos.
    text = "grasp the handle and pull to open the drawer step 6"
    img = Image.new("RGB", (420, 16))
    draw_text(ImageDraw.Draw(img), (2, 1), text)
    assert sum(run >= 4 for run in _blank_runs(img)) >= text.count(" ")
    assert text_width("to open") >= text_width("toopen") + 4


def test_caption_lines_wrap_by_width_and_never_join_words():
    instruction = "grasp the handle and pull to open the drawer, then push the blue block to the left " * 3
    header = "chain 0  subtask 1/5  step 6  open_drawer"
    reasoning = Reasoning(task="open the drawer", subtask="grasp the handle and pull", move="move left down")
    desc = AgentDescription(status="policy: 7 actions queued", reasoning=reasoning)
    lines = caption_lines([header, instruction], desc, width_px=392)
    assert len(lines) == N_CAPTION_LINES
    assert lines[0] == header  # fits: kept as it is, double spaces included
    assert all(text_width(line) <= 392 for line in lines)
    shown = " ".join(lines[1:3]).removesuffix("...").split()
    assert shown == instruction.split()[: len(shown)] or shown[:-1] == instruction.split()[: len(shown) - 1]
    assert lines[2].endswith("...")  # the rest is cut, visibly
    assert lines[3] == "policy: 7 actions queued"
    assert lines[4] == "SUBTASK: grasp the handle and pull | MOVE: move left down"
    short = caption_lines([header, "open the drawer"], AgentDescription(), width_px=392)
    assert short == [header, "open the drawer", "", "", "", ""]
    assert caption_lines(["step 6  toolong" * 10], AgentDescription(), 100)[0].endswith("...")


def test_compact_reasoning():
    assert compact_reasoning(None) == ""
    assert compact_reasoning("expert: open_drawer (1/5)") == "expert: open_drawer (1/5)"
    assert compact_reasoning(Reasoning(task="open the drawer")) == "TASK: open the drawer"
    assert compact_reasoning(Reasoning(task="t", subtask="s", move="stop")) == "SUBTASK: s | MOVE: stop"


def _subgoal(k: int, chosen: int, source: str = "susie") -> Subgoal:
    candidates = np.zeros((k, 32, 32, 3), np.uint8)
    candidates[..., 2] = 200  # blue thumbnails: no green in them
    return Subgoal(image=candidates[chosen], candidates=candidates, scores=np.linspace(0, 1, k), chosen=chosen,
                   source=source)


def _is_chosen_colour(region: np.ndarray) -> np.ndarray:
    return (np.abs(region.astype(int) - np.array(CHOSEN)) < 40).all(axis=-1)


def test_frames_label_the_goal_and_show_candidates_with_the_chosen_one_marked(tmp_path):
    camera = np.full((50, 50, 3), 100, np.uint8)
    video = RolloutVideo(tmp_path / "v.mp4", fps=5, scale=2)
    frame = video.frame(camera, ["chain 0  subtask 1/5  step 0  open_drawer", "open the drawer"],
                        AgentDescription(status="s", subgoal=_subgoal(4, chosen=2)))
    band = 14 * N_CAPTION_LINES + 4
    assert frame.shape[1] == 200  # camera and goal side by side, 2x
    goal_label = frame[band:band + 14, 100:160]
    assert (goal_label == 0).all(axis=-1).any() and (goal_label > 200).all(axis=-1).any()  # "goal: susie" box
    strip = frame[band + 100:]
    assert strip.shape[0] > 20  # the candidates strip below camera and goal
    marked = _is_chosen_colour(strip)
    cols = np.flatnonzero(marked.any(axis=0))  # thumbnails are ~49 px apart: the third spans x ~100..150
    assert marked.sum() > 50 and 95 <= cols.min() and cols.max() < 151, cols  # only the chosen one is framed
    # The layout is fixed by the first frame: later frames (other K, no goal at all) have the same size.
    assert video.frame(camera, ["h", "i"], AgentDescription(subgoal=_subgoal(6, chosen=5))).shape == frame.shape
    assert video.frame(camera, ["h", "i"], AgentDescription()).shape == frame.shape
    video.close()


def test_video_without_a_goal_is_the_camera_alone_and_is_written(tmp_path):
    import imageio.v2 as imageio

    video = RolloutVideo(tmp_path / "v.mp4", fps=5, scale=2)
    for step in range(3):
        video.add(np.full((40, 40, 3), 100, np.uint8), [f"chain 0  subtask 1/1  step {step}  x", "hold"],
                  AgentDescription(status="expert: idle"))
    video.close()
    frames = imageio.mimread(tmp_path / "v.mp4")
    assert len(frames) == 3 and frames[0].shape == (14 * N_CAPTION_LINES + 4 + 80, 80, 3)
