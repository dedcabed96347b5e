"""Installs that work anywhere: the help's examples compose, a missing optional dependency is one line naming its
extra (and leaves no folder), checkpoints resolve cwd-first then from the package, and the built wheel holds the
configs, the shipped checkpoints and the protocol data and runs from an unrelated folder."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import ghil.cli as cli
from ghil.extras import INSTALL_COMMANDS, extra_for, iter_targets
from ghil.paths import CHECKPOINT_DIR, CONFIG_DIR, PACKAGE_ROOT, resolve_checkpoint

REPO = PACKAGE_ROOT.parent
TORCH_HINT = "needs 'torch' (not installed): pip install torch==2.13.0 'ghil[learning]'"


# ------------------------------------------------------------------------------------------------ help examples
def _shown_command_lines() -> list[list[str]]:
    """Every `ghil <command> ...` line of `ghil --help` and of the cli module's docstring, as argv lists."""
    text = cli._usage() + "\n" + (cli.__doc__ or "")
    found = []
    for line in text.splitlines():
        line = line.split("#")[0].strip().strip("`")
        if line.startswith("ghil "):
            found.append(shlex.split(line)[1:])
    return found


def test_help_shows_examples_and_every_shown_override_composes():
    shown = _shown_command_lines()
    assert len(shown) >= 6 and all(shlex.split(example)[1:] in shown for example in cli.EXAMPLES)
    assert "env.camera" not in cli._usage()
    checked = 0
    for command, *overrides in shown:
        if command not in cli.COMMANDS or (command, *overrides[:1]) in cli.SUBCOMMANDS:
            continue  # `ghil eval merge ...` is plain argparse
        overrides = cli.hydra_overrides(command, overrides)  # `ghil run "open the drawer"`, `--json`
        overrides = [o for o in overrides if not o.startswith("-") and o != "job"]  # `--cfg job`
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
        for override in overrides:
            key, value = override.split("=", 1)
            value = value[1:-1] if value[:1] == "'" and value[-1:] == "'" else value  # a quoted string
            if key in cfg.hydra.runtime.choices:  # a config group choice
                assert cfg.hydra.runtime.choices[key] == value, override
            else:  # a setting: it must exist (Hydra refuses new keys) and hold the value
                assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), override
        checked += 1
    assert checked >= 6


def test_help_prints_usage(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert "env.static_size=128" in out and "ghil eval agent=oracle_subgoal_policy" in out


def _readme_commands() -> list[str]:
    block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_command_1_installs_what_the_main_job_needs_and_ci_runs_command_2():
    install, tests = _readme_commands()[:2]
    assert "torch==2.13.0" in install and '".[learning]"' in install and install.endswith('ghil run "open the drawer"')
    requested = re.findall(r"torch[=<>~!]=?\S*", install + " " + tests)
    assert set(requested) == {"torch==2.13.0"}  # only the CPU build: any other request pulls CUDA wheels
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and
          not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests]


# -------------------------------------------------------------------------------------------- optional extras
def test_optional_modules_map_to_extras_that_exist():
    extras = set(metadata.metadata("ghil").get_all("Provides-Extra") or [])
    assert set(INSTALL_COMMANDS) <= extras
    assert extra_for("torch") == extra_for("torch.nn.functional") == "learning"
    assert extra_for("rclpy") == "ros" and extra_for("hydra_plugins.hydra_joblib_launcher") == "cluster"
    assert extra_for("numpy") is None and extra_for("torchx") is None and extra_for(None) is None
    cfg = OmegaConf.create({"agent": {"_target_": "a.B", "policy": {"_target_": "c.d"}, "xs": [{"_target_": "e.F"}]},
                            "out": "${hydra:runtime.choices.agent}"})
    assert list(iter_targets(cfg)) == [("agent._target_", "a.B"), ("agent.policy._target_", "c.d"),
                                       ("agent.xs[0]._target_", "e.F")]


def _run_without_torch(cwd: Path, *argv: str, code: str = "from ghil.cli import main; main()"):
    """Run ``ghil <argv>`` (or ``code``) in a fresh interpreter where ``import torch`` fails as if not installed."""
    prelude = ("import sys\n"
               "class NoTorch:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
               "sys.meta_path.insert(0, NoTorch())\n"
               f"sys.argv[1:] = {list(argv)!r}\n")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "pybullet build time" not in line]


@pytest.mark.parametrize("agent", ["oracle_subgoal_policy", "flat_policy"])
def test_eval_without_torch_says_one_line_and_makes_no_folder(tmp_path, agent):
    proc = _run_without_torch(tmp_path, "eval", f"agent={agent}", "eval.n_chains=2")
    assert proc.returncode != 0
    assert _lines(proc.stderr) == [f"ghil eval: agent={agent} {TORCH_HINT}"], proc.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra_run


