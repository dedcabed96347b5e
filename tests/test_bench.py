"""`ghil bench`: per-stage percentiles from the methods of the built agent, actions/s, the --json object."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from ghil import cli
from ghil.cli import CONFIG_DIR
from policies.dit import DiTPolicy
from policies.shortcut import ShortcutConfig
from sim_eval.evaluation.bench import StageTimer, run
from tests._policy_fixtures import fake_stats, tiny_config


def _bench(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["env.static_size=32", "env.gripper_size=32", "bench.n_steps=12",
                                          "bench.warmup_steps=2", *overrides])
    return run(cfg)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    policy.fit_normalizer(fake_stats())
    return policy.save_pretrained(tmp_path_factory.mktemp("bench") / "tiny")


def test_the_hierarchys_stages_are_timed_and_json_has_the_promised_keys(tiny_policy, capsys):
    figures = _bench("agent=oracle_subgoal_policy", f"agent.policy.path={tiny_policy}", "bench.json=true")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(figures))
    assert {"p50", "p95"} <= set(printed["replan_ms"]) and printed["actions_per_s"] > 0
    # exec_len 2 over 12 timed steps: 6 chunks, each one encoder pass inside one policy call and one replan
    assert printed["policy_ms"]["n"] == printed["encoder_ms"]["n"] == printed["replan_ms"]["n"] == 6
    assert printed["policy_ms"]["p50"] >= printed["encoder_ms"]["p50"] and "sampler_ms" in printed
    assert printed["step_ms"]["n"] == 12
    assert set(printed["setup"]["stages_timed"]) == {"encoder", "policy", "replan"}  # no generator, filter here


def test_an_agent_without_stages_reports_steps_only():
    figures = _bench("agent=expert")
    assert figures["setup"]["stages_timed"] == [] and figures["step_ms"]["n"] == 12 and figures["replans"] == 0


def test_stage_timer_wraps_instances_not_classes():
    class Stage:
        def go(self, x):
            return x + 1

    a, b = Stage(), Stage()
    timer = StageTimer()
    assert timer.wrap(a, "go", "go") and not timer.wrap(a, "missing.go", "x") and not timer.wrap(a, "nope", "y")
    assert a.go(1) == 2 and b.go(1) == 2
    assert len(timer.seconds["go"]) == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="bench.n_steps"):
        _bench("agent=expert", "bench.n_steps=0")


def test_json_flag_is_an_override(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_load", lambda target, command: (lambda cfg: seen.update(cfg=cfg)))
    monkeypatch.setattr(cli, "_check_extras_first", lambda command, overrides: None)
    monkeypatch.setattr("sys.argv", ["ghil"])
    cli.main(["bench", "agent=expert", "--json"])
    assert seen["cfg"].bench.json is True
