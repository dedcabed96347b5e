"""`ghil eval` on the playtable: the loop, results files, resume after a kill, workers and shards, merge, modes,
the malformed-action path and bad input.

Runs are tiny: the scripted expert on the first 3 official chains (~2 s a chain), or the hold agent with a short
EP_LEN (milliseconds a chain) where only the harness is under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from ghil.cli import CONFIG_DIR
from ghil.cli import main as ghil_main
from ghil.interfaces import AgentDescription, CalvinAgent, DescribedAgent
from sim_eval.evaluation import evaluate
from sim_eval.evaluation.agents import ExpertAgent, FaultyAgent, HoldAgent
from sim_eval.evaluation.evaluate import ConfigMismatchError, EvaluationError, MergeError, merge
from sim_eval.protocol.instructions import InstructionIndex, UnknownInstructionError, compose_instructions
from sim_eval.evaluation.records import FAILURE_INVALID_ACTION, ChainRecord
from sim_eval.protocol.tasks import eval_instruction, heldout_phrasings

REPO = Path(__file__).resolve().parents[1]
N_EXPERT_CHAINS = 3
FAST = ["agent=hold", "eval.ep_len=6", "eval.n_videos=0"]  # harness-only runs: ~10 ms a chain


def make_cfg(out_dir, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"eval.out_dir={out_dir}", *overrides])


def run(out_dir, *overrides: str) -> evaluate.EvalResult:
    return evaluate.run(make_cfg(out_dir, *overrides))


def outcomes(records) -> list[dict]:
    return [r.outcome() for r in sorted(records, key=lambda r: r.chain_index)]


def read_jsonl(path: Path) -> list[ChainRecord]:
    return [ChainRecord.from_json(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The expert on the first 3 official chains, one worker, one process: the result every other way of
    running the same evaluation must reproduce."""
    return run(tmp_path_factory.mktemp("ref"), f"eval.n_chains={N_EXPERT_CHAINS}", "eval.n_videos=0")


# ------------------------------------------------------------------------------------------------ the loop
def test_reference_run_follows_the_protocol_and_writes_results(reference):
    assert reference.complete and [r.chain_index for r in reference.records] == [0, 1, 2]
    for rec in reference.records:
        assert all(sub.instruction == eval_instruction(sub.task) for sub in rec.subtasks)
        assert all(0 < sub.n_steps <= 360 for sub in rec.subtasks)
    # The expert solves most subtasks: a harness that never reported success would fail here.
    assert reference.metrics.avg_len >= 1.0
    results = json.loads((reference.run_dir / "results.json").read_text())
    assert results["protocol"]["ep_len"] == 360 and results["protocol"]["mode"] == "standard"
    assert results["protocol"]["chains"].startswith("official[0:3]")
    assert results["metrics"]["avg_len"] == pytest.approx(sum(results["metrics"]["sr"].values()))
    assert results["config"]["agent"]["_target_"] == "sim_eval.evaluation.agents.ExpertAgent"
    assert results["git"]["commit"] and results["ghil_version"] and results["seeds"]["base"] == 0
    assert results["warnings"] == [] and len(results["chains"]) == 3
    report = (reference.run_dir / "report.md").read_text()
    assert "| N | SR@1" in report and f"**{reference.metrics.avg_len:.3f}**" in report
    for svg in ("per_task.svg", "sr_curve.svg"):
        ET.parse(reference.run_dir / svg)  # well-formed
    assert json.loads((reference.run_dir / "status.json").read_text())["state"] == "complete"


def test_workers_and_shards_reproduce_the_single_run_and_merge_equals_it(reference, tmp_path):
    base = tmp_path / "sharded"
    common = [f"eval.n_chains={N_EXPERT_CHAINS}", "eval.n_videos=0", "eval.n_shards=2"]
    shard0 = run(base, *common, "eval.shard=0", "eval.workers=2")  # chains 0 and 2 in two spawned workers
    shard1 = run(base, *common, "eval.shard=1")  # chain 1 in-process
    assert [r.chain_index for r in shard0.records] == [0, 2] and [r.chain_index for r in shard1.records] == [1]
    merged = merge([base], tmp_path / "merged")
    assert merged.complete
    assert outcomes(merged.records) == outcomes(reference.records)
    assert merged.metrics == reference.metrics
    ref_results = json.loads((reference.run_dir / "results.json").read_text())
    assert merged.results["metrics"] == ref_results["metrics"]
    assert merged.results["fingerprint"] == ref_results["fingerprint"]
    assert [s["shard"] for s in merged.results["merged_from"]] == [0, 1]