def test_train_without_torch_says_one_line_and_makes_no_folder(tmp_path):
    proc = _run_without_torch(tmp_path, "train", "data.root=nowhere")
    assert proc.returncode != 0
    assert _lines(proc.stderr) == [f"ghil train {TORCH_HINT}"], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_evaluate_run_checks_its_config_before_making_the_run_folder(tmp_path):
    """Called directly (no CLI): the command's own check names the target's key and stops before the folder."""
    code = ("from hydra import compose, initialize_config_dir; from ghil.paths import CONFIG_DIR\n"
            "from sim_eval.evaluation.evaluate import run\n"
            "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
            "    cfg = compose('eval', ['agent=oracle_subgoal_policy', 'eval.out_dir=out'])\n"
            "run(cfg)\n")
    proc = _run_without_torch(tmp_path, code=code)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr) == [f"ghil: agent._target_=ghil.runtime.policy_agent.PolicyAgent {TORCH_HINT}"], \
        proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_core_runs_without_torch(tmp_path):
    """The check fires only for what is missing: the harness with a torch-free agent runs without torch."""
    proc = _run_without_torch(tmp_path, "eval", "agent=hold", "eval.n_chains=1", "eval.ep_len=2", "eval.n_videos=0",
                              "eval.out_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").is_file()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_relative_checkpoint_paths_look_in_the_working_directory_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("checkpoints/dit_small") == CHECKPOINT_DIR / "dit_small"  # the shipped one
    (tmp_path / "checkpoints" / "dit_small").mkdir(parents=True)
    assert resolve_checkpoint("checkpoints/dit_small") == tmp_path / "checkpoints" / "dit_small"  # the local one
    assert resolve_checkpoint(tmp_path / "checkpoints" / "dit_small") == tmp_path / "checkpoints" / "dit_small"
    with pytest.raises(FileNotFoundError, match="checkpoints/dit_lang"):  # names what ships
        resolve_checkpoint("checkpoints/nothing")


def test_git_state_is_the_checkouts_and_unknown_for_an_installed_copy(tmp_path, monkeypatch):
    import ghil.paths as paths

    state = paths.git_state()
    if shutil.which("git") and (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)
    monkeypatch.setattr(paths, "PACKAGE_ROOT", tmp_path / "site-packages" / "ghil")  # no pyproject beside it
    assert paths.source_checkout() is None
    assert paths.git_state() == {"commit": "unknown", "dirty": None}


# ------------------------------------------------------------------------------------------------------ wheel
def _package_data() -> set[str]:
    """The files the wheel must hold besides modules: configs, shipped checkpoints, protocol data."""
    names = set()
    for folder in (CONFIG_DIR, CHECKPOINT_DIR, REPO / "sim_eval" / "protocol" / "data"):
        names |= {p.relative_to(REPO).as_posix() for p in folder.rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts}
    return names


def _build_backend_args() -> list[str]:
    """Build without isolation when this environment has the backend pyproject asks for (fast, offline)."""
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 70 else []  # 70.1+: bdist_wheel without the wheel package


@pytest.mark.slow
def test_the_wheel_holds_package_data_and_runs_from_any_folder(tmp_path):
    # Build from a copy, so the build's own folders (build/, *.egg-info) never land in the work tree.
    src = tmp_path / "src"
    anywhere = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache")
    top = {".venv", "outputs", "runs", "data", "multirun", "build", "dist", "logs"}  # the root's run folders only

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(anywhere(folder, names)) | (top & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, src, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_build_backend_args(), "-w",
                    str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("ghil-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_package_data() - held)
    assert not missing, f"package data missing from {wheel.name}: {missing}"
    assert {"ghil/configs/eval.yaml", "ghil/configs/hydra/launcher/slurm.yaml",
            "ghil/checkpoints/dit_small/model.safetensors", "ghil/checkpoints/dit_lang/config.json"} <= held

    # Installed (not editable) and run from an unrelated folder: configs, protocol data, shipped checkpoints.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install's finder
    code = ("import ghil, sim_eval, sys; from ghil.cli import main; from ghil.paths import git_state\n"
            "assert ghil.__file__.startswith(sys.argv[1]) and sim_eval.__file__.startswith(sys.argv[1]), ghil.__file__\n"
            "assert git_state()['commit'] == 'unknown'\n"
            "from ghil.checkpoint import load_pretrained\n"
            "print(type(load_pretrained('checkpoints/dit_small')).__name__)\n"
            "sys.argv[1:] = ['eval', 'agent=hold', 'eval.n_chains=1', 'eval.ep_len=2', 'eval.n_videos=0']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DiTPolicy" in proc.stdout
    assert list((elsewhere / "outputs" / "eval").glob("hold_playtable_standard_n1/results.json"))
