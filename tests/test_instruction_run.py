"""`ghil run "<instruction>"`: one rollout, its video and verdict; the positional instruction; bad input."""

from __future__ import annotations

import json

import imageio.v2 as imageio
import pytest
from hydra import compose, initialize_config_dir

from ghil import cli
from ghil.cli import CONFIG_DIR
from sim_eval.evaluation.instruction_run import choose_start, run
from sim_eval.protocol.instructions import UnknownInstructionError

SMALL = ["env.static_size=64", "env.gripper_size=32", "agent=expert"]


def _run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[*SMALL, f"run.out_dir={tmp_path}", *overrides])
    return run(cfg)


def test_the_expert_opens_the_drawer_with_a_video_and_a_verdict(tmp_path):
    verdict = _run(tmp_path, "run.instruction='open the drawer'")
    assert verdict["success"] and verdict["tasks"] == ["open_drawer"]
    on_disk = json.loads((tmp_path / "verdict.json").read_text())
    assert on_disk["subtasks"][0]["success"] and on_disk["subtasks"][0]["steps"] == verdict["subtasks"][0]["steps"]
    assert on_disk["initial_state"]["chain"] == choose_start(["open_drawer"], None)[0]
    frames = imageio.mimread(tmp_path / "rollout.mp4")
    assert len(frames) == verdict["subtasks"][0]["steps"]


def test_a_composite_instruction_runs_its_subtasks_in_order(tmp_path):
    verdict = _run(tmp_path, "run.instruction='open the drawer, then turn on the led'", "run.video=false")
    assert [s["task"] for s in verdict["subtasks"]] == ["open_drawer", "turn_on_led"]
    assert verdict["success"]


def test_a_budget_too_short_is_a_failure_not_an_error(tmp_path):
    verdict = _run(tmp_path, "run.instruction='open the drawer'", "run.ep_len=3", "run.video=false")
    assert not verdict["success"] and verdict["subtasks"][0]["failure"] == "timeout"


@pytest.mark.parametrize("instruction, error", [("''", ValueError), ("'open the drawr please now'", UnknownInstructionError),
                                                ("'" + "x" * 400 + "'", ValueError)])
def test_bad_instructions_are_refused_before_anything_is_written(tmp_path, instruction, error):
    out = tmp_path / "never"
    with pytest.raises(error):
        _run(out, f"run.instruction={instruction}")
    assert not out.exists()


def test_an_initial_state_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="run.initial_state"):
        _run(tmp_path / "x", "run.instruction='open the drawer'", "run.initial_state=5000")


def test_the_first_bare_argument_is_the_instruction(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_load", lambda target, command: (lambda cfg: seen.update(cfg=cfg)))
    monkeypatch.setattr(cli, "_check_extras_first", lambda command, overrides: None)
    monkeypatch.setattr("sys.argv", ["ghil"])
    cli.main(["run", "push the blue block's left side", "agent=expert", "run.video=false"])
    assert seen["cfg"].run.instruction == "push the blue block's left side"