def test_resume_after_kill_neither_loses_nor_double_counts(reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from ghil.cli import main; main()", "eval", f"eval.out_dir={out}",
           f"eval.n_chains={N_EXPERT_CHAINS}", "eval.n_videos=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    chains_file = out / "chains.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if chains_file.exists() and chains_file.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = chains_file.read_bytes().count(b"\n")
    assert 1 <= n_before < N_EXPERT_CHAINS, "the kill should land mid-run"
    assert (out / ".lock").exists()  # left behind by the killed run; resuming on this host takes it over
    with open(chains_file, "ab") as f:  # a record torn by the kill
        f.write(b'{"chain_index": 1, "initial_sta')
    resumed = run(out, f"eval.n_chains={N_EXPERT_CHAINS}", "eval.n_videos=0")
    lines = read_jsonl(chains_file)
    assert sorted(r.chain_index for r in lines) == [0, 1, 2]  # each chain exactly once
    assert resumed.results["timing"]["n_chains_run"] == N_EXPERT_CHAINS - n_before
    assert outcomes(resumed.records) == outcomes(reference.records)
    assert resumed.metrics == reference.metrics
    # Running again on a finished folder recomputes the results and runs nothing.
    again = run(out, f"eval.n_chains={N_EXPERT_CHAINS}", "eval.n_videos=0", "eval.workers=2")
    assert again.results["timing"]["n_chains_run"] == 0 and again.metrics == reference.metrics


def test_resume_refuses_a_different_configuration(tmp_path):
    run(tmp_path, *FAST, "eval.n_chains=2")
    with pytest.raises(ConfigMismatchError, match=r"eval\.seed: 0 -> 1") as err:
        run(tmp_path, *FAST, "eval.n_chains=2", "eval.seed=1")
    assert "eval.overwrite=true" in str(err.value)
    with pytest.raises(ConfigMismatchError, match="agent._target_"):
        run(tmp_path, "eval.ep_len=6", "eval.n_videos=0", "eval.n_chains=2")
    # Settings that do not change results may differ; overwrite starts over.
    run(tmp_path, *FAST, "eval.n_chains=2", "eval.workers=2", "eval.n_videos=1")
    fresh = run(tmp_path, *FAST, "eval.n_chains=2", "eval.seed=1", "eval.overwrite=true")
    assert {r.seed for r in fresh.records} != {r.seed for r in run(tmp_path / "s0", *FAST, "eval.n_chains=2").records}


def test_chain_seeds_do_not_depend_on_scheduling(tmp_path):
    a = run(tmp_path / "a", *FAST, "eval.n_chains=4")
    b = run(tmp_path / "b", *FAST, "eval.n_chains=4", "eval.chain_start=2", "eval.n_chains=2")
    assert [r.seed for r in a.records][2:] == [r.seed for r in b.records]
    assert len({r.seed for r in a.records}) == 4


# ------------------------------------------------------------------------------------------------ error paths
@pytest.mark.parametrize("fault, message", [
    ("non_finite", "non-finite"), ("wrong_length", "must have 7 values"), ("bad_gripper", "exactly -1")])
def test_malformed_action_fails_the_subtask_with_the_reason(tmp_path, fault, message):
    res = run(tmp_path, "agent=faulty", "agent.inner._target_=sim_eval.evaluation.agents.HoldAgent", f"agent.fault={fault}",
              "agent.at_reset=1", "agent.at_step=2", "eval.ep_len=6", "eval.n_videos=0", "eval.n_chains=2")
    first, second = res.records
    assert first.subtasks[-1].failure == "timeout"  # reset 0: chain 0's first subtask, no fault
    sub = second.subtasks[-1]  # reset 1: chain 1's first subtask, the fault at its step 2
    assert sub.failure == FAILURE_INVALID_ACTION and sub.n_steps == 2 and message in sub.detail
    assert res.complete and res.metrics.failure_reasons == {"invalid_action": 1, "timeout": 1}
    assert "invalid_action 1" in (res.run_dir / "report.md").read_text().replace("(", "").replace(")", "")


def test_malformed_action_after_a_success_keeps_the_success(tmp_path):
    res = run(tmp_path, "agent=faulty", "agent.fault=non_finite", "agent.at_reset=1", "agent.at_step=0",
              "eval.n_chains=1", "eval.n_videos=0")
    (rec,) = res.records
    if not rec.subtasks[0].success:
        pytest.skip("the expert currently fails chain 0's first subtask")
    assert rec.n_completed == 1 and rec.subtasks[1].failure == FAILURE_INVALID_ACTION


def test_agent_exception_fails_the_run_keeps_finished_chains_and_resumes(tmp_path):
    crash = ["agent=faulty", "agent.inner._target_=sim_eval.evaluation.agents.HoldAgent", "agent.fault=raise",
             "agent.at_reset=1", "eval.ep_len=6", "eval.n_videos=0", "eval.n_chains=3", "eval.agent_errors=raise"]
    with pytest.raises(EvaluationError, match="chain 1 failed.*AgentFault"):
        run(tmp_path, *crash)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "AgentFault" in status["error"]
    assert [r.chain_index for r in read_jsonl(tmp_path / "chains.jsonl")] == [0]
    assert not (tmp_path / ".lock").exists()
    # The same config resumes where it stopped; the agent's reset counter restarts, so chain 2 now crashes...
    with pytest.raises(EvaluationError, match="chain 2 failed"):
        run(tmp_path, *crash)
    done = run(tmp_path, *crash)  # ...and the third session finishes chain 2 alone.
    assert done.complete and [r.chain_index for r in read_jsonl(tmp_path / "chains.jsonl")] == [0, 1, 2]
    assert done.results["timing"]["n_chains_run"] == 1
    with pytest.raises(EvaluationError, match="(?s)failed in a worker process.*AgentFault"):
        run(tmp_path / "w2", *crash, "eval.workers=2", "agent.at_reset=0")


def test_agent_exception_is_recorded_by_default(tmp_path):
    res = run(tmp_path, "agent=faulty", "agent.inner._target_=sim_eval.evaluation.agents.HoldAgent", "agent.fault=raise",
              "agent.at_reset=1", "agent.at_step=3", "eval.ep_len=6", "eval.n_videos=0", "eval.n_chains=3")
    assert res.complete and [r.n_completed for r in res.records] == [0, 0, 0]
    sub = res.records[1].subtasks[-1]
    assert sub.failure == "agent_error" and sub.n_steps == 3 and sub.detail.startswith("AgentFault: injected")
    assert res.metrics.failure_reasons == {"agent_error": 1, "timeout": 2}
    assert any("raised an exception" in w for w in res.results["warnings"])


@pytest.mark.parametrize("override, message", [
    ("eval.agent_errors=ignore", "'record' or 'raise'"),
    ("eval.n_chains=0", "outside the official 1000"),
    ("eval.n_chains=1001", "outside the official 1000"),
    ("eval.chain_start=990", "outside the official 1000"),  # 990 + 100 > 1000
    ("eval.chain_start=-1", "outside the official 1000"),
    ("eval.mode=shuffled", "unknown eval.mode 'shuffled'"),
    ("eval.workers=0", "workers must be >= 1"),
    ("eval.threads=0", "threads must be null or an integer >= 1"),
    ("eval.shard=2", "0 <= eval.shard < n_shards"),
    ("+eval.n_chain=5", "unknown eval settings"),
    ("agent._target_=collections.OrderedDict", "neither a CalvinAgent"),
])
def test_bad_settings_are_clear_errors(tmp_path, override, message):
    with pytest.raises(EvaluationError, match=message):
        run(tmp_path, "eval.n_videos=0", override)


@pytest.mark.parametrize("override, group", [("agent=nope", "agent"), ("env=mujoco", "env")])
def test_unknown_agent_or_env_names_list_the_options(tmp_path, override, group):
    with pytest.raises(HydraException, match=f"Could not find '{group}/") as err:
        make_cfg(tmp_path, override)
    assert ("expert" if group == "agent" else "playtable") in str(err.value)


def test_ep_len_change_is_loudly_flagged(tmp_path, caplog):
    res = run(tmp_path, *FAST, "eval.n_chains=1")
    assert any("NOT THE CALVIN PROTOCOL" in w for w in res.results["warnings"])
    assert "NOT THE CALVIN PROTOCOL" in caplog.text
    assert "**Warning:** NOT THE CALVIN PROTOCOL" in (tmp_path / "report.md").read_text()
    assert res.results["protocol"]["standard_ep_len"] is False


# ------------------------------------------------------------------------------------------------ merge
def test_merge_refuses_mismatched_overlapping_missing_and_unfinished_shards(tmp_path):
    common = [*FAST, "eval.n_chains=4", "eval.n_shards=2"]
    run(tmp_path / "a", *common, "eval.shard=0")
    run(tmp_path / "a", *common, "eval.shard=1")
    run(tmp_path / "b", *common, "eval.shard=1", "eval.seed=7")
    run(tmp_path / "c", *common, "eval.shard=0")
    shard = "shard_001-of-002"
    with pytest.raises(MergeError, match="different evaluations.*eval.seed"):
        merge([tmp_path / "a" / "shard_000-of-002", tmp_path / "b" / shard], tmp_path / "m")
    with pytest.raises(MergeError, match="shard 0 given twice"):
        merge([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    with pytest.raises(MergeError, match="shard 1 of 2 is missing"):
        merge([tmp_path / "a" / "shard_000-of-002"], tmp_path / "m")
    # A shard killed after one of its two chains: reported, not silently dropped.
    lines = (tmp_path / "a" / shard / "chains.jsonl").read_text().splitlines()
    (tmp_path / "a" / shard / "chains.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(MergeError, match="shard 1 .* unfinished: 1 of 2 chains"):
        merge([tmp_path / "a"], tmp_path / "m")
    partial = merge([tmp_path / "a"], tmp_path / "m", allow_partial=True)
    assert not partial.complete and partial.results["missing_chains"] == [3] and partial.metrics.n_chains == 3
    assert "INCOMPLETE" in (tmp_path / "m" / "report.md").read_text()


def test_merge_cli(tmp_path, capsys):
    common = [*FAST, "eval.n_chains=2", "eval.n_shards=2"]
    run(tmp_path / "s", *common, "eval.shard=0")
    run(tmp_path / "s", *common, "eval.shard=1")
    ghil_main(["eval", "merge", str(tmp_path / "s"), f"out={tmp_path / 'm'}"])
    assert json.loads((tmp_path / "m" / "results.json").read_text())["complete"] is True
    with pytest.raises(SystemExit, match="shard 1 of 2 is missing"):
        ghil_main(["eval", "merge", str(tmp_path / "s" / "shard_000-of-002"), f"out={tmp_path / 'm2'}"])
    ghil_main(["--help"])
    assert "eval merge" in capsys.readouterr().out


def test_joblib_multirun_shards_merge_to_the_single_run(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    common = [*FAST, "eval.n_chains=4"]
    single = run(tmp_path / "single", *common)
    cmd = [sys.executable, "-c", "from ghil.cli import main; main()", "eval", "-m", "eval.shard=0,1",
           "eval.n_shards=2", f"eval.out_dir={tmp_path / 'multi'}", *common, "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=120)
    merged = merge([tmp_path / "multi"], tmp_path / "merged")
    assert merged.complete and outcomes(merged.records) == outcomes(single.records)


def test_multirun_with_the_default_out_dir(tmp_path):
    """`ghil eval -m ...` without eval.out_dir: Hydra resolves its sweep folder before any job exists, so it must
    not depend on the job's config choices (it failed with "HydraConfig was not set")."""
    cmd = [sys.executable, "-c", "from ghil.cli import main; main()", "eval", "-m", "eval.shard=0,1",
           "eval.n_shards=2", *FAST, "eval.n_chains=2", "eval.step_timeout_s=null"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = merge([tmp_path / "outputs" / "eval" / "hold_playtable_standard_n2"], tmp_path / "merged")
    assert merged.complete and sorted(r.chain_index for r in merged.records) == [0, 1]


# ------------------------------------------------------------------------------------------------ modes
def test_heldout_phrasings_mode_uses_unseen_wording_deterministically(tmp_path):
    res = run(tmp_path / "a", *FAST, "eval.n_chains=3", "eval.mode=heldout_phrasings")
    again = run(tmp_path / "b", *FAST, "eval.n_chains=3", "eval.mode=heldout_phrasings")
    for rec in res.records:
        for sub in rec.subtasks:
            assert sub.instruction in heldout_phrasings(sub.task)
    assert outcomes(res.records) == outcomes(again.records)
    assert any("heldout_phrasings" in w for w in res.results["warnings"])


def test_long_horizon_mode_gives_one_composite_instruction(reference, tmp_path):
    res = run(tmp_path, "eval.mode=long_horizon", "eval.n_chains=1", "eval.n_videos=0")
    (rec,) = res.records
    composite = compose_instructions([eval_instruction(t) for t in rec.tasks])
    assert all(sub.instruction == composite for sub in rec.subtasks)
    # Subtask 1 starts from the same state with the same plan as in the standard mode.
    assert rec.subtasks[0].success == reference.records[0].subtasks[0].success


# ------------------------------------------------------------------------------------------------ agents, videos
def test_agents_satisfy_the_interface():
    assert isinstance(ExpertAgent(), DescribedAgent) and isinstance(HoldAgent(), CalvinAgent)
    assert isinstance(FaultyAgent(HoldAgent()), CalvinAgent)
    assert not isinstance(object(), CalvinAgent)
    # A CALVIN-style agent's free-text reasoning is shown as its status; an image becomes the Subgoal in force.
    coerced = AgentDescription.coerce({"reasoning": "r", "subgoal": np.zeros((4, 4, 3), np.uint8)})
    assert coerced.status == "r" and coerced.reasoning is None and coerced.goal_image.shape == (4, 4, 3)
    with pytest.raises(ValueError, match="unknown keys"):
        AgentDescription.coerce({"thoughts": "r"})


def test_expert_agent_maps_phrasings_and_splits_composite_instructions():
    index = InstructionIndex()
    assert index.task_for("  Pull the handle to open the drawer. ") == "open_drawer"
    assert index.task_for(heldout_phrasings("turn_on_led")[0]) == "turn_on_led"
    text = compose_instructions([eval_instruction("open_drawer"), eval_instruction("turn_on_led")])
    assert index.tasks_for(text) == ["open_drawer", "turn_on_led"]
    with pytest.raises(UnknownInstructionError, match="closest known phrasings"):
        index.task_for("pull the handle to open the drawers now")
    from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs

    robot_obs, scene_obs = state_to_obs(enumerate_symbolic_states()[0])
    agent = ExpertAgent()
    agent.reset()
    action = agent.step({"robot_obs": robot_obs, "scene_obs": scene_obs}, text)
    assert action.shape == (7,) and abs(action[6]) == 1
    assert "open_drawer (1/2)" in agent.describe().status
    with pytest.raises(UnknownInstructionError):
        agent.step({"robot_obs": robot_obs, "scene_obs": scene_obs}, "dance")


class _SubgoalAgent:
    """A describing agent with a subgoal image, for the video layout."""

    def reset(self) -> None:
        pass

    def step(self, obs, instruction):
        return np.array([0, 0, 0, 0, 0, 0, 1.0])

    def describe(self):
        return {"reasoning": "I should hold still " * 20, "subgoal": np.zeros((32, 32, 3))}


def test_videos_show_the_static_camera_and_the_subgoal(tmp_path):
    import imageio.v2 as imageio

    res = run(tmp_path, *FAST, "eval.n_chains=2", "eval.n_videos=1")
    assert res.results["videos"] == ["videos/chain_0000.mp4"]
    frames = imageio.mimread(tmp_path / "videos" / "chain_0000.mp4")
    assert len(frames) == 6 and frames[0].shape[1] == 400  # ep_len frames, static camera at 2x
    sub = run(tmp_path / "sub", "agent._target_=test_evaluate._SubgoalAgent", "eval.ep_len=3",
              "eval.n_videos=1", "eval.n_chains=1")
    frames = imageio.mimread(sub.run_dir / "videos" / "chain_0000.mp4")
    assert frames[0].shape[1] == 800  # camera and subgoal side by side


@pytest.mark.parametrize("agent", ["expert", "hold", "faulty"])
@pytest.mark.parametrize("env", ["playtable", "calvin"])
def test_every_agent_and_env_option_composes_and_imports(tmp_path, agent, env):
    from hydra.utils import get_class

    cfg = make_cfg(tmp_path, f"agent={agent}", f"env={env}")
    get_class(cfg.agent._target_)
    get_class(cfg.env._target_)  # the calvin bridge imports without calvin_env (it loads it lazily)
    evaluate.EvalSettings.from_config(cfg.eval)


def test_fresh_env_per_chain_rebuilds_the_env_and_is_fingerprinted(tmp_path, monkeypatch):
    built = []
    original = evaluate.ChainRunner.__init__

    def counting_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        make = self._make_env
        self._make_env = lambda: built.append(1) or make()

    monkeypatch.setattr(evaluate.ChainRunner, "__init__", counting_init)
    # In this process (no watchdog), where the patched runner counts; the watchdog runs chains in worker processes.
    fresh = run(tmp_path / "fresh", *FAST, "eval.n_chains=3", "eval.fresh_env_per_chain=true",
                "eval.step_timeout_s=null")
    assert len(built) == 2  # chains 1 and 2 get a new env; chain 0 uses the one built at start
    kept = run(tmp_path / "kept", *FAST, "eval.n_chains=3")
    assert outcomes(fresh.records) == outcomes(kept.records)  # the playtable resets history-free anyway
    assert fresh.results["fingerprint"] != kept.results["fingerprint"]


def test_user_phrasings_replace_the_wording_with_a_seeded_choice_and_are_recorded(tmp_path):
    import yaml

    from sim_eval.protocol.chains import load_official_chains

    first_tasks = {tasks[0] for _, tasks in load_official_chains()[:3]}
    table = {task: [f"please {task.replace('_', ' ')}", f"could you {task.replace('_', ' ')} now"]
             for task in sorted(first_tasks)}
    file = tmp_path / "mine.yaml"
    file.write_text(yaml.safe_dump(table))
    res = run(tmp_path / "a", *FAST, "eval.n_chains=3", f"eval.phrasings={file}")
    again = run(tmp_path / "b", *FAST, "eval.n_chains=3", f"eval.phrasings={file}", "eval.workers=2")
    for rec in res.records:
        for sub in rec.subtasks:
            expected = table.get(sub.task)
            assert sub.instruction in expected if expected else sub.instruction == eval_instruction(sub.task)
    assert outcomes(res.records) == outcomes(again.records)  # the choice depends on the chain's seed only
    recorded = res.results["protocol"]["phrasings"]
    assert recorded["table"] == table and recorded["file"] == str(file) and len(recorded["sha256"]) == 64
    assert any("eval.phrasings" in w for w in res.results["warnings"])
    # Resuming with other phrasings is refused (they change the chain records).
    table[sorted(table)[0]] = ["something else entirely"]
    file.write_text(yaml.safe_dump(table))
    with pytest.raises(evaluate.EvaluationError):
        run(tmp_path / "a", *FAST, "eval.n_chains=3", f"eval.phrasings={file}")


@pytest.mark.parametrize("content, problem", [
    (None, "no file"), ("[1, 2]", "must map task names"), ("open_the_fridge: [x]", "unknown CALVIN task"),
    ("open_drawer: []", "non-empty list"), ("open_drawer: ['']", "empty or non-text"),
    ("open_drawer: [" + "x" * 600 + "]", "longer than 512"), ("open_drawer: ['a, then b']", "contains"),
    ("open_drawer: [1: 2", "not readable YAML"),
])
def test_bad_phrasings_files_are_refused_before_anything_runs(tmp_path, content, problem):
    file = tmp_path / "p.yaml"
    if content is not None:
        file.write_text(content)
    with pytest.raises(evaluate.EvaluationError, match=problem):
        run(tmp_path / "out", *FAST, "eval.n_chains=1", f"eval.phrasings={file}")
    assert not (tmp_path / "out").exists()
